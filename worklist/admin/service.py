"""The administration console's services: clinics and their AE titles, users, routing rules
and SLA targets. Every change is audited with what it was before and after; ``principal``
None is the command line (a local operator, actor ``cli``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from rdc_core.db import upsert
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError
from rdc_core.security import hash_password
from worklist.access import Principal, require_roles
from worklist.admin.schemas import (
    ClinicIn,
    ClinicOut,
    ClinicPatch,
    Qualification,
    RoutingRuleIn,
    RoutingRuleOut,
    RoutingRulesOut,
    SlaTargetIn,
    SlaTargetOut,
    SlaTargetsOut,
    UserIn,
    UserOut,
    UserPatch,
)
from worklist.audit import record_event
from worklist.directory import (
    _normalise_ae,
    _normalise_facility,
    add_ae_title,
    add_hl7_facility,
    add_organization,
    add_user,
    check_role,
    get_organization,
)
from worklist.models import (
    AETitle,
    Discipline,
    Exam,
    ExamState,
    HL7Facility,
    Organization,
    OrgKind,
    Priority,
    Role,
    RoutingRule,
    SlaTarget,
    User,
    WorkItem,
    WorkItemState,
)
from worklist.readiness import DEFAULT_SLA_MINUTES

__all__ = [
    "create_clinic",
    "create_user",
    "get_routing_rules",
    "get_sla_targets",
    "list_clinics",
    "list_users",
    "put_routing_rules",
    "put_sla_targets",
    "reset_password",
    "save_organization",
    "update_clinic",
    "update_user",
]

_ADMIN = frozenset({Role.ADMIN})
_READ_ROLES = frozenset({Role.ADMIN, Role.QC})


def _require(principal: Principal | None, roles: frozenset[Role]) -> None:
    if principal is not None:  # None: the command line, a local operator
        require_roles(principal, roles, lead_only=True)


def _audit(
    session: Session,
    principal: Principal | None,
    *,
    action: str,
    object_type: str,
    object_id: str,
    before: Any,
    after: Any,
) -> None:
    record_event(
        session,
        actor=principal.actor if principal else "cli",
        org_id=principal.org_id if principal else None,
        action=action,
        object_type=object_type,
        object_id=object_id,
        detail={"before": before, "after": after},
    )


# --- clinics -------------------------------------------------------------------------------


def _clinic_out(session: Session, org: Organization) -> ClinicOut:
    titles = session.execute(
        select(AETitle.ae_title).where(AETitle.org_id == org.id).order_by(AETitle.ae_title)
    ).scalars()
    users = session.execute(
        select(func.count()).select_from(User).where(User.org_id == org.id)
    ).scalar_one()
    facilities = session.execute(
        select(HL7Facility.name).where(HL7Facility.org_id == org.id).order_by(HL7Facility.name)
    ).scalars()
    return ClinicOut(
        code=org.code,
        name=org.name,
        kind=org.kind.value,
        active=org.active,
        ae_titles=list(titles),
        hl7_facilities=list(facilities),
        users=users,
    )


def list_clinics(
    session: Session, *, principal: Principal | None, include_lead: bool = False
) -> list[ClinicOut]:
    """The member clinics (and the lead hospital if asked), by code, with their AE titles."""
    _require(principal, _READ_ROLES)
    stmt = select(Organization).order_by(Organization.kind != OrgKind.LEAD, Organization.code)
    if not include_lead:
        stmt = stmt.where(Organization.kind == OrgKind.CLINIC)
    return [_clinic_out(session, org) for org in session.execute(stmt).scalars()]


def save_organization(
    session: Session,
    *,
    principal: Principal | None,
    code: str,
    name: str,
    kind: OrgKind = OrgKind.CLINIC,
    ae_titles: list[str] | None = None,
    hl7_facilities: list[str] | None = None,
    update: bool = False,
) -> ClinicOut:
    """Register an organisation; an existing code is a ConflictError unless ``update`` (then
    it is renamed and the AE titles are added). Audited before/after."""
    _require(principal, _ADMIN)
    existing = session.execute(
        select(Organization).where(Organization.code == code)
    ).scalar_one_or_none()
    before = _clinic_out(session, existing).model_dump(exclude={"users"}) if existing else None
    org = add_organization(
        session,
        code=code,
        name=name,
        kind=kind,
        ae_titles=ae_titles,
        hl7_facilities=hl7_facilities,
        actor=principal.actor if principal else "cli",
        update_existing=update,
    )
    out = _clinic_out(session, org)
    after = out.model_dump(exclude={"users"})
    if after != before:
        _audit(
            session,
            principal,
            action="clinic.create" if before is None else "clinic.update",
            object_type="organization",
            object_id=org.code,
            before=before,
            after=after,
        )
    return out


def create_clinic(session: Session, *, principal: Principal | None, data: ClinicIn) -> ClinicOut:
    """Register a new clinic; an existing code is a ConflictError (edit it instead)."""
    return save_organization(
        session,
        principal=principal,
        code=data.code,
        name=data.name,
        ae_titles=data.ae_titles,
        hl7_facilities=data.hl7_facilities,
    )


def update_clinic(
    session: Session, *, principal: Principal | None, code: str, patch: ClinicPatch
) -> ClinicOut:
    """Rename, disable/enable a clinic or replace its AE titles or HL7 sending facilities;
    audited before/after."""
    _require(principal, _ADMIN)
    org = get_organization(session, code=code)
    before = _clinic_out(session, org).model_dump(exclude={"users"})
    if patch.name is not None:
        if not patch.name.strip():
            raise InvalidInputError("organisation name must not be empty")
        org.name = patch.name.strip()
    if patch.active is not None:
        if org.kind is OrgKind.LEAD and not patch.active:
            raise InvalidInputError("the lead hospital cannot be disabled")
        org.active = patch.active
    if patch.ae_titles is not None:
        wanted = {_normalise_ae(ae) for ae in patch.ae_titles}
        session.execute(
            delete(AETitle).where(AETitle.org_id == org.id, AETitle.ae_title.not_in(wanted))
        )
        for ae in sorted(wanted):
            add_ae_title(session, org_code=org.code, ae_title=ae)
    if patch.hl7_facilities is not None:
        facilities = {_normalise_facility(name) for name in patch.hl7_facilities}
        session.execute(
            delete(HL7Facility).where(
                HL7Facility.org_id == org.id, HL7Facility.name.not_in(facilities)
            )
        )
        for name in sorted(facilities):
            add_hl7_facility(session, org_code=org.code, name=name)
    session.flush()
    out = _clinic_out(session, org)
    after = out.model_dump(exclude={"users"})
    if after != before:
        _audit(
            session,
            principal,
            action="clinic.update",
            object_type="organization",
            object_id=org.code,
            before=before,
            after=after,
        )
    return out


# --- users ---------------------------------------------------------------------------------


def _user_out(user: User) -> UserOut:
    return UserOut(
        username=user.username,
        display_name=user.display_name,
        role=user.role,
        level=user.level,
        org_code=user.organization.code,
        pools=list(user.pools or []),
        qualifications=list(user.qualifications or []),
        active=user.active,
    )


def _user(session: Session, username: str) -> User:
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise NotFoundError(f"no user {username!r}")
    return user


def _quals(values: list[Qualification] | None) -> list[dict[str, str]] | None:
    if values is None:
        return None
    return [
        {"discipline": q.discipline.value, **({"modality": q.modality} if q.modality else {})}
        for q in values
    ]


def list_users(
    session: Session, *, principal: Principal | None, org_code: str | None = None
) -> list[UserOut]:
    """Every user (or those of one organisation), by organisation and username."""
    _require(principal, _READ_ROLES)
    stmt = select(User).join(Organization, User.org_id == Organization.id)
    if org_code:
        stmt = stmt.where(Organization.code == org_code)
    stmt = stmt.order_by(Organization.kind != OrgKind.LEAD, Organization.code, User.username)
    return [_user_out(u) for u in session.execute(stmt).scalars()]


def create_user(
    session: Session, *, principal: Principal | None, data: UserIn, replace: bool = False
) -> UserOut:
    """Create a user; an existing username is a ConflictError unless ``replace`` (the CLI's
    ``rdc user add``: then the password, role, level and what is given are reset)."""
    _require(principal, _ADMIN)
    existing = session.execute(
        select(User).where(User.username == data.username)
    ).scalar_one_or_none()
    if existing is not None and not replace:
        raise ConflictError(f"user {data.username} exists already")
    before = _user_out(existing).model_dump(mode="json") if existing else None
    user = add_user(
        session,
        username=data.username,
        password=data.password,
        role=data.role,
        org_code=data.org_code,
        level=data.level,
        display_name=data.display_name.strip(),
        pools=data.pools,
        qualifications=_quals(data.qualifications),
    )
    out = _user_out(user)
    _audit(
        session,
        principal,
        action="user.create" if before is None else "user.update",
        object_type="user",
        object_id=user.username,
        before=before,
        after={**out.model_dump(mode="json"), **({"password": "(reset)"} if before else {})},
    )
    return out


def update_user(
    session: Session, *, principal: Principal | None, username: str, patch: UserPatch
) -> UserOut:
    """Change a user's display name, role, level, pools, qualifications or active flag."""
    _require(principal, _ADMIN)
    user = _user(session, username)
    before = _user_out(user).model_dump(mode="json")
    demoted = patch.active is False or (patch.role is not None and patch.role != user.role)
    if principal is not None and principal.user_id == user.id and demoted:
        raise ConflictError("administrators cannot disable or demote themselves")
    role = patch.role or user.role
    level = patch.level if patch.level is not None else (user.level if role == user.role else None)
    level = check_role(user.organization, role, level)
    reader = role.value in ("reader", "senior_reader")
    if not reader and (patch.pools or patch.qualifications):
        raise InvalidInputError("pools and qualifications apply to readers only")
    user.role, user.level = role, level
    if patch.display_name is not None:
        user.display_name = patch.display_name.strip() or user.username
    if patch.pools is not None:
        user.pools = sorted({p.strip() for p in patch.pools if p.strip()})
    if patch.qualifications is not None:
        user.qualifications = [
            {k: v.upper() if k == "modality" else v for k, v in q.items()}
            for q in _quals(patch.qualifications) or []
        ]
    if not reader:
        user.pools, user.qualifications = [], []
    if patch.active is not None:
        user.active = patch.active
    session.flush()
    out = _user_out(user)
    after = out.model_dump(mode="json")
    if after != before:
        _audit(
            session,
            principal,
            action="user.update",
            object_type="user",
            object_id=user.username,
            before=before,
            after=after,
        )
    return out


