"""Background tasks of critical_values (edges: each opens and commits its own transaction)."""

from __future__ import annotations

import logging

from rdc_core.db import session_scope, utcnow
from rdc_core.settings import get_settings
from rdc_core.tasks import periodic, task
from worklist.critical_values.service import escalate_overdue_alerts

__all__ = ["ESCALATE_CRITICAL_VALUES", "escalate_critical_values_task"]

log = logging.getLogger(__name__)

ESCALATE_CRITICAL_VALUES = "worklist.escalate_critical_values"
_BATCH = 100


@task(ESCALATE_CRITICAL_VALUES)
def escalate_critical_values_task() -> int:
    """Escalate every overdue, unacknowledged critical-value alert; returns how many levels
    fired. Safe to run on several workers at once."""
    total = 0
    while True:
        with session_scope() as session:
            fired = escalate_overdue_alerts(session, now=utcnow(), limit=_BATCH)
        for entry in fired:
            alert_id, level = entry.rsplit(":", 1)
            log.warning("critical-value alert %s escalated to level %s", alert_id, level)
        total += len(fired)
        if len(fired) < _BATCH:
            return total


periodic(ESCALATE_CRITICAL_VALUES, interval=lambda: get_settings().critical_scan_interval_seconds)
