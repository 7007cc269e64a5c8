"""From RECEIVING to READY: stable-study detection, routing to a reader pool, SLA due time.

An exam is complete when no instance has arrived for the stable age. The state lives in
the exams table; the transition is a conditional UPDATE, so a restart, a second replica or a
retried task makes each exam READY exactly once and creates exactly one work item.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from rdc_core.db import insert_ignore, stable_id
from worklist.models import (
    Discipline,
    Exam,
    ExamState,
    Priority,
    RoutingRule,
    SlaTarget,
    WorkItem,
    WorkItemState,
)

__all__ = [
    "BATCH_SIZE",
    "DEFAULT_SLA_MINUTES",
    "TRIAGE_RANK",
    "ReadyExam",
    "due_time",
    "mark_exam_ready",
    "mark_stable_exams_ready",
    "queue_rank",
    "requeue_exam",
    "route_exam",
    "triage_exam",
]

# Defaults shipped with the product (DESIGN.md §5); the sla_targets table overrides them.
DEFAULT_SLA_MINUTES: dict[tuple[Discipline, Priority], int] = {
    (Discipline.IMAGING, Priority.EMERGENCY): 30,
    (Discipline.IMAGING, Priority.URGENT): 120,
    (Discipline.IMAGING, Priority.ROUTINE): 24 * 60,
    (Discipline.ECG, Priority.EMERGENCY): 15,
    (Discipline.ECG, Priority.URGENT): 15,
    (Discipline.ECG, Priority.ROUTINE): 30,
    (Discipline.LAB, Priority.EMERGENCY): 40,
    (Discipline.LAB, Priority.URGENT): 40,
    (Discipline.LAB, Priority.ROUTINE): 4 * 60,
}

BATCH_SIZE = 200  # exams made READY per transaction
# The queue rank of an exam a machine pre-screen suspects is critical (an ECG whose QTc is
# >= 550 ms...): above every emergency (rank 0), so the reader sees it first.
TRIAGE_RANK = -1


def queue_rank(exam: Exam) -> int:
    """Where the exam sorts in the reading queue: its priority's rank, or
    :data:`TRIAGE_RANK` when a pre-screen flagged it (``exam.triage_reason``)."""
    return TRIAGE_RANK if exam.triage_reason else exam.priority.rank


@dataclass(frozen=True, slots=True)
class ReadyExam:
    exam_id: str
    pool: str
    due_at: datetime


def route_exam(session: Session, *, exam: Exam) -> str:
    """The reader pool for ``exam``: the first matching routing rule, else the discipline's pool."""
    rules = session.execute(
        select(RoutingRule).order_by(RoutingRule.position, RoutingRule.id)
    ).scalars()
    for rule in rules:
        if rule.discipline and rule.discipline != exam.discipline.value:
            continue
        if rule.modality and rule.modality.upper() not in {
            m.upper() for m in exam.modalities.split("\\")
        }:
            continue
        if rule.body_part and rule.body_part.upper() != exam.body_part.upper():
            continue
        if rule.org_id and rule.org_id != exam.org_id:
            continue
        if rule.priority and rule.priority != exam.priority.value:
            continue
        return rule.pool
    return exam.discipline.value


def due_time(session: Session, *, exam: Exam, since: datetime | None = None) -> datetime:
    """When the final report is due: first arrival (or ``since``, for an exam back in the
    queue after a re-scan) plus the SLA target for the exam's discipline and priority."""
    minutes = session.execute(
        select(SlaTarget.minutes).where(
            SlaTarget.discipline == exam.discipline, SlaTarget.priority == exam.priority
        )
    ).scalar_one_or_none()
    if minutes is None:
        minutes = DEFAULT_SLA_MINUTES[(exam.discipline, exam.priority)]
    return (since or exam.first_received_at) + timedelta(minutes=minutes)


