"""Delivery services: scheduling on finalization (one pending push per enabled endpoint,
idempotent, clinic notified), the lease on due pushes, backoff and the failing mark,
portal fetches (first fetch sets delivered_at once), acknowledgement, scoping."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from rdc_core.db import session_scope, utcnow
from rdc_core.errors import NotFoundError, PermissionDeniedError
from tests.worklist.conftest import Reading
from worklist.claims import claim_item
from worklist.critical_values.models import Notification
from worklist.delivery.models import DeliveryState, ReportDelivery
from worklist.delivery.portal import (
    acknowledge_report,
    fetch_report_artifact,
    fetch_report_fhir,
    list_reports,
)
from worklist.delivery.schemas import EndpointIn
from worklist.delivery.service import (
    FAILING_AFTER,
    LeaseLostError,
    add_endpoint,
    backoff_seconds,
    claim_due_deliveries,
    prepare_push,
    record_attempt,
    schedule_report_delivery,
    set_endpoint_enabled,
)
from worklist.directory import add_user, principal_for_user
from worklist.models import AmendmentKind, Exam, Report, Role, User
from worklist.reports import amend_report, save_draft, submit_report
from worklist.schemas import ReportAmendIn, ReportIn
from worklist.signing.service import get_signed_artifact

STUDY = "1.2.9.1"
GOOD = ReportIn(
    findings="两肺纹理清晰。Lungs clear.",
    impression="未见异常。Normal.",
    quality_grade="甲",  # type: ignore[arg-type]
)


def finalize(reading: Reading, study: str = STUDY, who: str = "attending") -> str:
    """Claim, write and sign ``study`` as ``who``; returns the final report's ID."""
    principal = reading.people[who]
    with session_scope() as session:
        claim_item(
            session,
            principal=principal,
            item_id=reading.items[study],
            now=utcnow(),
            lease_seconds=600,
        )
    with session_scope() as session:
        save_draft(
            session, principal=principal, exam_id=reading.exams[study], data=GOOD, now=utcnow()
        )
    with session_scope() as session:
        report = submit_report(
            session, principal=principal, exam_id=reading.exams[study], now=utcnow()
        )
    assert report.status == "final"
    return report.id


def amend(reading: Reading, report_id: str, impression: str) -> str:
    """A corrected version of ``report_id`` by the chief; returns its ID."""
    with session_scope() as session:
        return amend_report(
            session,
            principal=reading.people["chief"],
            report_id=report_id,
            data=ReportAmendIn(
                kind=AmendmentKind.CORRECTED,
                reason="左右写反 / sides swapped",
                impression=impression,
            ),
            now=utcnow(),
        ).id


def add_clinic_endpoint(clinic: str = "C1", **fields: object) -> str:
    """Add a push-back endpoint through the service (as the CLI does); returns its ID."""
    values: dict[str, object] = {"clinic": clinic, "host": "127.0.0.1", "port": 1, **fields}
    values.setdefault("channel", "dicom")
    if values["channel"] == "dicom":
        values.setdefault("ae_title", "CLINIC_PACS")
    with session_scope() as session:
        return add_endpoint(
            session, principal=None, data=EndpointIn.model_validate(values), now=utcnow()
        ).id


def clinic_user(reading: Reading, username: str, clinic: str) -> None:
    with session_scope() as session:
        add_user(
            session, username=username, password="pw-123456", role=Role.CLINICIAN, org_code=clinic
        )
        user = session.execute(select(User).where(User.username == username)).scalar_one()
        reading.people[username] = principal_for_user(user)


def _deliveries(report_id: str) -> list[ReportDelivery]:
    with session_scope() as session:
        return list(
            session.execute(
                select(ReportDelivery)
                .where(ReportDelivery.report_id == report_id)
                .order_by(ReportDelivery.channel)
            ).scalars()
        )


