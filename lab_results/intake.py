"""Durable intake of HL7 v2 lab messages, shared by the MLLP listener and the HTTP route.

For each message: read its envelope and check it is a lab result we accept; write the bytes
as received to the object store (fsynced); in one transaction find the clinic that
registered the sending facility and insert the index row, keyed by (MSH-3, MSH-4, MSH-10),
with the acknowledgement it will get; and only once that transaction has committed answer
AA (original mode) or CA (enhanced mode: MSH-15 or MSH-16 valued). Group commit: the
objects of the messages arriving meanwhile on every connection are written and synced
together (:func:`rdc_core.storage.put_new_objects`), then their index rows are written as
one unit of a shared transaction (:mod:`rdc_core.group_commit`) while the next batch's
objects sync; a row is written only once its object is durable. The row's
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

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from functools import partial
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
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
from rdc_core.db import after_commit, insert_ignore, on_rollback, read_session, utcnow
from rdc_core.errors import (
    DatabaseUnavailableError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
)
from rdc_core.group_commit import GroupCommitter
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
    "index_message",
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


def index_message(
    session: Session,
    *,
    envelope: Envelope,
    sender: OrgRef,
    object_key: str,
    content_sha256: str,
    size_bytes: int,
    channel: str,
    ack: bytes,
    ack_code: str,
    now: datetime,
    store: ObjectStore,
) -> IndexedMessage:
    """Insert the index row of a stored message from ``sender`` (the caller commits); when
    the key (MSH-3, MSH-4, MSH-10) is taken, write nothing and return what the row holds.
    ``content_sha256``: SHA-256 of the message's bytes as received."""
    key = {
        "sending_application": envelope.sending_application[:255],
        "sending_facility": envelope.sending_facility[:255],
        "control_id": envelope.control_id[:199],
    }
    message_id = str(uuid.uuid4())
    values = {
        "id": message_id,
        **key,
        "org_id": sender.id,
        "message_type": envelope.message_type[:64],
        "version": envelope.version[:32],
        "channel": channel,
        "content_sha256": content_sha256,
        "object_key": object_key,
        "size_bytes": size_bytes,
        "ack_code": ack_code,
        "ack": ack,
        "status": LabMessageStatus.RECEIVED.value,
        "exam_id": None,
        "received_at": now,
    }
    if insert_ignore(session, LabMessage.__table__, values, conflict=_KEY_COLUMNS):
        # The row refers to the object: should the transaction roll back, remove it.
        on_rollback(session, lambda: store.delete(object_key))
        return IndexedMessage(duplicate=False, ack=ack, message_id=message_id)
    existing = session.execute(
        select(LabMessage.content_sha256, LabMessage.ack, LabMessage.object_key).where(
            LabMessage.sending_application == key["sending_application"],
            LabMessage.sending_facility == key["sending_facility"],
            LabMessage.control_id == key["control_id"],
        )
    ).one()
    return IndexedMessage(
        duplicate=True,
        ack=bytes(existing.ack),
        stored_sha256=existing.content_sha256,
        stored_key=existing.object_key,
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


@dataclass(eq=False, slots=True)
class _Arrival:
    """A message on its way to being kept: what its index row needs, then the outcome."""

    envelope: Envelope
    sender: OrgRef
    raw: bytes
    content_sha256: str  # of ``raw``, the bytes as received
    object_key: str
    ack: bytes
    code: str
    channel: str
    now: datetime
    wake: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    indexed: IndexedMessage | None = None
    error: BaseException | None = None


_MAX_BATCH: Final = 256
_COUNTERS: dict[tuple[str, str], Any] = {}  # LAB_MESSAGES' children, by (channel, code)


class LabIntake:
    """Stores, indexes and acknowledges HL7 v2 lab messages (one instance per process and
    channel kind; safe to call from many threads)."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        zone: tzinfo,
        committer: GroupCommitter | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_accepted: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        # Called with the ID of each newly accepted message after its commit (default:
        # enqueue the task that processes it on the process's task runner).
        self.on_accepted = on_accepted or _ProcessingTrigger()
        self.zone = zone
        self.committer = committer or GroupCommitter()
        self.clock = clock
        # Registered senders, by MSH-4's names: facilities are only ever added, so a
        # clinic found stays right; unknown names are looked up again every time.
        self._senders: dict[tuple[str, ...], tuple[OrgRef, float]] = {}
        self._senders_lock = threading.Lock()
        if isinstance(store, LocalObjectStore):
            # Objects a process that died wrote but did not sync are written again first.
            store.open_journal()
        # Messages waiting to be kept (stored and indexed) by the next batch.
        self._lock = threading.Lock()
        self._pending: list[_Arrival] = []
        self._leading = False

    def _sender(self, envelope: Envelope, restrict_to_org: str | None) -> OrgRef:
        names = envelope.facility_names
        now = time.monotonic()
        with self._senders_lock:
            cached = self._senders.get(names)
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
        ack = self._encode(
            ack_message(
                envelope, code=code, now=now.astimezone(self.zone), control_id=new_control_id()
            ),
            envelope,
        )
        arrival = _Arrival(
            envelope=envelope,
            sender=sender,
            raw=raw,
            content_sha256=hashlib.sha256(raw).hexdigest(),
            object_key=f"hl7/{now:%Y/%m/%d}/{uuid.uuid4().hex}.hl7",
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

        The messages arriving meanwhile on every connection are kept together, by whichever
        of their threads finds no batch in progress (leader/follower, as the group
        committer): their objects are written and synced at once, then the leader hands the
        objects' stage on to the next batch and commits the batch's index rows as one unit
        of the group committer (one statement per row, no savepoint each) while the next
        batch's objects are being synced. A row is written only once its object is
        durable; the answers go out only once the rows committed."""
        with self._lock:
            self._pending.append(arrival)
            lead = not self._leading
            self._leading = True
        if not lead:
            arrival.wake.wait()
        if not arrival.finished:  # woken to lead the next batch
            self._lead()

    def _lead(self) -> None:
        with self._lock:
            batch = self._pending[:_MAX_BATCH]
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
                following.wake.set()
        try:
            if stored:
                self._index_batch(batch)
        finally:
            for arrival in batch:
                arrival.finished = True
                arrival.wake.set()

    def _index_batch(self, batch: list[_Arrival]) -> None:
        def work(session: Session) -> list[IndexedMessage]:
            results = [
                index_message(
                    session,
                    envelope=a.envelope,
                    sender=a.sender,
                    object_key=a.object_key,
                    content_sha256=a.content_sha256,
                    size_bytes=len(a.raw),
                    channel=a.channel,
                    ack=a.ack,
                    ack_code=a.code,
                    now=a.now,
                    store=self.store,
                )
                for a in batch
            ]
            accepted = [r.message_id for r in results if r.message_id is not None]
            if accepted:
                # Processing (the result model) starts once the rows committed.
                after_commit(session, partial(self._accepted, accepted))
            return results

        try:
            results = self.committer.run(work)
        except Exception as exc:
            for arrival in batch:
                arrival.error = exc
                self._discard(arrival.object_key)
            return
        for arrival, result in zip(batch, results, strict=True):
            arrival.indexed = result
            if result.duplicate:
                self._discard(arrival.object_key)  # nothing refers to it

    def _accepted(self, message_ids: list[str]) -> None:
        for message_id in message_ids:
            self.on_accepted(message_id)

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