def reset_password(
    session: Session, *, principal: Principal | None, username: str, password: str
) -> None:
    """Set a new password (the audit records that it changed, never the password)."""
    _require(principal, _ADMIN)
    if len(password) < 8:
        raise InvalidInputError("the password needs at least 8 characters")
    user = _user(session, username)
    user.password_hash = hash_password(password)
    session.flush()
    _audit(
        session,
        principal,
        action="user.reset_password",
        object_type="user",
        object_id=user.username,
        before={"password": "(old)"},
        after={"password": "(new)"},
    )


# --- routing rules -------------------------------------------------------------------------


def _rules(session: Session) -> list[RoutingRuleOut]:
    codes = dict(session.execute(select(Organization.id, Organization.code)).tuples().all())
    rows = session.execute(select(RoutingRule).order_by(RoutingRule.position, RoutingRule.id))
    return [
        RoutingRuleOut(
            position=index + 1,
            discipline=Discipline(r.discipline) if r.discipline else None,
            modality=r.modality,
            body_part=r.body_part,
            clinic=codes.get(r.org_id) if r.org_id else None,
            priority=Priority(r.priority) if r.priority else None,
            pool=r.pool,
        )
        for index, r in enumerate(rows.scalars())
    ]


def get_routing_rules(session: Session, *, principal: Principal | None) -> RoutingRulesOut:
    """The routing rules in the order they are tried."""
    _require(principal, _READ_ROLES)
    return RoutingRulesOut(rules=_rules(session))


