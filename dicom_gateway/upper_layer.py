"""DICOM upper layer acceptor for the Verification and Storage services.

Why not pynetdicom's own acceptor: its association and DUL threads poll with 1 ms sleeps,
which we measured at about 3.5 ms of idle latency per C-STORE (a no-op handler managed
~220 instances/s on loopback). Here each association is one thread that blocks on its
socket and answers as soon as the handler returns. The association PDUs are decoded and
encoded in :mod:`dicom_gateway.acse_pdus` (why there, not by pynetdicom: see that module).

Scope: the acceptor side of association negotiation (PS3.8 9.3), P-DATA reassembly, C-ECHO
and C-STORE (PS3.7 9.1.1, 9.3.1), release and abort. A C-STORE data set is streamed into a
Part-10 file as its fragments arrive, so memory use is bounded by the PDU size.

Query/Retrieve (C-FIND, C-GET, C-MOVE; PS3.4 C) is served on the same associations. Their
messages are encoded and their identifiers decoded by pynetdicom's DIMSE message classes
and dataset utilities (not a second codec); only the PDU framing is ours. C-GET sends its
C-STORE sub-operations on this association (the peer has taken the SCP role for their SOP
classes by role selection), streaming each object's data set from the store; C-MOVE hands
the instances to :func:`dicom_gateway.retrieve.send_to_destination` (pynetdicom as SCU).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import select
import socket
import socketserver
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_FIND_RSP, C_GET_RSP, C_MOVE_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode as decode_dataset
from pynetdicom.dsutils import encode as encode_dataset

from dicom_gateway.acse_pdus import (
    AcceptedContext,
    PDUError,
    ProposedContext,
    RoleSelection,
    decode_associate_rq,
    encode_associate_ac,
    encode_associate_rj,
)
from dicom_gateway.admission import Applicant, AssociationLimits, SlotBook
from dicom_gateway.query import (
    FIND_CLASSES,
    GET_CLASSES,
    MOVE_CLASSES,
    QR_CLASSES,
    QueryError,
    RetrieveItem,
)
from dicom_gateway.retrieve import (
    MoveDestination,
    SubOperations,
    data_set_chunks,
    send_to_destination,
)
from dicom_gateway.tls import clinic_of_certificate

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "AcceptorConfig",
    "StorageHandler",
    "StoreRequest",
    "UpperLayerServer",
    "serve_association",
]

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1450.1"
IMPLEMENTATION_VERSION = "RDC_0_1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3.1)
_ASSOCIATE_RQ = 0x01
_P_DATA, _RELEASE_RQ, _RELEASE_RP, _ABORT = 0x04, 0x05, 0x06, 0x07
# Command fields (PS3.7 E.1)
_C_STORE_RQ, _C_STORE_RSP, _C_ECHO_RQ, _C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
_C_FIND_RSP = 0x8020
_NO_DATA_SET = 0x0101
_C_GET_RQ, _C_FIND_RQ, _C_MOVE_RQ, _C_CANCEL_RQ = 0x0010, 0x0020, 0x0021, 0x0FFF
_QR_REQUESTS = frozenset({_C_GET_RQ, _C_FIND_RQ, _C_MOVE_RQ})
_MAX_IDENTIFIER = 1 << 20
_PENDING, _SUCCESS, _SUB_OPERATION_FAILURES = 0xFF00, 0x0000, 0xB000
_CANCEL = 0xFE00  # matching / sub-operations terminated due to a Cancel request
_UNABLE_TO_PROCESS, _MOVE_DESTINATION_UNKNOWN = 0xC000, 0xA801
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# A-ABORT provider reasons (PS3.8 9.3.8)
_NOT_SPECIFIED, _UNRECOGNISED_PDU, _UNEXPECTED_PDU, _INVALID_PARAMETER = 0x00, 0x01, 0x02, 0x06

# A DIMSE message (command and data set) must arrive at this average pace at least: it is
# given one network timeout, and one more for every this many bytes received. A sender that
# keeps an association busy with a trickle of tiny PDUs is cut off like one that keeps a PDU
# incomplete (at 60 s that is about 270 bytes per second; a PDU must come whole in one timeout).
_PACE_BYTES = 16_384

_MAX_ASSOCIATE_RQ = 1 << 16
_AFTER_REJECT_SECONDS = 5.0  # how long a rejected requestor is given to close the connection
_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")

# Known SOP classes that are not storage: their contexts are refused at negotiation.
_NOT_STORAGE_WORDS = (
    "Find",
    "Move",
    "Get",
    "Commitment",
    "Print",
    "Worklist",
    "Procedure Step",
    "Query",
    "Directory",
    "Retrieve",
    "Instance Availability",
)


@functools.lru_cache(maxsize=4096)
def _is_storage_class(uid: str) -> bool:
    entry = UID_dictionary.get(uid)
    if entry is None:
        # Private SOP classes (modality vendors' own objects) are stored like any other.
        return UID(uid).is_valid and not UID(uid).is_transfer_syntax
    name, kind = entry[0], entry[1]
    return (
        kind == "SOP Class"
        and "Storage" in name
        and not any(word in name for word in _NOT_STORAGE_WORDS)
    )


def _is_known_transfer_syntax(uid: str) -> bool:
    entry = UID_dictionary.get(uid)
    return entry is not None and entry[1] == "Transfer Syntax"


@dataclass(frozen=True, slots=True)
class AcceptorConfig:
    """Listener settings."""

    ae_title: str
    max_pdu: int = 262_144
    max_associations: int = 32
    max_associations_per_ae: int = 8
    max_associations_per_clinic: int = 16
    acse_timeout: float = 30.0
    network_timeout: float = 60.0
    spool_dir: Path | None = None

    @property
    def limits(self) -> AssociationLimits:
        """The association limits: in all, per calling AE title, per clinic."""
        return AssociationLimits(
            total=self.max_associations,
            per_ae=self.max_associations_per_ae,
            per_clinic=self.max_associations_per_clinic,
        )


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One received C-STORE: the data set is in the Part-10 file at ``path``."""

    sender: Any
    calling_ae: str
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    sha256: str  # of the data set as received (file meta excluded)


