"""What a clinic's technician does with an exam after sending it: answer a re-scan request
(new images put it back on the queue by themselves; declining says why it cannot be
repeated and puts it back as it is), and mark its urgency when the DICOM priority is absent.

Every change is audited; the clinic is told of a re-scan request and the reader who asked
is told of a decline, in the portal notifications.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from rdc_core.errors import ConflictError, InvalidInputError, PermissionDeniedError
from worklist.access import Principal
from worklist.audit import record_access
from worklist.critical_values.models import Notification
from worklist.critical_values.notifications import notify
from worklist.delivery.senders import display_name
from worklist.models import Exam, ExamState, Priority, Role, WorkItemState
from worklist.people import person_name
from worklist.queries import get_exam, visible_exam
from worklist.readiness import due_time, requeue_exam
from worklist.schemas import ExamDetail

__all__ = [
    "CLINIC_ANSWER_ROLES",
    "PRIORITY_ROLES",
    "decline_rescan",
    "notify_rescan_requested",
    "requester_name",
    "set_priority",
]

# Who answers for the clinic, and who may mark urgency (lead-hospital QC and admins too).
CLINIC_ANSWER_ROLES = frozenset({Role.TECHNICIAN, Role.CLINICIAN, Role.ADMIN})
PRIORITY_ROLES = frozenset({Role.TECHNICIAN, Role.CLINICIAN, Role.QC, Role.ADMIN})
_OPEN_STATES = (ExamState.RECEIVING, ExamState.READY, ExamState.RESCAN_REQUESTED)


def _what(exam: Exam) -> str:
    patient = exam.patient
    who = display_name(patient.name or "") or patient.patient_id
    what = " ".join(p for p in (exam.modality, exam.body_part, exam.description) if p)
    return f"{who} {what}".strip()


def notify_rescan_requested(session: Session, *, exam: Exam, now: datetime) -> None:
    """Tell the exam's clinic that a reader asks for the exam to be repeated, and why."""
    reason = exam.rescan_reason or ""
    notify(
        session,
        org_id=exam.org_id,
        kind="rescan_requested",
        subject_type="exam",
        subject_id=exam.id,
        text=(
            f"请重新检查：{_what(exam)}。原因：{reason}",
            f"Re-scan requested: {_what(exam)}. Reason: {reason}",
        ),
        now=now,
        key=now.isoformat(),
    )


def decline_rescan(
    session: Session, *, principal: Principal, exam_id: str, reason: str, now: datetime
) -> ExamDetail:
    """The clinic cannot repeat the exam (patient gone, device down ...): the exam goes
    back to the reading queue as it is, with the clinic's reason; the reader who asked is
    notified."""
    if principal.role not in CLINIC_ANSWER_ROLES or not principal.is_clinic_user:
        raise PermissionDeniedError("only the exam's clinic answers a re-scan request")
    if not reason.strip():
        raise InvalidInputError("say why the exam cannot be repeated")
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    if exam.state is not ExamState.RESCAN_REQUESTED:
        raise ConflictError("no re-scan request is waiting for an answer on this exam")
    exam.rescan_declined_at = now
    exam.rescan_decline_reason = reason.strip()[:2000]
    session.execute(  # the request is answered: its notice is read
        update(Notification)
        .where(
            Notification.org_id == exam.org_id,
            Notification.kind == "rescan_requested",
            Notification.subject_id == exam.id,
            Notification.read_at.is_(None),
        )
        .values(read_at=now)
        .execution_options(synchronize_session=False)
    )
    requeue_exam(session, exam=exam, now=now)
    record_access(
        session,
        principal,
        action="decline_rescan",
        object_type="exam",
        object_id=exam.id,
        detail={"reason": exam.rescan_decline_reason},
    )
    if exam.rescan_requested_by:
        notify(
            session,
            org_id=exam.rescan_requester.org_id if exam.rescan_requester else exam.org_id,
            user_ids=[exam.rescan_requested_by],
            kind="rescan_declined",
            subject_type="exam",
            subject_id=exam.id,
            text=(
                f"送检机构无法重扫：{_what(exam)}。原因：{exam.rescan_decline_reason}",
                f"The clinic cannot repeat {_what(exam)}. Reason: {exam.rescan_decline_reason}",
            ),
            now=now,
            key=now.isoformat(),
        )
    return get_exam(session, principal=principal, exam_id=exam.id)


def set_priority(
    session: Session,
    *,
    principal: Principal,
    exam_id: str,
    priority: Priority,
    reason: str,
    now: datetime,
) -> ExamDetail:
    """Mark an exam's urgency by hand (its DICOM priority was absent or wrong), with the
    reason; an open work item takes the new priority and its due time follows."""
    if principal.role not in PRIORITY_ROLES:
        raise PermissionDeniedError(f"role {principal.role.value} may not set the urgency")
    if not reason.strip():
        raise InvalidInputError("say why the urgency changes")
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    if exam.state not in _OPEN_STATES:
        raise ConflictError("the exam is reported already; its urgency no longer changes")
    before = exam.priority
    exam.priority = priority
    exam.priority_reason = reason.strip()[:2000]
    item = exam.work_item
    if item is not None and item.state in (WorkItemState.OPEN, WorkItemState.AWAITING_VERIFICATION):
        requeued = exam.rescan_requested_at is not None
        item.priority = priority
        item.priority_rank = priority.rank
        item.due_at = due_time(session, exam=exam, since=exam.ready_at if requeued else None)
        item.updated_at = now
    session.flush()
    record_access(
        session,
        principal,
        action="set_priority",
        object_type="exam",
        object_id=exam.id,
        detail={"from": before.value, "to": priority.value, "reason": exam.priority_reason},
    )
    return get_exam(session, principal=principal, exam_id=exam.id)


def requester_name(exam: Exam) -> str | None:
    """Who asked for the re-scan, as people read it."""
    return person_name(exam.rescan_requester) or None
