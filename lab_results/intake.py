"""Durable intake of HL7 v2 lab messages, shared by the MLLP listener and the HTTP route.

For each message: read its envelope and check it is a lab result we accept; write the bytes
as received to the object store (fsynced); in one transaction find the clinic that
registered the sending facility and insert the index row, keyed by (MSH-3, MSH-4, MSH-10),
with the acknowledgement it will get; and only once that transaction has committed answer
AA (original mode) or CA (enhanced mode: MSH-15 or MSH-16 valued). Group commit: the
objects of the messages arriving meanwhile on every connection are written and synced
together (:func:`rdc_core.storage.put_new_objects`), then their index rows are written in
one transaction straight on a driver connection (no ORM session) while the next batch's
objects sync; a row is written only once its object is durable. A row that fails makes
its batch's rows go in one by one, so that only its own message is answered AE. The row's
``content_sha256`` is the SHA-256 of the message's bytes as received (inside the MLLP
frame, or the HTTP body's part for that message). Processing (parsing, mapping,
auto-verification) is not on this path: it is enqueued after the commit and deferred
while messages stream in.

Failures (original mode / enhanced mode):

- AR / CR: the message cannot be accepted as it is (not HL7, unsupported type, missing
  MSH-10, patient or order number, unknown sender). Sending it again will not help.
- AE / CE: the object store or the database failed (the sender should retry), or the
  control ID was already used for a different message ("control ID reused").

A message whose key is already stored with the same content (the same bytes, or the same
segments after normalising the BOM and segment terminators) gets the stored
acknowledgement again, byte for byte, and is not stored twice. Rejected messages are not kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from typing import Any, Final

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from lab_results.envelope import (
    Envelope,
    ErrorCode,
    MessageRejected,
    ack_message,
    batch_ack,
    check_acceptable,
    new_control_id,
    read_envelope,
    split_batch,
)
from lab_results.models import LabMessage, LabMessageStatus
from rdc_core.db import begin_driver_write, get_engine, read_session, utcnow
from rdc_core.errors import (
    DatabaseUnavailableError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
)
from rdc_core.group_commit import ATTEMPTS, retryable
from rdc_core.metrics import LAB_MESSAGES
from rdc_core.storage import LocalObjectStore, ObjectStore, put_new_objects
from rdc_core.tasks import submit_task
from worklist.access import Principal
from worklist.directory import OrgRef, organization_for_hl7_facility
from worklist.models import OrgKind, Role

__all__ = [
    "Acknowledgement",
    "IndexedMessage",
    "LabIntake",
    "http_intake_scope",
    "identify_sender",
    "intake_idle_seconds",
    "same_message",
]

log = logging.getLogger(__name__)

ACCEPTED: Final = "accepted"
DUPLICATE: Final = "duplicate"
REJECTED: Final = "rejected"
FAILED: Final = "failed"  # store or database outage: the sender should retry

_SENDER_CACHE_SECONDS: Final = 60.0
_KEY_COLUMNS = ("sending_application", "sending_facility", "control_id")


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """The answer to one message: the ACK bytes and what happened."""

    ack: bytes
    code: str  # MSA-1: AA, AE, AR (original mode) or CA, CE, CR (enhanced mode)
    outcome: str  # accepted, duplicate, rejected or failed
    reason: str = ""
    control_id: str = ""  # MSH-10 of the message

    @property
    def positive(self) -> bool:
        return self.code in ("AA", "CA")


@dataclass(frozen=True, slots=True)
class IndexedMessage:
    """What :func:`index_message` did: a new row (``message_id``), or ``duplicate``: the key
    is taken, by the row whose acknowledgement, content hash and object are given (the
    caller decides whether that earlier message is this one: see :func:`same_message`)."""

    duplicate: bool
    ack: bytes
    message_id: str | None = None
    stored_sha256: str = ""
    stored_key: str = ""


def identify_sender(
    session: Session, *, envelope: Envelope, restrict_to_org: str | None = None
) -> OrgRef:
    """The clinic that registered the message's sending facility (MSH-4, else MSH-3).

    Raises MessageRejected when no clinic did, or (``restrict_to_org``) another one did.
    """
    org = organization_for_hl7_facility(session, names=envelope.facility_names)
    if org is None:
        raise _unknown_sender(envelope)
    _check_restriction(envelope, org, restrict_to_org)
    return org


def _unknown_sender(envelope: Envelope) -> MessageRejected:
    names = " / ".join(envelope.facility_names)
    return MessageRejected(
        f"sending facility {names} is not registered (rdc clinic add --hl7-facility)",
        code=ErrorCode.UNKNOWN_KEY,
        location="MSH^1^4",
    )


def _check_restriction(envelope: Envelope, org: OrgRef, restrict_to_org: str | None) -> None:
    if restrict_to_org is not None and org.id != restrict_to_org:
        names = " / ".join(envelope.facility_names)
        raise MessageRejected(
            f"sending facility {names} is not one of your clinic's facilities",
            code=ErrorCode.UNKNOWN_KEY,
            location="MSH^1^4",
        )


def same_message(
    *, envelope: Envelope, content_sha256: str, earlier: IndexedMessage, store: ObjectStore
) -> bool:
    """Whether the message is the one stored under its key: the same bytes, or the same
    segments once the BOM and the segment terminators are normalised (a resend with LF for
    CR is the same message). Reads the earlier copy only when the bytes differ."""
    if earlier.stored_sha256 == content_sha256:
        return True
    try:
        with store.open(earlier.stored_key) as f:
            stored = f.read()
    except NotFoundError:
        return False
    try:
        return read_envelope(stored).segments == envelope.segments
    except MessageRejected:
        return False


def _reused(envelope: Envelope) -> MessageRejected:
    names = " / ".join(envelope.facility_names)
    return MessageRejected(
        f"control ID reused: MSH-10 {envelope.control_id} of {names} was already "
        "accepted for a different message",
        code=ErrorCode.DUPLICATE_KEY,
        reject=False,
        location="MSH^1^10",
    )


def http_intake_scope(principal: Principal) -> str | None:
    """Who may send lab messages over HTTP, and as whom: a clinic's technicians and
    clinicians for their own clinic's sending facilities (returns the clinic's ID), the lead
    hospital's administrators for any registered facility (returns None)."""
    if principal.org_kind is OrgKind.CLINIC and principal.role in (
        Role.TECHNICIAN,
        Role.CLINICIAN,
    ):
        return principal.org_id
    if principal.org_kind is OrgKind.LEAD and principal.role is Role.ADMIN:
        return None
    raise PermissionDeniedError(f"role {principal.role.value} may not send lab messages")


