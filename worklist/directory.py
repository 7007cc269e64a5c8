"""Organisations, their AE titles, and users: the alliance's directory."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from rdc_core.db import insert_ignore, stable_id, upsert, utcnow
from rdc_core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
)
from rdc_core.security import hash_password, verify_password
from worklist.access import Principal
from worklist.accounts import revoke_tokens
from worklist.audit import record_event
from worklist.models import (
    AETitle,
    Discipline,
    HL7Facility,
    Organization,
    OrgKind,
    ReaderLevel,
    Role,
    User,
)
from worklist.schemas import Me

__all__ = [
    "OrgRef",
    "add_ae_title",
    "add_hl7_facility",
    "add_organization",
    "add_user",
    "authenticate",
    "check_role",
    "describe_principal",
    "find_organization",
    "get_organization",
    "org_ref",
    "organization_for_ae",
    "organization_for_hl7_facility",
    "principal_for_user",
]


@dataclass(frozen=True, slots=True)
class OrgRef:
    """An organisation's identity, cheap to pass around and cache (no ORM state)."""

    id: str
    code: str
    kind: OrgKind


# A bcrypt hash of a random password nobody knows (cost 12, like real hashes).
_UNKNOWN_USER_HASH = "$2b$12$C6UzMDM.H6dfI/f/IKcEeO5hNpeXqzj1mYQbOK7BRFXwVtKQ4kZ7a"

_CODE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
# DICOM AE titles: up to 16 characters of the default repertoire, no backslash or controls.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _normalise_ae(ae_title: str) -> str:
    value = ae_title.strip()
    if not value or not _AE_RE.match(value):
        raise InvalidInputError(
            f"invalid AE title {ae_title!r}: 1-16 printable characters, no backslash"
        )
    return value


def add_organization(
    session: Session,
    *,
    code: str,
    name: str,
    kind: OrgKind,
    ae_titles: list[str] | None = None,
    hl7_facilities: list[str] | None = None,
    actor: str = "cli",
    update_existing: bool = True,
) -> Organization:
    """Create or update the organisation ``code`` and register its AE titles and HL7 sending
    facilities.

    Only one lead hospital may exist; re-running with the same code updates the name, unless
    ``update_existing`` is false: then an existing code is a ConflictError.
    """
    if not _CODE_RE.match(code):
        raise InvalidInputError(f"invalid organisation code {code!r}: letters, digits, - and _")
    if not name.strip():
        raise InvalidInputError("organisation name must not be empty")
    org_id = stable_id("org", code)
    existing = session.get(Organization, org_id)
    if existing is not None and not update_existing:
        raise ConflictError(
            f"organisation {code} exists already ({existing.name}); use --update to change it"
        )
    if existing is not None and existing.kind is not kind:
        raise ConflictError(f"organisation {code} exists as a {existing.kind.value}")
    if kind is OrgKind.LEAD:
        other_lead = session.execute(
            select(Organization.code).where(
                Organization.kind == OrgKind.LEAD, Organization.id != org_id
            )
        ).scalar_one_or_none()
        if other_lead is not None:
            raise ConflictError(
                f"the lead hospital is already {other_lead}; there is one per deployment"
            )
    upsert(
        session,
        Organization.__table__,
        {
            "id": org_id,
            "code": code,
            "name": name.strip(),
            "kind": kind.value,
            "created_at": utcnow(),
        },
        conflict=["id"],
        update=["name"],
    )
    for ae in ae_titles or []:
        add_ae_title(session, org_code=code, ae_title=ae)
    for facility in hl7_facilities or []:
        add_hl7_facility(session, org_code=code, name=facility)
    org = session.get(Organization, org_id, populate_existing=True)
    assert org is not None
    record_event(
        session,
        actor=actor,
        action="configure",
        object_type="organization",
        object_id=org_id,
        org_id=org_id,
        detail={
            "code": code,
            "name": org.name,
            "kind": kind.value,
            "ae_titles": ae_titles or [],
            "hl7_facilities": hl7_facilities or [],
        },
    )
    return org


def add_ae_title(session: Session, *, org_code: str, ae_title: str) -> None:
    """Register ``ae_title`` for the organisation; an AE title belongs to one organisation only."""
    org = get_organization(session, code=org_code)
    value = _normalise_ae(ae_title)
    inserted = insert_ignore(
        session,
        AETitle.__table__,
        {"ae_title": value, "org_id": org.id, "created_at": utcnow()},
        conflict=["ae_title"],
    )
    if not inserted:
        owner = session.execute(
            select(AETitle.org_id).where(AETitle.ae_title == value)
        ).scalar_one()
        if owner != org.id:
            raise ConflictError(f"AE title {value} already belongs to another organisation")


