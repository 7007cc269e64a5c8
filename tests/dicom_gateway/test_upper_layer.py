"""The DICOM upper layer of the gateway: negotiation, protocol errors, limits, large data."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from tests.helpers import RdcServer, echo_rejection, same_dataset, wait_for

# The tests here check the DICOM protocol and what is stored, nothing a background task does.
pytestmark = pytest.mark.task_free


@pytest.fixture(scope="module")
def server(shared_server: RdcServer) -> RdcServer:
    """One deployment for the tests that take ``server``: they store nothing but the large
    instance, which its test looks up by its UID; the others start their own."""
    return shared_server


def _associate(
    server: RdcServer, contexts: list[tuple[str, list[str] | None]], calling_ae: str = "CLINIC_A_CT"
):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = 65_536
    for abstract, syntaxes in contexts:
        if syntaxes:
            ae.add_requested_context(abstract, syntaxes)
        else:
            ae.add_requested_context(abstract)
    return ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")


_MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"


def test_negotiation_accepts_storage_verification_and_query_retrieve(server: RdcServer) -> None:
    assoc = _associate(
        server,
        [
            (CTImageStorage, None),
            (PatientRootQueryRetrieveInformationModelFind, None),
            (_MODALITY_WORKLIST_FIND, None),
            ("1.2.840.10008.5.1.4.1.1.4", ["1.2.3.4.5.6"]),  # MR storage in an unknown syntax
            (Verification, None),
            ("1.2.826.0.1.3680043.10.999.1", [ExplicitVRLittleEndian]),  # a private SOP class
        ],
    )
    assert assoc.is_established
    results = {str(cx.abstract_syntax): cx.result for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assert set(results) == {
        CTImageStorage,
        Verification,
        "1.2.826.0.1.3680043.10.999.1",
        PatientRootQueryRetrieveInformationModelFind,
    }
    assert rejected == {
        _MODALITY_WORKLIST_FIND: 0x03,  # abstract syntax not supported
        "1.2.840.10008.5.1.4.1.1.4": 0x04,  # transfer syntaxes not supported
    }
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return -1, b""
        header += chunk
    pdu_type, length = struct.unpack(">BxI", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return pdu_type, body


def test_protocol_violations_are_aborted_and_the_service_goes_on(server: RdcServer) -> None:
    for bad in (
        struct.pack(">BxI", 0x04, 6) + b"\x00" * 6,  # P-DATA before any association
        struct.pack(">BxI", 0x01, 50_000_000),  # an association request of 50 MB
        struct.pack(">BxI", 0x09, 4) + b"\x00" * 4,  # no such PDU type
        struct.pack(">BxI", 0x01, 10) + b"\x00" * 10,  # an association request cut short
    ):
        with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10) as sock:
            sock.sendall(bad)
            pdu_type, _ = _read_pdu(sock)
            assert pdu_type == 0x07, f"expected A-ABORT for {bad[:6].hex()}"
            assert _read_pdu(sock)[0] == -1  # and the connection is closed

    assoc = _associate(server, [(Verification, None)])
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_association_limit_rejects_transiently(
    rdc_env: dict[str, str], alliance: dict[str, str], tmp_path: Path, dcmtk: Path
) -> None:
    env = {**rdc_env, "RDC_DICOM_MAX_ASSOCIATIONS": "1"}
    server = RdcServer(env, tmp_path / "serve.log", workers=False)
    server.start()
    try:
        # A connection that never asks for an association (a probe) takes no slot.
        with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10):
            first = _associate(server, [(Verification, None)])
        assert first.is_established
        assert echo_rejection(dcmtk, server.dicom_port, "CLINIC_A_CT") == [
            "Result: Rejected Transient, Source: Service Provider (Presentation Related)",
            "Reason: Local Limit Exceeded",
        ]
        first.release()

        def third() -> Any:
            assoc = _associate(server, [(Verification, None)])
            return assoc if assoc.is_established else None

        # The slot is free again once the server has seen the release: at once on a quiet
        # machine, a moment later on a busy one (the limit is never exceeded meanwhile).
        wait_for(third, timeout=30, what="an association after the release").release()
    finally:
        server.stop()


def test_large_instance_is_streamed_and_stored_intact(server: RdcServer, tmp_path: Path) -> None:
    # 40 frames of 512x512x16 bit: about 21 MB, hundreds of PDUs.
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid() for _ in range(3)
    )
    ds.PatientID, ds.PatientName, ds.Modality = "BIG1", "Big^Study", "CT"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = 40
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(7).integers(0, 65535, (40, 512, 512), np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)

    assoc = _associate(server, [(CTImageStorage, [ExplicitVRLittleEndian])])
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    with server.db() as db:
        key, size = db.execute(
            "SELECT storage_key, size_bytes FROM instances WHERE sop_instance_uid=?",
            (ds.SOPInstanceUID,),
        ).fetchone()
    stored = server.object_file(key)
    assert stored.stat().st_size == size
    assert same_dataset(path, stored)
    assert pydicom.dcmread(stored).file_meta.SourceApplicationEntityTitle == "CLINIC_A_CT"


def _store_command(context_id: int, sop_instance: str) -> bytes:
    """A P-DATA PDU with a whole C-STORE-RQ command set (a data set to follow)."""

    def element(tag: int, value: bytes) -> bytes:
        value += b"\x00" * (len(value) % 2)
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    command = b"".join(
        (
            element(0x00000002, CTImageStorage.encode()),
            element(0x00000100, struct.pack("<H", 0x0001)),
            element(0x00000110, struct.pack("<H", 1)),
            element(0x00000700, struct.pack("<H", 0)),
            element(0x00000800, struct.pack("<H", 0x0000)),
            element(0x00001000, sop_instance.encode()),
        )
    )
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BxI", 0x04, len(pdv)) + pdv


def test_silent_peers_are_dropped_after_the_timeouts(
    rdc_env: dict[str, str], alliance: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **rdc_env,
        "RDC_DICOM_ACSE_TIMEOUT_SECONDS": "1",
        "RDC_DICOM_NETWORK_TIMEOUT_SECONDS": "1",
    }
    with RdcServer(env, tmp_path / "serve.log", workers=False) as server:
        # Connected, never asked for an association: closed after the ACSE timeout.
        with socket.create_connection(("127.0.0.1", server.dicom_port), timeout=15) as sock:
            assert sock.recv(1) == b""

        # An association that stops halfway through a C-STORE: closed after the network
        # timeout, and the part received is not kept.
        assoc = _associate(server, [(CTImageStorage, [ExplicitVRLittleEndian])])
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        assert raw is not None
        context_id = assoc.accepted_contexts[0].context_id
        raw.sendall(_store_command(context_id, generate_uid()))
        fragment = b"\x08\x00\x16\x00UI\x1a\x00" + b"1" * 200  # first bytes, not the last
        pdv = struct.pack(">IBB", len(fragment) + 2, context_id, 0x00) + fragment
        raw.sendall(struct.pack(">BxI", 0x04, len(pdv)) + pdv)
        deadline = time.monotonic() + 15
        while assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established
        assert list(server.data_dir.rglob(".rx-*")) == []

        # The service goes on.
        again = _associate(server, [(Verification, None)])
        assert again.send_c_echo().Status == 0x0000
        again.release()