class _Arrival:
    """A message on its way to being kept: what its index row needs, then the outcome.

    ``wake`` is a lock taken when the arrival is made: its thread waits by taking it again,
    another thread wakes it by letting it go (once per wait), to lead a stage or because
    the arrival is decided (``finished``)."""

    __slots__ = (
        "ack",
        "batch",
        "channel",
        "code",
        "content_sha256",
        "envelope",
        "error",
        "finished",
        "indexed",
        "message_id",
        "now",
        "object_key",
        "raw",
        "sender",
        "wake",
    )

    def __init__(
        self,
        *,
        envelope: Envelope,
        sender: OrgRef,
        raw: bytes,
        content_sha256: str,
        object_key: str,
        message_id: str,
        ack: bytes,
        code: str,
        channel: str,
        now: datetime,
    ) -> None:
        self.envelope = envelope
        self.sender = sender
        self.raw = raw
        self.content_sha256 = content_sha256  # of ``raw``, the bytes as received
        self.object_key = object_key
        self.message_id = message_id  # the index row's ID, if the row is new
        self.ack = ack
        self.code = code
        self.channel = channel
        self.now = now
        self.wake = threading.Lock()
        self.wake.acquire()
        self.finished = False
        self.indexed: IndexedMessage | None = None
        self.error: BaseException | None = None
        self.batch: list[_Arrival] = []  # the objects' batch this arrival's thread led