class StorageHandler(Protocol):
    """What the acceptor needs from the application."""

    def open_association(self, calling_ae: str) -> Any | None:
        """The sender behind ``calling_ae``, or None to reject the association."""
        ...

    def clinic_of(self, sender: Any) -> str:
        """The clinic ``sender`` belongs to: its associations share one limit."""
        ...

    def clinic_code(self, sender: Any) -> str:
        """The code of the clinic ``sender`` belongs to (a TLS client certificate names it)."""
        ...

    def store(self, request: StoreRequest) -> tuple[int, str]:
        """Store the object; return (DIMSE status, error comment for failures)."""
        ...

    def find(self, sender: Any, sop_class: str, identifier: Dataset) -> list[Dataset]:
        """C-FIND matches of ``identifier`` in the sender's data; raises QueryError."""
        ...

    def retrieve(self, sender: Any, sop_class: str, identifier: Dataset) -> list[RetrieveItem]:
        """The instances a C-GET/C-MOVE of ``identifier`` sends; raises QueryError."""
        ...

    def open_item(self, item: RetrieveItem) -> BinaryIO:
        """Open an instance to retrieve (a Part-10 file) for reading."""
        ...

    def move_destination(self, sender: Any, ae_title: str) -> MoveDestination | None:
        """The sender's clinic's registered move destination ``ae_title``, or None."""
        ...


class _Abort(Exception):
    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _PlainPortTLS(ConnectionError):
    """A TLS client on the plain port: closed at once, without reading its hello as a PDU."""


class _DeadlinePassed(TimeoutError):
    """A PDU (or a DIMSE message) did not arrive whole in time, however many bytes came."""


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    """Let the kernel time out blocking receives and sends on ``sock``.

    Why not socket.settimeout: a Python-level timeout polls the socket before every receive
    and send, about seven extra system calls per C-STORE, which are costly in a virtual
    machine. A receive that times out raises TimeoutError from :func:`_read_exact`. The
    limit holds per system call: a send that keeps making progress is not cut off (our sends
    are command sets and association PDUs of a few hundred bytes).
    """
    sock.settimeout(None)
    whole = int(seconds)
    micros = max(int((seconds - whole) * 1_000_000), 0 if whole else 1)  # (0, 0): no limit
    timeval = struct.pack("@ll", whole, micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _decode_command(data: bytes) -> dict[int, bytes]:
    """Command sets are always Implicit VR Little Endian; we only need their raw values."""
    values: dict[int, bytes] = {}
    offset = 0
    end = len(data)
    while offset + 8 <= end:
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if offset + length > end:
            raise _Abort(_INVALID_PARAMETER, "command set element runs past its end")
        values[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return values


def _us(values: dict[int, bytes], tag: int) -> int:
    raw = values.get(tag)
    if raw is None or len(raw) != 2:
        raise _Abort(
            _INVALID_PARAMETER, f"command element ({tag >> 16:04X},{tag & 0xFFFF:04X}) missing"
        )
    return int.from_bytes(raw, "little")


def _ui(values: dict[int, bytes], tag: int) -> str:
    # Bytes outside ASCII (never valid in a UID or AE title) become "?": the value is still
    # echoed and written to the file meta, and the data set's own UIDs are checked at ingest.
    raw = values.get(tag, b"").rstrip(b"\x00 ")
    return raw.decode("ascii", "replace").replace("\ufffd", "?")


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes = b"\x00") -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _file_meta(*, sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received data set.

    Written by hand rather than with pydicom's writer: it is the same eight elements for
    every object, and pydicom spends about 0.2 ms per object building them.
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", sop_class.encode("ascii")),
            _meta_element(0x0003, b"UI", sop_instance.encode("ascii")),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii")),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii"), b" "),
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace"), b" "),
        )
    )
    group_length = _meta_element(0x0000, b"UL", len(body).to_bytes(4, "little"))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _encode_response(
    command: int,
    message_id: int,
    status: int,
    sop_class: str,
    sop_instance: str | None,
    comment: str,
    *,
    data_set: bool = False,
) -> bytes:
    """A response's command set (Implicit VR Little Endian); ``data_set``: an identifier
    follows (Command Data Set Type 0x0001)."""
    present = 0x0001 if data_set else _NO_DATA_SET
    body = _element(0x00000002, sop_class.encode("ascii"))
    body += _element(0x00000100, command.to_bytes(2, "little"))
    body += _element(0x00000120, message_id.to_bytes(2, "little"))
    body += _element(0x00000800, present.to_bytes(2, "little"))
    body += _element(0x00000900, status.to_bytes(2, "little"))
    if comment and status not in (0x0000,):
        body += _element(0x00000902, comment.encode("ascii", "replace")[:64])
    if sop_instance:
        body += _element(0x00001000, sop_instance.encode("ascii"))
    return _element(0x00000000, len(body).to_bytes(4, "little")) + body


