"""Delivery services: scheduling on finalization (one pending push per endpoint, a disabled
endpoint's waiting until it is enabled; idempotent, clinic notified), the lease on due
pushes, backoff and the failing mark, portal fetches (first fetch sets delivered_at once),
the patient's full name in FHIR, acknowledgement, scoping."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from rdc_core.db import session_scope, utcnow
from rdc_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
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
from worklist.models import AmendmentKind, Exam, Patient, Report, Role, User
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


def set_patient_name(reading: Reading, name: str, study: str = STUDY) -> None:
    """Rename the patient of ``study`` (a DICOM PN value, e.g. ``Wang^Fang=王^芳``)."""
    with session_scope() as session:
        exam = session.get(Exam, reading.exams[study])
        assert exam is not None
        patient = session.get(Patient, exam.patient_ref)
        assert patient is not None
        patient.name = name


def _deliveries(report_id: str) -> list[ReportDelivery]:
    with session_scope() as session:
        return list(
            session.execute(
                select(ReportDelivery)
                .where(ReportDelivery.report_id == report_id)
                .order_by(ReportDelivery.channel)
            ).scalars()
        )


def test_finalization_schedules_one_push_per_endpoint_and_enabling_resumes(
    reading: Reading,
) -> None:
    add_clinic_endpoint(ae_title="PACS_A")
    add_clinic_endpoint(channel="hl7", receiving_application="HIS", receiving_facility="C1")
    off = add_clinic_endpoint(ae_title="OLD_PACS")
    add_clinic_endpoint(clinic="C2", ae_title="OTHER")
    with session_scope() as session:
        set_endpoint_enabled(session, principal=None, endpoint=off, enabled=False, now=utcnow())

    report_id = finalize(reading)
    pushes = _deliveries(report_id)
    # every endpoint of the clinic, the disabled one too (it waits until enabled)
    assert sorted(d.channel.value for d in pushes) == ["dicom", "dicom", "hl7"]
    assert {d.state for d in pushes} == {DeliveryState.PENDING}
    assert sum(d.endpoint_id == off for d in pushes) == 1

    with session_scope() as session:  # a second run (a retried hook) queues nothing new
        report = session.get(Report, report_id)
        assert report is not None
        exam = session.get(Exam, report.exam_id)
        assert exam is not None
        schedule_report_delivery(session, report=report, exam=exam, now=utcnow())
    assert len(_deliveries(report_id)) == 3

    with session_scope() as session:
        notes = session.execute(
            select(Notification).where(
                Notification.kind == "report_version", Notification.subject_id == report_id
            )
        ).scalars()
        notes = list(notes)
    assert len(notes) == 1 and notes[0].text_zh and "version 1" in notes[0].text_en

    second = amend(reading, report_id, "右肺结节。Nodule, right lung.")
    assert len(_deliveries(second)) == 3  # the new version is pushed too
    with session_scope() as session:
        text = session.execute(
            select(Notification.text_en).where(
                Notification.kind == "report_version", Notification.subject_id == second
            )
        ).scalar_one()
    assert "replaces version 1" in text and "corrected" in text

    # versions reach each endpoint in order: version 2 waits for version 1; the disabled
    # endpoint gets nothing
    v1 = {d.endpoint_id: d.id for d in _deliveries(report_id)}
    v2 = {d.endpoint_id: d.id for d in _deliveries(second)}
    now = utcnow()

    def deliver_claimed() -> set[str]:
        with session_scope() as session:
            claimed = claim_due_deliveries(session, now=now, worker="w", lease_seconds=60)
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
        return set(claimed)

    assert deliver_claimed() == {i for e, i in v1.items() if e != off}
    assert deliver_claimed() == {i for e, i in v2.items() if e != off}
    assert deliver_claimed() == set()

    with session_scope() as session:  # enabled again: its waiting pushes go out, in order
        set_endpoint_enabled(session, principal=None, endpoint=off, enabled=True, now=utcnow())
    assert deliver_claimed() == {v1[off]}
    assert deliver_claimed() == {v2[off]}
    assert {d.state for d in _deliveries(second)} == {DeliveryState.DELIVERED}


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
    set_patient_name(reading, "Wang^Fang^^Dr^III=王^芳")
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
        fhir = fetch_report_fhir(
            session, principal=tech, report_id=report_id, base_url="http://x", now=later
        )
    _assert_fhir_names(
        fhir,
        "王芳 (Dr Wang Fang III)",
        [
            ("ABC", "Wang", ["Fang"], ["Dr"], ["III"]),
            ("IDE", "王", ["芳"], [], []),
        ],
    )
    set_patient_name(reading, "=张三")
    with session_scope() as session:
        fhir = fetch_report_fhir(
            session, principal=tech, report_id=report_id, base_url="http://x", now=later
        )
    _assert_fhir_names(fhir, "张三", [("IDE", "张三", [], [], [])])
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
    assert downloads == 5  # every fetch is audited, the centre's too

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


def _assert_fhir_names(
    resource: dict[str, Any],
    display: str,
    names: list[tuple[str, str, list[str], list[str], list[str]]],
) -> None:
    """The subject shows ``display``; the contained Patient has one HumanName per PN group
    (representation, family, given, prefix, suffix); the resource is valid FHIR R4."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    DiagnosticReport.model_validate(resource)
    assert resource["subject"]["display"] == display
    (patient,) = resource["contained"]
    assert resource["subject"]["reference"] == f"#{patient['id']}"
    assert patient["resourceType"] == "Patient"
    got = [
        (
            n["extension"][0]["valueCode"],
            n["family"],
            n.get("given", []),
            n.get("prefix", []),
            n.get("suffix", []),
        )
        for n in patient["name"]
    ]
    assert got == names
    assert all(
        n["extension"][0]["url"].endswith("iso21090-EN-representation") for n in patient["name"]
    )


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
        with pytest.raises(InvalidInputError):  # a time without zone is ambiguous
            list_reports(session, principal=tech, since=datetime(2026, 1, 1))
    assert total == 2 and all_total == 3 and since == []
    assert [i.report_id for i in only] == [second]
    assert only[0].current and only[0].version == 2 and only[0].previous_id == first
    assert only[0].amendment_kind == "corrected"
    old = next(i for i in every if i.report_id == first)
    assert not old.current and old.links["pdf"] == f"/api/v1/reports/{first}/pdf"
    assert old.patient_id == "P1" and old.clinic_code == "C1"