def _normalise_facility(name: str) -> str:
    value = name.strip()
    if not value or len(value) > 255 or any(ord(c) < 0x20 for c in value):
        raise InvalidInputError(
            f"invalid HL7 sending facility {name!r}: 1-255 characters, no control characters"
        )
    if any(c in value for c in "|^~\\&"):
        raise InvalidInputError(
            f"invalid HL7 sending facility {name!r}: give one component (the namespace ID or "
            "the universal ID of MSH-4), without HL7 delimiters"
        )
    return value


def add_hl7_facility(session: Session, *, org_code: str, name: str) -> None:
    """Register ``name`` as an HL7 sending facility of the clinic ``org_code``: messages whose
    MSH-4 namespace ID or universal ID is ``name`` come from that clinic. A name belongs to
    one organisation only."""
    org = get_organization(session, code=org_code)
    if org.kind is not OrgKind.CLINIC:
        raise InvalidInputError("HL7 sending facilities belong to member clinics")
    value = _normalise_facility(name)
    inserted = insert_ignore(
        session,
        HL7Facility.__table__,
        {"name": value, "org_id": org.id, "created_at": utcnow()},
        conflict=["name"],
    )
    if not inserted:
        owner = session.execute(
            select(HL7Facility.org_id).where(HL7Facility.name == value)
        ).scalar_one()
        if owner != org.id:
            raise ConflictError(f"HL7 facility {value} already belongs to another organisation")


def organization_for_hl7_facility(session: Session, *, names: Sequence[str]) -> OrgRef | None:
    """The clinic that registered one of ``names`` (MSH-4's namespace ID and universal ID), or
    None. Should two names belong to different clinics, the first given wins."""
    wanted = [n.strip() for n in names if n and n.strip()]
    if not wanted:
        return None
    stmt = (
        select(Organization.id, Organization.code, Organization.kind, HL7Facility.name)
        .join(HL7Facility, HL7Facility.org_id == Organization.id)
        .where(HL7Facility.name.in_(wanted), Organization.kind == OrgKind.CLINIC)
    )
    rows = {row.name: row for row in session.execute(stmt)}
    for name in wanted:
        row = rows.get(name)
        if row is not None:
            return OrgRef(id=row.id, code=row.code, kind=OrgKind(row.kind))
    return None


def find_organization(session: Session, *, code: str) -> Organization | None:
    """The organisation ``code``, or None."""
    return session.execute(
        select(Organization).where(Organization.code == code)
    ).scalar_one_or_none()


def get_organization(session: Session, *, code: str) -> Organization:
    """The organisation with ``code``; raises NotFoundError."""
    org = session.execute(
        select(Organization).where(Organization.code == code)
    ).scalar_one_or_none()
    if org is None:
        raise NotFoundError(f"no organisation with code {code!r}")
    return org


def organization_for_ae(session: Session, *, ae_title: str) -> OrgRef | None:
    """The clinic that owns the calling AE title, or None."""
    stmt = (
        select(Organization.id, Organization.code, Organization.kind)
        .join(AETitle, AETitle.org_id == Organization.id)
        .where(
            AETitle.ae_title == ae_title.strip(),
            Organization.kind == OrgKind.CLINIC,
            Organization.active.is_(True),
        )
    )
    row = session.execute(stmt).one_or_none()
    return OrgRef(id=row.id, code=row.code, kind=row.kind) if row else None


def org_ref(org: Organization) -> OrgRef:
    """The cacheable identity of ``org``."""
    return OrgRef(id=org.id, code=org.code, kind=org.kind)