class _Association:
    """One association, served in the connection's thread from request to release."""

    def __init__(
        self,
        sock: socket.socket,
        config: AcceptorConfig,
        handler: StorageHandler,
        admit: Callable[[Applicant], bool] = lambda applicant: True,
        on_release: Callable[[], None] = lambda: None,
        certified_clinic: str | None = None,
    ) -> None:
        self.sock = sock
        # The clinic the peer's verified TLS client certificate stands for (None: no
        # certificate required); the calling AE title must belong to it.
        self.certified_clinic = certified_clinic
        self.config = config
        self.handler = handler
        # Takes an admission slot once an association is requested: a connection that never
        # asks for one (a port probe, a scanner) never counts against the limit.
        self.admit = admit
        # Frees this association's admission slot; called before the release answer goes out
        # so that a sender reconnecting at once finds the slot free.
        self.on_release = on_release
        self.calling_ae = ""
        self.sender: Any = None
        self.contexts: dict[int, str] = {}  # context id -> transfer syntax
        self.abstract: dict[int, str] = {}  # context id -> abstract syntax
        self.peer_max_pdu = 0
        self.buffer = bytearray(max(config.max_pdu, 16_384) + 6)
        self._data_file: BinaryIO | None = None
        self._data_path: Path | None = None
        self._data_hash: Any = None
        self._identifier: bytearray | None = None  # a Q/R request's identifier, as it arrives
        self.peer_scp: set[str] = set()  # SOP classes the peer takes the SCP role for
        self.cancelled: set[int] = set()  # message IDs the peer sent C-CANCEL for
        self._command = bytearray()  # a command arriving while we answer, as it arrives
        # The receive limit set on the socket now (seconds), and how far it may be from the
        # time left to a deadline before it is set again (one system call each time).
        self._armed = 0.0
        self._slack = 0.0

    def run(self) -> None:
        associated = False
        try:
            # The whole A-ASSOCIATE-RQ must arrive within the ACSE timeout of the connection.
            self._arm(self.config.acse_timeout)
            if not self._negotiate(time.monotonic() + self.config.acse_timeout):
                return
            associated = True
            self._arm(self.config.network_timeout)
            self._serve()
        except _Abort as exc:
            log.warning("aborting association from %s: %s", self.calling_ae or "?", exc)
            self._send_abort(exc.reason)
        except TimeoutError as exc:
            log.warning("association from %s cut off: %s", self.calling_ae or "?", exc)
            if associated:  # before association the connection is only closed (PS3.8 9.1.5)
                self._send_abort(_NOT_SPECIFIED)
        except _PlainPortTLS as exc:
            log.warning("connection closed: %s", exc)
        except (ConnectionError, OSError) as exc:
            log.info("association from %s ended: %s", self.calling_ae or "?", exc)
        except Exception:
            # A defect of ours, not the peer's: this association ends, the listener goes on.
            log.exception("association from %s failed", self.calling_ae or "?")
            self._send_abort(_NOT_SPECIFIED)
        finally:
            self._discard_data_file()

    # -- PDUs ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        _set_timeout(self.sock, seconds)
        self._armed = seconds
        self._slack = max(self._slack, seconds / 16)

    def _fit(self, deadline: float) -> None:
        """Make the socket's receive limit end near ``deadline`` (at most ``_slack`` later);
        past it, raise. Most calls change nothing: a fast sender's PDU arrives long before."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _DeadlinePassed("the peer did not complete the PDU in time")
        if remaining < self._armed - self._slack or remaining > self._armed + self._slack:
            self._arm(remaining)

    def _read_exact(self, view: memoryview, deadline: float) -> None:
        # The deadline holds for the whole PDU, not for each receive: a peer that sends a
        # byte now and then is cut off like a silent one.
        while view:
            try:
                count = self.sock.recv_into(view)
            except (BlockingIOError, ssl.SSLWantReadError) as exc:  # SO_RCVTIMEO expired
                raise TimeoutError("no data from the peer in time") from exc
            if not count:
                raise ConnectionError("peer closed the connection")
            view = view[count:]
            if view:
                self._fit(deadline)

    def _read_pdu(self, limit: int, deadline: float) -> tuple[int, memoryview]:
        self._fit(deadline)
        header = bytearray(6)
        self._read_exact(memoryview(header), deadline)
        pdu_type, length = _HEADER.unpack(header)
        if length > limit:
            raise _Abort(_INVALID_PARAMETER, f"PDU of {length} bytes exceeds {limit}")
        if len(self.buffer) < length:
            self.buffer = bytearray(length)
        body = memoryview(self.buffer)[:length]
        self._read_exact(body, deadline)
        return pdu_type, body

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(bytes([_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, reason]))

    # -- negotiation -----------------------------------------------------------------------

    def _negotiate(self, deadline: float) -> bool:
        if not isinstance(self.sock, ssl.SSLSocket):
            self._fit(deadline)
            try:
                first = self.sock.recv(2, socket.MSG_PEEK)
            except BlockingIOError as exc:  # SO_RCVTIMEO expired
                raise TimeoutError("no association request in time") from exc
            if first == b"\x16\x03":  # a TLS handshake record, not a DICOM PDU
                raise _PlainPortTLS(
                    "TLS handshake on the plain DICOM port (see RDC_DICOM_TLS_PORT)"
                )
        pdu_type, body = self._read_pdu(_MAX_ASSOCIATE_RQ, deadline)
        if pdu_type != _ASSOCIATE_RQ:
            raise _Abort(_UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}")
        try:
            request = decode_associate_rq(body)
        except PDUError as exc:
            raise _Abort(_INVALID_PARAMETER, str(exc)) from exc
        self.calling_ae = request.calling_ae_title
        self.peer_max_pdu = request.max_pdu

        if request.application_context != APPLICATION_CONTEXT:
            self._reject(1, 1, 2)  # application context name not supported
            return False
        self.sender = self.handler.open_association(self.calling_ae)
        if self.sender is None:
            log.warning("association from unknown calling AE %r rejected", self.calling_ae)
            self._reject(1, 1, 3)  # calling AE title not recognised
            return False
        if (
            self.certified_clinic is not None
            and self.handler.clinic_code(self.sender) != self.certified_clinic
        ):
            log.warning(
                "association from %s rejected: its TLS certificate is %s's",
                self.calling_ae,
                self.certified_clinic,
            )
            self._reject(1, 1, 3)  # calling AE title not recognised (for this certificate)
            return False
        # The limits are per calling AE and per clinic too, so the sender must be known first.
        if not self.admit(Applicant(self.calling_ae, self.handler.clinic_of(self.sender))):
            log.warning("association from %s rejected: local limit exceeded", self.calling_ae)
            self._reject(2, 3, 2)  # transient, presentation provider, local limit exceeded
            return False

        results = [self._negotiate_context(context) for context in request.contexts]
        accepted = set(self.abstract.values())
        # The peer may act as Storage SCP on this association (for C-GET sub-operations).
        roles = tuple(
            RoleSelection(role.sop_class_uid, role.scu_role, role.scp_role)
            for role in request.roles
            if role.sop_class_uid in accepted
        )
        self.peer_scp = {role.sop_class_uid for role in roles if role.scp_role}
        self.sock.sendall(
            encode_associate_ac(
                request,
                results,
                max_pdu=self.config.max_pdu,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version=IMPLEMENTATION_VERSION,
                roles=roles,
            )
        )
        return True

    def _negotiate_context(self, proposed: ProposedContext) -> AcceptedContext:
        context_id, abstract = proposed.context_id, proposed.abstract_syntax
        # A rejected context's transfer syntax is not significant (PS3.8 9.3.3.2).
        fallback = proposed.transfer_syntaxes[0] if proposed.transfer_syntaxes else ""
        query = abstract in QR_CLASSES
        if abstract != VERIFICATION and not query and not _is_storage_class(abstract):
            return AcceptedContext(context_id, 0x03, fallback)  # abstract syntax not supported
        for syntax in proposed.transfer_syntaxes:
            if syntax in _UNCOMPRESSED if query else _is_known_transfer_syntax(syntax):
                self.contexts[context_id] = syntax
                self.abstract[context_id] = abstract
                return AcceptedContext(context_id, 0x00, syntax)
        return AcceptedContext(context_id, 0x04, fallback)  # transfer syntaxes not supported

    def _reject(self, result: int, source: int, diagnostic: int) -> None:
        self.sock.sendall(encode_associate_rj(result, source, diagnostic))
        self._await_close()

    def _await_close(self) -> None:
        """After an A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2, state
        Sta13, ARTIM): wait for that, up to ``_AFTER_REJECT_SECONDS``, rather than close
        first. Closing at once was seen to lose the rejection on a loaded machine: the
        requestor saw the connection reset and reported an abort, not the reason."""
        deadline = time.monotonic() + min(self.config.acse_timeout, _AFTER_REJECT_SECONDS)
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError, _DeadlinePassed):
            while True:
                self._fit(deadline)
                try:
                    if not self.sock.recv(4096):
                        return  # the requestor closed it
                except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
                    return

    # -- data transfer ---------------------------------------------------------------------

    def _serve(self) -> None:
        command = bytearray()
        values: dict[int, bytes] | None = None
        context_id = 0
        limit = max(self.config.max_pdu, 16_384) * 4
        timeout = self.config.network_timeout
        message_start = 0.0  # when the first fragment of the message in progress came
        message_bytes = -1  # received of the message in progress (-1: none in progress)
        while True:
            deadline = time.monotonic() + timeout
            if message_bytes >= 0:
                deadline = min(
                    deadline, message_start + timeout * (1 + message_bytes // _PACE_BYTES)
                )
            pdu_type, body = self._read_pdu(limit, deadline)
            if pdu_type == _RELEASE_RQ:
                self.on_release()
                self.sock.sendall(bytes([_RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                return
            if pdu_type == _ABORT:
                log.info("association from %s aborted by the peer", self.calling_ae)
                return
            if pdu_type != _P_DATA:
                raise _Abort(
                    _UNEXPECTED_PDU if pdu_type <= _ABORT else _UNRECOGNISED_PDU,
                    f"unexpected PDU type {pdu_type} during data transfer",
                )
            offset = 0
            while offset < len(body):
                if offset + 6 > len(body):
                    raise _Abort(_INVALID_PARAMETER, "truncated PDV item")
                item_length, pc_id, control = _PDV_HEADER.unpack_from(body, offset)
                start, end = offset + 6, offset + 4 + item_length
                if item_length < 2 or end > len(body):
                    raise _Abort(_INVALID_PARAMETER, "PDV item length is inconsistent")
                offset = end
                if pc_id not in self.contexts:
                    raise _Abort(_INVALID_PARAMETER, f"presentation context {pc_id} not accepted")
                fragment = body[start:end]
                if message_bytes < 0:
                    message_start, message_bytes = time.monotonic(), 0
                message_bytes += len(fragment)
                last = bool(control & 0x02)
                if control & 0x01:  # command fragment
                    if values is not None:
                        raise _Abort(_UNEXPECTED_PDU, "command received before the data set")
                    command += fragment
                    if last:
                        values = _decode_command(bytes(command))
                        command.clear()
                        context_id = pc_id
                        if _us(values, 0x00000800) == _NO_DATA_SET:
                            self._dispatch(values, context_id)
                            values = None
                            message_bytes = -1
                        else:
                            self._open_data_file(values, context_id)
                elif self._identifier is not None:  # a Q/R request's identifier
                    if values is None or pc_id != context_id:
                        raise _Abort(_UNEXPECTED_PDU, "data set fragment without its command")
                    self._identifier += fragment
                    if len(self._identifier) > _MAX_IDENTIFIER:
                        raise _Abort(_INVALID_PARAMETER, "query identifier too large")
                    if last:
                        self._dispatch(values, context_id)
                        values = None
                        message_bytes = -1
                else:  # data set fragment
                    if values is None or self._data_file is None or pc_id != context_id:
                        raise _Abort(_UNEXPECTED_PDU, "data set fragment without its command")
                    self._data_file.write(fragment)
                    self._data_hash.update(fragment)
                    if last:
                        self._data_file.close()
                        self._dispatch(values, context_id)
                        values = None
                        message_bytes = -1

    def _open_data_file(self, values: dict[int, bytes], context_id: int) -> None:
        if _us(values, 0x00000100) in _QR_REQUESTS:
            self._identifier = bytearray()
            return
        if _us(values, 0x00000100) != _C_STORE_RQ:
            raise _Abort(_UNEXPECTED_PDU, "only C-STORE requests carry a data set here")
        spool = self.config.spool_dir
        try:
            fd, name = tempfile.mkstemp(prefix=".rx-", suffix=".dcm", dir=spool)
        except FileNotFoundError:
            if spool is None:
                raise
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)  # made at start; removed since?
            fd, name = tempfile.mkstemp(prefix=".rx-", suffix=".dcm", dir=spool)
        self._data_path = Path(name)
        self._data_file = os.fdopen(fd, "wb", buffering=1 << 20)
        header = _file_meta(
            sop_class=_ui(values, 0x00000002),
            sop_instance=_ui(values, 0x00001000),
            transfer_syntax=self.contexts[context_id],
            source_ae=self.calling_ae,
        )
        # The hash covers the data set only: it identifies the content whoever wrote the meta.
        self._data_hash = hashlib.sha256()
        self._data_file.write(header)

    def _discard_data_file(self) -> None:
        if self._data_file is not None:
            with contextlib.suppress(OSError):
                self._data_file.close()
            self._data_file = None
        if self._data_path is not None:
            with contextlib.suppress(OSError):
                self._data_path.unlink()
            self._data_path = None

    def _dispatch(self, values: dict[int, bytes], context_id: int) -> None:
        field = _us(values, 0x00000100)
        if field == _C_CANCEL_RQ:
            # Our answers are sent before the next request is read: nothing is in progress.
            return
        message_id = _us(values, 0x00000110)
        if field in _QR_REQUESTS:
            identifier, self._identifier = self._identifier, None
            if identifier is None:
                raise _Abort(_UNEXPECTED_PDU, "query/retrieve request without an identifier")
            destination = _ui(values, 0x00000600)  # Move Destination
            self._query_retrieve(field, message_id, context_id, bytes(identifier), destination)
            return
        sop_class = _ui(values, 0x00000002) or self.abstract[context_id]
        if field == _C_ECHO_RQ:
            self._send_command(
                context_id, _encode_response(_C_ECHO_RSP, message_id, 0x0000, sop_class, None, "")
            )
            return
        if field != _C_STORE_RQ or self._data_path is None:
            raise _Abort(_UNEXPECTED_PDU, f"unsupported DIMSE command 0x{field:04X}")
        sop_instance = _ui(values, 0x00001000)
        request = StoreRequest(
            sender=self.sender,
            calling_ae=self.calling_ae,
            message_id=message_id,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=self.contexts[context_id],
            path=self._data_path,
            sha256=self._data_hash.hexdigest(),
        )
        try:
            status, comment = self.handler.store(request)
        finally:
            self._data_file = None
            self._discard_data_file()
        self._send_command(
            context_id,
            _encode_response(_C_STORE_RSP, message_id, status, sop_class, sop_instance, comment),
        )

    # -- query/retrieve --------------------------------------------------------------------

    def _query_retrieve(
        self, field: int, message_id: int, context_id: int, identifier: bytes, destination: str
    ) -> None:
        sop_class = self.abstract[context_id]
        kinds = {_C_FIND_RQ: FIND_CLASSES, _C_GET_RQ: GET_CLASSES, _C_MOVE_RQ: MOVE_CLASSES}
        response = {_C_FIND_RQ: C_FIND, _C_GET_RQ: C_GET, _C_MOVE_RQ: C_MOVE}[field]
        if sop_class not in kinds[field]:
            self._respond(response, context_id, message_id, sop_class, 0x0122, "SOP class")
            return
        implicit = self.contexts[context_id] == ImplicitVRLittleEndian
        try:
            query = decode_dataset(BytesIO(identifier), implicit, True)
            if field == _C_FIND_RQ:
                self._find(context_id, message_id, sop_class, query)
            elif field == _C_GET_RQ:
                self._get(context_id, message_id, sop_class, query)
            else:
                self._move(context_id, message_id, sop_class, query, destination)
        except QueryError as exc:
            self._respond(response, context_id, message_id, sop_class, exc.status, exc.comment)
        except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
            log.warning("query from %s cannot be read: %s", self.calling_ae, exc)
            comment = "identifier cannot be read"
            self._respond(response, context_id, message_id, sop_class, 0xA900, comment)

    def _find(self, context_id: int, message_id: int, sop_class: str, query: Dataset) -> None:
        matches = self.handler.find(self.sender, sop_class, query)
        implicit = self.contexts[context_id] == ImplicitVRLittleEndian
        for match in matches:
            if self._cancel_requested(message_id):
                self._respond(C_FIND, context_id, message_id, sop_class, _CANCEL)
                return
            encoded = encode_dataset(match, implicit, True)
            if encoded is None:
                continue
            # The pending responses are the bulk of a C-FIND: their command is written here
            # (pynetdicom's message classes took about 1 ms each, ten times the rest).
            command = _encode_response(
                _C_FIND_RSP, message_id, _PENDING, sop_class, None, "", data_set=True
            )
            self._send_command_and_data(context_id, command, encoded)
        self._respond(C_FIND, context_id, message_id, sop_class, _SUCCESS)

    def _get(self, context_id: int, message_id: int, sop_class: str, query: Dataset) -> None:
        items = self.handler.retrieve(self.sender, sop_class, query)
        counts = SubOperations(remaining=len(items))
        store_id = 0
        for item in items:
            if self._cancel_requested(message_id):
                self._respond(C_GET, context_id, message_id, sop_class, _CANCEL, counts=counts)
                return
            self._respond(C_GET, context_id, message_id, sop_class, _PENDING, counts=counts)
            store_id = (store_id + 1) & 0xFFFF or 1
            status = self._send_sub_store(item, store_id)
            counts.count(item.sop_instance_uid, status)
        self._final(C_GET, context_id, message_id, sop_class, counts)

    def _move(
        self, context_id: int, message_id: int, sop_class: str, query: Dataset, ae: str
    ) -> None:
        destination = self.handler.move_destination(self.sender, ae)
        if destination is None:
            log.warning("C-MOVE from %s to unknown destination %r", self.calling_ae, ae)
            comment = "Move destination unknown"
            self._respond(C_MOVE, context_id, message_id, sop_class, 0xA801, comment)
            return
        items = self.handler.retrieve(self.sender, sop_class, query)

        def progress(counts: SubOperations) -> bool:
            if self._cancel_requested(message_id):
                return False  # no further sub-operations
            self._respond(C_MOVE, context_id, message_id, sop_class, _PENDING, counts=counts)
            return True

        counts = send_to_destination(
            destination,
            items,
            open_item=self.handler.open_item,
            our_ae=self.config.ae_title,
            originator_ae=self.calling_ae,
            originator_message_id=message_id,
            timeout=self.config.network_timeout,
            progress=progress,
        )
        if counts.cancelled:
            self._respond(C_MOVE, context_id, message_id, sop_class, _CANCEL, counts=counts)
            return
        self._final(C_MOVE, context_id, message_id, sop_class, counts)

    def _final(
        self, kind: Any, context_id: int, message_id: int, sop_class: str, counts: SubOperations
    ) -> None:
        identifier = None
        status = _SUCCESS
        comment = ""
        if counts.failed or counts.warning:
            status = _SUB_OPERATION_FAILURES
            comment = counts.comment
            if counts.failed_uids:
                failed = Dataset()
                failed.FailedSOPInstanceUIDList = counts.failed_uids
                implicit = self.contexts[context_id] == ImplicitVRLittleEndian
                identifier = encode_dataset(failed, implicit, True)
        if counts.refused:
            status, comment = 0xA702, counts.refused
        self._respond(
            kind, context_id, message_id, sop_class, status, comment, identifier, counts, final=True
        )

    def _respond(
        self,
        kind: Any,
        context_id: int,
        message_id: int,
        sop_class: str,
        status: int,
        comment: str = "",
        identifier: bytes | None = None,
        counts: SubOperations | None = None,
        *,
        final: bool = False,
    ) -> None:
        primitive = kind()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.Status = status
        if identifier is not None:
            primitive.Identifier = BytesIO(identifier)
        if counts is not None and kind is not C_FIND:
            primitive.NumberOfRemainingSuboperations = 0 if final else counts.remaining
            primitive.NumberOfCompletedSuboperations = counts.completed
            primitive.NumberOfFailedSuboperations = counts.failed
            primitive.NumberOfWarningSuboperations = counts.warning
        message = {C_FIND: C_FIND_RSP, C_GET: C_GET_RSP, C_MOVE: C_MOVE_RSP}[kind]()
        message.primitive_to_message(primitive)
        if comment and status not in (_SUCCESS, _PENDING):
            message.command_set.ErrorComment = comment[:64]
        self._send_message(message, context_id)

    def _send_message(self, message: Any, context_id: int) -> None:
        if self._armed < self.config.network_timeout - self._slack:
            self._arm(self.config.network_timeout)
        for pdata in message.encode_msg(context_id, self.peer_max_pdu):
            self._send_pdvs(pdata.presentation_data_value_list)

    def _send_pdvs(self, pdvs: list[tuple[int, bytes]]) -> None:
        items = b"".join(struct.pack(">IB", len(v) + 1, cid) + v for cid, v in pdvs)
        self.sock.sendall(_HEADER.pack(_P_DATA, len(items)) + items)

    def _store_context(self, item: RetrieveItem) -> int | None:
        if item.sop_class_uid not in self.peer_scp:
            return None
        for context_id, abstract in self.abstract.items():
            if (
                abstract == item.sop_class_uid
                and self.contexts[context_id] == item.transfer_syntax_uid
            ):
                return context_id
        return None

    def _send_sub_store(self, item: RetrieveItem, store_id: int) -> int | None:
        """C-STORE one instance to the peer on this association; its status (None: not
        sent, no presentation context for its SOP class and transfer syntax)."""
        context_id = self._store_context(item)
        if context_id is None:
            return None
        primitive = C_STORE()
        primitive.MessageID = store_id
        primitive.AffectedSOPClassUID = item.sop_class_uid
        primitive.AffectedSOPInstanceUID = item.sop_instance_uid
        primitive.Priority = 0x0002
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        message.command_set.CommandDataSetType = 0x0001
        message.data_set = None
        try:
            source = self.handler.open_item(item)
        except Exception:
            log.exception("cannot open %s for C-GET", item.storage_key or item.report_id)
            return None
        with source:
            self._send_message(message, context_id)
            chunk_size = (self.peer_max_pdu or 1 << 20) - 12
            chunks = data_set_chunks(source, chunk_size)
            chunk = next(chunks)
            for following in chunks:
                self._send_pdvs([(context_id, b"\x00" + chunk)])
                chunk = following
            self._send_pdvs([(context_id, b"\x02" + chunk)])  # the last fragment
        return self._await_store_response(store_id)

    def _await_store_response(self, store_id: int) -> int:
        """Read PDUs until the C-STORE-RSP for ``store_id``; a C-CANCEL is noted."""
        while True:
            for values in self._read_commands("awaiting C-STORE-RSP"):
                field = _us(values, 0x00000100)
                if field == 0x8001 and _us(values, 0x00000120) == store_id:
                    return _us(values, 0x00000900)
                raise _Abort(_UNEXPECTED_PDU, f"DIMSE 0x{field:04X} while awaiting C-STORE-RSP")

    def _cancel_requested(self, message_id: int) -> bool:
        """Whether the peer has sent C-CANCEL for ``message_id``: what it sent while we
        answer is read without waiting (PS3.7 9.3.2.3, C-CANCEL of a C-FIND/C-GET/C-MOVE)."""
        while message_id not in self.cancelled and self._peer_has_sent():
            for values in self._read_commands("during a query/retrieve"):
                raise _Abort(
                    _UNEXPECTED_PDU,
                    f"DIMSE 0x{_us(values, 0x00000100):04X} during a query/retrieve",
                )
        if message_id in self.cancelled:
            self.cancelled.discard(message_id)
            return True
        return False

    def _peer_has_sent(self) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def _read_commands(self, while_doing: str) -> list[dict[int, bytes]]:
        """Read one PDU from a peer that should send nothing but C-CANCEL or C-STORE-RSP
        now; the commands it completes, C-CANCELs taken out (noted in ``cancelled``)."""
        limit = max(self.config.max_pdu, 16_384) * 4
        deadline = time.monotonic() + self.config.network_timeout
        pdu_type, body = self._read_pdu(limit, deadline)
        if pdu_type == _ABORT:
            raise ConnectionError(f"the peer aborted {while_doing}")
        if pdu_type != _P_DATA:
            raise _Abort(_UNEXPECTED_PDU, f"PDU type {pdu_type} {while_doing}")
        commands: list[dict[int, bytes]] = []
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                raise _Abort(_INVALID_PARAMETER, "truncated PDV item")
            item_length, _context, control = _PDV_HEADER.unpack_from(body, offset)
            if item_length < 2 or offset + 4 + item_length > len(body):
                raise _Abort(_INVALID_PARAMETER, "PDV item length is inconsistent")
            fragment = body[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if not control & 0x01:
                continue  # a data set is not expected here; skipped
            self._command += fragment
            if not control & 0x02:
                continue
            values = _decode_command(bytes(self._command))
            self._command.clear()
            if _us(values, 0x00000100) == _C_CANCEL_RQ:
                self.cancelled.add(_us(values, 0x00000120))
            else:
                commands.append(values)
        return commands

    def _send_command_and_data(self, context_id: int, command: bytes, data: bytes) -> None:
        """A command and its data set, in one send: the command's PDV, then the data set's
        fragments within the peer's maximum PDU length."""
        if self._armed < self.config.network_timeout - self._slack:
            self._arm(self.config.network_timeout)
        pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
        out = [_HEADER.pack(_P_DATA, len(pdv)), pdv]
        # Below a few hundred bytes a maximum PDU length is nonsense (fuzzed, broken).
        size = max((self.peer_max_pdu or 1 << 20) - 12, 256)
        for start in range(0, max(len(data), 1), size):
            fragment = data[start : start + size]
            control = 0x02 if start + size >= len(data) else 0x00
            out += [
                _HEADER.pack(_P_DATA, len(fragment) + 6),
                _PDV_HEADER.pack(len(fragment) + 2, context_id, control),
                fragment,
            ]
        self.sock.sendall(b"".join(out))

    def _send_command(self, context_id: int, command: bytes) -> None:
        # One PDV, command, last fragment; responses are far below any peer's maximum PDU.
        if self._armed < self.config.network_timeout - self._slack:
            # Tightened to the end of a slow PDU: the answer gets the whole timeout.
            self._arm(self.config.network_timeout)
        pdv = _PDV_HEADER.pack(len(command) + 2, context_id, 0x03) + command
        self.sock.sendall(_HEADER.pack(_P_DATA, len(pdv)) + pdv)


