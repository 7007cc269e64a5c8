"""Whom to reach about a critical value: each clinic's primary and secondary contact, and
the centre's duty list. Changes come from an administrator (API) or the command line
(``principal`` None) and are audited either way."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from rdc_core.db import stable_id, upsert
from rdc_core.errors import InvalidInputError, NotFoundError
from worklist.access import Principal, require_roles
from worklist.audit import record_event
from worklist.critical_values.models import CriticalContact, DutyEntry
from worklist.critical_values.schemas import ContactIn, ContactOut, DutyOut
from worklist.directory import get_organization
from worklist.models import Organization, OrgKind, Role, User

__all__ = [
    "add_duty",
    "contact_for",
    "get_contact",
    "list_duty",
    "on_duty",
    "remove_duty",
    "set_contact",
]

_ADMIN = frozenset({Role.ADMIN})
_LEAD_ROLES = frozenset({Role.READER, Role.SENIOR_READER, Role.QC, Role.ADMIN})


def _audit(
    session: Session,
    principal: Principal | None,
    *,
    action: str,
    object_type: str,
    object_id: str,
    detail: dict[str, object],
) -> None:
    record_event(
        session,
        actor=principal.actor if principal else "cli",
        org_id=principal.org_id if principal else None,
        action=action,
        object_type=object_type,
        object_id=object_id,
        detail=detail,
    )


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _org_user(session: Session, org: Organization, username: str | None, what: str) -> None:
    if username is None:
        return
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None or user.org_id != org.id or not user.active:
        raise InvalidInputError(f"{what}: {username!r} is not an active user of {org.code}")


def _contact_out(contact: CriticalContact) -> ContactOut:
    return ContactOut(
        org_code=contact.organization.code,
        primary_name=contact.primary_name,
        primary_phone=contact.primary_phone,
        primary_username=contact.primary_username,
        secondary_name=contact.secondary_name,
        secondary_phone=contact.secondary_phone,
        secondary_username=contact.secondary_username,
        updated_at=contact.updated_at,
    )


def set_contact(
    session: Session,
    *,
    principal: Principal | None,
    org_code: str,
    data: ContactIn,
    now: datetime,
) -> ContactOut:
    """Set (replace) the critical-value contacts of clinic ``org_code``. The primary contact
    needs a name and a telephone number; the secondary one both or neither. A username
    must be an active user of that clinic."""
    if principal is not None:
        require_roles(principal, _ADMIN, lead_only=True)
    org = get_organization(session, code=org_code)
    if org.kind is not OrgKind.CLINIC:
        raise InvalidInputError(f"{org_code} is not a clinic")
    values = {
        "primary_name": _clean(data.primary_name),
        "primary_phone": _clean(data.primary_phone),
        "primary_username": _clean(data.primary_username),
        "secondary_name": _clean(data.secondary_name),
        "secondary_phone": _clean(data.secondary_phone),
        "secondary_username": _clean(data.secondary_username),
    }
    if not (values["primary_name"] and values["primary_phone"]):
        raise InvalidInputError("the primary contact needs a name and a telephone number")
    if bool(values["secondary_name"]) != bool(values["secondary_phone"]):
        raise InvalidInputError("the secondary contact needs both a name and a telephone number")
    if values["secondary_username"] and not values["secondary_name"]:
        raise InvalidInputError("a secondary username needs the secondary contact's name")
    _org_user(session, org, values["primary_username"], "primary contact")
    _org_user(session, org, values["secondary_username"], "secondary contact")
    upsert(
        session,
        CriticalContact.__table__,
        {"org_id": org.id, **values, "updated_at": now},
        conflict=["org_id"],
        update=[*values, "updated_at"],
    )
    contact = session.get(CriticalContact, org.id, populate_existing=True)
    assert contact is not None
    _audit(
        session,
        principal,
        action="configure",
        object_type="critical_contact",
        object_id=org.code,
        detail=dict(values),
    )
    return _contact_out(contact)


def contact_for(session: Session, *, org_id: str) -> CriticalContact | None:
    """The clinic's contact list, or None when it has none."""
    return session.get(CriticalContact, org_id)


