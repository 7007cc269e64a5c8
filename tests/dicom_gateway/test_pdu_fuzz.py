"""The upper layer's PDU and state handling under random and mutated PDUs.

An in-process listener (the same acceptor ``rdc serve`` runs, over real sockets, with a
small application handler) receives random byte strings, mutated association requests,
and well-formed associations followed by mutated P-DATA (C-ECHO, C-FIND, C-GET, C-MOVE
and C-STORE messages, fragments out of order, unknown contexts and commands). Each case
must end with a closed connection (abort, rejection or release, never a hang past the
timeouts), no admission slot may stay taken, and afterwards the listener still answers
C-ECHO, C-FIND and C-STORE. Seeded: a failure names its case and can be replayed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_gateway.query import QueryError, RetrieveItem
from dicom_gateway.retrieve import MoveDestination
from dicom_gateway.upper_layer import AcceptorConfig, StoreRequest, UpperLayerServer

SEED = 22
CASES = 1500
_CONTEXTS = (
    (1, Verification, ImplicitVRLittleEndian),
    (3, StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian),
    (5, StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian),
    (7, StudyRootQueryRetrieveInformationModelMove, ExplicitVRLittleEndian),
    (9, CTImageStorage, ExplicitVRLittleEndian),
)


class Application:
    """Answers like the gateway's service, without a database: one stored CT object."""

    def __init__(self, stored: bytes) -> None:
        self.stored = stored
        self.stores = 0

    def open_association(self, calling_ae: str) -> Any | None:
        return calling_ae if calling_ae.startswith("CLINIC") else None

    def clinic_of(self, sender: Any) -> str:
        return str(sender)

    def clinic_code(self, sender: Any) -> str:
        return str(sender)

    def store(self, request: StoreRequest) -> tuple[int, str]:
        self.stores += 1
        return 0x0000, ""

    def find(self, sender: Any, sop_class: str, identifier: Dataset) -> list[Dataset]:
        if identifier.get("QueryRetrieveLevel") not in ("STUDY", "SERIES", "IMAGE"):
            raise QueryError(0xA900, "bad level")
        answer = Dataset()
        answer.QueryRetrieveLevel = identifier.QueryRetrieveLevel
        answer.StudyInstanceUID = "1.2.3"
        return [answer]

    def retrieve(self, sender: Any, sop_class: str, identifier: Dataset) -> list[RetrieveItem]:
        return [RetrieveItem(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, "k")]

    def open_item(self, item: RetrieveItem) -> BinaryIO:
        return io.BytesIO(self.stored)

    def move_destination(self, sender: Any, ae_title: str) -> MoveDestination | None:
        return None  # every destination unknown: no outgoing associations while fuzzing


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpperLayerServer]:
    spool = tmp_path_factory.mktemp("fuzz")
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientID = "P"
    buffer = io.BytesIO()
    ds.file_meta = Dataset()  # type: ignore[assignment]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    config = AcceptorConfig(
        ae_title="RDC", acse_timeout=3.0, network_timeout=3.0, spool_dir=Path(spool)
    )
    server = UpperLayerServer(("127.0.0.1", 0), config, Application(buffer.getvalue()))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _associate_rq(calling: str = "CLINIC_A") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "RDC"
    contexts = []
    for number, abstract, syntax in _CONTEXTS:
        context = build_context(abstract, [syntax])
        context.context_id = number
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = 16_384
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CTImageStorage
    role.scu_role, role.scp_role = False, True
    primitive.user_information = [length, role]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BxI", 0x04, len(item)) + item


def _message(kind: str, rng: random.Random) -> bytes:
    """One well-formed DIMSE request as P-DATA PDUs (command, then any data set)."""
    query = Dataset()
    query.QueryRetrieveLevel = rng.choice(["STUDY", "SERIES", "IMAGE", "PATIENT", ""])
    query.StudyInstanceUID = "1.2.3"
    primitive: Any
    if kind == "echo":
        primitive, message, context = C_ECHO(), C_ECHO_RQ(), 1
        primitive.AffectedSOPClassUID = Verification
    elif kind == "find":
        primitive, message, context = C_FIND(), C_FIND_RQ(), 3
        primitive.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    elif kind == "get":
        primitive, message, context = C_GET(), C_GET_RQ(), 5
        primitive.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelGet
    elif kind == "move":
        primitive, message, context = C_MOVE(), C_MOVE_RQ(), 7
        primitive.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelMove
        primitive.MoveDestination = "ELSEWHERE"
    else:
        primitive, message, context = C_STORE(), C_STORE_RQ(), 9
        primitive.AffectedSOPClassUID = CTImageStorage
        primitive.AffectedSOPInstanceUID = generate_uid()
        store = Dataset()
        store.PatientID = "P"
        primitive.DataSet = io.BytesIO(encode(store, False, True) or b"")
    primitive.MessageID = rng.randint(1, 0xFFFF)
    if kind in ("find", "get", "move"):
        primitive.Priority = 0
        primitive.Identifier = io.BytesIO(encode(query, False, True) or b"")
    elif kind == "store":
        primitive.Priority = 0
    message.primitive_to_message(primitive)
    out = b""
    for pdata in message.encode_msg(context, 16_384):
        for context_id, value in pdata.presentation_data_value_list:
            out += _p_data(context_id, value[0], value[1:])
    return out


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        choice = rng.random()
        if not buffer:
            break
        at = rng.randrange(len(buffer))
        if choice < 0.4:
            buffer[at] = rng.randrange(256)
        elif choice < 0.55:
            del buffer[at : at + rng.randint(1, 16)]
        elif choice < 0.7:
            buffer[at:at] = rng.randbytes(rng.randint(1, 16))
        elif choice < 0.85:  # a length field set to something else
            if at + 6 <= len(buffer):
                buffer[at + 2 : at + 6] = struct.pack(">I", rng.choice([0, 1, 7, 0xFFFF, 2**31]))
        else:
            buffer = buffer[:at]
    return bytes(buffer)


