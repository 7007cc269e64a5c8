"""The reading queue: what each reader sees, and claims as leases.

A claim is a conditional UPDATE of the work item (free, expired or already mine -> mine),
so two readers claiming at once can never both win, on SQLite and PostgreSQL alike; the
database decides, not a read-then-write in Python.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Select,
    and_,
    case,
    false,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session, aliased

from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from worklist.access import READING_ROLES, Principal, require_roles
from worklist.audit import record_access
from worklist.models import (
    Discipline,
    Exam,
    Organization,
    OrgKind,
    Patient,
    Priority,
    ReaderLevel,
    Report,
    Role,
    User,
    WorkItem,
    WorkItemState,
)
from worklist.patients.national_id import shown_patient_id
from worklist.person_names import person_name_matches
from worklist.schemas import LeaseOut, ReaderOut, WorkItemOut, WorklistCounts, WorklistPage

__all__ = [
    "ACTIVE_STATES",
    "ClaimConflictError",
    "WorklistFilter",
    "can_verify",
    "claim_item",
    "claim_next",
    "list_readers",
    "list_worklist",
    "readable_by",
    "reassign_item",
    "release_item",
    "renew_item",
]

_S = TypeVar("_S", bound=Select)
WORKLIST_ROLES = frozenset({Role.READER, Role.SENIOR_READER, Role.QC, Role.ADMIN})
ACTIVE_STATES = (WorkItemState.OPEN, WorkItemState.AWAITING_VERIFICATION)
STATE_FILTERS = ("open", "claimed", "awaiting_verification")
MAX_PAGE = 500


class ClaimConflictError(ConflictError):
    """Someone else holds the lease on this work item, or it is no longer open."""

    title = "Exam taken"


def can_verify(principal: Principal) -> bool:
    """Seniors (attending or chief level, or the senior-reader role) co-sign and reassign."""
    return principal.role is Role.SENIOR_READER or principal.level in (
        ReaderLevel.ATTENDING,
        ReaderLevel.CHIEF,
    )


class WorklistFilter:
    """The worklist's filters, validated once."""

    def __init__(
        self,
        *,
        discipline: Discipline | None = None,
        modality: str | None = None,
        clinic: str | None = None,
        priority: Priority | None = None,
        state: str | None = None,
        mine: bool = False,
        patient_name: str | None = None,
    ) -> None:
        if state is not None and state not in STATE_FILTERS:
            raise InvalidInputError(f"state must be one of {', '.join(STATE_FILTERS)}")
        self.discipline = discipline
        self.modality = modality.upper() if modality else None
        self.clinic = clinic
        self.priority = priority
        self.state = state
        self.mine = mine
        self.patient_name = patient_name.strip() if patient_name else None


def _taken(now: datetime) -> ColumnElement[bool]:
    return and_(WorkItem.claimed_by.is_not(None), WorkItem.lease_expires_at > now)


def _visibility(session: Session, principal: Principal) -> ColumnElement[bool]:
    """What routing lets this reader see: their pools and qualifications (none: all)."""
    if principal.role not in READING_ROLES:
        return true()  # QC and administrators oversee the whole queue
    user = session.get(User, principal.user_id)
    if user is None:
        return false()
    return _routed_to(user)


def readable_by(session: Session, principal: Principal) -> ColumnElement[bool]:
    """A condition on WorkItem: the items routing lets ``principal`` read (their worklist)."""
    return _visibility(session, principal)


def _routed_to(user: User) -> ColumnElement[bool]:
    """The work items that ``user``'s pools and qualifications cover (none given: all)."""
    conditions: list[ColumnElement[bool]] = []
    if user.pools:
        conditions.append(WorkItem.pool.in_(user.pools))
    if user.qualifications:
        allowed = [
            and_(
                WorkItem.discipline == q["discipline"],
                *([WorkItem.modality == q["modality"].upper()] if q.get("modality") else []),
            )
            for q in user.qualifications
            if q.get("discipline")
        ]
        conditions.append(or_(*allowed) if allowed else false())
    return and_(true(), *conditions)


def _filtered(stmt: _S, flt: WorklistFilter, principal: Principal) -> _S:
    if flt.discipline:
        stmt = stmt.where(WorkItem.discipline == flt.discipline)
    if flt.modality:
        stmt = stmt.where(WorkItem.modality == flt.modality)
    if flt.priority:
        stmt = stmt.where(WorkItem.priority == flt.priority)
    if flt.clinic:
        clinic_id = select(Organization.id).where(Organization.code == flt.clinic)
        stmt = stmt.where(WorkItem.org_id == clinic_id.scalar_subquery())
    if flt.mine:
        stmt = stmt.where(WorkItem.claimed_by == principal.user_id)
    if flt.patient_name:
        named = (
            select(Exam.id)
            .join(Patient, Patient.id == Exam.patient_ref)
            .where(person_name_matches(Patient.name, [flt.patient_name]))
        )
        stmt = stmt.where(WorkItem.exam_id.in_(named))
    return stmt


