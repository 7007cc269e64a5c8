"""Critical values: an alert raised by signing a critical report, read-back acknowledgement
exactly once, escalation exactly once per level, the register, notifications, contacts."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from rdc_core.db import session_scope, utcnow
from rdc_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from tests.worklist.conftest import Reading
from worklist.access import Principal
from worklist.audit import AuditEvent, verify_chain
from worklist.claims import claim_item
from worklist.critical_values.contacts import add_duty, list_duty, remove_duty, set_contact
from worklist.critical_values.models import CriticalAlert, CriticalEscalation, Notification
from worklist.critical_values.notifications import (
    list_notifications,
    mark_notification_read,
    notify,
)
from worklist.critical_values.schemas import AcknowledgementIn, AlertOut, ContactIn
from worklist.critical_values.service import (
    AlertClosedError,
    AlreadyAcknowledgedError,
    acknowledge_alert,
    escalate_overdue_alerts,
    get_alert,
    list_alerts,
    raise_for_report,
)
from worklist.directory import add_user, principal_for_user
from worklist.models import Exam, ReaderLevel, Report, Role, User
from worklist.reports import amend_report, save_draft, submit_report, verify_report
from worklist.schemas import ReportAmendIn, ReportIn, ReportOut

CRITICAL = "1.2.9.2"
ROUTINE = "1.2.9.1"
IMPRESSION = "左侧大量气胸，纵隔右移。Large left pneumothorax with mediastinal shift."


_EXTRA = {
    "doc_a": (Role.CLINICIAN, "C1"),
    "doc_b": (Role.TECHNICIAN, "C1"),
    "tech_c2": (Role.TECHNICIAN, "C2"),
    "admin": (Role.ADMIN, "LEAD"),
}


def _people(reading: Reading, *extra: str) -> dict[str, Principal]:
    """The reading fixture's users and the ``extra`` ones of _EXTRA (doc_a: clinician of
    C1; doc_b: technician of C1, its second contact; tech_c2; admin), and C1's contacts.
    Only the users a test needs are made: each costs a bcrypt hash."""
    with session_scope() as session:
        for name in ("doc_b", *extra):
            role, org = _EXTRA[name]
            add_user(session, username=name, password="pw-123456", role=role, org_code=org)
        set_contact(
            session,
            principal=None,
            org_code="C1",
            data=ContactIn(
                primary_name="王医生",
                primary_phone="0551-1111",
                secondary_name="李主任",
                secondary_phone="0551-2222",
                secondary_username="doc_b",
            ),
            now=utcnow(),
        )
        users = session.execute(select(User)).scalars().all()
        return {u.username: principal_for_user(u) for u in users}


def _write_and_submit(
    reading: Reading, study: str, who: Principal, findings: str, critical: bool
) -> ReportOut:
    """``who`` claims ``study``, saves a draft with ``findings`` and submits it; the report."""
    with session_scope() as session:
        claim_item(
            session, principal=who, item_id=reading.items[study], now=utcnow(), lease_seconds=600
        )
    with session_scope() as session:
        save_draft(
            session,
            principal=who,
            exam_id=reading.exams[study],
            data=ReportIn(
                findings=findings,
                impression=IMPRESSION,
                quality_grade="甲",  # type: ignore[arg-type]
                critical=critical,
            ),
            now=utcnow(),
        )
    with session_scope() as session:
        return submit_report(session, principal=who, exam_id=reading.exams[study], now=utcnow())


def _sign(reading: Reading, study: str, *, critical: bool, author: str = "attending") -> str:
    """``author`` claims ``study``, writes and submits it: an attending reader signs it
    final; a resident's preliminary report is verified (signed) by the chief. Returns the
    report ID."""
    who = reading.people[author]
    report = _write_and_submit(reading, study, who, "左肺野透亮度增高，未见肺纹理。", critical)
    if who.level is ReaderLevel.RESIDENT:
        assert report.status == "preliminary"
        with session_scope() as session:
            report = verify_report(
                session, principal=reading.people["chief"], report_id=report.id, now=utcnow()
            )
    assert report.status == "final"
    return report.id


def _alert(report_id: str) -> CriticalAlert:
    with session_scope() as session:
        alert = session.execute(
            select(CriticalAlert).where(CriticalAlert.report_id == report_id)
        ).scalar_one()
        session.expunge(alert)
        return alert


def _notifications(alert_id: str) -> list[tuple[str | None, str | None, str | None]]:
    """(username or None, recipient name, key text) of every notification of the alert."""
    with session_scope() as session:
        rows = session.execute(
            select(Notification, User.username)
            .outerjoin(User, User.id == Notification.user_id)
            .where(Notification.subject_id == alert_id)
        ).all()
        return sorted(
            ((name, n.recipient_name, n.text_en.split(":")[0]) for n, name in rows),
            key=str,
        )


def _ack(who: Principal, alert_id: str, data: AcknowledgementIn, now: datetime) -> AlertOut:
    with session_scope() as session:
        return acknowledge_alert(session, principal=who, alert_id=alert_id, data=data, now=now)


def _escalate(now: datetime) -> list[str]:
    with session_scope() as session:
        return escalate_overdue_alerts(session, now=now)


def test_signing_a_critical_report_raises_one_alert_to_the_clinic(reading: Reading) -> None:
    people = _people(reading, "doc_a")
    before = utcnow()
    report_id = _sign(reading, CRITICAL, critical=True)
    _sign(reading, ROUTINE, critical=False)
    with session_scope() as session:
        assert session.execute(select(func.count()).select_from(CriticalAlert)).scalar_one() == 1
    alert = _alert(report_id)
    assert alert.finding == IMPRESSION
    assert alert.raised_by == people["attending"].user_id
    assert alert.exam_id == reading.exams[CRITICAL] and alert.state == "open"
    assert before <= alert.raised_at and alert.notified_at == alert.raised_at
    assert alert.deadline_at - alert.raised_at == timedelta(minutes=10)
    # The clinician in the portal, and the primary contact (no login) named to the clinic.
    assert _notifications(alert.id) == [
        ("doc_a", None, "Critical value"),
        (None, "王医生", "Critical value"),
    ]
    # A retry of the finalization hook creates nothing twice.
    with session_scope() as session:
        report = session.get(Report, report_id)
        exam = session.get(Exam, reading.exams[CRITICAL])
        assert report is not None and exam is not None
        again = raise_for_report(
            session, report=report, exam=exam, signer=people["attending"], now=utcnow()
        )
    assert again == alert.id
    assert len(_notifications(alert.id)) == 2
    with session_scope() as session:
        assert session.execute(select(func.count()).select_from(CriticalAlert)).scalar_one() == 1
        raised = session.execute(
            select(AuditEvent).where(AuditEvent.action == "raise", AuditEvent.object_id == alert.id)
        ).scalar_one()
        assert raised.actor == "user:attending"
    # The clinician sees it among their unread notifications: their own, and the clinic's
    # row that names the primary contact to call.
    with session_scope() as session:
        page = list_notifications(session, principal=people["doc_a"], kind="critical_value")
    assert [n.subject_id for n in page.items] == [alert.id, alert.id]
    assert sorted(n.recipient_name or "" for n in page.items) == ["", "王医生"]
    assert "危急值" in page.items[0].text_zh and "Critical value" in page.items[0].text_en


def test_unacknowledged_alert_escalates_exactly_once_per_level(reading: Reading) -> None:
    people = _people(reading, "admin")
    now = utcnow()
    with session_scope() as session:
        add_duty(session, principal=None, username="chief", now=now)
        add_duty(  # on duty yesterday only: not called
            session,
            principal=None,
            username="resident2",
            on_from=now - timedelta(days=2),
            on_until=now - timedelta(days=1),
            now=now,
        )
    alert = _alert(_sign(reading, CRITICAL, critical=True))
    assert _escalate(alert.raised_at + timedelta(minutes=9)) == []  # still in time

    overdue = alert.deadline_at + timedelta(minutes=1)
    # Two scanners at once (two workers): the level fires once.
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(_escalate(overdue))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(len, results)) == [0, 1]
    assert _escalate(overdue) == []  # and again: nothing
    with session_scope() as session:
        escalations = session.execute(select(CriticalEscalation)).scalars().all()
        assert [(e.level, e.at) for e in escalations] == [(1, overdue)]
        to = escalations[0].recipients
    assert {(r["role"], r.get("username")) for r in to} == {
        ("clinic_secondary", "doc_b"),
        ("duty", "chief"),
    }
    level1 = [n for n in _notifications(alert.id) if "escalation level 1" in n[2]]
    assert sorted(n[0] or "" for n in level1) == ["chief", "doc_b"]

    # Twice the time: the lead hospital's QC and administrators.
    later = alert.raised_at + timedelta(minutes=21)
    assert _escalate(later) == [f"{alert.id}:2"]
    assert _escalate(later + timedelta(hours=1)) == []  # the last level
    level2 = [n for n in _notifications(alert.id) if "escalation level 2" in n[2]]
    assert sorted(n[0] or "" for n in level2) == ["admin", "qc"]
    with session_scope() as session:
        row = get_alert(session, principal=people["qc"], alert_id=alert.id, now=later)
    assert row.escalated and row.escalation_level == 2 and row.state == "open"
    assert [(e.level, e.at) for e in row.escalations] == [(1, overdue), (2, later)]
    assert row.within_deadline is False and row.acknowledged_at is None
    # The clinic can still acknowledge afterwards; late is late.
    done = _ack(people["tech"], alert.id, AcknowledgementIn(read_back="气胸，已知悉"), later)
    assert done.state == "acknowledged" and done.within_deadline is False


def test_acknowledged_alert_shows_both_sides_in_the_register(reading: Reading) -> None:
    people = _people(reading, "doc_a")
    alert = _alert(_sign(reading, CRITICAL, critical=True))
    at = alert.raised_at + timedelta(minutes=4)
    out = _ack(
        people["doc_a"],
        alert.id,
        AcknowledgementIn(read_back="  左侧大量气胸，纵隔右移，已复述。 "),
        at,
    )
    assert out.state == "acknowledged" and out.via == "portal"
    assert _escalate(alert.deadline_at + timedelta(minutes=30)) == []  # acknowledged in time

    with session_scope() as session:
        register = list_alerts(session, principal=people["qc"], now=utcnow())
    assert register.total == 1
    row = register.items[0]
    # The centre's side.
    assert row.raised_by.username == "attending" and row.raised_at == alert.raised_at
    assert row.finding == IMPRESSION and row.clinic_code == "C1"
    assert row.patient["patient_id"] == "P2" and row.exam["modality"] == "CT"
    assert row.notified_at == alert.raised_at and row.notified_within_deadline is True
    assert row.minutes_to_notify == 0
    # The clinic's side.
    assert row.acknowledged_by is not None and row.acknowledged_by.username == "doc_a"
    assert row.acknowledged_at == at and row.read_back == "左侧大量气胸，纵隔右移，已复述。"
    assert row.via == "portal" and row.recorded_by is None
    assert row.minutes_to_acknowledge == 4.0 and row.within_deadline is True
    assert row.escalations == [] and not row.escalated
    # The clinic's reminders are read now.
    with session_scope() as session:
        reminders = list_notifications(session, principal=people["doc_a"], kind="critical_value")
        assert reminders.total == 0
        actions = session.execute(
            select(AuditEvent.action, AuditEvent.actor).where(AuditEvent.object_id == alert.id)
        ).all()
        assert ("acknowledge", "user:doc_a") in actions
        assert verify_chain(session) == (True, None)


def test_acknowledgement_rules(reading: Reading) -> None:
    people = _people(reading, "tech_c2")
    alert = _alert(_sign(reading, CRITICAL, critical=True))
    now = utcnow()
    with pytest.raises(InvalidInputError, match="read-back"):
        _ack(people["tech"], alert.id, AcknowledgementIn(read_back="   "), now)
    with pytest.raises(NotFoundError):  # another clinic cannot learn the alert exists
        _ack(people["tech_c2"], alert.id, AcknowledgementIn(read_back="ok"), now)
    with pytest.raises(NotFoundError), session_scope() as session:
        get_alert(session, principal=people["tech_c2"], alert_id=alert.id, now=now)
    with pytest.raises(InvalidInputError, match="portal"):
        _ack(people["tech"], alert.id, AcknowledgementIn(read_back="ok", via="phone"), now)  # type: ignore[arg-type]
    # Lead-hospital staff record telephone acknowledgements only, naming the receiver.
    with pytest.raises(InvalidInputError, match="phone"):
        _ack(people["qc"], alert.id, AcknowledgementIn(read_back="ok"), now)
    phone = AcknowledgementIn(read_back="气胸，收到", via="phone")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="receiver"):
        _ack(people["qc"], alert.id, phone, now)
    phone.receiver_name = "王医生"
    out = _ack(people["qc"], alert.id, phone, now)
    assert out.via == "phone" and out.receiver_name == "王医生" and out.acknowledged_by is None
    assert out.recorded_by is not None and out.recorded_by.username == "qc"
    with pytest.raises(AlreadyAcknowledgedError):
        _ack(people["tech"], alert.id, AcknowledgementIn(read_back="again"), now)


def test_register_filters_and_scoping(reading: Reading) -> None:
    people = _people(reading, "doc_a", "tech_c2")
    first = _alert(_sign(reading, CRITICAL, critical=True))
    # A resident's critical report: raised when the resident submits it, by the resident.
    second = _alert(_sign(reading, "1.2.9.4", critical=True, author="resident"))
    assert second.raised_by == people["resident"].user_id
    _ack(people["tech"], first.id, AcknowledgementIn(read_back="收到"), utcnow())
    _escalate(second.deadline_at + timedelta(seconds=1))

    def ids(who: str, **filters: object) -> list[str]:
        with session_scope() as session:
            page = list_alerts(session, principal=people[who], now=utcnow(), **filters)  # type: ignore[arg-type]
        return [a.id for a in page.items]

    assert ids("qc") == [second.id, first.id]  # newest first
    assert ids("qc", state="acknowledged") == [first.id]
    assert ids("qc", state="open") == [second.id]
    assert ids("attending", state="escalated") == [second.id]
    assert ids("qc", clinic="C2") == []
    assert ids("qc", since=second.raised_at) == [second.id]
    assert ids("qc", until=second.raised_at) == [first.id]
    assert ids("doc_a", clinic="C1") == [second.id, first.id]
    assert ids("tech_c2") == []
    assert ids("qc", limit=1, offset=1) == [first.id]
    with pytest.raises(InvalidInputError):
        ids("qc", state="closed")


def test_notifications_of_any_kind(reading: Reading) -> None:
    people = _people(reading, "doc_a", "tech_c2")
    c1 = people["tech"].org_id
    now = utcnow()
    with session_scope() as session:
        created = notify(
            session,
            org_id=c1,
            kind="report_version",
            subject_type="report",
            subject_id="r-1",
            text=("报告有新版本", "A new report version is available"),
            now=now,
            key="2",
        )
        again = notify(
            session,
            org_id=c1,
            kind="report_version",
            subject_type="report",
            subject_id="r-1",
            text=("报告有新版本", "A new report version is available"),
            now=now,
            key="2",
        )
        for_doc = notify(
            session,
            org_id=c1,
            user_ids=[people["doc_a"].user_id],
            kind="report_version",
            subject_type="report",
            subject_id="r-1",
            text="新版本 / new version",
            now=now,
        )
    assert len(created) == 1 and again == [] and len(for_doc) == 1
    with session_scope() as session:
        tech = list_notifications(session, principal=people["tech"])
        doc = list_notifications(session, principal=people["doc_a"])
        other = list_notifications(session, principal=people["tech_c2"])
    assert [n.id for n in tech.items] == created  # the organisation's row, not doc_a's
    assert {n.id for n in doc.items} == {*created, *for_doc}
    assert tech.items[0].text == "报告有新版本 / A new report version is available"
    assert other.total == 0
    with pytest.raises(NotFoundError), session_scope() as session:
        mark_notification_read(
            session, principal=people["tech"], notification_id=for_doc[0], now=now
        )
    with session_scope() as session:
        read = mark_notification_read(
            session, principal=people["tech"], notification_id=created[0], now=now
        )
    assert read.read_at == now
    with session_scope() as session:
        assert list_notifications(session, principal=people["tech"]).total == 0
        assert list_notifications(session, principal=people["tech"], unread_only=False).total == 1


def test_contacts_and_duty_list_rules(reading: Reading) -> None:
    people = _people(reading, "admin", "tech_c2")
    now = utcnow()
    good = ContactIn(primary_name="A", primary_phone="1")
    with pytest.raises(PermissionDeniedError), session_scope() as session:
        set_contact(session, principal=people["qc"], org_code="C1", data=good, now=now)
    with pytest.raises(InvalidInputError, match="not a clinic"), session_scope() as session:
        set_contact(session, principal=people["admin"], org_code="LEAD", data=good, now=now)
    for bad in (
        ContactIn(primary_name="A", primary_phone=" "),
        ContactIn(primary_name="A", primary_phone="1", secondary_name="B"),
        ContactIn(primary_name="A", primary_phone="1", primary_username="tech_c2"),
    ):
        with pytest.raises(InvalidInputError), session_scope() as session:
            set_contact(session, principal=people["admin"], org_code="C1", data=bad, now=now)
    with session_scope() as session:
        out = set_contact(session, principal=people["admin"], org_code="C1", data=good, now=now)
    assert out.secondary_name is None and out.primary_name == "A"
    with pytest.raises(InvalidInputError, match="lead-hospital"), session_scope() as session:
        add_duty(session, principal=None, username="tech", now=now)
    with pytest.raises(PermissionDeniedError), session_scope() as session:
        add_duty(session, principal=people["qc"], username="qc", now=now)
    with session_scope() as session:
        add_duty(session, principal=people["admin"], username="qc", now=now)
        add_duty(
            session,
            principal=people["admin"],
            username="qc",
            on_from=now + timedelta(hours=1),
            now=now,
        )  # again: the window is replaced
    with session_scope() as session:
        duty = list_duty(session, principal=people["qc"], now=now)
    assert [(d.username, d.on_duty_now) for d in duty] == [("qc", False)]
    with session_scope() as session:
        remove_duty(session, principal=people["admin"], username="qc")
    with pytest.raises(NotFoundError), session_scope() as session:
        remove_duty(session, principal=people["admin"], username="qc")


# --- Preliminary reports and report versions -------------------------------------------


def _preliminary(reading: Reading, study: str, *, critical: bool) -> str:
    """The resident claims, writes and submits ``study``: a preliminary report (signed by
    the resident, not verified yet). Returns the report ID."""
    report = _write_and_submit(
        reading, study, reading.people["resident"], "左肺野透亮度增高。", critical
    )
    assert report.status == "preliminary"
    return report.id


def _amend(reading: Reading, report_id: str, now: datetime, **change: object) -> str:
    """The chief signs a new version of ``report_id`` (kind and fields in ``change``)."""
    with session_scope() as session:
        new = amend_report(
            session,
            principal=reading.people["chief"],
            report_id=report_id,
            data=ReportAmendIn(reason="复核 review", **change),  # type: ignore[arg-type]
            now=now,
        )
    assert new.previous_id == report_id and new.status == "final"
    return new.id


def _alerts(exam_id: str | None = None) -> list[CriticalAlert]:
    """Every alert (of ``exam_id``), oldest first."""
    with session_scope() as session:
        stmt = select(CriticalAlert).order_by(CriticalAlert.raised_at)
        if exam_id is not None:
            stmt = stmt.where(CriticalAlert.exam_id == exam_id)
        alerts = list(session.execute(stmt).scalars())
        session.expunge_all()
        return alerts


def _register(who: Principal, **filters: object) -> list[AlertOut]:
    with session_scope() as session:
        page = list_alerts(session, principal=who, now=utcnow(), **filters)  # type: ignore[arg-type]
    return page.items


def test_preliminary_critical_report_alerts_at_once_verified_or_withdrawn(
    reading: Reading,
) -> None:
    people = _people(reading, "doc_a")
    kept_id = _preliminary(reading, "1.2.9.4", critical=True)
    # Before any senior looked at it, the clinic is alerted, by the resident.
    [alert] = _alerts()
    assert alert.report_id == kept_id and alert.state == "open"
    assert alert.raised_by == people["resident"].user_id
    assert alert.notified_at == alert.raised_at
    sent = _notifications(alert.id)
    assert ("doc_a", None, "Critical value") in sent
    with session_scope() as session:
        verify_report(session, principal=people["chief"], report_id=kept_id, now=utcnow())
    # Verified (signed final by the chief): the same alert, nothing sent twice.
    [after] = _alerts()
    assert (after.id, after.raised_by, after.raised_at) == (
        alert.id,
        people["resident"].user_id,
        alert.raised_at,
    )
    assert after.state == "open" and _notifications(alert.id) == sent
    [row] = _register(people["qc"])
    assert row.report_version == 1 and row.report_critical is True

    # The senior un-ticks critical before verifying another one: withdrawn, by the chief.
    withdrawn_id = _preliminary(reading, "1.2.9.3", critical=True)
    [alert] = _alerts(reading.exams["1.2.9.3"])
    chief = people["chief"]
    now = utcnow()
    with session_scope() as session:
        claim_item(
            session, principal=chief, item_id=reading.items["1.2.9.3"], now=now, lease_seconds=60
        )
    with session_scope() as session:
        save_draft(
            session,
            principal=chief,
            exam_id=reading.exams["1.2.9.3"],
            data=ReportIn(critical=False),
            now=now,
        )
    with session_scope() as session:
        submit_report(session, principal=chief, exam_id=reading.exams["1.2.9.3"], now=now)
    [closed] = _alerts(reading.exams["1.2.9.3"])
    assert closed.id == alert.id and closed.state == "withdrawn"
    assert closed.closed_by == chief.user_id and closed.closed_at == now
    assert closed.next_escalation_at is None
    # It stops escalating (the verified one still does), and cannot be read back.
    late = alert.deadline_at + timedelta(hours=1)
    assert _escalate(late) == [f"{after.id}:1"]
    with pytest.raises(AlertClosedError):
        _ack(people["doc_a"], alert.id, AcknowledgementIn(read_back="气胸"), now)
    # The clinic is told, and its reminders of it are done with.
    with session_scope() as session:
        unread = list_notifications(session, principal=people["doc_a"], kind="critical_value")
    mine = [n.text_en.split(":")[0] for n in unread.items if n.subject_id == alert.id]
    assert mine == ["Critical value withdrawn"]
    [row] = _register(people["doc_a"], state="withdrawn")
    assert row.id == alert.id and row.report_id == withdrawn_id and row.report_critical is False
    assert row.closed_by is not None and row.closed_by.username == "chief"
    assert row.closed_at == now and row.superseded_by_report_id is None
    assert [r.id for r in _register(people["qc"], state="open")] == [after.id]


def test_new_version_supersedes_the_open_alert_and_moves_it_when_still_critical(
    reading: Reading,
) -> None:
    people = _people(reading)
    # Corrected to not critical: the open alert is superseded, no new alert.
    v1 = _sign(reading, CRITICAL, critical=True)
    [alert] = _alerts()
    now = utcnow()
    v2 = _amend(reading, v1, now, kind="corrected", critical=False)
    [closed] = _alerts()
    assert closed.state == "superseded" and closed.superseded_by_report_id == v2
    assert closed.closed_at == now and closed.closed_by == people["chief"].user_id
    assert _escalate(alert.deadline_at + timedelta(hours=1)) == []  # it stopped escalating
    with pytest.raises(AlertClosedError):
        _ack(people["tech"], alert.id, AcknowledgementIn(read_back="气胸"), now)
    [row] = _register(people["qc"], state="superseded")
    assert row.id == alert.id and row.superseded_by_report_id == v2
    assert row.superseded_by_version == 2 and row.report_version == 1
    assert row.superseded_by_alert_id is None and row.within_deadline is None
    # The clinic learns the critical value was superseded.
    with session_scope() as session:
        unread = list_notifications(session, principal=people["tech"], kind="critical_value")
    assert [n.text_en.split(":")[0] for n in unread.items] == ["Critical value superseded"]

    # An addendum copies critical=True: the open alert moves to the new version, once.
    u1 = _sign(reading, ROUTINE, critical=True)
    u2 = _amend(reading, u1, utcnow(), kind="appended", recommendation="建议胸外科会诊")
    first, second = _alerts(reading.exams[ROUTINE])
    assert (first.report_id, first.state, first.superseded_by_report_id) == (u1, "superseded", u2)
    assert (second.report_id, second.state, second.previous_alert_id) == (u2, "open", first.id)
    assert [a.id for a in _register(people["qc"], state="open")] == [second.id]
    old = [a for a in _register(people["qc"], state="superseded") if a.id == first.id]
    assert old[0].superseded_by_alert_id == second.id
    [new] = _register(people["tech"], state="open")
    assert new.previous_alert_id == first.id and new.report_version == 2
    with session_scope() as session:
        unread = list_notifications(session, principal=people["tech"], kind="critical_value")
    assert sorted(n.text_en.split(":")[0] for n in unread.items) == [
        "Critical value (report version 2)",
        "Critical value superseded",
    ]
    fired = _escalate(second.deadline_at + timedelta(seconds=1))
    assert fired == [f"{second.id}:1"]


def test_acknowledged_alert_stays_and_only_a_changed_finding_alerts_again(
    reading: Reading,
) -> None:
    people = _people(reading)
    v1 = _sign(reading, CRITICAL, critical=True)
    [a1] = _alerts()
    _ack(people["tech"], a1.id, AcknowledgementIn(read_back="气胸"), utcnow())
    # Same finding (an addendum to the recommendation): read back already, nothing new.
    v2 = _amend(reading, v1, utcnow(), kind="appended", recommendation="建议复查")
    [kept] = _alerts()
    assert kept.state == "acknowledged" and kept.superseded_by_report_id == v2
    # A changed finding: the clinic must read back the new one.
    v3 = _amend(reading, v2, utcnow(), kind="corrected", impression="右侧大量气胸 Right")
    assert [(a.report_id, a.state) for a in _alerts()] == [(v1, "acknowledged"), (v3, "open")]
    a3 = _alerts()[1]
    assert a3.previous_alert_id == a1.id and a3.finding == "右侧大量气胸 Right"
    _ack(people["tech"], a3.id, AcknowledgementIn(read_back="右侧气胸"), utcnow())
    # Not critical any more, then critical again with the same text: that is news again.
    v4 = _amend(reading, v3, utcnow(), kind="corrected", critical=False)
    assert len(_alerts()) == 2
    v5 = _amend(reading, v4, utcnow(), kind="corrected", critical=True)
    states = [(a.report_id, a.state) for a in _alerts()]
    assert states == [(v1, "acknowledged"), (v3, "acknowledged"), (v5, "open")]
    assert _register(people["qc"], state="acknowledged")[0].superseded_by_report_id == v4
