"""Writing reports: drafts, submission (preliminary or final by the signer's level),
senior verification, and sending an exam back to the clinic for a re-scan.

Every change needs the caller's live lease on the exam's work item, so two readers never
write the same report. A submitted report is signed (:mod:`worklist.signing`) and a final
one is locked: a later change is a new version (amended / corrected / appended), linked to
its predecessor and signed again; every version stays readable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rdc_core.db import stable_id
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from worklist.access import READING_ROLES, Principal, require_roles
from worklist.artifact_details import frame_counts
from worklist.audit import record_access
from worklist.claims import can_verify, readable_by
from worklist.critical_values.service import raise_for_report
from worklist.exam_actions import notify_rescan_requested
from worklist.finalization import finalize_report
from worklist.models import (
    AmendmentKind,
    Discipline,
    Exam,
    ExamState,
    QualityGrade,
    Report,
    ReportStatus,
    WorkItem,
    WorkItemState,
)
from worklist.queries import get_exam, visible_exam
from worklist.recognition.service import evaluate_report, recognition_for_report
from worklist.report_templates import template_by_code
from worklist.schemas import (
    ExamSummary,
    KeyImageRef,
    ReportAmendIn,
    ReportDetailOut,
    ReportIn,
    ReportOut,
    ReportVersionOut,
    SigningPreviewOut,
)
from worklist.signing.service import (
    PRELIMINARY_NOTICE,
    sign_preliminary_report,
    signature_summary,
)

__all__ = [
    "PRELIMINARY_NOTICE",
    "ReportLockedError",
    "amend_report",
    "get_report",
    "get_report_version",
    "request_rescan",
    "save_draft",
    "signing_preview",
    "submit_report",
    "verify_report",
]

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
        author_name=report.author.display_name or report.author.username,
        verified_by_name=(
            (report.verifier.display_name or report.verifier.username) if report.verifier else None
        ),
        created_at=report.created_at,
        updated_at=report.updated_at,
        submitted_at=report.submitted_at,
        verified_at=report.verified_at,
        final_at=report.final_at,
        revision=report.revision,
        locked=report.status is ReportStatus.FINAL,
        notice=PRELIMINARY_NOTICE if report.status is ReportStatus.PRELIMINARY else None,
        key_images=[KeyImageRef(**k) for k in report.key_images or []],
        previous_id=report.previous_id,
        amendment_kind=report.amendment_kind,
        amendment_reason=report.amendment_reason,
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


def signing_preview(
    session: Session, *, principal: Principal, report_id: str, action: str, now: datetime
) -> SigningPreviewOut:
    """What ``principal`` would sign with ``action`` (submit, verify, amend) on the report:
    whether it becomes final or preliminary and, when final, the recognition decision as it
    stands now (recorded only by the signature itself)."""
    require_roles(principal, READING_ROLES, lead_only=True)
    if action not in ("submit", "verify", "amend"):
        raise InvalidInputError("action: submit, verify or amend")
    report = session.get(Report, report_id)
    if report is None:
        raise NotFoundError(f"no report {report_id}")
    exam = visible_exam(session, principal=principal, exam_id=report.exam_id)
    # Residents submit preliminary reports; whoever may verify makes a report final (a senior
    # submitting a preliminary report verifies it). Only they may verify or amend.
    final = can_verify(principal)
    recognition = (
        evaluate_report(session, report=report, exam=exam, signer=principal, now=now, preview=True)
        if final
        else None
    )
    record_access(
        session,
        principal,
        action="view_signing",
        object_type="report",
        object_id=report.id,
        detail={"signing_action": action},
    )
    return SigningPreviewOut(
        report_id=report.id,
        exam_id=exam.id,
        action=action,
        outcome=ReportStatus.FINAL if final else ReportStatus.PRELIMINARY,
        impression=report.impression,
        critical=report.critical,
        recognition=recognition,
    )


def save_draft(
    session: Session, *, principal: Principal, exam_id: str, data: ReportIn, now: datetime
) -> ReportOut:
    """Create or update the draft (only the fields given change). A resident's submitted
    report can still be edited by the senior who holds the lease, before verification."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    _leased_item(session, principal, exam, now)
    if data.template_code and template_by_code(data.template_code) is None:
        raise InvalidInputError(f"no report template {data.template_code!r}")
    if data.key_images:
        _check_key_images(session, exam, data.key_images)
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
    if data.key_images is not None:  # whole references, defaults included
        changes["key_images"] = [k.model_dump() for k in data.key_images]
    for name, value in changes.items():
        if value is not None or name in ("quality_grade", "template_code"):
            setattr(report, name, value)
    report.updated_at = now
    report.revision = (report.revision or 0) + 1
    session.flush()
    record_access(session, principal, action="edit", object_type="report", object_id=report.id)
    return report_out(report)