def list_worklist(
    session: Session,
    *,
    principal: Principal,
    now: datetime,
    filters: WorklistFilter | None = None,
    limit: int = 50,
    offset: int = 0,
) -> WorklistPage:
    """Open and awaiting-verification items the principal may see: most urgent first, then
    earliest due; with counts per reading state (lead hospital staff only, audited).

    Two statements: the counts (which also give the total) over the work items alone, and
    the page, read as plain columns in the order of the partial queue index.
    """
    require_roles(principal, WORKLIST_ROLES, lead_only=True)
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise InvalidInputError(f"limit must be 1..{MAX_PAGE} and offset not negative")
    flt = filters or WorklistFilter()
    taken = _taken(now)
    visible = _visibility(session, principal)
    scope = and_(WorkItem.state.in_(ACTIVE_STATES), visible)
    # The page names only the states it shows: "IN (both) AND = OPEN" misleads the
    # planner's row estimate into joining the whole backlog before sorting.
    page_states = {
        "open": (WorkItemState.OPEN,),
        "awaiting_verification": (WorkItemState.AWAITING_VERIFICATION,),
    }.get(flt.state or "", ACTIVE_STATES)
    is_open = and_(WorkItem.state == WorkItemState.OPEN, ~taken)
    is_awaiting = WorkItem.state == WorkItemState.AWAITING_VERIFICATION
    counted = _filtered(
        select(
            func.count(),
            func.count().filter(is_open),
            func.count().filter(taken),
            func.count().filter(is_awaiting),
            func.count().filter(WorkItem.due_at < now),
            func.count().filter(WorkItem.claimed_by == principal.user_id),
        )
        .select_from(WorkItem)
        .where(scope),
        flt,
        principal,
    )
    every, *per_state = session.execute(counted).one()
    counts = WorklistCounts(
        **dict(
            zip(
                ("open", "claimed", "awaiting_verification", "overdue", "mine"),
                per_state,
                strict=True,
            )
        )
    )
    state_condition = {"open": is_open, "claimed": taken, "awaiting_verification": is_awaiting}
    total = {"open": counts.open, "claimed": counts.claimed}.get(
        flt.state or "", counts.awaiting_verification if flt.state else every
    )
    holder = aliased(User)
    stmt = _filtered(
        select(
            WorkItem.id,
            WorkItem.state,
            WorkItem.pool,
            WorkItem.priority,
            WorkItem.due_at,
            WorkItem.created_at,
            WorkItem.claimed_by,
            WorkItem.lease_expires_at,
            Exam.id.label("exam_id"),
            Exam.study_instance_uid,
            Exam.discipline,
            Exam.modality,
            Exam.body_part,
            Exam.description,
            Exam.state.label("exam_state"),
            Exam.triage_reason,
            Organization.code.label("clinic_code"),
            Organization.name.label("clinic_name"),
            Patient.name.label("patient_name"),
            Patient.patient_id,
            Patient.issuer.label("patient_issuer"),
            # People, not logins: the holder's display name (the login when none is set).
            func.coalesce(func.nullif(holder.display_name, ""), holder.username).label("holder"),
            Report.status.label("report_status"),
        )
        .select_from(WorkItem)
        .join(Exam, Exam.id == WorkItem.exam_id)
        .join(Patient, Patient.id == Exam.patient_ref)
        .join(Organization, Organization.id == Exam.org_id)
        .outerjoin(holder, holder.id == WorkItem.claimed_by)
        .outerjoin(Report, and_(Report.exam_id == Exam.id, Report.version == 1))
        .where(WorkItem.state.in_(page_states), visible),
        flt,
        principal,
    )
    if flt.state:
        stmt = stmt.where(state_condition[flt.state])
    rows = session.execute(
        stmt.order_by(WorkItem.priority_rank, WorkItem.due_at, WorkItem.id)
        .limit(limit)
        .offset(offset)
    ).all()
    items = [_item_out(row, principal=principal, now=now) for row in rows]
    record_access(
        session,
        principal,
        action="list",
        object_type="work_item",
        detail={"work_item_ids": [i.id for i in items]},
    )
    return WorklistPage(
        items=items, total=total, limit=limit, offset=offset, counts=counts, server_time=now
    )