def serve_association(
    sock: socket.socket,
    config: AcceptorConfig,
    handler: StorageHandler,
    *,
    admit: Callable[[Applicant], bool],
    on_release: Callable[[], None],
    certified_clinic: str | None = None,
) -> None:
    """Serve one accepted connection in the calling thread until it ends.

    ``admit`` is asked once the peer has requested an association and its calling AE title
    is known (False: rejected as over the local limit); ``on_release`` is called when an
    admitted association is released, before the answer goes out. The socket is left open:
    its owner closes it.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _Association(sock, config, handler, admit, on_release, certified_clinic).run()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class UpperLayerServer:
    """Listens for associations and serves each in its own thread; with ``tls`` (a server
    context) each connection is a TLS connection (DICOM TLS, PS3.15 Annex B). Listeners
    given the same ``slots`` count their associations together."""

    def __init__(
        self,
        address: tuple[str, int],
        config: AcceptorConfig,
        handler: StorageHandler,
        *,
        tls: ssl.SSLContext | None = None,
        slots: SlotBook | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.tls = tls
        self.slots = self._slots = slots or SlotBook(config.limits)
        outer = self

        class RequestHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._handle_connection(self.request)

        self._server = _Server(address, RequestHandler)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _handle_connection(self, sock: socket.socket) -> None:
        # Both run in this connection's thread: admitted needs no lock.
        admitted: Applicant | None = None

        def admit(applicant: Applicant) -> bool:
            nonlocal admitted
            if self._slots.take(applicant):
                admitted = applicant
            return admitted is not None

        def release_slot() -> None:
            nonlocal admitted
            if admitted is not None:
                self._slots.give_back(admitted)
                admitted = None

        certified_clinic: str | None = None
        if self.tls is not None:
            # The handshake belongs to the association request's deadline.
            sock.settimeout(self.config.acse_timeout)
            try:
                tls_sock = self.tls.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                log.warning("TLS handshake failed: %s", exc)
                return
            if self.tls.verify_mode == ssl.CERT_REQUIRED:
                certified_clinic = clinic_of_certificate(tls_sock.getpeercert())
                if not certified_clinic:
                    log.warning("TLS client certificate without a clinic code; closed")
                    tls_sock.close()
                    return
            sock = tls_sock
        try:
            serve_association(
                sock,
                self.config,
                self.handler,
                admit=admit,
                on_release=release_slot,
                certified_clinic=certified_clinic,
            )
        finally:
            release_slot()
            if self.tls is not None:
                with contextlib.suppress(OSError):
                    sock.close()

    def start(self) -> None:
        """Serve in a background thread."""
        # A short poll: stop() waits for the loop to notice, up to this long.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="rdc-dicom", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening; associations in progress end with their connection."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