_MAX_BATCH: Final = 256
_COUNTERS: dict[tuple[str, str], Any] = {}  # LAB_MESSAGES' children, by (channel, code)
_ROW_COLUMNS: Final = (
    "id",
    "sending_application",
    "sending_facility",
    "control_id",
    "org_id",
    "message_type",
    "version",
    "channel",
    "content_sha256",
    "object_key",
    "size_bytes",
    "ack_code",
    "ack",
    "status",
    "received_at",
)
_RECEIVED: Final = LabMessageStatus.RECEIVED.value


@dataclass(frozen=True, slots=True)
class _Statements:
    """The index writer's statements in one database's driver dialect."""

    insert: str  # INSERT ... ON CONFLICT (key) DO NOTHING, parameters in _ROW_COLUMNS order
    existing: str  # the row holding a key: id, content_sha256, ack, object_key
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (column index, bind processor)
    error: type[Exception]  # the driver's base exception


def _statements(engine: Engine) -> _Statements:
    dialect = engine.dialect
    if dialect.name == "sqlite":
        mark = "?"
    elif dialect.name == "postgresql":
        mark = "%s"  # psycopg: positional parameters
    else:
        raise NotImplementedError(f"the lab index writer does not support {dialect.name}")
    table: Any = LabMessage.__table__
    columns = ", ".join(_ROW_COLUMNS)
    marks = ", ".join(mark for _ in _ROW_COLUMNS)
    key = ", ".join(_KEY_COLUMNS)
    where = " AND ".join(f"{name} = {mark}" for name in _KEY_COLUMNS)
    processors = []
    for index, name in enumerate(_ROW_COLUMNS):
        # The column types' own conversions (e.g. the UTC timestamp's text form on SQLite),
        # as SQLAlchemy would bind them.
        process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((index, process))
    return _Statements(
        insert=(
            f"INSERT INTO {table.name} ({columns}) VALUES ({marks}) ON CONFLICT ({key}) DO NOTHING"
        ),
        existing=(f"SELECT id, content_sha256, ack, object_key FROM {table.name} WHERE {where}"),
        processors=tuple(processors),
        error=dialect.loaded_dbapi.Error,
    )


class _BatchFailed(Exception):
    """A batch's transaction failed after it began (a statement or the commit): each of its
    rows may be tried on its own."""


