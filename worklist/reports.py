"""Writing reports: drafts, submission (preliminary or final by the signer's level),
senior verification, and sending an exam back to the clinic for a re-scan.

Every change needs the caller's live lease on the exam's work item, so two readers never
write the same report. A final report is locked; later changes are new versions (signing
and amendments live in their own module).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from rdc_core.db import stable_id
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from worklist.access import READING_ROLES, Principal, require_roles
from worklist.audit import record_access
from worklist.claims import can_verify, readable_by
from worklist.finalization import finalize_report
from worklist.models import (
    Exam,
    ExamState,
    QualityGrade,
    Report,
    ReportStatus,
    WorkItem,
    WorkItemState,
)
from worklist.queries import get_exam, visible_exam
from worklist.report_templates import template_by_code
from worklist.schemas import ExamSummary, ReportIn, ReportOut

__all__ = [
    "PRELIMINARY_NOTICE",
    "ReportLockedError",
    "get_report",
    "request_rescan",
    "save_draft",
    "submit_report",
    "verify_report",
]

PRELIMINARY_NOTICE = "以正式报告为准 / Subject to the final report"
# Grades that need a reason: the clinic must learn what to fix.
_GRADES_NEEDING_REASON = (QualityGrade.C, QualityGrade.REJECT)


class ReportLockedError(ConflictError):
    """The report can no longer be edited (final, or waiting for a senior)."""

    title = "Report locked"


class LeaseRequiredError(ConflictError):
    """The caller does not hold the exam's lease."""

    title = "Claim required"


def report_out(report: Report) -> ReportOut:
    """The API view of a report."""
    return ReportOut(
        id=report.id,
        exam_id=report.exam_id,
        version=report.version,
        status=report.status,
        template_code=report.template_code,
        findings=report.findings,
        impression=report.impression,
        recommendation=report.recommendation,
        structured=report.structured or {},
        quality_grade=report.quality_grade,
        quality_reason=report.quality_reason,
        critical=report.critical,
        author=report.author.username,
        author_level=report.author_level,
        verified_by=report.verifier.username if report.verifier else None,
        created_at=report.created_at,
        updated_at=report.updated_at,
        submitted_at=report.submitted_at,
        verified_at=report.verified_at,
        final_at=report.final_at,
        revision=report.revision,
        locked=report.status is ReportStatus.FINAL,
        notice=PRELIMINARY_NOTICE if report.status is ReportStatus.PRELIMINARY else None,
    )


def _current(session: Session, exam_id: str) -> Report | None:
    return session.execute(
        select(Report).where(Report.exam_id == exam_id).order_by(Report.version.desc()).limit(1)
    ).scalar_one_or_none()


