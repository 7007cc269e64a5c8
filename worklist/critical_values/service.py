"""Critical-value alerts: raised when a critical report version is signed, acknowledged by
the clinic with a read-back, escalated when nobody did in time, and listed in the register.

The clinic must be notified within the configured minutes (default 10, DESIGN.md §5); the
portal notification goes out in the signer's own transaction, so ``notified_at`` equals
``raised_at`` unless something delayed it. Every change of an alert is a conditional
UPDATE: of two acknowledgements exactly one wins, and two scanners never escalate the same
level twice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Select, func, select, update
from sqlalchemy.orm import Session

from rdc_core.db import insert_ignore, stable_id
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError
from rdc_core.settings import get_settings
from worklist.access import Principal, require_roles
from worklist.audit import record_access, record_event
from worklist.critical_values.contacts import contact_for, on_duty
from worklist.critical_values.models import (
    AckChannel,
    AlertState,
    CriticalAlert,
    CriticalEscalation,
    Notification,
)
from worklist.critical_values.notifications import BilingualText, add_notification
from worklist.critical_values.schemas import (
    AcknowledgementIn,
    AlertOut,
    EscalationOut,
    PersonOut,
)
from worklist.delivery.senders import display_name
from worklist.models import Exam, Organization, OrgKind, Report, Role, User
from worklist.patients.national_id import shown_patient_id
from worklist.schemas import Page

__all__ = [
    "CRITICAL_VALUE",
    "LAST_LEVEL",
    "AlertClosedError",
    "AlreadyAcknowledgedError",
    "acknowledge_alert",
    "alert_out",
    "escalate_overdue_alerts",
    "get_alert",
    "list_alerts",
    "raise_for_report",
]

CRITICAL_VALUE = "critical_value"
SUBJECT = "critical_alert"
# Level 1: the clinic's second contact and the centre's duty list, once the deadline
# passed; level 2: the lead hospital's QC and administrators, after twice that time.
LAST_LEVEL = 2
FINDING_MAX = 500
MAX_PAGE = 500
_CLINIC_ROLES = frozenset({Role.CLINICIAN, Role.TECHNICIAN})
_LEAD_ROLES = frozenset({Role.READER, Role.SENIOR_READER, Role.QC, Role.ADMIN})
_REGISTER_STATES = ("open", "acknowledged", "escalated", "superseded", "withdrawn")


class AlreadyAcknowledgedError(ConflictError):
    """The alert was acknowledged already; an acknowledgement is recorded exactly once."""

    title = "Already acknowledged"


class AlertClosedError(ConflictError):
    """The alert was withdrawn or superseded by a newer report version: nothing to read
    back any more (a newer version's alert, if any, is the one to acknowledge)."""

    title = "Alert closed"


def _finding(report: Report) -> str:
    text = " ".join((report.impression.strip() or report.findings.strip()).split())
    if len(text) <= FINDING_MAX:
        return text
    cut = text[: FINDING_MAX - 1]
    # Cut at a word boundary when there is one near the end (Chinese text has none).
    space = cut.rfind(" ")
    if space > FINDING_MAX * 0.8:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _label(alert: CriticalAlert) -> tuple[str, str]:
    exam = alert.exam
    what = " ".join(p for p in (exam.modality, exam.body_part, exam.description) if p)
    name = display_name(alert.patient.name or "")
    shown = shown_patient_id(alert.patient.issuer, alert.patient.patient_id)
    patient = f"{name or shown} ({shown})"
    return patient, what or exam.accession_number or exam.id


def _clinic_users(
    session: Session, org_id: str, usernames: list[str], roles: set[Role]
) -> list[User]:
    stmt = select(User).where(User.org_id == org_id, User.active.is_(True))
    rows = session.execute(stmt).scalars().all()
    return [u for u in rows if u.role in roles or u.username in usernames]


def raise_for_report(
    session: Session, *, report: Report, exam: Exam, signer: Principal, now: datetime
) -> str | None:
    """Open a critical-value alert to the exam's clinic when ``report.critical``; returns the
    alert's ID (None when no alert stands for this version).

    Called when a resident's preliminary report is signed and whenever a version becomes
    final. One alert per report version (its ID derives from the report's): a retry, or the
    senior's verification of a preliminary report, creates nothing twice; a senior who
    un-ticked critical before verifying withdraws the open alert. A new version
    (``report.previous_id``) closes the open alerts of earlier versions as superseded, and
    raises a new alert only when it is critical and the clinic has not read back this very
    finding already (an acknowledged alert of the previous, critical, version with the same
    text stands). The clinic's clinicians and its primary contact are notified in the
    portal at once; a primary contact without a login gets a clinic-wide row naming them.
    """
    alert_id = stable_id("critical_alert", report.id)
    finding = _finding(report) or "危急值 / critical value"
    existing = session.execute(
        select(CriticalAlert).where(CriticalAlert.id == alert_id)
    ).scalar_one_or_none()
    if existing is not None:
        return _reconsider(
            session, existing, report=report, finding=finding, signer=signer, now=now
        )
    previous_alert_id = None
    if report.previous_id is not None:
        previous_alert_id, stands = _supersede_earlier(
            session, report=report, exam=exam, finding=finding, signer=signer, now=now
        )
        if stands:
            return None
    if not report.critical:
        return None
    settings = get_settings()
    deadline = now + timedelta(minutes=settings.critical_escalation_minutes)
    inserted = insert_ignore(
        session,
        CriticalAlert.__table__,
        {
            "id": alert_id,
            "report_id": report.id,
            "exam_id": exam.id,
            "org_id": exam.org_id,
            "patient_ref": exam.patient_ref,
            "finding": finding,
            "raised_by": signer.user_id,
            "raised_at": now,
            "deadline_at": deadline,
            "state": AlertState.OPEN.value,
            "escalation_level": 0,
            "next_escalation_at": deadline,
            "previous_alert_id": previous_alert_id,
            "created_at": now,
        },
        conflict=(),  # the ID derives from report_id: a clash on either is this alert
    )
    if not inserted:
        return alert_id
    alert = session.get(CriticalAlert, alert_id)
    assert alert is not None
    patient, what = _label(alert)
    minutes = f"{settings.critical_escalation_minutes:g}"
    zh_head, en_head = "危急值", "Critical value"
    if previous_alert_id is not None:
        zh_head, en_head = (
            f"危急值（第{report.version}版报告）",
            (f"Critical value (report version {report.version})"),
        )
    text = (
        f"{zh_head}：{patient}，{what}：{_short(alert.finding)}。请在{minutes}分钟内复述确认。",
        f"{en_head}: {patient}, {what}: {_short(alert.finding)}. "
        f"Read back and acknowledge within {minutes} minutes.",
    )
    contact = contact_for(session, org_id=exam.org_id)
    primary = contact.primary_username if contact else None
    users = _clinic_users(session, exam.org_id, [primary] if primary else [], {Role.CLINICIAN})
    for user in users:
        _notify(session, alert, user_id=user.id, org_id=exam.org_id, text=text, now=now)
    if contact is not None and not any(u.username == primary for u in users):
        # The primary contact has no login: the whole clinic sees whom to call.
        _notify(
            session,
            alert,
            user_id=None,
            org_id=exam.org_id,
            text=text,
            now=now,
            name=contact.primary_name,
            phone=contact.primary_phone,
        )
    elif not users:
        _notify(session, alert, user_id=None, org_id=exam.org_id, text=text, now=now)
    session.execute(
        update(CriticalAlert)
        .where(CriticalAlert.id == alert_id)
        .values(notified_at=now)
        .execution_options(synchronize_session=False)
    )
    record_access(
        session,
        signer,
        action="raise",
        object_type=SUBJECT,
        object_id=alert_id,
        detail={
            "report_id": report.id,
            "exam_id": exam.id,
            "clinic": exam.org_id,
            "previous_alert_id": previous_alert_id,
        },
    )
    return alert_id


def _reconsider(
    session: Session,
    alert: CriticalAlert,
    *,
    report: Report,
    finding: str,
    signer: Principal,
    now: datetime,
) -> str | None:
    """The version's alert exists (raised at preliminary signing, or a retry): withdraw it
    when the verifier un-ticked critical, follow an edited finding while it is open."""
    if not report.critical:
        if _close(session, alert, AlertState.WITHDRAWN, signer=signer, now=now):
            _notify_clinic(
                session,
                alert,
                now=now,
                key="withdrawn",
                text=lambda patient, what, finding: (
                    f"危急值已撤回：{patient}，{what}：上级医师审核后的正式报告不再报告危急值"
                    f"（原为：{finding}）。",
                    f"Critical value withdrawn: {patient}, {what}: the senior reader's "
                    f"verified report no longer reports a critical value (was: {finding}).",
                ),
            )
        return None
    if alert.state is AlertState.OPEN and alert.finding != finding:
        # The verifier reworded the finding: the clinic reads back the final text.
        session.execute(
            update(CriticalAlert)
            .where(CriticalAlert.id == alert.id, CriticalAlert.state == AlertState.OPEN)
            .values(finding=finding)
            .execution_options(synchronize_session=False)
        )
        session.expire(alert)
        _notify_clinic(
            session,
            alert,
            now=now,
            key="verified",
            text=lambda patient, what, finding: (
                f"危急值（审核后更新）：{patient}，{what}：{finding}",
                f"Critical value (updated on verification): {patient}, {what}: {finding}",
            ),
        )
    return alert.id


def _close(
    session: Session,
    alert: CriticalAlert,
    state: AlertState,
    *,
    signer: Principal,
    now: datetime,
    superseded_by: str | None = None,
) -> bool:
    """Close an open alert without a read-back; False when it was not open (acknowledged
    meanwhile, or closed already). The clinic's reminders of it are done with."""
    values: dict[str, Any] = {
        "state": state,
        "closed_at": now,
        "closed_by": signer.user_id,
        "next_escalation_at": None,
    }
    if superseded_by is not None:
        values["superseded_by_report_id"] = superseded_by
    result = session.execute(
        update(CriticalAlert)
        .where(CriticalAlert.id == alert.id, CriticalAlert.state == AlertState.OPEN)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        return False
    _mark_clinic_read(session, alert, now)
    session.expire(alert)
    record_access(
        session,
        signer,
        action="withdraw" if state is AlertState.WITHDRAWN else "supersede",
        object_type=SUBJECT,
        object_id=alert.id,
        detail={"report_id": alert.report_id, "superseded_by_report_id": superseded_by},
    )
    return True


def _supersede_earlier(
    session: Session,
    *,
    report: Report,
    exam: Exam,
    finding: str,
    signer: Principal,
    now: datetime,
) -> tuple[str | None, bool]:
    """Close the open alerts of the exam's earlier versions as superseded by ``report`` and
    link every earlier alert to it. Returns the latest earlier alert's ID (the one a new
    alert follows) and whether an acknowledgement already covers ``report``: the previous
    version was critical too and the clinic read back this very finding."""
    earlier = (
        session.execute(
            select(CriticalAlert)
            .join(Report, Report.id == CriticalAlert.report_id)
            .where(CriticalAlert.exam_id == exam.id, Report.version < report.version)
            .order_by(Report.version.desc())
            .execution_options(populate_existing=True)
        )
        .scalars()
        .all()
    )
    latest = earlier[0] if earlier else None
    previous = session.get(Report, report.previous_id)
    stands = bool(
        report.critical
        and previous is not None
        and previous.critical
        and latest is not None
        and latest.state is AlertState.ACKNOWLEDGED
        and latest.finding == finding
    )
    closed = []
    for alert in earlier:
        if alert.state is AlertState.OPEN and _close(
            session, alert, AlertState.SUPERSEDED, signer=signer, now=now, superseded_by=report.id
        ):
            closed.append(alert)
    # Acknowledged (and withdrawn) alerts keep their state; they learn their successor.
    session.execute(
        update(CriticalAlert)
        .where(
            CriticalAlert.id.in_([a.id for a in earlier]),
            CriticalAlert.superseded_by_report_id.is_(None),
        )
        .values(superseded_by_report_id=report.id)
        .execution_options(synchronize_session=False)
    )
    if not report.critical:
        for alert in closed:
            _notify_clinic(
                session,
                alert,
                now=now,
                key=f"superseded:{report.id}",
                text=lambda patient, what, finding: (
                    f"危急值已被取代：{patient}，{what}：第{report.version}版报告不再报告危急值"
                    f"（原为：{finding}）。",
                    f"Critical value superseded: {patient}, {what}: report version "
                    f"{report.version} no longer reports a critical value (was: {finding}).",
                ),
            )
    return (latest.id if latest else None), stands


def _mark_clinic_read(session: Session, alert: CriticalAlert, now: datetime) -> None:
    # The clinic's reminders are done with; the centre's escalation notices stay unread.
    session.execute(
        update(Notification)
        .where(
            Notification.subject_type == SUBJECT,
            Notification.subject_id == alert.id,
            Notification.org_id == alert.org_id,
            Notification.read_at.is_(None),
        )
        .values(read_at=now)
        .execution_options(synchronize_session=False)
    )


def _notify(
    session: Session,
    alert: CriticalAlert,
    *,
    user_id: str | None,
    org_id: str,
    text: BilingualText,
    now: datetime,
    key: str = "raised",
    name: str | None = None,
    phone: str | None = None,
) -> None:
    add_notification(
        session,
        org_id=org_id,
        user_id=user_id,
        kind=CRITICAL_VALUE,
        subject_type=SUBJECT,
        subject_id=alert.id,
        text=text,
        now=now,
        key=key,
        recipient_name=name,
        recipient_phone=phone,
    )


def _notify_clinic(
    session: Session,
    alert: CriticalAlert,
    *,
    now: datetime,
    key: str,
    text: Callable[[str, str, str], BilingualText],
) -> None:
    """Tell every user of the alert's clinic ``text(patient, what, finding)``: the alert's
    labels and (shortened) finding as it stands."""
    _notify(
        session,
        alert,
        user_id=None,
        org_id=alert.org_id,
        now=now,
        key=key,
        text=text(*_label(alert), _short(alert.finding)),
    )


def _visible(session: Session, principal: Principal, alert_id: str) -> CriticalAlert:
    if principal.is_clinic_user:
        require_roles(principal, _CLINIC_ROLES)
    else:
        require_roles(principal, _LEAD_ROLES, lead_only=True)
    stmt = select(CriticalAlert).where(CriticalAlert.id == alert_id)
    if principal.is_clinic_user:
        stmt = stmt.where(CriticalAlert.org_id == principal.org_id)
    alert = session.execute(stmt.execution_options(populate_existing=True)).scalar_one_or_none()
    if alert is None:
        raise NotFoundError(f"no critical-value alert {alert_id}")
    return alert


def _person(user: User | None) -> PersonOut | None:
    if user is None:
        return None
    return PersonOut(username=user.username, name=user.display_name or user.username)


def _minutes(later: datetime | None, earlier: datetime) -> float | None:
    return None if later is None else round((later - earlier).total_seconds() / 60, 2)


def alert_out(alert: CriticalAlert, *, now: datetime) -> AlertOut:
    """The register's view of an alert: both sides, times, and whether they were in time."""
    if alert.acknowledged_at is not None:
        within: bool | None = alert.acknowledged_at <= alert.deadline_at
    else:
        # A closed alert stopped the clock: late only if it was overdue when closed.
        until = alert.closed_at or now
        within = False if until > alert.deadline_at else None
    raiser = _person(alert.raiser)
    assert raiser is not None
    return AlertOut(
        id=alert.id,
        exam_id=alert.exam_id,
        report_id=alert.report_id,
        clinic_code=alert.organization.code,
        clinic_name=alert.organization.name,
        patient={
            "patient_id": shown_patient_id(alert.patient.issuer, alert.patient.patient_id),
            "issuer": alert.patient.issuer,
            "name": alert.patient.name,
        },
        exam={
            "accession_number": alert.exam.accession_number,
            "modality": alert.exam.modality,
            "body_part": alert.exam.body_part,
            "description": alert.exam.description,
            "priority": alert.exam.priority.value,
        },
        finding=alert.finding,
        raised_by=raiser,
        raised_at=alert.raised_at,
        deadline_at=alert.deadline_at,
        notified_at=alert.notified_at,
        minutes_to_notify=_minutes(alert.notified_at, alert.raised_at),
        notified_within_deadline=(
            None if alert.notified_at is None else alert.notified_at <= alert.deadline_at
        ),
        state=alert.state,
        escalated=alert.escalation_level > 0,
        escalation_level=alert.escalation_level,
        escalations=[
            EscalationOut(level=e.level, at=e.at, to=e.recipients) for e in alert.escalations
        ],
        acknowledged_by=_person(alert.acknowledger),
        receiver_name=alert.receiver_name,
        acknowledged_at=alert.acknowledged_at,
        read_back=alert.read_back,
        via=alert.ack_via,
        recorded_by=_person(alert.recorder),
        minutes_to_acknowledge=_minutes(alert.acknowledged_at, alert.raised_at),
        within_deadline=within,
        report_version=alert.report.version,
        report_critical=alert.report.critical,
        closed_at=alert.closed_at,
        closed_by=_person(alert.closer),
        superseded_by_report_id=alert.superseded_by_report_id,
        superseded_by_version=(
            alert.superseding_report.version if alert.superseding_report else None
        ),
        superseded_by_alert_id=(
            max(alert.successors, key=lambda a: a.raised_at).id if alert.successors else None
        ),
        previous_alert_id=alert.previous_alert_id,
    )


def get_alert(session: Session, *, principal: Principal, alert_id: str, now: datetime) -> AlertOut:
    """One alert of the register (a clinic sees its own only; others are not found). Audited."""
    alert = _visible(session, principal, alert_id)
    record_access(session, principal, action="view", object_type=SUBJECT, object_id=alert.id)
    return alert_out(alert, now=now)


def list_alerts(
    session: Session,
    *,
    principal: Principal,
    now: datetime,
    state: str | None = None,
    clinic: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[AlertOut]:
    """The critical-value register, newest first: lead-hospital staff see every clinic's
    alerts, a clinic its own. ``state`` is open, acknowledged or escalated (escalated at
    least once, whatever happened after), superseded (a newer report version was signed
    before anybody read it back) or withdrawn (the verifying senior un-ticked critical);
    ``since``/``until`` bound the time raised."""
    if principal.is_clinic_user:
        require_roles(principal, _CLINIC_ROLES)
    else:
        require_roles(principal, _LEAD_ROLES, lead_only=True)
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise InvalidInputError(f"limit must be 1-{MAX_PAGE} and offset not negative")
    if state is not None and state not in _REGISTER_STATES:
        raise InvalidInputError(f"state must be one of {', '.join(_REGISTER_STATES)}")
    stmt: Select[Any] = select(CriticalAlert)
    if principal.is_clinic_user:
        stmt = stmt.where(CriticalAlert.org_id == principal.org_id)
    if clinic:
        stmt = stmt.where(
            CriticalAlert.org_id.in_(select(Organization.id).where(Organization.code == clinic))
        )
    if state == "escalated":
        stmt = stmt.where(CriticalAlert.escalation_level > 0)
    elif state:
        stmt = stmt.where(CriticalAlert.state == AlertState(state))
    if since:
        stmt = stmt.where(CriticalAlert.raised_at >= since)
    if until:
        stmt = stmt.where(CriticalAlert.raised_at < until)
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    alerts = (
        session.execute(
            stmt.order_by(CriticalAlert.raised_at.desc(), CriticalAlert.id)
            .limit(limit)
            .offset(offset)
        )
        .scalars()
        .all()
    )
    items = [alert_out(a, now=now) for a in alerts]
    record_access(
        session,
        principal,
        action="list",
        object_type=SUBJECT,
        detail={"alert_ids": [a.id for a in items]},
    )
    return Page[AlertOut](items=items, total=total, limit=limit, offset=offset)


def acknowledge_alert(
    session: Session,
    *,
    principal: Principal,
    alert_id: str,
    data: AcknowledgementIn,
    now: datetime,
) -> AlertOut:
    """Record the clinic's read-back, exactly once (a second acknowledgement is a conflict).

    A clinic user acknowledges in the portal for their own clinic. Lead-hospital staff
    record an acknowledgement taken by telephone (``via`` phone, with the receiver's name):
    then both the clinic's receiver and the recording staff member are kept.
    """
    alert = _visible(session, principal, alert_id)
    read_back = data.read_back.strip()
    if not read_back:
        raise InvalidInputError("the read-back must repeat the critical finding")
    receiver = (data.receiver_name or "").strip() or None
    if principal.is_clinic_user:
        if data.via is not AckChannel.PORTAL:
            raise InvalidInputError("clinic users acknowledge in the portal (via=portal)")
        acknowledged_by: str | None = principal.user_id
        recorded_by: str | None = None
    else:
        if data.via is not AckChannel.PHONE:
            raise InvalidInputError(
                "lead-hospital staff record an acknowledgement taken by telephone (via=phone)"
            )
        if receiver is None:
            raise InvalidInputError("name the clinic's receiver of the telephone call")
        acknowledged_by, recorded_by = None, principal.user_id
    result = session.execute(
        update(CriticalAlert)
        .where(CriticalAlert.id == alert.id, CriticalAlert.state == AlertState.OPEN)
        .values(
            state=AlertState.ACKNOWLEDGED,
            acknowledged_by=acknowledged_by,
            receiver_name=receiver,
            acknowledged_at=now,
            read_back=read_back,
            ack_via=data.via,
            recorded_by=recorded_by,
            next_escalation_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        state = session.execute(
            select(CriticalAlert.state).where(CriticalAlert.id == alert.id)
        ).scalar_one()
        if state in (AlertState.SUPERSEDED, AlertState.WITHDRAWN):
            raise AlertClosedError(
                f"critical-value alert {alert.id} was {state.value}; see the current report"
            )
        raise AlreadyAcknowledgedError(f"critical-value alert {alert.id} is already acknowledged")
    _mark_clinic_read(session, alert, now)
    record_access(
        session,
        principal,
        action="acknowledge",
        object_type=SUBJECT,
        object_id=alert.id,
        detail={"via": data.via.value, "receiver_name": receiver, "read_back": read_back},
    )
    alert = _visible(session, principal, alert_id)
    return alert_out(alert, now=now)


def _lead_org_id(session: Session) -> str | None:
    return session.execute(
        select(Organization.id).where(Organization.kind == OrgKind.LEAD)
    ).scalar_one_or_none()


def _escalate_level_1(
    session: Session, alert: CriticalAlert, text: BilingualText, now: datetime
) -> list[dict[str, Any]]:
    recipients: list[dict[str, Any]] = []
    contact = contact_for(session, org_id=alert.org_id)
    secondary_user = None
    if contact is not None and contact.secondary_username:
        secondary_user = session.execute(
            select(User).where(
                User.username == contact.secondary_username,
                User.org_id == alert.org_id,
                User.active.is_(True),
            )
        ).scalar_one_or_none()
    if contact is not None and contact.secondary_name:
        recipients.append(
            {
                "role": "clinic_secondary",
                "name": contact.secondary_name,
                "phone": contact.secondary_phone,
                "username": secondary_user.username if secondary_user else None,
            }
        )
        _notify(
            session,
            alert,
            user_id=secondary_user.id if secondary_user else None,
            org_id=alert.org_id,
            text=text,
            now=now,
            key="level1",
            name=None if secondary_user else contact.secondary_name,
            phone=None if secondary_user else contact.secondary_phone,
        )
    else:
        # No second contact on file: the whole clinic sees the escalation.
        recipients.append({"role": "clinic", "org": alert.organization.code})
        _notify(session, alert, user_id=None, org_id=alert.org_id, text=text, now=now, key="level1")
    duty = on_duty(session, now=now)
    for user in duty:
        recipients.append(
            {"role": "duty", "username": user.username, "name": user.display_name or user.username}
        )
        _notify(
            session, alert, user_id=user.id, org_id=user.org_id, text=text, now=now, key="level1"
        )
    lead = _lead_org_id(session)
    if not duty and lead is not None:
        recipients.append({"role": "centre", "org": "lead"})
        _notify(session, alert, user_id=None, org_id=lead, text=text, now=now, key="level1")
    return recipients


def _escalate_level_2(
    session: Session, alert: CriticalAlert, text: BilingualText, now: datetime
) -> list[dict[str, Any]]:
    recipients: list[dict[str, Any]] = []
    lead = _lead_org_id(session)
    users = session.execute(
        select(User)
        .where(User.org_id == lead, User.active.is_(True), User.role.in_([Role.QC, Role.ADMIN]))
        .order_by(User.username)
    ).scalars()
    for user in users:
        recipients.append(
            {
                "role": user.role.value,
                "username": user.username,
                "name": user.display_name or user.username,
            }
        )
        _notify(
            session, alert, user_id=user.id, org_id=user.org_id, text=text, now=now, key="level2"
        )
    return recipients


def escalate_overdue_alerts(session: Session, *, now: datetime, limit: int = 100) -> list[str]:
    """Escalate every open alert whose next escalation is due; returns "alert_id:level" for
    each escalation that fired (at most ``limit`` per call).

    Level 1 (deadline passed): the clinic's second contact and the centre's duty list
    (nobody on duty: the whole lead hospital). Level 2 (twice the time): the lead
    hospital's QC and administrators. Each level is taken by a conditional UPDATE, so a
    level fires exactly once however many scanners run.
    """
    due = session.execute(
        select(CriticalAlert.id, CriticalAlert.escalation_level)
        .where(
            CriticalAlert.state == AlertState.OPEN,
            CriticalAlert.next_escalation_at.is_not(None),
            CriticalAlert.next_escalation_at <= now,
        )
        .order_by(CriticalAlert.next_escalation_at)
        .limit(limit)
    ).all()
    fired = []
    for alert_id, level in due:
        alert = session.get(CriticalAlert, alert_id, populate_existing=True)
        assert alert is not None
        new_level = level + 1
        span = alert.deadline_at - alert.raised_at
        next_at = alert.raised_at + span * (new_level + 1) if new_level < LAST_LEVEL else None
        result = session.execute(
            update(CriticalAlert)
            .where(
                CriticalAlert.id == alert_id,
                CriticalAlert.state == AlertState.OPEN,
                CriticalAlert.escalation_level == level,
            )
            .values(escalation_level=new_level, escalated_at=now, next_escalation_at=next_at)
            .execution_options(synchronize_session=False)
        )
        if not cast(CursorResult[Any], result).rowcount:
            continue  # another scanner took this level, or the clinic acknowledged meanwhile
        patient, what = _label(alert)
        waited = f"{(now - alert.raised_at).total_seconds() / 60:.0f}"
        text = (
            f"危急值{waited}分钟未确认（升级第{new_level}级）：{alert.organization.name}，"
            f"{patient}，{what}：{_short(alert.finding)}",
            f"Critical value not acknowledged after {waited} min (escalation level "
            f"{new_level}): {alert.organization.name}, {patient}, {what}: "
            f"{_short(alert.finding)}",
        )
        if new_level == 1:
            recipients = _escalate_level_1(session, alert, text, now)
        else:
            recipients = _escalate_level_2(session, alert, text, now)
        insert_ignore(
            session,
            CriticalEscalation.__table__,
            {
                "id": stable_id("critical_escalation", alert_id, str(new_level)),
                "alert_id": alert_id,
                "level": new_level,
                "at": now,
                "recipients": recipients,
            },
            conflict=(),  # the ID derives from (alert_id, level): a clash on either is this row
        )
        record_event(
            session,
            actor="system",
            org_id=alert.org_id,
            action="escalate",
            object_type=SUBJECT,
            object_id=alert_id,
            detail={"level": new_level, "recipients": recipients},
        )
        session.expire(alert)
        fired.append(f"{alert_id}:{new_level}")
    return fired
