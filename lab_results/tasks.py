"""Background tasks of the lab centre (edges: each opens and commits its own transaction).

``lab_results.process_message`` turns an accepted message into orders and results; the
intake enqueues it once the message's row committed (after the ACK is durable; at most ten
times a second, see :class:`lab_results.intake.LabIntake`). A run processes that message
and every other one waiting, oldest first, ``BATCH`` to a transaction: under a stream of
messages one commit serves many. Before the write transaction begins, the batch's bytes
still in their index rows are written to the object store (durably, one sync for the
batch; the transaction then empties the rows' copies) and every message is parsed. While
the same process's intake is busy (also while it waits for the writer) a run takes small
batches only (on SQLite the intake's commits and processing share one writer): the
acknowledgements come first, results follow.
``lab_results.process_pending`` picks up accepted messages left unprocessed (an enqueue lost
in a crash, a worker that died mid-task). Processing is idempotent: running both for one
message changes nothing twice.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import Select, literal_column, select

from lab_results.intake import intake_idle_seconds
from lab_results.models import LabMessage, LabMessageStatus
from lab_results.processing import (
    ProcessOutcome,
    WaitingMessage,
    prepare_messages,
    process_prepared,
)
from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.errors import DatabaseUnavailableError, StorageError
from rdc_core.settings import Settings, get_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import periodic, task

__all__ = [
    "BATCH",
    "PROCESS_MESSAGE",
    "PROCESS_PENDING",
    "process_batch",
    "process_message_task",
    "process_pending_task",
]

log = logging.getLogger(__name__)

PROCESS_MESSAGE = "lab_results.process_message"
PROCESS_PENDING = "lab_results.process_pending"
BATCH = 50
# A message younger than this is left to the task its intake enqueued.
_GRACE = timedelta(seconds=20)
_OUTAGES = (DatabaseUnavailableError, StorageError)
_INTAKE_QUIET = 0.1  # seconds without a new message: the intake is not busy
_YIELD_MAX = 1.0  # the longest a batch waits for the intake
_BUSY_BATCH = 5  # messages per transaction while the intake is busy


def _waiting_rows() -> Select[str, str, bytes | None]:
    """Accepted messages still to process: ID, object key, bytes."""
    # The status as a literal, not a parameter: the index is partial (status 'received'),
    # and the generic plan PostgreSQL makes of a statement psycopg has prepared (after 5
    # runs) cannot prove that a parameter equals that value.
    return select(LabMessage.id, LabMessage.object_key, LabMessage.raw).where(
        LabMessage.status == literal_column(f"'{LabMessageStatus.RECEIVED.value}'")
    )


def waiting_statement(
    *, limit: int, older_than: timedelta | None = None
) -> Select[str, str, bytes | None]:
    """The query of the oldest accepted messages still to process, through the partial
    index of waiting messages (migration 0025)."""
    stmt = _waiting_rows()
    if older_than is not None:
        stmt = stmt.where(LabMessage.received_at <= utcnow() - older_than)
    return stmt.order_by(LabMessage.received_at, LabMessage.id).limit(limit)


def _waiting(
    first: str | None, *, older_than: timedelta | None = None, limit: int = 0
) -> list[WaitingMessage]:
    """The accepted messages to process now: ``first`` (if still waiting) and the oldest
    others, up to ``limit`` (default BATCH)."""
    limit = limit or BATCH
    with read_session() as session:
        head: list[WaitingMessage] = []
        if first is not None:
            row = session.execute(_waiting_rows().where(LabMessage.id == first)).one_or_none()
            if row is None:
                return []  # processed already (by an earlier batch), or unknown
            head = [WaitingMessage(*row)]
        stmt = waiting_statement(limit=limit - len(head), older_than=older_than)
        if first is not None:
            stmt = stmt.where(LabMessage.id != first)
        rows = session.execute(stmt).all()
    return head + [WaitingMessage(*row) for row in rows]


def process_batch(batch: list[WaitingMessage], settings: Settings) -> list[ProcessOutcome]:
    """Process ``batch`` in one transaction; should that fail, each message in its own (a
    message that fails alone is marked failed; an outage is raised, to retry later)."""
    prepared = prepare_messages(batch, store=get_object_store(settings), settings=settings)
    try:
        with session_scope() as session:
            now = utcnow()
            return [
                process_prepared(session, prepared=p, settings=settings, now=now) for p in prepared
            ]
    except _OUTAGES:
        raise
    except Exception:
        if len(prepared) == 1:
            _mark_failed(prepared[0].message_id)
            raise
        log.warning("lab batch of %d failed; processing its messages one by one", len(prepared))
    outcomes = []
    for p in prepared:
        try:
            with session_scope() as session:
                outcomes.append(
                    process_prepared(session, prepared=p, settings=settings, now=utcnow())
                )
        except _OUTAGES:
            raise
        except Exception:
            log.exception("lab message %s could not be processed", p.message_id)
            _mark_failed(p.message_id)
    return outcomes


def _log(outcomes: list[ProcessOutcome]) -> None:
    for outcome in outcomes:
        if outcome.status == "skipped":
            continue
        log.info(
            "lab message %s %s: orders %s, released %s, held %s, critical alerts %s%s",
            outcome.message_id,
            outcome.status,
            len(outcome.orders),
            len(outcome.released),
            len(outcome.held),
            len(outcome.alerts),
            f" ({outcome.error})" if outcome.error else "",
        )


_run_lock = threading.Lock()  # one run per process; a second asks the first to go on
_again = threading.Event()


def _yield_to_intake() -> int:
    """Wait while this process's intake is busy (up to ``_YIELD_MAX``): its group commits
    and processing share one database writer on SQLite. Returns the batch size to take:
    a small one when the intake is still busy."""
    deadline = time.monotonic() + _YIELD_MAX
    while intake_idle_seconds() < _INTAKE_QUIET:
        if time.monotonic() > deadline:
            return _BUSY_BATCH
        time.sleep(0.05)
    return BATCH


def _drain(first: str | None, settings: Settings) -> int:
    done = 0
    while True:
        size = _yield_to_intake()
        batch = _waiting(first, limit=size)
        first = None
        if not batch:
            return done
        outcomes = process_batch(batch, settings)
        _log(outcomes)
        processed = sum(o.status != "skipped" for o in outcomes)
        done += processed
        if len(batch) < size or not processed:
            return done


@task(PROCESS_MESSAGE)
def process_message_task(message_id: str) -> int:
    """Process an accepted lab message and every other one waiting; returns how many
    messages this run processed."""
    if not _run_lock.acquire(blocking=False):
        _again.set()  # the run in progress looks again before it ends
        return 0
    try:
        settings = get_settings()
        total = 0
        first: str | None = message_id
        while True:
            _again.clear()
            total += _drain(first, settings)
            first = None
            if not _again.is_set():
                return total
    finally:
        _run_lock.release()


@task(PROCESS_PENDING)
def process_pending_task() -> int:
    """Process accepted messages that nobody processed yet (oldest first); returns how many."""
    settings = get_settings()
    done = 0
    while True:
        size = _yield_to_intake()
        batch = _waiting(None, older_than=_GRACE, limit=size)
        if not batch:
            return done
        outcomes = process_batch(batch, settings)
        _log(outcomes)
        processed = sum(o.status != "skipped" for o in outcomes)
        done += processed
        if len(batch) < size or not processed:
            return done


def _mark_failed(message_id: str) -> None:
    """Keep a message whose processing raised out of the way (its error is logged)."""
    with session_scope() as session:
        message = session.get(LabMessage, message_id)
        if message is not None and message.status is LabMessageStatus.RECEIVED:
            message.status = LabMessageStatus.FAILED
            message.processed_at = utcnow()
            message.error = "processing raised an error; see the server log"


periodic(PROCESS_PENDING, interval=lambda: get_settings().lab_process_scan_interval_seconds)