def put_routing_rules(
    session: Session, *, principal: Principal | None, rules: list[RoutingRuleIn]
) -> RoutingRulesOut:
    """Replace every routing rule by ``rules`` (tried in list order). They apply to exams that
    become READY from the commit on; exams routed already keep their pool."""
    _require(principal, _ADMIN)
    before = [r.model_dump(mode="json") for r in _rules(session)]
    rows: list[dict[str, Any]] = []
    for index, rule in enumerate(rules):
        org_id = None
        if rule.clinic:
            org = get_organization(session, code=rule.clinic.strip())
            if org.kind is not OrgKind.CLINIC:
                raise InvalidInputError(f"rule {index + 1}: {rule.clinic} is not a clinic")
            org_id = org.id
        rows.append(
            {
                "position": (index + 1) * 10,
                "discipline": rule.discipline.value if rule.discipline else None,
                "modality": (rule.modality or "").strip().upper() or None,
                "body_part": (rule.body_part or "").strip().upper() or None,
                "org_id": org_id,
                "priority": rule.priority.value if rule.priority else None,
                "pool": rule.pool.strip(),
            }
        )
        if not rows[-1]["pool"]:
            raise InvalidInputError(f"rule {index + 1}: the pool must not be empty")
    session.execute(delete(RoutingRule))
    for row in rows:
        session.add(RoutingRule(**row))
    session.flush()
    out = RoutingRulesOut(rules=_rules(session))
    after = [r.model_dump(mode="json") for r in out.rules]
    if after != before:
        _audit(
            session,
            principal,
            action="routing_rules.update",
            object_type="routing_rules",
            object_id="*",
            before=before,
            after=after,
        )
    return out