def get_contact(session: Session, *, principal: Principal, org_code: str) -> ContactOut:
    """A clinic's contacts: lead-hospital staff see every clinic's, a clinic its own (another
    clinic's answers not found)."""
    org = get_organization(session, code=org_code)
    if principal.is_clinic_user and principal.org_id != org.id:
        raise NotFoundError(f"no organisation with code {org_code!r}")
    contact = contact_for(session, org_id=org.id)
    if contact is None:
        raise NotFoundError(f"{org_code} has no critical-value contacts yet")
    return _contact_out(contact)


def _duty_out(entry: DutyEntry, now: datetime) -> DutyOut:
    return DutyOut(
        username=entry.user.username,
        name=entry.user.display_name or entry.user.username,
        on_from=entry.on_from,
        on_until=entry.on_until,
        on_duty_now=entry.user.active
        and (entry.on_from is None or entry.on_from <= now)
        and (entry.on_until is None or now < entry.on_until),
    )


def list_duty(session: Session, *, principal: Principal | None, now: datetime) -> list[DutyOut]:
    """The centre's duty list (lead-hospital staff and the command line)."""
    if principal is not None:
        require_roles(principal, _LEAD_ROLES, lead_only=True)
    entries = session.execute(select(DutyEntry)).scalars().all()
    return sorted((_duty_out(e, now) for e in entries), key=lambda d: d.username)


def on_duty(session: Session, *, now: datetime) -> list[User]:
    """Active users on the duty list whose window holds ``now``."""
    return list(
        session.execute(
            select(User)
            .join(DutyEntry, DutyEntry.user_id == User.id)
            .where(
                User.active.is_(True),
                or_(DutyEntry.on_from.is_(None), DutyEntry.on_from <= now),
                or_(DutyEntry.on_until.is_(None), DutyEntry.on_until > now),
            )
            .order_by(User.username)
        )
        .scalars()
        .all()
    )


def add_duty(
    session: Session,
    *,
    principal: Principal | None,
    username: str,
    on_from: datetime | None = None,
    on_until: datetime | None = None,
    now: datetime,
) -> DutyOut:
    """Put a lead-hospital user on the duty list (again: replaces the window)."""
    if principal is not None:
        require_roles(principal, _ADMIN, lead_only=True)
    for value in (on_from, on_until):
        if value is not None and value.tzinfo is None:
            raise InvalidInputError("duty window times need a time zone")
    if on_from and on_until and on_until <= on_from:
        raise InvalidInputError("the duty window ends before it starts")
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise NotFoundError(f"no user {username!r}")
    if user.organization.kind is not OrgKind.LEAD:
        raise InvalidInputError(f"{username} is not lead-hospital staff")
    upsert(
        session,
        DutyEntry.__table__,
        {
            "id": stable_id("critical_duty", user.id),
            "user_id": user.id,
            "on_from": on_from,
            "on_until": on_until,
            "created_at": now,
        },
        conflict=["id"],
        update=["on_from", "on_until"],
    )
    entry = session.get(DutyEntry, stable_id("critical_duty", user.id), populate_existing=True)
    assert entry is not None
    _audit(
        session,
        principal,
        action="configure",
        object_type="critical_duty",
        object_id=username,
        detail={
            "on_from": on_from.isoformat() if on_from else None,
            "on_until": on_until.isoformat() if on_until else None,
        },
    )
    return _duty_out(entry, now)


def remove_duty(session: Session, *, principal: Principal | None, username: str) -> None:
    """Take a user off the duty list; NotFoundError when they are not on it."""
    if principal is not None:
        require_roles(principal, _ADMIN, lead_only=True)
    user_id = session.execute(select(User.id).where(User.username == username)).scalar_one_or_none()
    result = session.execute(
        delete(DutyEntry)
        .where(DutyEntry.user_id == user_id)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise NotFoundError(f"{username} is not on the duty list")
    _audit(
        session,
        principal,
        action="remove",
        object_type="critical_duty",
        object_id=username,
        detail={},
    )
