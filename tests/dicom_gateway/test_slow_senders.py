"""One sender cannot stop intake for everyone.

A registered AE title opening more associations than its limit and keeping each busy with
a byte now and then (the slow-drip attack), a clinic using all its AE titles at once, and
association requests dribbled byte by byte: the attacker's extra associations are rejected
as over the local limit, every drip is cut off once its PDU (or its request) is overdue
although bytes keep arriving, and another clinic's C-ECHO and C-STORE succeed throughout.
With one listener process and with two (the limits are counted where slots are granted).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.dicom_gateway.test_upper_layer import _store_command
from tests.helpers import RdcServer, echo_rejection, echoscu, storescu, wait_for

# The tests here check the DICOM protocol and what is stored, nothing a background task does.
pytestmark = pytest.mark.task_free

PER_AE = 3
PER_CLINIC = 4
ACSE_TIMEOUT = 3
NETWORK_TIMEOUT = 5
LOCAL_LIMIT_EXCEEDED = (2, 3, 2)  # rejected-transient, provider (presentation), local limit
_ASSOCIATE_AC, _ASSOCIATE_RJ, _ABORT = 0x02, 0x03, 0x07
_DRIP_PDU_LENGTH = 4_000  # announced by the dripper; it would take far longer than a timeout
_VERIFICATION_CONTEXT, _CT_CONTEXT = 1, 3


def _request(calling_ae: str) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = "RDC"
    contexts = [
        build_context(Verification, [ImplicitVRLittleEndian]),
        build_context(CTImageStorage, [ExplicitVRLittleEndian]),
    ]
    for context, number in zip(contexts, (_VERIFICATION_CONTEXT, _CT_CONTEXT), strict=True):
        context.context_id = number
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16_384
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return 0, b""
        header += chunk
    pdu_type, length = struct.unpack(">BxI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return pdu_type, body


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class _Cut:
    """How the server ended a drip: the bytes of the dripped unit that had arrived (fewer
    than the unit has: it was still incomplete), and the A-ABORT reason if one came."""

    sent: int
    abort_reason: int | None


def _drip(sock: socket.socket, data: bytes, interval: float, stop: threading.Event) -> _Cut | None:
    """Send ``data`` a byte at a time, ``interval`` apart, until the server ends the
    connection (the cut) or ``stop`` is set (None). Reaching the end of ``data`` uncut fails."""
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent : sent + 1])
        except OSError:
            return _Cut(sent, None)
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                pdu_type, body = _read_pdu(sock)
            except OSError:
                pdu_type, body = 0, b""
            reason = body[3] if pdu_type == _ABORT and len(body) == 4 else None
            return _Cut(sent + 1, reason)
        if stop.is_set():
            return None
    raise AssertionError(f"{len(data)} bytes dripped and the server never cut the sender off")


@dataclass
class _DripAttack:
    """``workers`` connections from ``calling_ae``, each asking for an association and, once
    admitted, dripping a P-DATA PDU; a connection cut off asks again."""

    port: int
    calling_ae: str
    workers: int
    interval: float = 0.25
    stop: threading.Event = field(default_factory=threading.Event)
    rejections: list[tuple[int, int, int]] = field(default_factory=list)
    established: int = 0
    cuts: list[_Cut] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> _DripAttack:
        for _ in range(self.workers):
            thread = threading.Thread(target=self._work, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        assert not self.errors, self.errors

    def _work(self) -> None:
        try:
            while not self.stop.is_set():
                self._once()
        except BaseException as exc:
            self.errors.append(exc)

    def _once(self) -> None:
        with _connect(self.port) as sock:
            sock.sendall(_request(self.calling_ae))
            pdu_type, body = _read_pdu(sock)
            if pdu_type == _ASSOCIATE_RJ:
                with self._lock:
                    self.rejections.append((body[1], body[2], body[3]))
                self.stop.wait(self.interval)
                return
            assert pdu_type == _ASSOCIATE_AC, pdu_type
            with self._lock:
                self.established += 1
            # A P-DATA PDU announcing more bytes than will ever come in time.
            pdu = struct.pack(">BxI", 0x04, _DRIP_PDU_LENGTH) + bytes(_DRIP_PDU_LENGTH)
            cut = _drip(sock, pdu, self.interval, self.stop)
            if cut is not None:
                with self._lock:
                    self.cuts.append(cut)


@contextlib.contextmanager
def _held(port: int, calling_ae: str, count: int) -> Iterator[list[object]]:
    """``count`` associations from ``calling_ae``, released at the end."""
    held = []
    try:
        for _ in range(count):
            ae = AE(ae_title=calling_ae)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="RDC")
            assert assoc.is_established
            held.append(assoc)
        yield held
    finally:
        for assoc in held:
            with contextlib.suppress(Exception):
                assoc.release()  # type: ignore[attr-defined]


def _local_limit(lines: list[str]) -> bool:
    return lines == [
        "Result: Rejected Transient, Source: Service Provider (Presentation Related)",
        "Reason: Local Limit Exceeded",
    ]


@pytest.fixture(params=[1, 2], ids=["one-process", "two-processes"])
def limited_server(
    request: pytest.FixtureRequest,
    rdc_env: dict[str, str],
    alliance: dict[str, str],
    tmp_path: Path,
) -> Iterator[RdcServer]:
    env = {
        **rdc_env,
        "RDC_DICOM_PROCESSES": str(request.param),
        "RDC_DICOM_MAX_ASSOCIATIONS_PER_AE": str(PER_AE),
        "RDC_DICOM_MAX_ASSOCIATIONS_PER_CLINIC": str(PER_CLINIC),
        "RDC_DICOM_ACSE_TIMEOUT_SECONDS": str(ACSE_TIMEOUT),
        "RDC_DICOM_NETWORK_TIMEOUT_SECONDS": str(NETWORK_TIMEOUT),
    }
    with RdcServer(env, tmp_path / "serve.log", workers=False) as server:
        yield server


def test_a_dripping_sender_cannot_stop_other_clinics(
    limited_server: RdcServer, dcmtk: Path, testdata: Path
) -> None:
    port = limited_server.dicom_port
    ct_file = testdata / "dicom" / "CT_small.dcm"

    # Per clinic: CLINIC_A's two AE titles together get PER_CLINIC associations, no more.
    with _held(port, "CLINIC_A_CT", PER_AE), _held(port, "CLINIC_A_DR", PER_CLINIC - PER_AE):
        assert _local_limit(echo_rejection(dcmtk, port, "CLINIC_A_DR"))
        assert echoscu(dcmtk, port, "CLINIC_B_MR").returncode == 0

    # The slow drip: twice as many associations as CLINIC_A_CT may have, each trickling a
    # PDU that would take minutes to complete.
    with _DripAttack(port, "CLINIC_A_CT", workers=2 * PER_AE) as attack:
        wait_for(
            lambda: attack.established >= PER_AE and attack.rejections,
            timeout=60,
            what="the attacker's associations admitted up to its limit and then rejected",
        )
        # Meanwhile another clinic's C-ECHO and C-STORE go through.
        echo = echoscu(dcmtk, port, "CLINIC_B_MR")
        assert echo.returncode == 0, echo.stderr
        sent = storescu(dcmtk, [ct_file], port=port, calling_ae="CLINIC_B_MR")
        assert all(result.returncode == 0 for result in sent), [r.stderr for r in sent]
        # Every drip is cut off once its PDU is overdue, with an A-ABORT, though bytes
        # keep coming; the attacker then asks again and is admitted or rejected.
        wait_for(lambda: len(attack.cuts) >= PER_AE, timeout=120, what="the drips cut off")
        echo = echoscu(dcmtk, port, "CLINIC_B_MR")
        assert echo.returncode == 0, echo.stderr
    assert set(attack.rejections) == {LOCAL_LIMIT_EXCEEDED}
    assert all(cut.sent < 6 + _DRIP_PDU_LENGTH for cut in attack.cuts)
    assert all(cut.abort_reason == 0 for cut in attack.cuts), attack.cuts
    # Far more than one slot's worth of drips were rejected or cut, never served for long.
    assert attack.established >= PER_AE

    # Association requests dribbled a byte at a time are closed after the ACSE timeout,
    # however many bytes arrive; none is ever answered.
    stop = threading.Event()
    cuts: list[_Cut | None] = []

    def dribble() -> None:
        with _connect(port) as sock:
            cuts.append(_drip(sock, _request("CLINIC_A_CT"), 0.1, stop))

    dribblers = [threading.Thread(target=dribble) for _ in range(10)]
    for thread in dribblers:
        thread.start()
    for thread in dribblers:
        thread.join(timeout=120)
    request_length = len(_request("CLINIC_A_CT"))
    assert len(cuts) == 10
    assert all(cut is not None and cut.sent < request_length for cut in cuts), cuts
    assert all(cut is not None and cut.abort_reason is None for cut in cuts), cuts

    # A C-STORE whose data set comes as a trickle of tiny whole PDUs is cut off too: the data
    # set as a whole is overdue.
    with _connect(port) as sock:
        sock.sendall(_request("CLINIC_A_CT"))
        assert _read_pdu(sock)[0] == _ASSOCIATE_AC
        sock.sendall(_store_command(_CT_CONTEXT, generate_uid()))
        trickle = b"".join(
            struct.pack(">BxIIBB", 0x04, 7, 3, _CT_CONTEXT, 0x00) + b"\x00" for _ in range(2_000)
        )
        cut = _drip_pdus(sock, trickle, 7 + 6, 0.05)
        assert cut.sent < len(trickle) and cut.abort_reason == 0, cut

    # The service goes on for everyone, the attacker included.
    assert echoscu(dcmtk, port, "CLINIC_A_CT").returncode == 0
    assert echoscu(dcmtk, port, "CLINIC_B_MR").returncode == 0


def _drip_pdus(sock: socket.socket, data: bytes, size: int, interval: float) -> _Cut:
    """Send ``data`` in whole PDUs of ``size`` bytes, ``interval`` apart, until cut off."""
    for sent in range(0, len(data), size):
        try:
            sock.sendall(data[sent : sent + size])
        except OSError:
            return _Cut(sent, None)
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            pdu_type, body = _read_pdu(sock)
            return _Cut(sent + size, body[3] if pdu_type == _ABORT and len(body) == 4 else None)
    raise AssertionError("the trickle of PDUs was never cut off")