class _IndexWriter:
    """Writes the index rows of a batch of arrivals in one transaction, straight on a driver
    connection of the engine's pool that it holds (no ORM session, no SQLAlchemy execution
    per statement: at thousands of messages a second those cost more than the statements).

    One ``INSERT ... ON CONFLICT DO NOTHING`` per row through the driver's ``executemany``;
    when fewer rows went in than were given, each row's key is read back: a row with another
    ID is the earlier message's (a duplicate). On SQLite the transaction begins as every
    write transaction of the process does (:func:`rdc_core.db.begin_driver_write`: the
    writer gate, BEGIN IMMEDIATE) and its COMMIT leaves the disk sync to the caller. Rows are
    written in key order (two writers on one PostgreSQL database take the keys' locks in the
    same order); a lost deadlock or serialization check runs the batch again, a broken
    connection is replaced once. Not thread-safe: one batch at a time (the intake's index
    stage has one leader)."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._held: Any = None  # a checked-out pool connection
        self._release: weakref.finalize[Any, Any] | None = None
        self._statements: _Statements | None = None

    def _connection(self) -> tuple[Engine, Any, _Statements]:
        engine = get_engine()
        if engine is not self._engine:
            self._drop()  # the engines were disposed (tests) or the database changed
            self._engine = engine
            self._statements = _statements(engine)
        if self._held is None:
            held = self._held = engine.raw_connection()
            # Back to its pool when the intake goes away (a pooled connection left to the
            # garbage collector is dropped with a warning); not at exit, where a daemon
            # thread may still be writing through it.
            self._release = weakref.finalize(self, _return_to_pool, held)
            self._release.atexit = False
        assert self._statements is not None
        return engine, self._held, self._statements

    def _drop(self) -> None:
        held, self._held = self._held, None
        if self._release is not None:
            self._release.detach()
            self._release = None
        if held is not None:
            with contextlib.suppress(Exception):
                held.invalidate()  # closed, not returned to the pool: its state is unknown

    def write(self, batch: list[_Arrival]) -> Callable[[], None] | None:
        """Insert the rows of ``batch`` and commit; each arrival's ``indexed`` says what
        happened. Returns the function that makes the commit durable (None: it is). Raises
        DatabaseUnavailableError when the batch was not committed (_BatchFailed's cause
        when it failed after it began: each row may then be tried on its own)."""
        rows = sorted(batch, key=_row_key) if len(batch) > 1 else batch
        attempt = 0
        while True:
            attempt += 1
            began = False
            try:
                engine, held, statements = self._connection()
                dbapi = held.driver_connection
                sync = begin_driver_write(engine, dbapi)
                began = True
                self._insert(dbapi, statements, rows)
                dbapi.commit()
                return sync
            except Exception as exc:
                lost = self._held is not None and self._rolled_back(exc)
                if lost or not began:
                    self._drop()
                if attempt < ATTEMPTS and (retryable(exc) or (lost and attempt == 1)):
                    log.warning(
                        "lab index batch of %d again (attempt %d): %s", len(rows), attempt, exc
                    )
                    for arrival in rows:
                        arrival.indexed = None
                    time.sleep(random.uniform(0.001, 0.01) * (attempt - 1))
                    continue
                failure = DatabaseUnavailableError(f"index write failed: {exc}")
                if began and not lost:
                    raise failure from _BatchFailed(str(exc))
                raise failure from exc

    def _rolled_back(self, exc: BaseException) -> bool:
        """Roll the transaction back after ``exc``; True when the connection is unusable
        (a disconnect, or the rollback failed too)."""
        held = self._held
        assert self._engine is not None
        dbapi = held.driver_connection
        try:
            dbapi.rollback()
        except Exception:
            return True
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        error = self._statements.error if self._statements else Exception
        return isinstance(orig, error) and bool(
            self._engine.dialect.is_disconnect(orig, dbapi, None)  # type: ignore[arg-type]
        )

    @staticmethod
    def _insert(dbapi: Any, statements: _Statements, rows: list[_Arrival]) -> None:
        params = []
        processors = statements.processors
        for a in rows:
            env = a.envelope
            values = [
                a.message_id,
                env.sending_application[:255],
                env.sending_facility[:255],
                env.control_id[:199],
                a.sender.id,
                env.message_type[:64],
                env.version[:32],
                a.channel,
                a.content_sha256,
                a.object_key,
                len(a.raw),
                a.code,
                a.ack,
                _RECEIVED,
                a.now,
            ]
            for index, process in processors:
                values[index] = process(values[index])
            params.append(values)
        cursor = dbapi.cursor()
        try:
            cursor.executemany(statements.insert, params)
            if cursor.rowcount == len(rows):
                for a in rows:
                    a.indexed = IndexedMessage(duplicate=False, ack=a.ack, message_id=a.message_id)
                return
            # Some keys were taken (or the driver did not count): which, and by what.
            for a, values in zip(rows, params, strict=True):
                cursor.execute(statements.existing, values[1:4])
                found = cursor.fetchone()
                if found is None:
                    raise RuntimeError(f"lab message {a.message_id}: no row holds its key")
                if found[0] == a.message_id:
                    a.indexed = IndexedMessage(duplicate=False, ack=a.ack, message_id=a.message_id)
                else:
                    a.indexed = IndexedMessage(
                        duplicate=True,
                        ack=bytes(found[2]),
                        stored_sha256=found[1],
                        stored_key=found[3],
                    )
        finally:
            cursor.close()


def _uuid4_text(digits: str) -> str:
    """A random UUID (version 4, RFC 4122 variant) in its usual text form, from 32 random
    hexadecimal digits."""
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:32]}"


def _return_to_pool(held: Any) -> None:
    with contextlib.suppress(Exception):
        held.close()


def _new(arrival: _Arrival) -> bool:
    return arrival.indexed is not None and not arrival.indexed.duplicate


def _row_key(arrival: _Arrival) -> tuple[str, str, str]:
    env = arrival.envelope
    return (env.sending_application[:255], env.sending_facility[:255], env.control_id[:199])


class LabIntake:
    """Stores, indexes and acknowledges HL7 v2 lab messages (one instance per process and
    channel kind; safe to call from many threads)."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        zone: tzinfo,
        clock: Callable[[], datetime] = utcnow,
        on_accepted: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        # Called with the ID of each newly accepted message after its commit (default:
        # enqueue the task that processes it on the process's task runner).
        self.on_accepted = on_accepted or _ProcessingTrigger()
        self.zone = zone
        self.clock = clock
        # Registered senders, by MSH-4's names: facilities are only ever added, so a
        # clinic found stays right; unknown names are looked up again every time.
        self._senders: dict[tuple[str, ...], tuple[OrgRef, float]] = {}
        self._senders_lock = threading.Lock()
        if isinstance(store, LocalObjectStore):
            # Objects a process that died wrote but did not sync are written again first.
            store.open_journal()
        # Messages waiting for the next batch of objects, and whether a thread leads one.
        self._lock = threading.Lock()
        self._pending: list[_Arrival] = []
        self._leading = False
        # Batches whose objects are durable, waiting for the next index transaction (each
        # by the arrival of the thread that led it), and whether a thread leads one.
        self._index_lock = threading.Lock()
        self._index_pending: list[_Arrival] = []
        self._indexing = False
        self._writer = _IndexWriter()
        self._last_day: tuple[date | None, str] = (None, "")

    def _day(self, now: datetime) -> str:
        """The objects' folder of ``now``'s day (UTC), YYYY/MM/DD (the last one is kept)."""
        day = self._last_day
        if day[0] != now.date():
            day = self._last_day = (now.date(), f"{now:%Y/%m/%d}")
        return day[1]

    def _sender(self, envelope: Envelope, restrict_to_org: str | None) -> OrgRef:
        names = envelope.facility_names
        now = time.monotonic()
        cached = self._senders.get(names)  # a dict's get is atomic; writes take the lock
        if cached is not None and cached[1] > now:
            _check_restriction(envelope, cached[0], restrict_to_org)
            return cached[0]
        with read_session() as session:
            org = identify_sender(session, envelope=envelope)
        with self._senders_lock:
            if len(self._senders) > 10_000:
                self._senders.clear()
            self._senders[names] = (org, now + _SENDER_CACHE_SECONDS)
        _check_restriction(envelope, org, restrict_to_org)
        return org

    def receive_body(
        self, raw: bytes, *, channel: str, restrict_to_org: str | None = None
    ) -> tuple[bytes, list[Acknowledgement]]:
        """Acknowledge one message or an HL7 batch (FHS/BHS ... BTS/FTS); returns the
        answer (one ACK, or a batch of ACKs) and each message's acknowledgement."""
        # A batch has an FHS or BHS segment: without those bytes anywhere it is one message.
        batch = split_batch(raw) if b"BHS" in raw or b"FHS" in raw else None
        if batch is None or not batch.is_batch:
            answer = self.receive(raw, channel=channel, restrict_to_org=restrict_to_org)
            return answer.ack, [answer]
        answers = [
            self.receive(message, channel=channel, restrict_to_org=restrict_to_org)
            for message in batch.messages
        ]
        body = batch_ack(
            batch,
            [a.ack.decode("utf-8", "replace") for a in answers],
            now=self.clock().astimezone(self.zone),
            control_id=new_control_id(),
        )
        return body.encode("utf-8"), answers

    def receive(
        self, raw: bytes, *, channel: str, restrict_to_org: str | None = None
    ) -> Acknowledgement:
        """Store, index and acknowledge one message."""
        answer = self._receive(raw, channel=channel, restrict_to_org=restrict_to_org)
        counter = _COUNTERS.get((channel, answer.code))
        if counter is None:
            counter = LAB_MESSAGES.labels(channel=channel, code=answer.code)
            _COUNTERS[(channel, answer.code)] = counter
        counter.inc()
        return answer

    def _receive(self, raw: bytes, *, channel: str, restrict_to_org: str | None) -> Acknowledgement:
        now = self.clock()
        envelope: Envelope | None = None
        try:
            envelope = read_envelope(raw)
            check_acceptable(envelope)
        except MessageRejected as exc:
            return self._failure(envelope, exc, now)
        try:
            sender = self._sender(envelope, restrict_to_org)
        except MessageRejected as exc:
            return self._failure(envelope, exc, now)
        except (DatabaseUnavailableError, SQLAlchemyError) as exc:
            log.error("HL7 %s from %s: sender lookup failed: %s", envelope.control_id, channel, exc)
            return self._failure(envelope, _outage("index unavailable"), now)
        code = "CA" if envelope.enhanced_mode else "AA"
        # The object's name, the index row's ID and the ACK's control ID, from one read of
        # the system's random source (uuid4() three times cost more than the rest of this).
        ids = os.urandom(42).hex()
        ack = self._encode(
            ack_message(envelope, code=code, now=now.astimezone(self.zone), control_id=ids[64:]),
            envelope,
        )
        arrival = _Arrival(
            envelope=envelope,
            sender=sender,
            raw=raw,
            content_sha256=hashlib.sha256(raw).hexdigest(),
            object_key=f"hl7/{self._day(now)}/{ids[:32]}.hl7",
            message_id=_uuid4_text(ids[32:64]),
            ack=ack,
            code=code,
            channel=channel,
            now=now,
        )
        self._keep(arrival)
        error = arrival.error
        if isinstance(error, StorageError):
            log.error("HL7 %s from %s: store failed: %s", envelope.control_id, channel, error)
            return self._failure(envelope, _outage("object store unavailable"), now)
        if isinstance(error, (DatabaseUnavailableError, SQLAlchemyError)):
            # Whatever the database answered (unreachable, I/O error, a failing trigger),
            # nothing was committed: the sender should send again.
            log.error("HL7 %s from %s: index failed: %s", envelope.control_id, channel, error)
            return self._failure(envelope, _outage("index unavailable"), now)
        if error is not None or arrival.indexed is None:
            log.error(
                "HL7 %s from %s: unexpected failure",
                envelope.control_id,
                channel,
                exc_info=error,
            )
            return self._failure(envelope, _outage("internal error"), now)
        indexed = arrival.indexed
        if not indexed.duplicate:
            return Acknowledgement(
                ack=ack, code=code, outcome=ACCEPTED, control_id=envelope.control_id
            )
        # The key is taken: the same message again gets the stored acknowledgement byte for
        # byte (the first copy's object is the one of record); another one is refused.
        try:
            same = same_message(
                envelope=envelope,
                content_sha256=arrival.content_sha256,
                earlier=indexed,
                store=self.store,
            )
        except StorageError as exc:
            log.error("HL7 %s from %s: store failed: %s", envelope.control_id, channel, exc)
            return self._failure(envelope, _outage("object store unavailable"), now)
        if not same:
            return self._failure(envelope, _reused(envelope), now)
        return Acknowledgement(
            ack=indexed.ack,
            code=_ack_code(indexed.ack, envelope) or code,
            outcome=DUPLICATE,
            control_id=envelope.control_id,
        )

    def _keep(self, arrival: _Arrival) -> None:
        """Store ``arrival``'s bytes and commit its index row; returns once decided (the
        outcome in ``arrival.indexed`` or ``arrival.error``).

        Two stages, each led by one thread at a time (leader/follower): the messages
        arriving meanwhile on every connection are kept together by whichever of their
        threads finds no batch in progress. Objects: the leader writes the batch's objects
        and syncs them at once, then hands this stage on to the next batch (the first
        message waiting leads it) and queues its batch for the index. Index: one
        transaction for every batch queued (:class:`_IndexWriter`), committed; the leader
        hands the stage on, syncs the commit to disk and only then wakes each message's
        thread. So a row is written only once its object is durable, the answers go out
        only once the rows are durable, and one batch's objects sync while another's rows
        are written and synced."""
        with self._lock:
            self._pending.append(arrival)
            lead = not self._leading
            self._leading = True
        if not lead:
            arrival.wake.acquire()  # let go to lead the next batch, or when decided
            if arrival.finished:
                return
        self._lead(arrival)

    def _lead(self, own: _Arrival) -> None:
        with self._lock:
            batch = self._pending[:_MAX_BATCH]  # ``own`` first: it was the first waiting
            del self._pending[:_MAX_BATCH]
        stored = False
        try:
            put_new_objects(self.store, [(a.object_key, a.raw) for a in batch])
            stored = True
        except Exception as exc:
            error = exc if isinstance(exc, StorageError) else StorageError(str(exc))
            for arrival in batch:
                arrival.error = error
        finally:
            with self._lock:
                following = self._pending[0] if self._pending else None
                if following is None:
                    self._leading = False
            if following is not None:
                following.wake.release()
        if not stored:
            self._finish(batch, own)
            return
        own.batch = batch
        with self._index_lock:
            self._index_pending.append(own)
            lead = not self._indexing
            self._indexing = True
        if not lead:
            own.wake.acquire()  # let go to lead the next transaction, or when decided
            if own.finished:
                return
        self._lead_index(own)

    def _lead_index(self, own: _Arrival) -> None:
        with self._index_lock:
            leaders = self._index_pending  # ``own`` first
            self._index_pending = []
        rows = leaders[0].batch if len(leaders) == 1 else [a for b in leaders for a in b.batch]
        sync: Callable[[], None] | None = None
        try:
            sync = self._write(rows)
        finally:
            with self._index_lock:
                following = self._index_pending[0] if self._index_pending else None
                if following is None:
                    self._indexing = False
            if following is not None:
                following.wake.release()
        try:
            if sync is not None:
                self._sync(sync, rows)
            accepted = [a.message_id for a in rows if a.error is None and _new(a)]
            for message_id in accepted:
                # Processing (the result model) starts once the rows are durable.
                self.on_accepted(message_id)
        finally:
            self._finish(rows, own)
        for arrival in rows:
            # Only objects no index row refers to: a duplicate's, or a failed row's.
            indexed = arrival.indexed
            if indexed is None or indexed.duplicate:
                self._discard(arrival.object_key)

    def _write(self, rows: list[_Arrival]) -> Callable[[], None] | None:
        """Commit the rows' index rows; the function that makes them durable (or None)."""
        try:
            return self._writer.write(rows)
        except DatabaseUnavailableError as exc:
            if len(rows) > 1 and isinstance(exc.__cause__, _BatchFailed):
                # One row's statement (e.g. a failing constraint or trigger) failed them
                # all: each row again on its own, so that only that row's message fails.
                log.warning("lab index batch of %d failed, one by one: %s", len(rows), exc)
                return self._write_each(rows)
            failure: BaseException = exc
        except Exception as exc:
            failure = exc
        for arrival in rows:
            arrival.indexed, arrival.error = None, failure
        return None

    def _write_each(self, rows: list[_Arrival]) -> Callable[[], None] | None:
        last = None
        for arrival in rows:
            arrival.indexed = None
            try:
                # A sync of the WAL makes every commit before it durable: the last suffices.
                last = self._writer.write([arrival]) or last
            except Exception as exc:
                arrival.indexed, arrival.error = None, exc
        return last

    @staticmethod
    def _sync(sync: Callable[[], None], rows: list[_Arrival]) -> None:
        try:
            sync()
        except OSError as exc:
            # Committed, not durable: nobody may be told AA (the rows and objects stay:
            # a resend is then the same message, answered with the stored ACK).
            log.error("the lab index commit of %d rows was not made durable: %s", len(rows), exc)
            failure = DatabaseUnavailableError(f"index commit not made durable: {exc}")
            for arrival in rows:
                if arrival.error is None:
                    arrival.error = failure

    @staticmethod
    def _finish(rows: list[_Arrival], own: _Arrival) -> None:
        """Mark ``rows`` decided and wake their threads (all but this one's, ``own``)."""
        for arrival in rows:
            arrival.finished = True
            if arrival is not own:
                arrival.wake.release()

    def _discard(self, object_key: str) -> None:
        # Only this call's object, which no index row refers to.
        try:
            self.store.delete(object_key)
        except StorageError as exc:
            log.warning("could not remove unreferenced object %s: %s", object_key, exc)

    def _failure(
        self, envelope: Envelope | None, exc: MessageRejected, now: datetime
    ) -> Acknowledgement:
        enhanced = envelope is not None and envelope.enhanced_mode
        # Table 0008: AR/CR the message is refused, AE/CE an error (send again)
        code = {(True, False): "AR", (True, True): "CR", (False, False): "AE"}.get(
            (exc.reject, enhanced), "CE"
        )
        text = ack_message(
            envelope,
            code=code,
            now=now.astimezone(self.zone),
            control_id=new_control_id(),
            reason=exc.reason,
            error=exc.code,
            location=exc.location,
        )
        outcome = FAILED if exc.code == ErrorCode.INTERNAL else REJECTED
        return Acknowledgement(
            ack=self._encode(text, envelope),
            code=code,
            outcome=outcome,
            reason=exc.reason,
            control_id=envelope.control_id if envelope else "",
        )

    @staticmethod
    def _encode(text: str, envelope: Envelope | None) -> bytes:
        codec = envelope.codec if envelope else "utf-8"
        return text.encode(codec, "replace")


