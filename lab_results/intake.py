"""Durable intake of HL7 v2 lab messages, shared by the MLLP listener and the HTTP route.

For each message: read its envelope and check it is a lab result we accept; find the clinic
that registered the sending facility; in one transaction insert the index row, keyed by
(MSH-3, MSH-4, MSH-10), holding the bytes as received and the acknowledgement it will get
(DOMAIN.md B1: the raw message persisted in the same transaction as its unique key); make
that commit durable; only then answer AA (original mode) or CA (enhanced mode: MSH-15 or
MSH-16 valued). Messages that arrived together (the MLLP listener passes every message its
connections brought since its last round, see :mod:`lab_results.mllp`) share that
transaction: a group commit. The sync runs after the COMMIT, outside SQLite's writer gate:
:meth:`LabIntake.receive_many` runs it and answers; :meth:`LabIntake.accept_many` leaves it
to the caller (:class:`AcceptedRound`), whose one sync may cover several rounds. The row's
``content_sha256`` is the SHA-256 of the message's bytes as received (inside the MLLP
frame, or the HTTP body's part for that message). Processing (writing the bytes to the
object store, parsing, mapping, auto-verification) is not on this path: it is enqueued
after the commit and deferred while messages stream in; it empties the row's copy once the
object is durable.

Failures (original mode / enhanced mode):

- AR / CR: the message cannot be accepted as it is (not HL7, unsupported type, missing
  MSH-10, patient or order number, unknown sender). Sending it again will not help.
- AE / CE: the database failed (the sender should retry), or the control ID was already
  used for a different message ("control ID reused"). An object store outage does not
  stop the intake (the bytes are in the database); it delays processing until it ends.

A message whose key is already stored with the same content (the same bytes, or the same
segments after normalising the BOM and segment terminators) gets the stored
acknowledgement again, byte for byte, and is not stored twice. Rejected messages are not kept.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
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
from rdc_core.storage import ObjectStore
from rdc_core.tasks import submit_task
from worklist.access import Principal
from worklist.directory import OrgRef, organization_for_hl7_facility
from worklist.models import OrgKind, Role

__all__ = [
    "AcceptedRound",
    "Acknowledgement",
    "IndexedMessage",
    "LabIntake",
    "http_intake_scope",
    "identify_sender",
    "intake_idle_seconds",
    "message_bytes",
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
    """What writing a message's index row did: a new row (``message_id``), or
    ``duplicate``: the key is taken, by the row whose acknowledgement, content hash and bytes
    (in the row, or in the object store) are given (the caller decides whether that earlier
    message is this one: see :func:`same_message`)."""

    duplicate: bool
    ack: bytes
    message_id: str | None = None
    stored_sha256: str = ""
    stored_key: str = ""
    stored_raw: bytes | None = None


def message_bytes(*, raw: bytes | None, object_key: str, store: ObjectStore) -> bytes:
    """The bytes of an accepted message as received: ``raw`` (its index row's copy) until
    processing has written them to the object store, then the object ``object_key``.
    Raises NotFoundError or StorageError."""
    if raw is not None:
        return raw
    with store.open(object_key) as f:
        return f.read()


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
        stored = message_bytes(raw=earlier.stored_raw, object_key=earlier.stored_key, store=store)
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


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more
class _Arrival:
    """A message on its way to being kept: what its index row holds."""

    envelope: Envelope
    sender: OrgRef
    raw: bytes  # the bytes as received
    content_sha256: str  # of ``raw``
    object_key: str  # where processing will keep the bytes
    message_id: str  # the index row's ID, if the row is new
    ack: bytes
    code: str
    channel: str
    now: datetime


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
    "raw",
    "size_bytes",
    "ack_code",
    "ack",
    "status",
    "received_at",
)
_RECEIVED: Final = LabMessageStatus.RECEIVED.value
_HELD_CONNECTIONS: Final = 4  # driver connections the index writer keeps between batches


@dataclass(frozen=True, slots=True)
class _Statements:
    """The index writer's statements in one database's driver dialect."""

    insert: str  # INSERT ... ON CONFLICT (key) DO NOTHING, parameters in _ROW_COLUMNS order
    existing: str  # the row holding a key: id, content_sha256, ack, object_key, raw
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
        existing=(
            f"SELECT id, content_sha256, ack, object_key, raw FROM {table.name} WHERE {where}"
        ),
        processors=tuple(processors),
        error=dialect.loaded_dbapi.Error,
    )


class _BatchFailed(Exception):
    """A batch's transaction failed after it began (a statement or the commit): each of its
    rows may be tried on its own."""


class _IndexWriter:
    """Writes the index rows of messages that arrived together (their bytes in the rows) in
    one transaction, straight on a driver connection of the engine's pool (no ORM session,
    no SQLAlchemy execution: at thousands of messages a second those cost more than the
    statements).

    One ``INSERT ... ON CONFLICT DO NOTHING`` per row through the driver's ``executemany``;
    when fewer rows went in than were given, each row's key is read back: a row with another
    ID is the earlier message's (a duplicate). On SQLite the transaction begins as every
    write transaction of the process does (:func:`rdc_core.db.begin_driver_write`: the
    writer gate, BEGIN IMMEDIATE) and its COMMIT leaves the disk sync to the caller, outside
    the gate. Rows are written in key order (two writers on one PostgreSQL database take the
    keys' locks in the same order); a lost deadlock or serialization check runs the batch
    again, a broken connection is replaced once. Callers may be concurrent (the HTTP route's
    threads beside the MLLP listener): up to ``_HELD_CONNECTIONS`` connections are kept
    checked out between batches (a pool checkout costs more than a small batch's
    statements; PostgreSQL's pre-ping is a round trip)."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._statements: _Statements | None = None
        self._free: list[Any] = []  # held pool connections not in use (append/pop: atomic)
        self._lock = threading.Lock()
        # Back to their pool when the intake goes away (a pooled connection left to the
        # garbage collector is dropped with a warning); not at exit, where a daemon thread
        # may still be writing through one.
        self._release = weakref.finalize(self, _return_all, self._free)
        self._release.atexit = False

    def _take(self) -> tuple[Engine, _Statements, Any]:
        engine = get_engine()
        if engine is not self._engine:
            with self._lock:
                if engine is not self._engine:
                    # The engines were disposed (tests) or the database changed.
                    _return_all(self._free)
                    self._statements = _statements(engine)
                    self._engine = engine
        statements = self._statements
        assert statements is not None
        try:
            held = self._free.pop()
        except IndexError:
            held = engine.raw_connection()
        return engine, statements, held

    def _give_back(self, engine: Engine, held: Any) -> None:
        if engine is self._engine and len(self._free) < _HELD_CONNECTIONS:
            self._free.append(held)
        else:
            _return_to_pool(held)

    def write(
        self, batch: Sequence[_Arrival]
    ) -> tuple[list[IndexedMessage], Callable[[], None] | None]:
        """Insert the rows of ``batch`` and commit. Returns what happened to each (in
        ``batch``'s order) and the function that makes the commit durable (None: it is),
        to be called before anyone is told. Raises DatabaseUnavailableError when nothing was
        committed (_BatchFailed its cause when a statement or the commit failed: each row
        may then be tried on its own)."""
        rows = sorted(batch, key=_row_key) if len(batch) > 1 else list(batch)
        attempt = 0
        while True:
            attempt += 1
            try:
                engine, statements, held = self._take()
            except Exception as exc:  # no connection to be had (the database is down)
                raise DatabaseUnavailableError(f"index write failed: {exc}") from exc
            dbapi = held.driver_connection
            began = False
            try:
                sync = begin_driver_write(engine, dbapi)
                began = True
                indexed = self._insert(dbapi, statements, rows)
                dbapi.commit()
            except Exception as exc:
                lost = self._rolled_back(engine, statements, dbapi, exc)
                if lost or not began:
                    with contextlib.suppress(Exception):
                        held.invalidate()  # closed, not returned to the pool: state unknown
                else:
                    self._give_back(engine, held)
                if attempt < ATTEMPTS and (retryable(exc) or (lost and attempt == 1)):
                    log.warning(
                        "lab index batch of %d again (attempt %d): %s", len(rows), attempt, exc
                    )
                    time.sleep(random.uniform(0.001, 0.01) * (attempt - 1))
                    continue
                failure = DatabaseUnavailableError(f"index write failed: {exc}")
                if began and not lost:
                    raise failure from _BatchFailed(str(exc))
                raise failure from exc
            self._give_back(engine, held)
            return [indexed[a.message_id] for a in batch], sync

    @staticmethod
    def _rolled_back(engine: Engine, statements: _Statements, dbapi: Any, exc: Exception) -> bool:
        """Roll the transaction back after ``exc``; True when the connection is unusable
        (a disconnect, or the rollback failed too)."""
        try:
            dbapi.rollback()
        except Exception:
            return True
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        return isinstance(orig, statements.error) and bool(
            engine.dialect.is_disconnect(orig, dbapi, None)  # type: ignore[arg-type]
        )

    @staticmethod
    def _insert(
        dbapi: Any, statements: _Statements, rows: list[_Arrival]
    ) -> dict[str, IndexedMessage]:
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
                a.raw,
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
                return {
                    a.message_id: IndexedMessage(
                        duplicate=False, ack=a.ack, message_id=a.message_id
                    )
                    for a in rows
                }
            # Some keys were taken (or the driver did not count): which, and by what.
            indexed = {}
            for a, values in zip(rows, params, strict=True):
                cursor.execute(statements.existing, values[1:4])
                found = cursor.fetchone()
                if found is None:
                    raise RuntimeError(f"lab message {a.message_id}: no row holds its key")
                if found[0] == a.message_id:
                    indexed[a.message_id] = IndexedMessage(
                        duplicate=False, ack=a.ack, message_id=a.message_id
                    )
                else:
                    indexed[a.message_id] = IndexedMessage(
                        duplicate=True,
                        ack=bytes(found[2]),
                        stored_sha256=found[1],
                        stored_key=found[3],
                        stored_raw=None if found[4] is None else bytes(found[4]),
                    )
            return indexed
        finally:
            cursor.close()


def _uuid7_text(now: datetime, digits: str) -> str:
    """A time-ordered UUID (version 7, RFC 9562) in its usual text form: the milliseconds
    since the epoch of ``now`` (aware), then 20 random hexadecimal digits (74 random bits)."""
    ms = f"{int(now.timestamp() * 1000) & 0xFFFFFFFFFFFF:012x}"
    variant = "89ab"[int(digits[3], 16) & 3]
    return f"{ms[:8]}-{ms[8:]}-7{digits[:3]}-{variant}{digits[4:7]}-{digits[7:19]}"


def _return_to_pool(held: Any) -> None:
    with contextlib.suppress(Exception):
        held.close()


def _return_all(free: list[Any]) -> None:
    while free:
        _return_to_pool(free.pop())


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
        # Read only to compare a resend with an earlier message whose bytes processing has
        # moved there; the intake itself writes nothing to the store.
        self.store = store
        # Called with the ID of each newly accepted message once its row is durable
        # (default: enqueue the task that processes it on the process's task runner).
        self.on_accepted = on_accepted or _ProcessingTrigger()
        self.zone = zone
        self.clock = clock
        # Registered senders, by MSH-4's names: facilities are only ever added, so a
        # clinic found stays right; unknown names are looked up again every time.
        self._senders: dict[tuple[str, ...], tuple[OrgRef, float]] = {}
        self._senders_lock = threading.Lock()
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
        answers = self.receive_many(
            batch.messages, channel=channel, restrict_to_org=restrict_to_org
        )
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
        return self.receive_many([raw], channel=channel, restrict_to_org=restrict_to_org)[0]

    def receive_many(
        self, raws: Sequence[bytes], *, channel: str, restrict_to_org: str | None = None
    ) -> list[Acknowledgement]:
        """Store, index and acknowledge messages that arrived together: one transaction and
        one sync for all of them (a group commit). The acknowledgements, in order."""
        return self.accept_many(raws, channel=channel, restrict_to_org=restrict_to_org).complete()

    def accept_many(
        self, raws: Sequence[bytes], *, channel: str, restrict_to_org: str | None = None
    ) -> AcceptedRound:
        """Check messages that arrived together and commit their index rows in one
        transaction, without waiting for the disk: the round returned makes them durable
        and gives their acknowledgements (:meth:`AcceptedRound.complete`). The MLLP listener
        checks and commits the next round while this one's sync runs; one sync of the
        WAL covers every commit before it (:meth:`AcceptedRound.finish`)."""
        _begin_work()
        try:
            now = self.clock()
            slots: list[Acknowledgement | _Arrival] = [
                self._check(raw, channel=channel, restrict_to_org=restrict_to_org, now=now)
                for raw in raws
            ]
            arrivals = [slot for slot in slots if isinstance(slot, _Arrival)]
            written: list[Acknowledgement | tuple[_Arrival, IndexedMessage]] = []
            sync = None
            if arrivals:
                written, sync = self._write(arrivals)
        except BaseException:
            _end_work()
            raise
        return AcceptedRound(self, slots, written, sync, channel, now)

    def _finish(self, round_: AcceptedRound, durable: OSError | None) -> list[Acknowledgement]:
        """The acknowledgements of a round whose commit was synced (``durable``: the sync's
        error, if it failed)."""
        channel, now = round_.channel, round_.now
        written = iter(round_.written)
        answers = []
        for slot in round_.slots:
            outcome = next(written) if isinstance(slot, _Arrival) else slot
            if isinstance(outcome, Acknowledgement):
                answer = outcome
            elif durable is not None:
                # Committed, not durable: nobody may be told AA (the row stays: a resend is
                # then the same message, answered with the stored ACK after a sync).
                arrival = outcome[0]
                log.error(
                    "HL7 %s from %s: index not made durable: %s",
                    arrival.envelope.control_id,
                    channel,
                    durable,
                )
                answer = self._failure(arrival.envelope, _outage("index unavailable"), now)
            else:
                answer = self._answer(*outcome)
            answers.append(answer)
        for code, count in collections.Counter(a.code for a in answers).items():
            counter = _COUNTERS.get((channel, code))
            if counter is None:
                counter = _COUNTERS[(channel, code)] = LAB_MESSAGES.labels(
                    channel=channel, code=code
                )
            counter.inc(count)
        return answers

    def _check(
        self, raw: bytes, *, channel: str, restrict_to_org: str | None, now: datetime
    ) -> _Arrival | Acknowledgement:
        """The message ready to be kept, or the answer refusing it."""
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
        # The row's ID is time-ordered (a UUIDv7): a new message's primary key entry goes to
        # the index's last page, not to a random one (one page less to sync per message).
        ids = os.urandom(42).hex()
        ack = self._encode(
            ack_message(envelope, code=code, now=now.astimezone(self.zone), control_id=ids[64:]),
            envelope,
        )
        return _Arrival(
            envelope=envelope,
            sender=sender,
            raw=raw,
            content_sha256=hashlib.sha256(raw).hexdigest(),
            object_key=f"hl7/{self._day(now)}/{ids[:32]}.hl7",
            message_id=_uuid7_text(now, ids[32:52]),
            ack=ack,
            code=code,
            channel=channel,
            now=now,
        )

    def _write(
        self, arrivals: list[_Arrival]
    ) -> tuple[list[Acknowledgement | tuple[_Arrival, IndexedMessage]], Callable[[], None] | None]:
        """Commit ``arrivals``' index rows: for each, the row written (with the arrival) or
        the answer refusing it; and the function that makes the commit durable."""
        try:
            indexed, sync = self._writer.write(arrivals)
        except DatabaseUnavailableError as exc:
            if len(arrivals) > 1 and isinstance(exc.__cause__, _BatchFailed):
                # One row's statement (e.g. a failing constraint or trigger) failed them
                # all: each again on its own, so that only that row's message fails.
                log.warning("lab index batch of %d failed, one by one: %s", len(arrivals), exc)
                results: list[Acknowledgement | tuple[_Arrival, IndexedMessage]] = []
                last = None
                for arrival in arrivals:
                    result, own = self._write([arrival])
                    results += result
                    last = own or last  # a sync of the WAL covers every commit before it
                return results, last
            # Whatever the database answered (unreachable, I/O error, a failing trigger),
            # nothing was committed: the senders should send again.
            return self._outage(arrivals, "index failed", exc, "index unavailable"), None
        except Exception as exc:
            log.exception("lab intake: unexpected failure")
            return self._outage(arrivals, "failed", exc, "internal error"), None
        return list(zip(arrivals, indexed, strict=True)), sync

    def _outage(
        self, arrivals: list[_Arrival], what: str, exc: BaseException, reason: str
    ) -> list[Acknowledgement | tuple[_Arrival, IndexedMessage]]:
        ids = ", ".join(a.envelope.control_id for a in arrivals[:5])
        more = f" and {len(arrivals) - 5} more" if len(arrivals) > 5 else ""
        log.error("HL7 %s%s from %s: %s: %s", ids, more, arrivals[0].channel, what, exc)
        return [self._failure(a.envelope, _outage(reason), a.now) for a in arrivals]

    def _answer(self, arrival: _Arrival, indexed: IndexedMessage) -> Acknowledgement:
        """The acknowledgement of a message whose index write is durable."""
        envelope, now = arrival.envelope, arrival.now
        if not indexed.duplicate:
            assert indexed.message_id is not None
            # Processing (the result model) starts once the row is durable.
            self.on_accepted(indexed.message_id)
            return Acknowledgement(
                ack=arrival.ack, code=arrival.code, outcome=ACCEPTED, control_id=envelope.control_id
            )
        # The key is taken: the same message again gets the stored acknowledgement byte for
        # byte (the first copy is the one of record); another one is refused.
        try:
            same = same_message(
                envelope=envelope,
                content_sha256=arrival.content_sha256,
                earlier=indexed,
                store=self.store,
            )
        except StorageError as exc:
            log.error("HL7 %s: reading the earlier copy failed: %s", envelope.control_id, exc)
            return self._failure(envelope, _outage("object store unavailable"), now)
        if not same:
            return self._failure(envelope, _reused(envelope), now)
        return Acknowledgement(
            ack=indexed.ack,
            code=_ack_code(indexed.ack, envelope) or arrival.code,
            outcome=DUPLICATE,
            control_id=envelope.control_id,
        )

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
_activity_lock = threading.Lock()
_in_progress = [0]  # calls of LabIntake.receive_many in this process now
_last_done = [0.0]  # time.monotonic() at which the last one ended


def intake_idle_seconds() -> float:
    """Seconds since this process's intake last worked on lab messages, 0 while it does
    (processing in the same process yields the database writer to the intake while
    messages stream in). An intake waiting for the writer is busy: were it idle, processing
    would take the writer for longer, and the intake would wait longer still."""
    if _in_progress[0]:
        return 0.0
    return time.monotonic() - _last_done[0]


def _begin_work() -> None:
    with _activity_lock:
        _in_progress[0] += 1


def _end_work() -> None:
    with _activity_lock:
        _in_progress[0] -= 1
        _last_done[0] = time.monotonic()


class AcceptedRound:
    """Messages checked together and their index rows committed, not yet synced to disk:
    nobody may be told before :meth:`complete` (or :meth:`finish`, after a sync that covers
    the commit) returned their acknowledgements. Until then the intake counts as busy."""

    __slots__ = ("_intake", "channel", "finished", "now", "slots", "sync", "written")

    def __init__(
        self,
        intake: LabIntake,
        slots: list[Acknowledgement | _Arrival],
        written: list[Acknowledgement | tuple[_Arrival, IndexedMessage]],
        sync: Callable[[], None] | None,
        channel: str,
        now: datetime,
    ) -> None:
        self._intake = intake
        self.slots = slots  # per message: the arrival to keep, or the answer refusing it
        self.written = written  # per arrival: its row written, or the answer refusing it
        self.sync = sync  # makes the commit durable (None: it is, or nothing was written)
        self.channel = channel
        self.now = now
        self.finished = False

    def complete(self) -> list[Acknowledgement]:
        """Sync the round's commit, then its acknowledgements, in order."""
        durable: OSError | None = None
        if self.sync is not None:
            try:
                self.sync()
            except OSError as exc:
                durable = exc
        return self.finish(durable)

    def finish(self, durable: OSError | None) -> list[Acknowledgement]:
        """The acknowledgements, in order, once a sync after the round's commit returned
        (``durable``: its error, if it failed: the accepted messages then get AE/CE).
        Starts processing of the messages accepted. Once only."""
        if self.finished:
            raise RuntimeError("this round was finished already")
        self.finished = True
        try:
            return self._intake._finish(self, durable)
        finally:
            _end_work()


class _ProcessingTrigger:
    """Enqueues the processing task after commits, at most once per ``_COALESCE_SECONDS``:
    one run processes every message waiting, so a stream of messages does not become a
    stream of tasks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __call__(self, message_id: str) -> None:
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