def test_finalization_schedules_one_push_per_enabled_endpoint(reading: Reading) -> None:
    add_clinic_endpoint(ae_title="PACS_A")
    add_clinic_endpoint(channel="hl7", receiving_application="HIS", receiving_facility="C1")
    off = add_clinic_endpoint(ae_title="OLD_PACS")
    add_clinic_endpoint(clinic="C2", ae_title="OTHER")
    with session_scope() as session:
        set_endpoint_enabled(session, principal=None, endpoint=off, enabled=False, now=utcnow())

    report_id = finalize(reading)
    pushes = _deliveries(report_id)
    assert sorted(d.channel.value for d in pushes) == ["dicom", "hl7"]
    assert {d.state for d in pushes} == {DeliveryState.PENDING}
    assert all(d.endpoint_id != off for d in pushes)

    with session_scope() as session:  # a second run (a retried hook) queues nothing new
        report = session.get(Report, report_id)
        assert report is not None
        exam = session.get(Exam, report.exam_id)
        assert exam is not None
        schedule_report_delivery(session, report=report, exam=exam, now=utcnow())
    assert len(_deliveries(report_id)) == 2

    with session_scope() as session:
        notes = session.execute(
            select(Notification).where(
                Notification.kind == "report_version", Notification.subject_id == report_id
            )
        ).scalars()
        notes = list(notes)
    assert len(notes) == 1 and notes[0].text_zh and "version 1" in notes[0].text_en

    second = amend(reading, report_id, "右肺结节。Nodule, right lung.")
    assert len(_deliveries(second)) == 2  # the new version is pushed too
    with session_scope() as session:
        text = session.execute(
            select(Notification.text_en).where(
                Notification.kind == "report_version", Notification.subject_id == second
            )
        ).scalar_one()
    assert "replaces version 1" in text and "corrected" in text

    # versions reach each endpoint in order: version 2 waits for version 1
    v1 = {d.id for d in _deliveries(report_id)}
    now = utcnow()
    with session_scope() as session:
        claimed = claim_due_deliveries(session, now=now, worker="w", lease_seconds=60)
    assert set(claimed) == v1
    for delivery_id in claimed:
        with session_scope() as session:
            record_attempt(
                session,
                delivery_id=delivery_id,
                worker="w",
                now=now,
                error=None,
                detail={},
                max_backoff=60,
            )
    with session_scope() as session:
        claimed = claim_due_deliveries(session, now=now, worker="w", lease_seconds=60)
    assert set(claimed) == {d.id for d in _deliveries(second)}


def test_a_due_push_is_leased_then_backs_off_and_is_retried(reading: Reading) -> None:
    add_clinic_endpoint()
    report_id = finalize(reading)
    now = utcnow()
    with session_scope() as session:
        first = claim_due_deliveries(session, now=now, worker="w1", lease_seconds=60)
    with session_scope() as session:
        second = claim_due_deliveries(session, now=now, worker="w2", lease_seconds=60)
    assert len(first) == 1 and second == []
    with session_scope() as session:  # the lease expired: another worker may take it
        third = claim_due_deliveries(
            session, now=now + timedelta(seconds=61), worker="w2", lease_seconds=60
        )
    assert third == first
    assert _deliveries(report_id)[0].lease_owner == "w2"
    with session_scope() as session, pytest.raises(LeaseLostError):  # w1 must not send
        prepare_push(session, delivery_id=first[0], worker="w1", now=now, lease_seconds=60)
    with session_scope() as session:
        push, endpoint = prepare_push(
            session, delivery_id=first[0], worker="w2", now=now, lease_seconds=60
        )
    assert push.pdf.startswith(b"%PDF") and push.version == 1 and push.result_status == "F"
    assert endpoint.ae_title == "CLINIC_PACS" and push.patient_id == "P1"

    now += timedelta(seconds=200)  # every lease has expired
    delivery_id = _deliveries(report_id)[0].id
    waits = []
    for attempt in range(1, FAILING_AFTER + 1):
        with session_scope() as session:
            assert claim_due_deliveries(session, now=now, worker="w", lease_seconds=60) == [
                delivery_id
            ]
            state = record_attempt(
                session,
                delivery_id=delivery_id,
                worker="w",
                now=now,
                error=f"refused {attempt}",
                detail={},
                max_backoff=60,
            )
        delivery = _deliveries(report_id)[0]
        assert delivery.next_attempt_at is not None
        waits.append((delivery.next_attempt_at - now).total_seconds())
        assert state is (
            DeliveryState.FAILING if attempt >= FAILING_AFTER else DeliveryState.PENDING
        )
        with session_scope() as session:  # not due before its time
            assert claim_due_deliveries(session, now=now, worker="w", lease_seconds=60) == []
        now = delivery.next_attempt_at
    assert waits == [backoff_seconds(n, max_backoff=60) for n in range(1, FAILING_AFTER + 1)]
    assert waits[:3] == [10, 20, 40] and waits[-1] == 60  # capped
    with session_scope() as session:  # still retried, and delivered in the end
        assert claim_due_deliveries(session, now=now, worker="w", lease_seconds=60)
        state = record_attempt(
            session,
            delivery_id=delivery_id,
            worker="w",
            now=now,
            error=None,
            detail={"msa": "AA"},
            max_backoff=60,
        )
    assert state is DeliveryState.DELIVERED
    delivery = _deliveries(report_id)[0]
    assert delivery.attempts == FAILING_AFTER + 1 and delivery.acknowledged_at == now
    with session_scope() as session:
        exam = session.get(Exam, delivery.exam_id)
        assert exam is not None and exam.delivered_at == now


