"""Retrieve sub-operations: counting them, and C-MOVE's association to its destination.

A C-MOVE opens a new association to the move destination with pynetdicom's AE as SCU and
C-STOREs the instances one by one, each read from the store as it is sent (one instance in
memory at a time, never the whole study).
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom.filereader import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from dicom_gateway.query import RetrieveItem

__all__ = ["MoveDestination", "SubOperations", "data_set_chunks", "send_to_destination"]

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True, slots=True)
class MoveDestination:
    """A clinic's registered C-MOVE destination."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None


@dataclass
class SubOperations:
    """Counts of a C-GET's or C-MOVE's sub-operations (PS3.4 C.4.2.1.6)."""

    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    refused: str = ""  # the whole retrieve could not start (association refused)
    comment: str = ""
    cancelled: bool = False  # the originator cancelled: the remaining ones were not sent

    def count(self, sop_instance_uid: str, status: int | None) -> None:
        """Count one finished sub-operation (status None: it could not be sent)."""
        self.remaining -= 1
        if status == 0x0000:
            self.completed += 1
        elif status is not None and status in _WARNINGS:
            self.warning += 1
            self.comment = "one or more sub-operations completed with a warning"
        else:
            self.failed += 1
            self.failed_uids.append(sop_instance_uid)
            self.comment = "one or more sub-operations failed"


def _fill(source: BinaryIO, buffer: bytearray, size: int) -> None:
    while len(buffer) < size:
        chunk = source.read(max(size - len(buffer), 65_536))
        if not chunk:
            return
        buffer += chunk


def data_set_chunks(source: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    """The data set of a stored Part-10 object (preamble and file meta skipped) in chunks of
    at most ``chunk_size`` bytes, reading forward only: object stores' streams do not seek."""
    buffer = bytearray()
    _fill(source, buffer, 132)
    offset = 0
    if buffer[128:132] == b"DICM":
        offset = 132
        while True:
            _fill(source, buffer, offset + 12)
            element = bytes(buffer[offset : offset + 8])
            if len(element) < 8 or int.from_bytes(element[:2], "little") != 0x0002:
                break
            if element[4:6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                offset += 12 + int.from_bytes(buffer[offset + 8 : offset + 12], "little")
            else:
                offset += 8 + int.from_bytes(element[6:8], "little")
        _fill(source, buffer, offset)
    pending = bytes(buffer[offset:])
    while True:
        while len(pending) < chunk_size:
            more = source.read(chunk_size)
            if not more:
                break
            pending += more
        if len(pending) <= chunk_size:
            yield pending
            return
        yield pending[:chunk_size]
        pending = pending[chunk_size:]


def _no_delay(event: Any) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_to_destination(
    destination: MoveDestination,
    items: list[RetrieveItem],
    *,
    open_item: Callable[[RetrieveItem], BinaryIO],
    our_ae: str,
    originator_ae: str,
    originator_message_id: int,
    timeout: float,
    progress: Callable[[SubOperations], bool],
) -> SubOperations:
    """C-STORE ``items`` to ``destination`` on one new association; ``progress`` is called
    before each sub-operation (for the pending C-MOVE responses) and answers False when the
    move is cancelled: no further sub-operation is started."""
    counts = SubOperations(remaining=len(items))
    if not items:
        return counts
    ae = AE(ae_title=our_ae)
    for sop_class, syntax in sorted({(i.sop_class_uid, i.transfer_syntax_uid) for i in items}):
        syntaxes = [syntax] + [s for s in _UNCOMPRESSED if s != syntax]
        if len(ae.requested_contexts) < 128:
            ae.add_requested_context(sop_class, syntaxes)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    tls_args = (destination.tls, destination.host) if destination.tls else None
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
    )
    if not assoc.is_established:
        ae.shutdown()
        counts.refused = f"association with move destination {destination.ae_title} failed"
        return counts
    try:
        for item in items:
            if not progress(counts):
                counts.cancelled = True
                break
            status: int | None = None
            if assoc.is_established:
                try:
                    # One instance at a time, spooled to disk past 16 MiB: pydicom seeks,
                    # object stores' streams do not.
                    with (
                        open_item(item) as source,
                        tempfile.SpooledTemporaryFile(max_size=16 << 20) as local,
                    ):
                        shutil.copyfileobj(source, local, 1 << 20)
                        local.seek(0)
                        ds = dcmread(local)
                    answer = assoc.send_c_store(
                        ds,
                        originator_aet=originator_ae,
                        originator_id=originator_message_id,
                    )
                    status = int(answer.Status) if "Status" in answer else None
                except Exception as exc:  # one instance failing does not end the move
                    log.warning("C-MOVE sub-operation %s failed: %s", item.sop_instance_uid, exc)
            counts.count(item.sop_instance_uid, status)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return counts