def requeue_exam(session: Session, *, exam: Exam, now: datetime) -> ReadyExam:
    """Put an exam that left the queue (sent back for a re-scan) back on it: its work item
    opens again, unclaimed, in the pool its routing gives now, due by the SLA counted from
    ``now``. The exam is READY."""
    pool = route_exam(session, exam=exam)
    due_at = due_time(session, exam=exam, since=now)
    exam.state = ExamState.READY
    exam.ready_at = now
    session.execute(
        update(WorkItem)
        .where(WorkItem.exam_id == exam.id)
        .values(
            state=WorkItemState.OPEN,
            pool=pool,
            priority=exam.priority,
            priority_rank=queue_rank(exam),
            due_at=due_at,
            claimed_by=None,
            claimed_at=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return ReadyExam(exam_id=exam.id, pool=pool, due_at=due_at)


def mark_stable_exams_ready(
    session: Session, *, now: datetime, stable_age_seconds: float
) -> list[ReadyExam]:
    """Move every RECEIVING exam quiet for ``stable_age_seconds`` to READY and queue it."""
    cutoff = now - timedelta(seconds=stable_age_seconds)
    candidates = (
        session.execute(
            select(Exam.id)
            .where(Exam.state == ExamState.RECEIVING, Exam.last_received_at <= cutoff)
            .order_by(Exam.last_received_at)
            .limit(BATCH_SIZE)
        )
        .scalars()
        .all()
    )
    made_ready: list[ReadyExam] = []
    for exam_id in candidates:
        result = session.execute(
            update(Exam)
            .where(
                Exam.id == exam_id,
                Exam.state == ExamState.RECEIVING,
                Exam.last_received_at <= cutoff,
            )
            .values(state=ExamState.READY, ready_at=now)
            .execution_options(synchronize_session=False)
        )
        if not cast(CursorResult[Any], result).rowcount:
            continue  # another worker got there first, or an instance just arrived
        made_ready.append(_queue(session, exam_id=exam_id, now=now))
    return made_ready


def _queue(session: Session, *, exam_id: str, now: datetime) -> ReadyExam:
    # The exam was just made READY: create its work item (or reopen it after a re-scan).
    exam = session.get(Exam, exam_id, populate_existing=True)
    assert exam is not None
    if exam.rescan_requested_at is not None and exam.work_item is not None:
        # New images after a re-scan request: the exam goes back to the queue.
        return requeue_exam(session, exam=exam, now=now)
    pool = route_exam(session, exam=exam)
    due_at = due_time(session, exam=exam)
    insert_ignore(
        session,
        WorkItem.__table__,
        {
            "id": stable_id("work_item", exam_id),
            "exam_id": exam_id,
            "state": WorkItemState.OPEN.value,
            "pool": pool,
            "priority": exam.priority.value,
            "priority_rank": queue_rank(exam),
            "due_at": due_at,
            "org_id": exam.org_id,
            "discipline": exam.discipline.value,
            "modality": exam.modality,
            "created_at": now,
        },
        conflict=(),  # the ID derives from exam_id: a clash on either is the same item
    )
    return ReadyExam(exam_id=exam_id, pool=pool, due_at=due_at)


def mark_exam_ready(session: Session, *, exam_id: str, now: datetime) -> ReadyExam | None:
    """Make one RECEIVING exam READY and queue it now, without waiting for the stable age:
    for intakes whose one artifact is the whole exam (an uploaded ECG record). None when
    the exam is not RECEIVING (READY already, reported, cancelled)."""
    result = session.execute(
        update(Exam)
        .where(Exam.id == exam_id, Exam.state == ExamState.RECEIVING)
        .values(state=ExamState.READY, ready_at=now)
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], result).rowcount:
        return None
    return _queue(session, exam_id=exam_id, now=now)


def triage_exam(session: Session, *, exam_id: str, reason: str, now: datetime) -> bool:
    """A machine pre-screen suspects the exam is critical: it becomes an emergency with the
    reason, and its work item (now, or when it is created) sorts above every other
    (:data:`TRIAGE_RANK`), due by the emergency target. Nothing is signed or released: the
    reader confirms. Returns False when the exam is reported or cancelled already (it is
    left as it is)."""
    exam = session.get(Exam, exam_id, populate_existing=True)
    if exam is None or exam.state not in (
        ExamState.RECEIVING,
        ExamState.READY,
        ExamState.RESCAN_REQUESTED,
    ):
        return False
    exam.triage_reason = reason[:4000]
    exam.priority = Priority.EMERGENCY
    item = exam.work_item
    if item is not None and item.state in (WorkItemState.OPEN, WorkItemState.AWAITING_VERIFICATION):
        item.priority = Priority.EMERGENCY
        item.priority_rank = TRIAGE_RANK
        requeued = exam.rescan_requested_at is not None
        item.due_at = min(
            item.due_at, due_time(session, exam=exam, since=exam.ready_at if requeued else None)
        )
        item.updated_at = now
    session.flush()
    return True