def test_first_clinic_fetch_sets_delivered_at_once(reading: Reading) -> None:
    report_id = finalize(reading)
    tech = reading.people["tech"]
    first, later = utcnow(), utcnow() + timedelta(minutes=5)

    with session_scope() as session:  # the centre reading it is no delivery
        fetch_report_artifact(
            session, principal=reading.people["qc"], report_id=report_id, kind="pdf", now=first
        )
    with session_scope() as session:
        exam = session.get(Exam, reading.exams[STUDY])
        assert exam is not None and exam.delivered_at is None

    with session_scope() as session:
        pdf = fetch_report_artifact(
            session, principal=tech, report_id=report_id, kind="pdf", now=first
        )
        signed = get_signed_artifact(session, report_id=report_id, kind="pdf")
    assert pdf.content == signed and pdf.content.startswith(b"%PDF")
    assert pdf.filename.isascii() and pdf.filename.endswith("-v1.pdf")
    with session_scope() as session:
        fetch_report_artifact(
            session, principal=tech, report_id=report_id, kind="document", now=later
        )
        fetch_report_fhir(
            session, principal=tech, report_id=report_id, base_url="http://x", now=later
        )
    with session_scope() as session:
        exam = session.get(Exam, reading.exams[STUDY])
        assert exam is not None and exam.delivered_at == first
        portal = session.execute(
            select(ReportDelivery).where(ReportDelivery.report_id == report_id)
        ).scalar_one()
        assert portal.channel.value == "portal" and portal.delivered_at == first
        assert portal.detail["user"] == "tech"
        from worklist.audit import AuditEvent

        downloads = session.execute(
            select(func.count()).where(
                AuditEvent.action == "download", AuditEvent.object_id == report_id
            )
        ).scalar_one()
    assert downloads == 4  # every fetch is audited, the centre's too

    t1, t2 = utcnow(), utcnow() + timedelta(minutes=1)
    with session_scope() as session, pytest.raises(PermissionDeniedError):
        acknowledge_report(session, principal=reading.people["qc"], report_id=report_id, now=t1)
    with session_scope() as session:
        ack = acknowledge_report(
            session, principal=reading.people["tech"], report_id=report_id, now=t1
        )
    assert ack.acknowledged_at == t1 and ack.delivered_at == first  # delivered earlier
    with session_scope() as session:
        again = acknowledge_report(
            session, principal=reading.people["tech"], report_id=report_id, now=t2
        )
    assert again.acknowledged_at == t1


def test_another_clinic_sees_nothing_and_the_list_marks_the_current_version(
    reading: Reading,
) -> None:
    report_id = finalize(reading)
    clinic_user(reading, "doc_c2", "C2")
    other = reading.people["doc_c2"]
    for call in (
        lambda s: fetch_report_artifact(
            s, principal=other, report_id=report_id, kind="pdf", now=utcnow()
        ),
        lambda s: fetch_report_fhir(
            s, principal=other, report_id=report_id, base_url="http://x", now=utcnow()
        ),
        lambda s: acknowledge_report(s, principal=other, report_id=report_id, now=utcnow()),
    ):
        with session_scope() as session, pytest.raises(NotFoundError):
            call(session)
    with session_scope() as session:
        items, total = list_reports(session, principal=other)
    assert items == [] and total == 0
    with session_scope() as session:
        exam = session.get(Exam, reading.exams[STUDY])
        assert exam is not None and exam.delivered_at is None

    first = report_id
    second = amend(reading, first, "右肺结节。Nodule, right lung.")
    finalize(reading, "1.2.9.3")
    tech = reading.people["tech"]
    with session_scope() as session:
        current, total = list_reports(session, principal=tech)
        assert {i.version for i in current} == {1, 2} and all(i.current for i in current)
        every, all_total = list_reports(session, principal=tech, current_only=False)
        only, _ = list_reports(session, principal=tech, exam_id=reading.exams[STUDY])
        since, _ = list_reports(session, principal=tech, since=datetime(2999, 1, 1).astimezone())
    assert total == 2 and all_total == 3 and since == []
    assert [i.report_id for i in only] == [second]
    assert only[0].current and only[0].version == 2 and only[0].previous_id == first
    assert only[0].amendment_kind == "corrected"
    old = next(i for i in every if i.report_id == first)
    assert not old.current and old.links["pdf"] == f"/api/v1/reports/{first}/pdf"
    assert old.patient_id == "P1" and old.clinic_code == "C1"