PROCESS_MESSAGE: Final = "lab_results.process_message"  # lab_results.tasks registers it
_COALESCE_SECONDS: Final = 0.1
_last_accepted = [0.0]  # time.monotonic() of the last message this process accepted


def intake_idle_seconds() -> float:
    """Seconds since this process last accepted a lab message (processing in the same
    process yields the database writer to the intake while messages stream in)."""
    return time.monotonic() - _last_accepted[0]


class _ProcessingTrigger:
    """Enqueues the processing task after commits, at most once per ``_COALESCE_SECONDS``:
    one run processes every message waiting, so a stream of messages does not become a
    stream of tasks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __call__(self, message_id: str) -> None:
        _last_accepted[0] = time.monotonic()
        if self._timer is not None:
            # One is pending (read without the lock: it is cleared before its task is
            # submitted, and that task sees every row committed before this call).
            return
        with self._lock:
            if self._timer is not None:
                return
            timer = threading.Timer(_COALESCE_SECONDS, self._fire, args=(message_id,))
            timer.daemon = True
            self._timer = timer
        timer.start()

    def _fire(self, message_id: str) -> None:
        with self._lock:
            self._timer = None
        submit_task(PROCESS_MESSAGE, message_id=message_id)


def _outage(reason: str) -> MessageRejected:
    return MessageRejected(
        f"{reason}; the message was not accepted, send it again later",
        code=ErrorCode.INTERNAL,
        reject=False,
    )


def _ack_code(ack: bytes, envelope: Envelope) -> str:
    """MSA-1 of a stored acknowledgement."""
    for segment in ack.replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSA"):
            fields = segment.decode("ascii", "replace").split(envelope.field_separator)
            return fields[1] if len(fields) > 1 else ""
    return ""
