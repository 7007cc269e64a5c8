"""Append-only, hash-chained audit trail of access to patient data and of changes.

Appending is cheap and takes no lock: :func:`record_event` inserts one row in the caller's
transaction (it commits or rolls back with it) and nothing else. The chain is built apart,
by :func:`seal_pending` (a periodic task, and on demand before a checkpoint or a
verification): it walks the records not sealed yet in sequence order and appends one row to
``audit_seals`` per sequence number, holding the running hash
``sha256(previous hash, record)``. The database refuses UPDATE and DELETE on both tables
(triggers, see migration 0008), but the detection does not rely on that:
:func:`check_chain` recomputes the chain and compares it with the signed checkpoints kept
outside the database (:mod:`worklist.audit_anchor`), so an edited, deleted or re-hashed
record, and a truncated trail, are found.

Sequence numbers of transactions that rolled back leave gaps on PostgreSQL. The sealer seals
only the contiguous committed prefix; a gap whose following record is older than the grace
period is sealed as a ``rolled_back`` sequence number, so that a record removed later is
still missed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, String, func, insert, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from rdc_core.db import Base, get_engine, session_scope, utcnow
from rdc_core.errors import DatabaseUnavailableError
from rdc_core.group_commit import GroupCommitter
from worklist.access import Principal

__all__ = [
    "AuditEvent",
    "AuditSeal",
    "ChainReport",
    "CheckpointRef",
    "SealResult",
    "audited_read",
    "check_chain",
    "has_unsealed",
    "record_access",
    "record_event",
    "seal_pending",
    "verify_chain",
]

GENESIS = "0" * 64
EVENT = "event"
ROLLED_BACK = "rolled_back"
_SEALER_LOCK = 726381  # pg_advisory_xact_lock key: one sealer at a time (appenders take none)


class AuditEvent(Base):
    """One audited action. Rows are only ever inserted."""

    __tablename__ = "audit_events"
    # AUTOINCREMENT on SQLite: a sequence number is never handed out twice, even after the
    # last row was removed.
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012

    # INTEGER on SQLite so the column is the rowid and autoincrements.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(100))
    org_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AuditSeal(Base):
    """The chain: one row per sequence number, in order, appended by the sealer."""

    __tablename__ = "audit_seals"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))  # "event" or "rolled_back"
    hash: Mapped[str] = mapped_column(String(64))
    records: Mapped[int] = mapped_column(BigInteger)  # records sealed up to and including seq
    sealed_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by migration 0008 where the chain of the earlier scheme did not verify.
    note: Mapped[str | None] = mapped_column(String(200), nullable=True)


def _canonical(values: list[Any]) -> str:
    return json.dumps(
        values, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str
    )


def event_digest(
    prev_hash: str,
    at: datetime,
    actor: str,
    org_id: str | None,
    action: str,
    object_type: str,
    object_id: str,
    detail: dict[str, Any],
) -> str:
    """The chain hash after a record (the same digest as the chain before migration 0008)."""
    canonical = _canonical(
        [prev_hash, at.isoformat(), actor, org_id, action, object_type, object_id, detail]
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def rolled_back_digest(prev_hash: str, seq: int) -> str:
    """The chain hash after a sequence number that no committed record holds."""
    return hashlib.sha256(_canonical([prev_hash, ROLLED_BACK, seq]).encode("utf-8")).hexdigest()


def record_event(
    session: Session,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    org_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an audit record in the caller's transaction (no lock; sealed later). In an
    :func:`audited_read` on SQLite, the record is appended when the read ends."""
    values = {
        "at": utcnow(),
        "actor": actor,
        "org_id": org_id,
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "detail": detail or {},
    }
    deferred: list[dict[str, Any]] | None = session.info.get(_DEFERRED)
    if deferred is not None:
        deferred.append(values)
        return AuditEvent(**values)
    event = AuditEvent(**values)
    session.add(event)
    session.flush()
    return event


_DEFERRED = "rdc_audit_deferred"
_appender = GroupCommitter()