def _item_out(row: Any, *, principal: Principal, now: datetime) -> WorkItemOut:
    live = row.claimed_by is not None and (row.lease_expires_at or now) > now
    return WorkItemOut(
        id=row.id,
        state=row.state,
        pool=row.pool,
        priority=row.priority,
        due_at=row.due_at,
        created_at=row.created_at,
        exam_id=row.exam_id,
        study_instance_uid=row.study_instance_uid,
        clinic_code=row.clinic_code,
        clinic_name=row.clinic_name,
        discipline=row.discipline,
        modality=row.modality,
        body_part=row.body_part,
        description=row.description,
        patient_name=row.patient_name,
        patient_id=shown_patient_id(row.patient_issuer, row.patient_id),
        exam_state=row.exam_state,
        claimed_by=row.holder if live else None,
        lease_expires_at=row.lease_expires_at if live else None,
        taken=live and row.claimed_by != principal.user_id,
        mine=live and row.claimed_by == principal.user_id,
        overdue=row.due_at < now,
        report_status=row.report_status,
        triage_reason=row.triage_reason,
    )


def _visible_item(session: Session, principal: Principal, item_id: str) -> WorkItem:
    require_roles(principal, READING_ROLES, lead_only=True)
    item = session.execute(
        select(WorkItem).where(WorkItem.id == item_id, _visibility(session, principal))
    ).scalar_one_or_none()
    if item is None:
        raise NotFoundError(f"no work item {item_id}")
    return item


def _lease(item_id: str, exam_id: str, username: str, until: datetime, seconds: int) -> LeaseOut:
    return LeaseOut(
        item_id=item_id,
        exam_id=exam_id,
        claimed_by=username,
        lease_expires_at=until,
        lease_seconds=seconds,
    )


def _holder_name(session: Session, item_id: str) -> str:
    name = session.execute(
        select(User.username)
        .join(WorkItem, WorkItem.claimed_by == User.id)
        .where(WorkItem.id == item_id)
    ).scalar_one_or_none()
    return name or "?"


