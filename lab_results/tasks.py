"""Background tasks of the lab centre (edges: each opens and commits its own transaction).

``lab_results.process_message`` turns one accepted message into orders and results; the
intake enqueues it once the message's row committed (after the ACK is durable).
``lab_results.process_pending`` picks up accepted messages left unprocessed (an enqueue lost
in a crash, a worker that died mid-task): processing is idempotent, so running both for one
message changes nothing twice.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from lab_results.models import LabMessage, LabMessageStatus
from lab_results.processing import process_message
from rdc_core.db import session_scope, utcnow
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import periodic, task

__all__ = ["PROCESS_MESSAGE", "PROCESS_PENDING", "process_message_task", "process_pending_task"]

log = logging.getLogger(__name__)

PROCESS_MESSAGE = "lab_results.process_message"
PROCESS_PENDING = "lab_results.process_pending"
_BATCH = 50
# A message younger than this is left to the task its intake enqueued.
_GRACE = timedelta(seconds=20)


@task(PROCESS_MESSAGE)
def process_message_task(message_id: str) -> str:
    """Process one accepted lab message; returns what happened (processed, failed, skipped)."""
    settings = get_settings()
    store = get_object_store(settings)
    with session_scope() as session:
        outcome = process_message(
            session, message_id=message_id, store=store, settings=settings, now=utcnow()
        )
    if outcome.status != "skipped":
        log.info(
            "lab message %s %s: orders %s, released %s, held %s, critical alerts %s",
            message_id,
            outcome.status,
            len(outcome.orders),
            len(outcome.released),
            len(outcome.held),
            len(outcome.alerts),
        )
    return outcome.status


@task(PROCESS_PENDING)
def process_pending_task() -> int:
    """Process accepted messages that nobody processed yet (oldest first); returns how many."""
    done = 0
    while True:
        with session_scope() as session:
            ids = (
                session.execute(
                    select(LabMessage.id)
                    .where(
                        LabMessage.status == LabMessageStatus.RECEIVED,
                        LabMessage.received_at <= utcnow() - _GRACE,
                    )
                    .order_by(LabMessage.received_at)
                    .limit(_BATCH)
                )
                .scalars()
                .all()
            )
        for message_id in ids:
            try:
                if process_message_task(message_id) != "skipped":
                    done += 1
            except Exception:
                log.exception("lab message %s could not be processed", message_id)
                _mark_failed(message_id)
        if len(ids) < _BATCH:
            return done


def _mark_failed(message_id: str) -> None:
    """Keep a message that raised out of the sweep's way (its error is logged)."""
    with session_scope() as session:
        message = session.get(LabMessage, message_id)
        if message is not None and message.status is LabMessageStatus.RECEIVED:
            message.status = LabMessageStatus.FAILED
            message.processed_at = utcnow()
            message.error = "processing raised an error; see the server log"


periodic(PROCESS_PENDING, interval=lambda: get_settings().lab_process_scan_interval_seconds)
