"""The audit trail's background work, also run on demand by ``rdc audit`` and the API:
seal new records, write a signed checkpoint, verify the whole trail (edges: each step opens
and commits its own transaction)."""

from __future__ import annotations

import logging

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import periodic, task
from worklist.audit import ChainReport, has_unsealed, seal_pending
from worklist.audit_anchor import (
    Checkpoint,
    checkpoint_signing_key,
    save_status,
    verify_trail,
    write_checkpoint,
)

__all__ = [
    "AUDIT_CHECKPOINT",
    "AUDIT_SEAL",
    "AUDIT_VERIFY",
    "checkpoint_now",
    "seal_now",
    "verify_now",
]

log = logging.getLogger(__name__)

AUDIT_SEAL = "worklist.audit_seal"
AUDIT_CHECKPOINT = "worklist.audit_checkpoint"
AUDIT_VERIFY = "worklist.audit_verify"
_BATCH = 5000


@task(AUDIT_SEAL)
def seal_now() -> int:
    """Chain every committed record not sealed yet (up to a gap that may still fill);
    returns how many records were sealed."""
    grace = get_settings().audit_seal_grace_seconds
    with read_session() as session:
        if not has_unsealed(session):
            return 0  # on SQLite, do not take the writer lock for nothing
    total = 0
    while True:
        with session_scope() as session:
            result = seal_pending(session, now=utcnow(), grace_seconds=grace, limit=_BATCH)
        total += result.sealed
        if result.sealed + result.rolled_back < _BATCH or result.waiting:
            return total


def checkpoint_now() -> Checkpoint | None:
    """Seal, then sign the chain's head into the object store (None: nothing new)."""
    seal_now()
    settings = get_settings()
    with read_session() as session:
        checkpoint = write_checkpoint(
            session,
            store=get_object_store(settings),
            key=checkpoint_signing_key(settings),
            now=utcnow(),
        )
    if checkpoint is not None:
        log.info("audit checkpoint at seq %d (%d records)", checkpoint.seq, checkpoint.count)
    return checkpoint


@task(AUDIT_CHECKPOINT)
def checkpoint_task() -> int | None:
    """The periodic checkpoint; returns its sequence number (None: nothing new)."""
    checkpoint = checkpoint_now()
    return None if checkpoint is None else checkpoint.seq


def verify_now() -> ChainReport:
    """Seal, then verify the whole trail against the checkpoints; the outcome is kept for
    /readyz and /metrics."""
    seal_now()
    settings = get_settings()
    store = get_object_store(settings)
    with read_session() as session:
        report = verify_trail(session, store=store, key=checkpoint_signing_key(settings))
    save_status(store, report, now=utcnow())
    if not report.intact:
        log.error(
            "audit trail verification FAILED at seq %s: %s", report.first_bad_seq, report.reason
        )
    return report


@task(AUDIT_VERIFY)
def verify_task() -> bool:
    """The periodic verification; returns whether the trail is intact."""
    return verify_now().intact


periodic(AUDIT_SEAL, interval=lambda: get_settings().audit_seal_interval_seconds)
periodic(AUDIT_CHECKPOINT, interval=lambda: get_settings().audit_checkpoint_interval_seconds)
periodic(AUDIT_VERIFY, interval=lambda: get_settings().audit_verify_interval_seconds)