def _leased_item(session: Session, principal: Principal, exam: Exam, now: datetime) -> WorkItem:
    require_roles(principal, READING_ROLES, lead_only=True)
    # populate_existing: a claim earlier in this transaction changed the row behind the
    # session's back (a conditional UPDATE), so never trust a cached copy here.
    item = session.execute(
        select(WorkItem)
        .where(WorkItem.exam_id == exam.id)
        .with_for_update(of=WorkItem)  # the eager joins are outer: lock only the item
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if item is None:
        raise ConflictError("the exam is not ready for reading yet")
    if item.state not in (WorkItemState.OPEN, WorkItemState.AWAITING_VERIFICATION):
        raise ReportLockedError(f"the exam is {item.state.value.lower()}")
    if item.claimed_by != principal.user_id or (item.lease_expires_at or now) <= now:
        raise LeaseRequiredError("claim the exam before writing its report")
    return item


def get_report(session: Session, *, principal: Principal, exam_id: str) -> ReportOut:
    """The exam's current report. Clinics see submitted reports only, never drafts."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    report = _current(session, exam.id)
    if report is None or (principal.is_clinic_user and report.status is ReportStatus.DRAFT):
        raise NotFoundError(f"exam {exam_id} has no report yet")
    record_access(session, principal, action="view", object_type="report", object_id=report.id)
    return report_out(report)


def save_draft(
    session: Session, *, principal: Principal, exam_id: str, data: ReportIn, now: datetime
) -> ReportOut:
    """Create or update the draft (only the fields given change). A resident's submitted
    report can still be edited by the senior who holds the lease, before verification."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    _leased_item(session, principal, exam, now)
    if data.template_code and template_by_code(data.template_code) is None:
        raise InvalidInputError(f"no report template {data.template_code!r}")
    report = _current(session, exam.id)
    if report is None:
        report = Report(
            id=stable_id("report", exam.id, "1"),
            exam_id=exam.id,
            version=1,
            status=ReportStatus.DRAFT,
            author_id=principal.user_id,
            author_level=principal.level,
            structured={},
            created_at=now,
            updated_at=now,
            revision=0,
        )
        session.add(report)
    elif report.status is ReportStatus.FINAL:
        raise ReportLockedError("a final report is locked; amend it instead")
    elif report.status is ReportStatus.PRELIMINARY and not can_verify(principal):
        raise ReportLockedError("the preliminary report waits for a senior's verification")
    if data.revision is not None and data.revision != report.revision:
        raise ConflictError(
            f"the report changed meanwhile (revision {report.revision}, you had {data.revision})"
        )
    changes = data.model_dump(exclude_unset=True, exclude={"revision"})
    for name, value in changes.items():
        if value is not None or name in ("quality_grade", "template_code"):
            setattr(report, name, value)
    report.updated_at = now
    report.revision = (report.revision or 0) + 1
    session.flush()
    record_access(session, principal, action="edit", object_type="report", object_id=report.id)
    return report_out(report)


def _check_complete(report: Report) -> None:
    if not (report.findings.strip() or report.impression.strip()):
        raise InvalidInputError("a report needs findings or an impression")
    if report.quality_grade is None:
        raise InvalidInputError("grade the image quality (甲/乙/丙/废) before submitting")
    if report.quality_grade in _GRADES_NEEDING_REASON and not report.quality_reason.strip():
        raise InvalidInputError(f"grade {report.quality_grade.value} needs a reason")


def _set_state(
    session: Session, exam: Exam, item: WorkItem, exam_state: ExamState, item_state: WorkItemState
) -> None:
    exam.state = exam_state
    item.state = item_state
    item.claimed_by = None
    item.lease_expires_at = None


def submit_report(
    session: Session, *, principal: Principal, exam_id: str, now: datetime
) -> ReportOut:
    """Submit the draft: final for attending and chief readers (and the senior-reader role),
    preliminary (waiting for a senior, marked 以正式报告为准) for residents and readers
    without a level."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    item = _leased_item(session, principal, exam, now)
    report = _current(session, exam.id)
    if report is None:
        raise InvalidInputError("write the report before submitting it")
    if report.status is ReportStatus.FINAL:
        raise ReportLockedError("the report is already final")
    if report.status is ReportStatus.PRELIMINARY:
        # A senior holding a preliminary report signs it by verifying it.
        return verify_report(session, principal=principal, report_id=report.id, now=now)
    _check_complete(report)
    report.submitted_at = now
    report.updated_at = now
    report.author_id = principal.user_id
    report.author_level = principal.level
    if can_verify(principal):  # attending, chief or senior reader: signs final directly
        report.status = ReportStatus.FINAL
        report.final_at = now
        exam.final_at = now
        _set_state(session, exam, item, ExamState.FINAL, WorkItemState.DONE)
        session.flush()
        finalize_report(session, report=report, exam=exam, signer=principal, now=now)
        action = "sign"
    else:
        report.status = ReportStatus.PRELIMINARY
        exam.preliminary_at = now
        _set_state(session, exam, item, ExamState.PRELIMINARY, WorkItemState.AWAITING_VERIFICATION)
        action = "submit_preliminary"
    item.updated_at = now
    session.flush()
    record_access(session, principal, action=action, object_type="report", object_id=report.id)
    return report_out(report)


def verify_report(
    session: Session, *, principal: Principal, report_id: str, now: datetime
) -> ReportOut:
    """A senior co-signs a resident's preliminary report, making it final. Happens once:
    the status change is conditional, so a second verifier gets a conflict."""
    require_roles(principal, READING_ROLES, lead_only=True)
    if not can_verify(principal):
        raise PermissionDeniedError("only attending or chief readers may verify reports")
    report = session.get(Report, report_id)
    if report is None:
        raise NotFoundError(f"no report {report_id}")
    exam = visible_exam(session, principal=principal, exam_id=report.exam_id)
    if report.author_id == principal.user_id:
        raise PermissionDeniedError("a report is verified by someone other than its author")
    item = session.execute(
        select(WorkItem)
        .where(WorkItem.exam_id == exam.id, readable_by(session, principal))
        .with_for_update(of=WorkItem)  # the eager joins are outer: lock only the item
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if item is None:
        # Not routed to this senior (pools, qualifications): not theirs to co-sign.
        raise NotFoundError(f"no report {report_id} on your worklist")
    live = item.claimed_by is not None and (item.lease_expires_at or now) > now
    if live and item.claimed_by != principal.user_id:
        raise LeaseRequiredError("another reader holds this exam")
    result = session.execute(
        update(Report)
        .where(Report.id == report.id, Report.status == ReportStatus.PRELIMINARY)
        .values(
            status=ReportStatus.FINAL,
            verified_by=principal.user_id,
            verified_at=now,
            final_at=now,
            updated_at=now,
            revision=Report.revision + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        raise ReportLockedError(f"report {report_id} is not waiting for verification")
    exam.final_at = now
    _set_state(session, exam, item, ExamState.FINAL, WorkItemState.DONE)
    item.updated_at = now
    session.flush()
    session.refresh(report)
    finalize_report(session, report=report, exam=exam, signer=principal, now=now)
    record_access(session, principal, action="verify", object_type="report", object_id=report.id)
    return report_out(report)


def request_rescan(
    session: Session, *, principal: Principal, exam_id: str, reason: str, now: datetime
) -> ExamSummary:
    """Send the exam back to its clinic for a re-scan; it leaves the reading queue."""
    if not reason.strip():
        raise InvalidInputError("say why the exam must be repeated")
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    item = _leased_item(session, principal, exam, now)
    report = _current(session, exam.id)
    if report is not None and report.status is not ReportStatus.DRAFT:
        raise ReportLockedError("the exam already has a submitted report")
    exam.rescan_requested_at = now
    exam.rescan_reason = reason.strip()[:2000]
    _set_state(session, exam, item, ExamState.RESCAN_REQUESTED, WorkItemState.DONE)
    item.updated_at = now
    session.flush()
    record_access(
        session,
        principal,
        action="request_rescan",
        object_type="exam",
        object_id=exam.id,
        detail={"reason": exam.rescan_reason},
    )
    return get_exam(session, principal=principal, exam_id=exam.id)