def _check_key_images(session: Session, exam: Exam, marked: list[KeyImageRef]) -> None:
    frames = frame_counts(session, exam_id=exam.id, refs={m.sop_instance_uid for m in marked})
    for mark in marked:
        count = frames.get(mark.sop_instance_uid)
        if count is None:
            raise InvalidInputError(f"key image {mark.sop_instance_uid} is not part of this exam")
        if mark.frame > max(1, count):
            raise InvalidInputError(
                f"key image {mark.sop_instance_uid} has {count} frame(s), not {mark.frame}"
            )


def _check_complete(report: Report, exam: Exam) -> None:
    if not (report.findings.strip() or report.impression.strip()):
        raise InvalidInputError("a report needs findings or an impression")
    if exam.discipline is Discipline.LAB:
        return  # no images to grade: the lab's results are reviewed one by one instead
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
    _check_complete(report, exam)
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
        session.flush()
        # The resident signs what they submit; the clinic may see it (marked 以正式报告为准).
        sign_preliminary_report(session, report=report, exam=exam, signer=principal, now=now)
        # A critical finding cannot wait for the senior (DESIGN §5: the clinic within
        # minutes); verification later finds the same alert (its ID is the report's).
        raise_for_report(session, report=report, exam=exam, signer=principal, now=now)
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
    exam.rescan_requested_by = principal.user_id
    exam.rescan_declined_at = None
    exam.rescan_decline_reason = None
    _set_state(session, exam, item, ExamState.RESCAN_REQUESTED, WorkItemState.DONE)
    item.updated_at = now
    session.flush()
    notify_rescan_requested(session, exam=exam, now=now)
    record_access(
        session,
        principal,
        action="request_rescan",
        object_type="exam",
        object_id=exam.id,
        detail={"reason": exam.rescan_reason},
    )
    return get_exam(session, principal=principal, exam_id=exam.id)


_ADDENDUM = "【补充 Addendum】"


def _amended_text(kind: AmendmentKind, old: str, new: str | None) -> str:
    if new is None:
        return old
    if kind is AmendmentKind.APPENDED:
        # An addendum never changes what was said: the old text stays, the new follows.
        return f"{old}\n\n{_ADDENDUM}\n{new}" if old.strip() else f"{_ADDENDUM}\n{new}"
    return new


