"""Durable intake of HL7 v2 lab messages, shared by the MLLP listener and the HTTP route.

For each message: read its envelope and check it is a lab result we accept; write the bytes
as received to the object store (fsynced); in one transaction find the clinic that
registered the sending facility and insert the index row, keyed by (MSH-3, MSH-4, MSH-10),
with the acknowledgement it will get; and only once that transaction has committed answer
AA (original mode) or CA (enhanced mode: MSH-15 or MSH-16 valued). Group commit: the
objects of the messages arriving meanwhile on every connection are written and synced
together (:class:`rdc_core.storage.BatchedWriter`), then their index rows share one
transaction (:mod:`rdc_core.group_commit`); a row is written only once its object is
durable. Processing (parsing, mapping, auto-verification) is not on this path: it is
enqueued after the commit and deferred while messages stream in.

Failures (original mode / enhanced mode):

- AR / CR: the message cannot be accepted as it is (not HL7, unsupported type, missing
  MSH-10, patient or order number, unknown sender). Sending it again will not help.
- AE / CE: the object store or the database failed (the sender should retry), or the
  control ID was already used for a different message ("control ID reused").

A message whose key is already stored with the same content (segments compared after
normalising the BOM and segment terminators) gets the stored acknowledgement again, byte
for byte, and is not stored twice. Rejected messages are not kept.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from functools import partial
from typing import Final

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
from rdc_core.errors import DatabaseUnavailableError, PermissionDeniedError, StorageError
from rdc_core.group_commit import GroupCommitter
from rdc_core.metrics import LAB_MESSAGES
from rdc_core.storage import BatchedWriter, ObjectStore
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
    """What :func:`index_message` did: ``duplicate`` with the acknowledgement stored for the
    earlier copy, or a new row."""

    duplicate: bool
    ack: bytes
    message_id: str | None = None


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
    size_bytes: int,
    channel: str,
    ack: bytes,
    ack_code: str,
    now: datetime,
    store: ObjectStore,
) -> IndexedMessage:
    """Insert the index row of a stored message from ``sender`` (the caller commits).

    Raises MessageRejected when the control ID was used for another message.
    """
    names = " / ".join(envelope.facility_names)
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
        "content_sha256": envelope.content_sha256,
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
        select(LabMessage.content_sha256, LabMessage.ack).where(
            LabMessage.sending_application == key["sending_application"],
            LabMessage.sending_facility == key["sending_facility"],
            LabMessage.control_id == key["control_id"],
        )
    ).one()
    if existing.content_sha256 != envelope.content_sha256:
        raise MessageRejected(
            f"control ID reused: MSH-10 {envelope.control_id} of {names} was already "
            "accepted for a different message",
            code=ErrorCode.DUPLICATE_KEY,
            reject=False,
            location="MSH^1^10",
        )
    return IndexedMessage(duplicate=True, ack=bytes(existing.ack))


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
        # The messages' bytes, written durably in batches (one sync for all waiting).
        self._objects = BatchedWriter(store)

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
        batch = split_batch(raw)
        if not batch.is_batch:
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
        LAB_MESSAGES.labels(channel=channel, code=answer.code).inc()
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
        object_key = f"hl7/{now:%Y/%m/%d}/{uuid.uuid4().hex}.hl7"
        # The bytes are durable before the index row is written: the objects of the
        # messages arriving meanwhile (on every connection) are synced together, and so are
        # their rows (the group committer), while the next objects are being written.
        try:
            self._objects.put(object_key, raw)
        except StorageError as exc:
            log.error("HL7 %s from %s: store failed: %s", envelope.control_id, channel, exc)
            return self._failure(envelope, _outage("object store unavailable"), now)

        def work(session: Session) -> IndexedMessage:
            indexed = index_message(
                session,
                envelope=envelope,
                sender=sender,
                object_key=object_key,
                size_bytes=len(raw),
                channel=channel,
                ack=ack,
                ack_code=code,
                now=now,
                store=self.store,
            )
            if not indexed.duplicate and indexed.message_id is not None:
                # Processing (the result model) starts once the row committed.
                after_commit(session, partial(self.on_accepted, indexed.message_id))
            return indexed

        try:
            indexed = self._index(work)
        except MessageRejected as exc:
            self._discard(object_key)
            return self._failure(envelope, exc, now)
        except (DatabaseUnavailableError, SQLAlchemyError) as exc:
            # Whatever the database answered (unreachable, I/O error, a failing trigger),
            # nothing was committed: the sender should send again.
            log.error("HL7 %s from %s: index failed: %s", envelope.control_id, channel, exc)
            self._discard(object_key)
            return self._failure(envelope, _outage("index unavailable"), now)
        except Exception:
            log.exception("HL7 %s from %s: unexpected failure", envelope.control_id, channel)
            self._discard(object_key)
            return self._failure(envelope, _outage("internal error"), now)
        if indexed.duplicate:
            self._discard(object_key)  # the first copy's object is the one of record
            return Acknowledgement(
                ack=indexed.ack,
                code=_ack_code(indexed.ack, envelope) or code,
                outcome=DUPLICATE,
                control_id=envelope.control_id,
            )
        return Acknowledgement(ack=ack, code=code, outcome=ACCEPTED, control_id=envelope.control_id)

    def _index(self, work: Callable[[Session], IndexedMessage]) -> IndexedMessage:
        """Run ``work`` in the committer's next shared transaction; return once committed.

        Queued to the committer's writer thread (not led by this thread): the messages
        whose objects were synced together are woken together and all queue before the
        writer takes them, so they share a transaction while the next objects sync."""
        decided = threading.Event()
        outcome: list[tuple[IndexedMessage | None, BaseException | None]] = []

        def done(result: IndexedMessage | None, error: BaseException | None) -> None:
            outcome.append((result, error))
            decided.set()

        self.committer.submit(work, done)
        decided.wait()
        result, error = outcome[0]
        if error is not None:
            raise error
        assert result is not None
        return result

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