def claim_item(
    session: Session, *, principal: Principal, item_id: str, now: datetime, lease_seconds: int
) -> LeaseOut:
    """Claim (or renew) the lease on a work item. Exactly one of several concurrent
    claimants wins; the others get ClaimConflictError naming the holder.

    Items awaiting verification can be claimed by seniors only.
    """
    item = _visible_item(session, principal, item_id)
    states = [WorkItemState.OPEN]
    if can_verify(principal):
        states.append(WorkItemState.AWAITING_VERIFICATION)
    until = now + timedelta(seconds=lease_seconds)
    result = session.execute(
        update(WorkItem)
        .where(
            WorkItem.id == item.id,
            WorkItem.state.in_(states),
            or_(
                WorkItem.claimed_by.is_(None),
                WorkItem.claimed_by == principal.user_id,
                WorkItem.lease_expires_at <= now,
            ),
        )
        .values(
            claimed_by=principal.user_id,
            claimed_at=case(
                (WorkItem.claimed_by == principal.user_id, WorkItem.claimed_at), else_=now
            ),
            lease_expires_at=until,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        session.refresh(item)
        if item.state not in states:
            awaiting = item.state is WorkItemState.AWAITING_VERIFICATION
            raise ClaimConflictError(
                f"work item {item_id} is {item.state.value.lower()}"
                + (" and needs a senior" if awaiting else "")
            )
        raise ClaimConflictError(f"taken by {_holder_name(session, item_id)}")
    session.execute(
        update(Exam)
        .where(Exam.id == item.exam_id, Exam.claimed_at.is_(None))
        .values(claimed_at=now)
        .execution_options(synchronize_session=False)
    )
    record_access(
        session,
        principal,
        action="claim",
        object_type="work_item",
        object_id=item.id,
        detail={"exam_id": item.exam_id, "lease_expires_at": until.isoformat()},
    )
    return _lease(item.id, item.exam_id, principal.username, until, lease_seconds)


def renew_item(
    session: Session, *, principal: Principal, item_id: str, now: datetime, lease_seconds: int
) -> LeaseOut:
    """Extend my lease; ClaimConflictError if it was lost to someone else meanwhile."""
    item = _visible_item(session, principal, item_id)
    until = now + timedelta(seconds=lease_seconds)
    result = session.execute(
        update(WorkItem)
        .where(
            WorkItem.id == item.id,
            WorkItem.state.in_(ACTIVE_STATES),
            WorkItem.claimed_by == principal.user_id,
        )
        .values(lease_expires_at=until, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        raise ClaimConflictError("the lease was lost; claim the exam again")
    return _lease(item.id, item.exam_id, principal.username, until, lease_seconds)


def release_item(session: Session, *, principal: Principal, item_id: str, now: datetime) -> None:
    """Give my claim back so another reader can take the exam."""
    item = _visible_item(session, principal, item_id)
    result = session.execute(
        update(WorkItem)
        .where(WorkItem.id == item.id, WorkItem.claimed_by == principal.user_id)
        .values(claimed_by=None, lease_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        raise ClaimConflictError("you do not hold this exam")
    record_access(session, principal, action="release", object_type="work_item", object_id=item_id)


def reassign_item(
    session: Session,
    *,
    principal: Principal,
    item_id: str,
    username: str,
    now: datetime,
    lease_seconds: int,
) -> LeaseOut:
    """A senior hands an exam to another reader of the lead hospital (lease restarts)."""
    if not can_verify(principal):
        raise PermissionDeniedError("only senior readers may reassign exams")
    item = _visible_item(session, principal, item_id)
    target = session.execute(
        select(User)
        .join(Organization, Organization.id == User.org_id)
        .where(
            User.username == username,
            User.active.is_(True),
            User.role.in_(READING_ROLES),
            Organization.kind == OrgKind.LEAD,
        )
    ).scalar_one_or_none()
    if target is None:
        raise InvalidInputError(f"{username!r} is not an active reader of the lead hospital")
    may_read = session.execute(
        select(WorkItem.id).where(WorkItem.id == item.id, _routed_to(target))
    ).scalar_one_or_none()
    if may_read is None:
        # Their pools or qualifications do not cover it: a lease would let them write a
        # report they may not read.
        raise InvalidInputError(f"{username!r} may not read this exam (pools, qualifications)")
    # An exam awaiting verification goes to seniors only (as claim_item has it): a resident
    # could neither verify nor edit it, and would hold it away from the seniors meanwhile.
    target_verifies = target.role is Role.SENIOR_READER or target.level in (
        ReaderLevel.ATTENDING,
        ReaderLevel.CHIEF,
    )
    states = ACTIVE_STATES if target_verifies else (WorkItemState.OPEN,)
    until = now + timedelta(seconds=lease_seconds)
    result = session.execute(
        update(WorkItem)
        .where(WorkItem.id == item.id, WorkItem.state.in_(states))
        .values(claimed_by=target.id, claimed_at=now, lease_expires_at=until, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        session.refresh(item)
        if item.state is WorkItemState.AWAITING_VERIFICATION and not target_verifies:
            raise InvalidInputError(f"{username!r} is not a senior; the exam awaits verification")
        raise ClaimConflictError("the exam is no longer open")
    record_access(
        session,
        principal,
        action="reassign",
        object_type="work_item",
        object_id=item_id,
        detail={"to": username},
    )
    return _lease(item.id, item.exam_id, target.username, until, lease_seconds)


def claim_next(
    session: Session, *, principal: Principal, now: datetime, lease_seconds: int
) -> LeaseOut:
    """Claim the most urgent free item I may read (items I already hold are not offered)."""
    require_roles(principal, READING_ROLES, lead_only=True)
    states = [WorkItemState.OPEN]
    if can_verify(principal):
        states.append(WorkItemState.AWAITING_VERIFICATION)
    candidates = (
        session.execute(
            select(WorkItem.id)
            .where(
                WorkItem.state.in_(states),
                _visibility(session, principal),
                or_(
                    WorkItem.claimed_by.is_(None),
                    WorkItem.lease_expires_at <= now,
                ),
            )
            .order_by(WorkItem.priority_rank, WorkItem.due_at, WorkItem.id)
            .limit(10)
        )
        .scalars()
        .all()
    )
    for item_id in candidates:
        try:
            with session.begin_nested():
                return claim_item(
                    session,
                    principal=principal,
                    item_id=item_id,
                    now=now,
                    lease_seconds=lease_seconds,
                )
        except ClaimConflictError:
            continue  # someone was quicker; try the next one
    raise NotFoundError("nothing left to read")


def list_readers(session: Session, *, principal: Principal) -> list[ReaderOut]:
    """Active readers of the lead hospital (for reassignment)."""
    require_roles(principal, WORKLIST_ROLES, lead_only=True)
    users = session.execute(
        select(User)
        .join(Organization, Organization.id == User.org_id)
        .where(
            User.active.is_(True),
            User.role.in_(READING_ROLES),
            Organization.kind == OrgKind.LEAD,
        )
        .order_by(User.username)
    ).scalars()
    return [
        ReaderOut(
            username=u.username, display_name=u.display_name, role=u.role.value, level=u.level
        )
        for u in users
    ]
