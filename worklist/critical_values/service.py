"""Critical-value alerts: raised when a critical report version is signed, acknowledged by
the clinic with a read-back, escalated when nobody did in time, and listed in the register.

The clinic must be notified within the configured minutes (default 10, DESIGN.md §5); the
portal notification goes out in the signer's own transaction, so ``notified_at`` equals
``raised_at`` unless something delayed it. Every change of an alert is a conditional
UPDATE: of two acknowledgements exactly one wins, and two scanners never escalate the same
level twice.
"""

from __future__ import annotations

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
from worklist.models import Exam, Organization, OrgKind, Report, Role, User
from worklist.schemas import Page

__all__ = [
    "CRITICAL_VALUE",
    "LAST_LEVEL",
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
_REGISTER_STATES = ("open", "acknowledged", "escalated")


class AlreadyAcknowledgedError(ConflictError):
    """The alert was acknowledged already; an acknowledgement is recorded exactly once."""

    title = "Already acknowledged"


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
    # DICOM person names: family^given, with ideographic/phonetic forms after "=".
    name = (alert.patient.name or "").split("=")[0].replace("^", " ").strip()
    patient = f"{name or alert.patient.patient_id} ({alert.patient.patient_id})"
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
    alert's ID (None for a report without a critical finding).

    One alert per report version (its ID derives from the report's): a retry creates
    nothing twice. The clinic's clinicians and its primary contact are notified in the
    portal at once; a primary contact without a login gets a clinic-wide row naming them.
    """
    if not report.critical:
        return None
    settings = get_settings()
    alert_id = stable_id("critical_alert", report.id)
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
            "finding": _finding(report) or "危急值 / critical value",
            "raised_by": signer.user_id,
            "raised_at": now,
            "deadline_at": deadline,
            "state": AlertState.OPEN.value,
            "escalation_level": 0,
            "next_escalation_at": deadline,
            "created_at": now,
        },
        conflict=["id"],
    )
    if not inserted:
        return alert_id
    alert = session.get(CriticalAlert, alert_id)
    assert alert is not None
    patient, what = _label(alert)
    minutes = f"{settings.critical_escalation_minutes:g}"
    text = (
        f"危急值：{patient}，{what}：{_short(alert.finding)}。请在{minutes}分钟内复述确认。",
        f"Critical value: {patient}, {what}: {_short(alert.finding)}. "
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
        detail={"report_id": report.id, "exam_id": exam.id, "clinic": exam.org_id},
    )
    return alert_id


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
        within = False if now > alert.deadline_at else None
    raiser = _person(alert.raiser)
    assert raiser is not None
    return AlertOut(
        id=alert.id,
        exam_id=alert.exam_id,
        report_id=alert.report_id,
        clinic_code=alert.organization.code,
        clinic_name=alert.organization.name,
        patient={
            "patient_id": alert.patient.patient_id,
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
    least once, whatever happened after); ``since``/``until`` bound the time raised."""
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
        raise AlreadyAcknowledgedError(f"critical-value alert {alert.id} is already acknowledged")
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
            conflict=["id"],
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