def _case(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.randint(0, 600))
    if kind < 0.45:
        return _mutate(_associate_rq(), rng)
    messages = b"".join(
        _message(rng.choice(["echo", "find", "get", "move", "store"]), rng)
        for _ in range(rng.randint(1, 3))
    )
    if rng.random() < 0.3:
        messages += bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # A-RELEASE-RQ
    return _associate_rq() + _mutate(messages, rng)


def _run_case(port: int, data: bytes) -> None:
    """Send ``data``, close our side, and read until the listener closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return
            except (ConnectionError, OSError):
                return
        raise AssertionError("the listener kept the connection open past its timeouts")


def test_random_and_mutated_pdus_never_stop_the_listener(
    listener: UpperLayerServer,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = random.Random(SEED)
    port = listener.address[1]
    for number in range(CASES):
        data = _case(rng)
        try:
            _run_case(port, data)
        except AssertionError as exc:
            raise AssertionError(f"case {number} (seed {SEED}): {exc}; {data[:80].hex()}") from exc
    # No case escaped the acceptor's handling (socketserver prints a traceback if one did).
    assert "Traceback" not in capfd.readouterr().err
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == []  # every case was a named protocol error, none a defect of ours
    # Every admission slot came back.
    deadline = time.monotonic() + 10
    while listener.slots._total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener.slots._total == 0
    # And the listener serves well-formed associations as before.
    ae = AE(ae_title="CLINIC_A")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RDC")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    answers = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assert [int(status.Status) for status, _ in answers] == [0xFF00, 0x0000]
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "P"
    ds.file_meta = Dataset()  # type: ignore[assignment]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def test_c_get_streams_the_stored_object_on_the_association(
    listener: UpperLayerServer,
) -> None:
    """The C-GET sub-operation arrives as a C-STORE on the requesting association (pynetdicom
    as the SCU taking the Storage SCP role)."""
    from pynetdicom import evt
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation as Role

    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="CLINIC_A")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    role = Role()
    role.sop_class_uid = CTImageStorage
    role.scu_role, role.scp_role = False, True
    assoc = ae.associate(
        "127.0.0.1",
        listener.address[1],
        ae_title="RDC",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    answers = [
        status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
    ]
    assoc.release()
    assert int(answers[-1].Status) == 0x0000
    assert int(answers[-1].NumberOfCompletedSuboperations) == 1
    assert [ds.SOPInstanceUID for ds in received] == ["1.2.3.4"]
    assert received[0].PatientID == "P"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_tls_client_on_the_plain_port_is_closed_at_once(listener: UpperLayerServer) -> None:
    """Its hello is not read as a 16 MB PDU: the server closes the connection (the client
    sees the close, not its own timeout) and logs the reason."""
    import ssl

    # Held on the gateway's own logger: what an earlier test did to the root logger's level
    # or handlers in this worker process does not hide the record.
    gateway_log = logging.getLogger("dicom_gateway.upper_layer")
    records = _Records()
    level, disabled = gateway_log.level, gateway_log.disabled
    gateway_log.addHandler(records)
    gateway_log.setLevel(logging.INFO)
    gateway_log.disabled = False
    try:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(listener.address, timeout=60) as raw,
            pytest.raises((ssl.SSLError, ConnectionError, OSError)) as refused,
        ):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        assert not isinstance(refused.value, TimeoutError), "the server never closed it"
        deadline = time.monotonic() + 30  # a poll for the log line, not a speed check
        while time.monotonic() < deadline and not any(
            "TLS handshake on the plain DICOM port" in m for m in records.messages
        ):
            time.sleep(0.05)
    finally:
        gateway_log.removeHandler(records)
        gateway_log.setLevel(level)
        gateway_log.disabled = disabled
    assert any("TLS handshake on the plain DICOM port" in m for m in records.messages), (
        records.messages
    )