def amend_report(
    session: Session, *, principal: Principal, report_id: str, data: ReportAmendIn, now: datetime
) -> ReportOut:
    """A new signed version of the exam's current final report (amended, corrected or
    appended), by an attending or chief reader of the lead hospital. Fields not given are
    copied; for ``appended`` the given text is added after the old. The new version is final
    at once and goes through :func:`finalize_report` (signature, recognition, critical
    alert, delivery). Of two amendments racing on one version exactly one wins."""
    require_roles(principal, READING_ROLES, lead_only=True)
    if not can_verify(principal):
        raise PermissionDeniedError("only attending or chief readers may amend signed reports")
    report = session.get(Report, report_id)
    if report is None:
        raise NotFoundError(f"no report {report_id}")
    exam = visible_exam(session, principal=principal, exam_id=report.exam_id)
    # Lock the predecessor: a concurrent amendment waits here, then finds it superseded.
    session.execute(select(Report.id).where(Report.id == report.id).with_for_update()).scalar_one()
    session.refresh(report)
    current = _current(session, exam.id)
    if current is None or current.id != report.id:
        raise ConflictError(
            f"report {report_id} is version {report.version}, not the current one"
            + (f" (version {current.version}, {current.id})" if current else "")
        )
    if report.status is not ReportStatus.FINAL:
        raise ReportLockedError("only a signed final report can be amended")
    given = data.model_dump(exclude_unset=True, exclude={"kind", "reason"})
    if not any(v is not None for v in given.values()):
        raise InvalidInputError("an amendment changes or adds something")
    if data.key_images:
        _check_key_images(session, exam, data.key_images)
    kind = data.kind
    key_images = list(report.key_images or [])
    if data.key_images is not None:
        marked = [k.model_dump() for k in data.key_images]
        key_images = (
            key_images + [k for k in marked if k not in key_images]
            if kind is AmendmentKind.APPENDED
            else marked
        )
    structured = dict(report.structured or {})
    if data.structured is not None:
        structured = (
            {**structured, **data.structured}
            if kind is AmendmentKind.APPENDED
            else dict(data.structured)
        )
    version = report.version + 1
    new = Report(
        id=stable_id("report", exam.id, str(version)),
        exam_id=exam.id,
        version=version,
        previous_id=report.id,
        status=ReportStatus.FINAL,
        template_code=report.template_code,
        findings=_amended_text(kind, report.findings, data.findings),
        impression=_amended_text(kind, report.impression, data.impression),
        recommendation=_amended_text(kind, report.recommendation, data.recommendation),
        structured=structured,
        quality_grade=report.quality_grade,
        quality_reason=report.quality_reason,
        critical=report.critical if data.critical is None else data.critical,
        key_images=key_images,
        amendment_kind=kind,
        amendment_reason=data.reason.strip(),
        author_id=principal.user_id,
        author_level=principal.level,
        created_at=now,
        updated_at=now,
        submitted_at=now,
        final_at=now,
        revision=1,
    )
    try:
        with session.begin_nested():
            session.add(new)
            session.flush()
    except IntegrityError as exc:
        raise ConflictError(f"report {report_id} was amended by someone else just now") from exc
    finalize_report(session, report=new, exam=exam, signer=principal, now=now)
    record_access(
        session,
        principal,
        action="amend",
        object_type="report",
        object_id=new.id,
        detail={"kind": kind.value, "reason": new.amendment_reason, "previous_id": report.id},
    )
    return report_out(new)


def get_report_version(
    session: Session, *, principal: Principal, report_id: str
) -> ReportDetailOut:
    """One report version with every version of its exam, the current one marked, its
    signature and recognition decision. Clinics see their own submitted reports only
    (anything else is not found). Audited."""
    report = session.get(Report, report_id)
    if report is None:
        raise NotFoundError(f"no report {report_id}")
    exam = visible_exam(session, principal=principal, exam_id=report.exam_id)
    if principal.is_clinic_user and report.status is ReportStatus.DRAFT:
        raise NotFoundError(f"no report {report_id}")
    versions = [
        r
        for r in session.execute(
            select(Report).where(Report.exam_id == exam.id).order_by(Report.version)
        ).scalars()
        if not (principal.is_clinic_user and r.status is ReportStatus.DRAFT)
    ]
    current = versions[-1]
    record_access(session, principal, action="view", object_type="report", object_id=report.id)
    return ReportDetailOut(
        **report_out(report).model_dump(),
        versions=[
            ReportVersionOut(
                id=r.id,
                version=r.version,
                status=r.status,
                kind=r.amendment_kind,
                reason=r.amendment_reason,
                final_at=r.final_at,
                current=r.id == current.id,
            )
            for r in versions
        ],
        current_id=current.id,
        signature=signature_summary(session, report_id=report.id),
        recognition=recognition_for_report(session, report_id=report.id),
    )
