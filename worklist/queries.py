"""Reading the worklist: exams and work items, always scoped to what the caller may see."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from rdc_core.errors import InvalidInputError, NotFoundError
from worklist.access import Principal
from worklist.artifact_details import exam_objects
from worklist.audit import record_access
from worklist.models import (
    Exam,
    ExamState,
    Organization,
    Patient,
    Priority,
    Report,
    ReportStatus,
)
from worklist.patients.links import same_person_clause
from worklist.patients.models import PersonLink
from worklist.people import person_name
from worklist.person_names import person_name_matches
from worklist.schemas import ExamDetail, ExamSummary, Page

__all__ = ["get_exam", "list_exams", "list_priors", "visible_exam"]

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


def _report_statuses(session: Session, exam_ids: list[str]) -> dict[str, ReportStatus]:
    if not exam_ids:
        return {}
    rows = session.execute(
        select(Report.exam_id, Report.status)
        .where(Report.exam_id.in_(exam_ids))
        .order_by(Report.exam_id, Report.version)
    ).all()
    return {exam_id: status for exam_id, status in rows}  # the newest version wins


def _summary(
    exam: Exam,
    report_status: ReportStatus | None = None,
    model: type[ExamSummary] = ExamSummary,
    objects: list[Mapping[str, Any]] | None = None,
) -> ExamSummary:
    return model.model_validate(
        {
            **{c: getattr(exam, c) for c in model.model_fields if hasattr(exam, c)},
            "clinic_code": exam.organization.code,
            "clinic_name": exam.organization.name,
            "patient": exam.patient,
            "report_status": report_status,
            "rescan_requested_by": person_name(exam.rescan_requester) or None
            if exam.rescan_requested_by
            else None,
            **({"instances": objects or []} if "instances" in model.model_fields else {}),
            **(
                {
                    "work_item_id": exam.work_item.id if exam.work_item else None,
                    "due_at": exam.work_item.due_at if exam.work_item else None,
                }
                if "work_item_id" in model.model_fields
                else {}
            ),
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
    patient_name: str | None = None,
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
    if patient_name:
        stmt = stmt.where(
            Exam.patient_ref.in_(
                select(Patient.id).where(person_name_matches(Patient.name, [patient_name]))
            )
        )
    stmt = _scoped(stmt, principal)
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    exams = (
        session.execute(
            stmt.order_by(Exam.last_received_at.desc(), Exam.id).limit(limit).offset(offset)
        )
        .scalars()
        .all()
    )
    statuses = _report_statuses(session, [e.id for e in exams])
    items = [_summary(e, statuses.get(e.id)) for e in exams]
    record_access(
        session,
        principal,
        action="list",
        object_type="exam",
        detail={"exam_ids": [e.id for e in items]},
    )
    return Page[ExamSummary](items=items, total=total, limit=limit, offset=offset)


def visible_exam(session: Session, *, principal: Principal, exam_id: str) -> Exam:
    """The exam if the principal may see it. An exam outside the caller's organisation is
    reported as not found, so a clinic cannot learn which study UIDs other clinics hold."""
    stmt = _scoped(select(Exam).where(Exam.id == exam_id), principal)
    exam = session.execute(stmt).scalar_one_or_none()
    if exam is None:
        raise NotFoundError(f"no exam {exam_id}")
    return exam


def get_exam(session: Session, *, principal: Principal, exam_id: str) -> ExamDetail:
    """One exam with its instances (audited)."""
    stmt = _scoped(select(Exam).where(Exam.id == exam_id), principal)
    exam = session.execute(stmt).scalar_one_or_none()
    if exam is None:
        raise NotFoundError(f"no exam {exam_id}")
    record_access(session, principal, action="view", object_type="exam", object_id=exam.id)
    detail = _summary(
        exam,
        _report_statuses(session, [exam.id]).get(exam.id),
        ExamDetail,
        objects=exam_objects(session, exam_id=exam.id),
    )
    assert isinstance(detail, ExamDetail)
    detail.patient_id_masked = detail.patient.masked
    detail.person_id = session.execute(
        select(PersonLink.person_id).where(PersonLink.patient_ref == exam.patient_ref)
    ).scalar_one_or_none()
    return detail


def list_priors(session: Session, *, principal: Principal, exam_id: str) -> list[ExamSummary]:
    """The same person's other exams of every discipline, from every clinic the principal
    may see (the alliance patient index links the clinics' identifiers), newest first
    (audited)."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    priors = (
        session.execute(
            _scoped(
                select(Exam).where(
                    same_person_clause(Exam.patient_ref, [exam.patient_ref]), Exam.id != exam.id
                ),
                principal,
            )
            .order_by(Exam.first_received_at.desc())
            .limit(50)
        )
        .scalars()
        .all()
    )
    statuses = _report_statuses(session, [p.id for p in priors])
    record_access(
        session,
        principal,
        action="list",
        object_type="exam",
        detail={"priors_of": exam.id, "exam_ids": [p.id for p in priors]},
    )
    return [_summary(p, statuses.get(p.id)) for p in priors]
