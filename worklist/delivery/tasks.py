"""Background tasks of delivery (edges: each opens and commits its own transaction).

``worklist.deliver_reports`` runs every ``delivery_scan_interval_seconds``: it leases the
due pushes, sends each through its channel's sender outside any transaction, and records
the outcome. Senders are registered by ``dicom_gateway.report_push`` and
``lab_results.report_push``, which the task runner imports at start-up.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rdc_core.db import session_scope, utcnow
from rdc_core.settings import get_settings
from rdc_core.tasks import periodic, task
from worklist.delivery.models import DeliveryState
from worklist.delivery.senders import DeliveryFailedError, get_sender
from worklist.delivery.service import (
    LeaseLostError,
    claim_due_deliveries,
    prepare_push,
    record_attempt,
)

__all__ = ["DELIVER_REPORTS", "SEND_TIMEOUT_SECONDS", "DeliveryRun", "deliver_due_reports"]

log = logging.getLogger(__name__)

DELIVER_REPORTS = "worklist.deliver_reports"
# One peer may take this long per step (connect, association, answer); the lease covers
# a few of them so it never expires while a send is still under way.
SEND_TIMEOUT_SECONDS = 30.0
_LEASE_SECONDS = 5 * SEND_TIMEOUT_SECONDS
_BATCH = 20
_MAX_BATCHES = 25


@dataclass
class DeliveryRun:
    """What one run did: delivery IDs by outcome."""

    delivered: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # taken over by another worker

    @property
    def attempted(self) -> int:
        return len(self.delivered) + len(self.failed)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def deliver_due_reports(
    *,
    now: datetime | None = None,
    worker: str | None = None,
    url: str | None = None,
    timeout: float = SEND_TIMEOUT_SECONDS,
) -> DeliveryRun:
    """Send every push that is due at ``now`` (default: the current time) once."""
    worker = worker or _worker_name()
    run = DeliveryRun()
    # Until nothing is due (a delivered version may free the next one of its exam), but a
    # bounded number of batches so one run never goes on forever.
    for _ in range(_MAX_BATCHES):
        at = now or utcnow()
        with session_scope(url) as session:
            claimed = claim_due_deliveries(
                session, now=at, worker=worker, lease_seconds=_LEASE_SECONDS, limit=_BATCH
            )
        if not claimed:
            break
        for delivery_id in claimed:
            state = _deliver_one(delivery_id, worker=worker, now=now, url=url, timeout=timeout)
            if state is None:
                run.skipped.append(delivery_id)
            elif state is DeliveryState.DELIVERED:
                run.delivered.append(delivery_id)
            else:
                run.failed.append(delivery_id)
    return run


def _deliver_one(
    delivery_id: str, *, worker: str, now: datetime | None, url: str | None, timeout: float
) -> DeliveryState | None:
    error: str | None = None
    detail: dict[str, Any] = {}
    try:
        with session_scope(url) as session:
            push, endpoint = prepare_push(
                session,
                delivery_id=delivery_id,
                worker=worker,
                now=now or utcnow(),
                lease_seconds=_LEASE_SECONDS,
            )
    except LeaseLostError:
        log.info("delivery %s: another worker took it over", delivery_id)
        return None
    except Exception as exc:  # e.g. the signed PDF is unreadable: a failed attempt
        push, endpoint, error = None, None, f"{type(exc).__name__}: {exc}"
    try:
        if push is not None and endpoint is not None:
            detail = get_sender(endpoint.channel)(push, endpoint, timeout)
    except DeliveryFailedError as exc:
        error, detail = str(exc) or type(exc).__name__, exc.detail
    except Exception as exc:  # any failure is recorded as a failed attempt and retried
        error = f"{type(exc).__name__}: {exc}"
    if error:
        log.warning("delivery %s failed: %s", delivery_id, error)
    with session_scope(url) as session:
        return record_attempt(
            session,
            delivery_id=delivery_id,
            worker=worker,
            now=now or utcnow(),
            error=error,
            detail=detail,
            max_backoff=get_settings().delivery_max_backoff_seconds,
        )


@task(DELIVER_REPORTS)
def deliver_reports_task() -> int:
    """Push due reports to the clinics' endpoints; returns how many were delivered."""
    return len(deliver_due_reports().delivered)


periodic(DELIVER_REPORTS, interval=lambda: get_settings().delivery_scan_interval_seconds)