# --- SLA targets ---------------------------------------------------------------------------


def _targets(session: Session) -> list[SlaTargetOut]:
    configured = {
        (t.discipline, t.priority): t.minutes for t in session.execute(select(SlaTarget)).scalars()
    }
    return [
        SlaTargetOut(
            discipline=d,
            priority=p,
            minutes=configured.get((d, p), DEFAULT_SLA_MINUTES[(d, p)]),
            default_minutes=DEFAULT_SLA_MINUTES[(d, p)],
            configured=(d, p) in configured,
        )
        for d in Discipline
        for p in Priority
    ]


def get_sla_targets(session: Session, *, principal: Principal | None) -> SlaTargetsOut:
    """The target of every discipline and priority (configured, else the shipped default)."""
    _require(principal, _READ_ROLES)
    return SlaTargetsOut(targets=_targets(session))


def put_sla_targets(
    session: Session,
    *,
    principal: Principal | None,
    targets: list[SlaTargetIn],
    apply_to_ready: bool = False,
) -> SlaTargetsOut:
    """Set the targets given (the others stay). Exams that become READY later get the new
    due time; those READY already keep theirs unless ``apply_to_ready``, which recomputes the
    due time of their open work items (first arrival + the new target)."""
    _require(principal, _ADMIN)
    seen: set[tuple[Discipline, Priority]] = set()
    for t in targets:
        if (t.discipline, t.priority) in seen:
            raise InvalidInputError(f"{t.discipline.value}/{t.priority.value} is given twice")
        seen.add((t.discipline, t.priority))
    before = {f"{t.discipline.value}/{t.priority.value}": t.minutes for t in _targets(session)}
    for t in targets:
        upsert(
            session,
            SlaTarget.__table__,
            {"discipline": t.discipline.value, "priority": t.priority.value, "minutes": t.minutes},
            conflict=["discipline", "priority"],
            update=["minutes"],
        )
    session.flush()
    out = _targets(session)
    after = {f"{t.discipline.value}/{t.priority.value}": t.minutes for t in out}
    changed = {k: v for k, v in after.items() if before[k] != v}
    rescheduled = 0
    if apply_to_ready:
        for t in targets:
            rescheduled += _reschedule(session, t.discipline, t.priority, t.minutes)
    if changed or rescheduled:
        _audit(
            session,
            principal,
            action="sla_targets.update",
            object_type="sla_targets",
            object_id="*",
            before={k: before[k] for k in changed},
            after={**changed, "apply_to_ready": apply_to_ready, "rescheduled": rescheduled},
        )
    return SlaTargetsOut(targets=out, rescheduled=rescheduled)


def _reschedule(session: Session, discipline: Discipline, priority: Priority, minutes: int) -> int:
    rows = session.execute(
        select(WorkItem.id, Exam.first_received_at)
        .join(Exam, Exam.id == WorkItem.exam_id)
        .where(
            Exam.state == ExamState.READY,
            WorkItem.state == WorkItemState.OPEN,
            WorkItem.discipline == discipline,
            WorkItem.priority == priority,
        )
    ).all()
    for item_id, first_received_at in rows:
        session.execute(
            update(WorkItem)
            .where(WorkItem.id == item_id)
            .values(due_at=first_received_at + timedelta(minutes=minutes))
            .execution_options(synchronize_session=False)
        )
    return len(rows)
