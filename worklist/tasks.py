"""Background tasks of the worklist (edges: each opens and commits its own transaction)."""

from __future__ import annotations

import logging

# The domain packages' task modules register their tasks on import.
import worklist.audit_tasks
import worklist.critical_values.tasks
import worklist.delivery.tasks
import worklist.qc.tasks  # noqa: F401
from rdc_core.db import session_scope, utcnow
from rdc_core.settings import get_settings
from rdc_core.tasks import periodic, task
from worklist.readiness import BATCH_SIZE, mark_stable_exams_ready

__all__ = ["MARK_STABLE_EXAMS_READY", "mark_stable_exams_ready_task"]

log = logging.getLogger(__name__)

MARK_STABLE_EXAMS_READY = "worklist.mark_stable_exams_ready"


@task(MARK_STABLE_EXAMS_READY)
def mark_stable_exams_ready_task() -> int:
    """Make quiet RECEIVING exams READY and queue them; returns how many."""
    settings = get_settings()
    total = 0
    while True:
        with session_scope() as session:
            ready = mark_stable_exams_ready(
                session, now=utcnow(), stable_age_seconds=settings.stable_age_seconds
            )
        for item in ready:
            log.info(
                "exam %s READY, pool %s, due %s", item.exam_id, item.pool, item.due_at.isoformat()
            )
        total += len(ready)
        if len(ready) < BATCH_SIZE:
            return total


periodic(MARK_STABLE_EXAMS_READY, interval=lambda: get_settings().stable_scan_interval)
