"""Reading the worklist: exams and work items, always scoped to what the caller may see."""

from __future__ import annotations

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, selectinload

from rdc_core.errors import InvalidInputError, NotFoundError
from worklist.access import Principal, require_roles
from worklist.audit import record_access
from worklist.models import (
    Exam,
    ExamState,
    Organization,
    Patient,
    Priority,
    Role,
    WorkItem,
    WorkItemState,
)
from worklist.schemas import ExamDetail, ExamSummary, Page, WorkItemOut

__all__ = ["WORKLIST_ROLES", "get_exam", "list_exams", "list_worklist"]

WORKLIST_ROLES = frozenset({Role.READER, Role.SENIOR_READER, Role.QC, Role.ADMIN})
MAX_PAGE = 500


def _scoped(stmt: Select, principal: Principal) -> Select:
    if principal.is_clinic_user:
        return stmt.where(Exam.org_id == principal.org_id)
    return stmt


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE}")
    if offset < 0:
        raise InvalidInputError("offset must not be negative")


def _summary(exam: Exam, model: type[ExamSummary] = ExamSummary) -> ExamSummary:
    return model.model_validate(
        {
            **{c: getattr(exam, c) for c in model.model_fields if hasattr(exam, c)},
            "clinic_code": exam.organization.code,
            "patient": exam.patient,
            **({"instances": exam.instances} if "instances" in model.model_fields else {}),
        }
    )


def list_exams(
    session: Session,
    *,
    principal: Principal,
    clinic: str | None = None,
    state: ExamState | None = None,
    modality: str | None = None,
    priority: Priority | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[ExamSummary]:
    """Exams the principal may see, newest first, with filters and paging (audited)."""
    _check_page(limit, offset)
    stmt = select(Exam)
    if clinic:
        stmt = stmt.join(Organization, Organization.id == Exam.org_id).where(
            Organization.code == clinic
        )
    if state:
        stmt = stmt.where(Exam.state == state)
    if modality:
        stmt = stmt.where(Exam.modalities.contains(modality.upper()))
    if priority:
        stmt = stmt.where(Exam.priority == priority)
    stmt = _scoped(stmt, principal)
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    exams = (
        session.execute(
            stmt.order_by(Exam.last_received_at.desc(), Exam.id).limit(limit).offset(offset)
        )
        .scalars()
        .all()
    )
    items = [_summary(e) for e in exams]
    record_access(
        session,
        principal,
        action="list",
        object_type="exam",
        detail={"exam_ids": [e.id for e in items]},
    )
    return Page[ExamSummary](items=items, total=total, limit=limit, offset=offset)


def get_exam(session: Session, *, principal: Principal, exam_id: str) -> ExamDetail:
    """One exam with its instances (audited).

    An exam outside the caller's organisation is reported as not found, so a clinic cannot
    learn which study UIDs other clinics hold.
    """
    stmt = _scoped(select(Exam).where(Exam.id == exam_id), principal).options(
        selectinload(Exam.instances)
    )
    exam = session.execute(stmt).scalar_one_or_none()
    if exam is None:
        raise NotFoundError(f"no exam {exam_id}")
    record_access(session, principal, action="view", object_type="exam", object_id=exam.id)
    detail = _summary(exam, ExamDetail)
    assert isinstance(detail, ExamDetail)
    return detail


def list_worklist(
    session: Session, *, principal: Principal, limit: int = 50, offset: int = 0
) -> Page[WorkItemOut]:
    """Open work items, most urgent first, then earliest due (lead hospital staff only)."""
    require_roles(principal, WORKLIST_ROLES, lead_only=True)
    _check_page(limit, offset)
    base = (
        select(WorkItem, Exam, Patient, Organization)
        .join(Exam, Exam.id == WorkItem.exam_id)
        .join(Patient, Patient.id == Exam.patient_ref)
        .join(Organization, Organization.id == Exam.org_id)
        .where(WorkItem.state == WorkItemState.OPEN, Exam.state == ExamState.READY)
    )
    total = session.execute(
        select(func.count())
        .select_from(WorkItem)
        .join(Exam, Exam.id == WorkItem.exam_id)
        .where(WorkItem.state == WorkItemState.OPEN, Exam.state == ExamState.READY)
    ).scalar_one()
    rows = session.execute(
        base.order_by(WorkItem.priority_rank, WorkItem.due_at, WorkItem.id)
        .limit(limit)
        .offset(offset)
    ).all()
    items = [
        WorkItemOut(
            id=item.id,
            state=item.state,
            pool=item.pool,
            priority=item.priority,
            due_at=item.due_at,
            created_at=item.created_at,
            exam_id=exam.id,
            study_instance_uid=exam.study_instance_uid,
            clinic_code=org.code,
            discipline=exam.discipline,
            modality=exam.modality,
            body_part=exam.body_part,
            description=exam.description,
            patient_name=patient.name,
            patient_id=patient.patient_id,
        )
        for item, exam, patient, org in rows
    ]
    record_access(
        session,
        principal,
        action="list",
        object_type="work_item",
        detail={"work_item_ids": [i.id for i in items]},
    )
    return Page[WorkItemOut](items=items, total=total, limit=limit, offset=offset)