def add_user(
    session: Session,
    *,
    username: str,
    password: str,
    role: Role,
    org_code: str,
    level: ReaderLevel | None = None,
    display_name: str = "",
    pools: list[str] | None = None,
    qualifications: list[dict[str, str]] | None = None,
    actor: str = "cli",
) -> User:
    """Create the user, or reset password/role/level of an existing one (idempotent).

    ``pools`` (reader pools the routing rules fill) and ``qualifications`` (``{"discipline":
    ..., "modality": ...}``) limit what a reader sees; given, they replace the stored ones.
    """
    if not re.match(r"^[A-Za-z0-9._@-]{2,64}$", username):
        raise InvalidInputError("username: 2-64 letters, digits, . _ @ -")
    org = get_organization(session, code=org_code)
    level = check_role(org, role, level)
    values = {
        "id": stable_id("user", username),
        "username": username,
        "display_name": display_name or username,
        "password_hash": hash_password(password),
        "role": role.value,
        "level": level.value if level else None,
        "org_id": org.id,
        "active": True,
        "created_at": utcnow(),
    }
    existing = session.get(User, values["id"])
    if existing is not None and existing.org_id != org.id:
        raise ConflictError(f"user {username} belongs to another organisation")
    # A password reset ends every session of the old password.
    reset = existing is not None and not verify_password(password, existing.password_hash)
    upsert(
        session,
        User.__table__,
        values,
        conflict=["id"],
        update=["display_name", "password_hash", "role", "level", "active"],
    )
    user = session.get(User, values["id"], populate_existing=True)
    assert user is not None
    if pools is not None:
        user.pools = sorted({p.strip() for p in pools if p.strip()})
    if qualifications is not None:
        for q in qualifications:
            if q.get("discipline") not in {d.value for d in Discipline}:
                raise InvalidInputError(f"unknown discipline in qualification {q!r}")
        user.qualifications = [
            {k: v.upper() if k == "modality" else v for k, v in q.items() if v}
            for q in qualifications
        ]
    if (pools or qualifications) and role not in {Role.READER, Role.SENIOR_READER}:
        raise InvalidInputError("pools and qualifications apply to readers only")
    session.flush()
    if reset:
        revoke_tokens(session, user_id=user.id)
        session.refresh(user)
    record_event(
        session,
        actor=actor,
        action="reset_password" if reset else ("update_user" if existing else "add_user"),
        object_type="user",
        object_id=user.id,
        org_id=org.id,
        detail={
            "username": username,
            "role": role.value,
            "level": level.value if level else None,
            "pools": user.pools,
            "qualifications": user.qualifications,
        },
    )
    return user


_LEAD_ROLES = frozenset({Role.READER, Role.SENIOR_READER, Role.QC, Role.ADMIN})
_READERS = frozenset({Role.READER, Role.SENIOR_READER})


def check_role(org: Organization, role: Role, level: ReaderLevel | None) -> ReaderLevel | None:
    """Check that ``role`` (and ``level``) fit a user of ``org``; returns the reader level to
    store (a reader without one is a resident, a senior reader an attending)."""
    if role in _LEAD_ROLES and org.kind is not OrgKind.LEAD:
        raise InvalidInputError(f"role {role.value} belongs to the lead hospital, not to a clinic")
    if role not in _LEAD_ROLES and org.kind is OrgKind.LEAD:
        raise InvalidInputError(f"role {role.value} belongs to a clinic, not to the lead hospital")
    if level is not None and role not in _READERS:
        raise InvalidInputError("--level applies to readers only")
    if role in _READERS and level is None:
        level = ReaderLevel.ATTENDING if role is Role.SENIOR_READER else ReaderLevel.RESIDENT
    return level


def principal_for_user(user: User) -> Principal:
    """The service-level identity of ``user``."""
    return Principal(
        user_id=user.id,
        username=user.username,
        role=user.role,
        org_id=user.org_id,
        org_kind=user.organization.kind,
        level=user.level,
        token_generation=user.token_generation or 0,
        display_name=user.display_name or "",
    )


def describe_principal(session: Session, *, principal: Principal) -> Me:
    """The principal's own user and organisation, for the UI's header."""
    user = session.get(User, principal.user_id)
    if user is None:
        raise NotFoundError("the user no longer exists")
    return Me(
        username=user.username,
        display_name=user.display_name,
        role=user.role.value,
        level=user.level,
        org_code=user.organization.code,
        org_kind=user.organization.kind.value,
    )


def authenticate(session: Session, *, username: str, password: str) -> Principal:
    """Check credentials; raises AuthenticationError without saying which part was wrong."""
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    # Check a password even for unknown users, so response time does not reveal usernames.
    hashed = user.password_hash if user is not None else _UNKNOWN_USER_HASH
    if (
        not verify_password(password, hashed)
        or user is None
        or not user.active
        or not user.organization.active
    ):
        raise AuthenticationError("unknown user or wrong password")
    return principal_for_user(user)