@contextmanager
def audited_read() -> Iterator[Session]:
    """A session for a request that only reads and records its access.

    On PostgreSQL this is one ordinary transaction (appending takes no lock). On SQLite,
    where a write transaction holds the one writer lock from its start, the reading runs in
    a read transaction (no lock), and the audit records are appended when the block ends,
    in one short write shared with the records of concurrent reads (group commit); they are
    committed before the block is left, so nothing is returned unaudited, and a failed
    append raises. The block must not write anything else (the read transaction is rolled
    back)."""
    engine = get_engine()
    if engine.dialect.name != "sqlite":
        with session_scope() as session:
            yield session
        return
    deferred: list[dict[str, Any]] = []
    session = Session(bind=engine.execution_options(rdc_readonly=True), expire_on_commit=False)
    session.info[_DEFERRED] = deferred
    try:
        yield session
        if session.new or session.dirty or session.deleted:
            raise RuntimeError("an audited read changed something; use session_scope")
    except OperationalError as exc:
        raise DatabaseUnavailableError(str(exc.orig or exc)) from exc
    finally:
        session.rollback()
        session.close()
    if deferred:
        _appender.run(lambda s: s.execute(insert(AuditEvent), deferred))


def record_access(
    session: Session,
    principal: Principal,
    *,
    action: str,
    object_type: str,
    object_id: str = "*",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append the record of ``principal`` doing ``action`` on an object (or a listing)."""
    return record_event(
        session,
        actor=principal.actor,
        org_id=principal.org_id,
        action=action,
        object_type=object_type,
        object_id=object_id,
        detail=detail,
    )


@dataclass(frozen=True, slots=True)
class SealResult:
    """What one sealing pass did."""

    sealed: int  # records sealed
    rolled_back: int  # sequence numbers sealed as rolled back
    head_seq: int  # last sequence number of the chain (0: none)
    head_hash: str
    count: int  # records in the chain
    waiting: bool  # stopped at a gap that may still fill (a transaction still open)


def seal_pending(
    session: Session, *, now: datetime, grace_seconds: float, limit: int = 5000
) -> SealResult:
    """Extend the chain over up to ``limit`` committed records not sealed yet, in sequence
    order, in the caller's transaction. Safe to run from several processes at once."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SELECT pg_advisory_xact_lock({_SEALER_LOCK})"))
    head = session.execute(
        select(AuditSeal.seq, AuditSeal.hash, AuditSeal.records)
        .order_by(AuditSeal.seq.desc())
        .limit(1)
    ).one_or_none()
    prev, count = (head.hash, head.records) if head else (GENESIS, 0)
    next_seq = head.seq + 1 if head else 1
    settled = now - timedelta(seconds=grace_seconds)
    rows: list[dict[str, Any]] = []
    sealed = rolled_back = 0
    waiting = False
    events = session.execute(
        select(AuditEvent).where(AuditEvent.seq >= next_seq).order_by(AuditEvent.seq).limit(limit)
    ).scalars()
    for event in events:
        if event.seq > next_seq:
            if event.at > settled:
                waiting = True  # the missing numbers may belong to a transaction still open
                break
            for missing in range(next_seq, event.seq):
                prev = rolled_back_digest(prev, missing)
                rows.append(_seal_row(missing, ROLLED_BACK, prev, count, now))
                rolled_back += 1
        count += 1
        prev = event_digest(
            prev,
            event.at,
            event.actor,
            event.org_id,
            event.action,
            event.object_type,
            event.object_id,
            event.detail,
        )
        rows.append(_seal_row(event.seq, EVENT, prev, count, now))
        sealed += 1
        next_seq = event.seq + 1
    if rows:
        session.execute(insert(AuditSeal), rows)
    return SealResult(
        sealed=sealed,
        rolled_back=rolled_back,
        head_seq=next_seq - 1,
        head_hash=prev,
        count=count,
        waiting=waiting,
    )


def has_unsealed(session: Session) -> bool:
    """Whether records were appended after the chain's head."""
    head = select(func.coalesce(func.max(AuditSeal.seq), 0)).scalar_subquery()
    return session.scalar(select(AuditEvent.seq).where(AuditEvent.seq > head).limit(1)) is not None


def _seal_row(seq: int, kind: str, digest: str, count: int, now: datetime) -> dict[str, Any]:
    return {"seq": seq, "kind": kind, "hash": digest, "records": count, "sealed_at": now}


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    """A signed checkpoint as the chain check needs it (signature already verified)."""

    seq: int
    head_hash: str
    count: int
    created_at: str
    key: str  # where it is stored


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of a chain check."""

    intact: bool
    first_bad_seq: int | None = None
    reason: str | None = None
    sealed_through: int = 0  # last sequence number of the chain
    records: int = 0  # records sealed in the chain
    unsealed: int = 0  # records appended after the chain's head (not sealed yet)
    checkpoints: int = 0  # checkpoints compared
    last_checkpoint_seq: int | None = None


def check_chain(session: Session, *, checkpoints: Iterable[CheckpointRef] = ()) -> ChainReport:
    """Recompute the whole chain from the records and compare it with the seals and with
    ``checkpoints``; reports the first bad or missing sequence number and why."""
    anchors = sorted(checkpoints, key=lambda c: c.seq)
    by_seq = {c.seq: c for c in anchors}
    last_anchor = anchors[-1].seq if anchors else None
    prev, count, expected = GENESIS, 0, 1
    compared = 0

    def bad(seq: int, reason: str) -> ChainReport:
        return ChainReport(
            intact=False,
            first_bad_seq=seq,
            reason=reason,
            sealed_through=expected - 1,
            records=count,
            checkpoints=compared,
            last_checkpoint_seq=last_anchor,
        )

    rows = session.execute(
        select(
            AuditSeal.seq,
            AuditSeal.kind,
            AuditSeal.hash,
            AuditSeal.records,
            AuditSeal.note,
            AuditEvent.seq.label("event_seq"),
            AuditEvent.at,
            AuditEvent.actor,
            AuditEvent.org_id,
            AuditEvent.action,
            AuditEvent.object_type,
            AuditEvent.object_id,
            AuditEvent.detail,
        )
        .outerjoin(AuditEvent, AuditEvent.seq == AuditSeal.seq)
        .order_by(AuditSeal.seq)
        .execution_options(yield_per=2000)
    )
    for row in rows:
        if row.seq != expected:
            return bad(expected, "sequence number missing from the chain (seal deleted)")
        if row.kind == EVENT:
            if row.event_seq is None:
                return bad(row.seq, "sealed record deleted")
            count += 1
            digest = event_digest(
                prev,
                row.at,
                row.actor,
                row.org_id,
                row.action,
                row.object_type,
                row.object_id,
                row.detail,
            )
            if digest != row.hash:
                return bad(row.seq, "record changed after it was sealed (hash mismatch)")
        elif row.kind == ROLLED_BACK:
            if row.event_seq is not None:
                return bad(row.seq, "record inserted under a sequence number sealed as unused")
            digest = rolled_back_digest(prev, row.seq)
            if digest != row.hash:
                return bad(row.seq, "seal changed (hash mismatch)")
        else:
            return bad(row.seq, f"seal of unknown kind {row.kind!r}")
        if row.records != count:
            return bad(row.seq, "seal changed (record count mismatch)")
        if row.note:
            return bad(row.seq, row.note)
        anchor = by_seq.get(row.seq)
        if anchor is not None:
            compared += 1
            if anchor.head_hash != digest or anchor.count != count:
                since = max((c.seq for c in anchors if c.seq < row.seq), default=0)
                return bad(
                    row.seq,
                    f"chain differs from the checkpoint signed at {anchor.created_at} "
                    f"({anchor.key}): records after seq {since} up to {row.seq} were "
                    "changed, removed or re-hashed",
                )
        prev = digest
        expected += 1
    head = expected - 1
    for anchor in anchors:
        if anchor.seq > head:
            return bad(
                head + 1,
                f"trail truncated: the checkpoint signed at {anchor.created_at} "
                f"({anchor.key}) covers records up to seq {anchor.seq}, the chain ends at "
                f"{head}",
            )
    unsealed = session.scalar(
        select(func.count()).select_from(AuditEvent).where(AuditEvent.seq > head)
    )
    return ChainReport(
        intact=True,
        sealed_through=head,
        records=count,
        unsealed=unsealed or 0,
        checkpoints=compared,
        last_checkpoint_seq=last_anchor,
    )


def verify_chain(session: Session) -> tuple[bool, int | None]:
    """Recompute the chain in the database alone (no checkpoints); returns (intact, first
    bad sequence number or None). Records not sealed yet are not covered."""
    report = check_chain(session)
    return report.intact, report.first_bad_seq
