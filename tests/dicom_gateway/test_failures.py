"""Failures answer a failure status and leave nothing half-written; restarts lose nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import pydicom
import pytest

from tests.helpers import RdcServer, StoreFault, c_store, wait_for


def _send(server: RdcServer, ds: pydicom.Dataset, calling_ae: str = "CLINIC_A_CT") -> int:
    return c_store(server.dicom_port, ds, calling_ae=calling_ae)


def _counts(server: RdcServer) -> tuple[int, int, int]:
    with server.db() as db:
        return tuple(
            db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[return-value]
            for t in ("instances", "exams", "patients")
        )


@pytest.mark.task_free  # the C-STORE answers and what is stored
def test_store_failure_answers_out_of_resources_and_leaves_no_rows(
    rdc_env: dict[str, str], alliance: dict[str, str], testdata: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    fault = StoreFault(rdc_env)
    server = RdcServer(fault.env, tmp_path / "serve.log", workers=False)
    server.start()
    try:
        with fault.failing():
            assert _send(server, ds) == 0xA700  # Refused: Out of Resources
            assert _counts(server) == (0, 0, 0)

        assert _send(server, ds) == 0x0000  # the modality's retry succeeds
        assert _counts(server) == (1, 1, 1)
        assert len(server.objects("dicom")) == 1
    finally:
        server.stop()
        fault.close()


@pytest.mark.task_free  # the C-STORE answers and what is stored
def test_database_failure_answers_failure_and_removes_the_object(
    server: RdcServer, testdata: Path
) -> None:
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    with server.db() as db:
        db.fail_inserts("instances")

    assert _send(server, ds) == 0x0110  # Processing failure
    assert _counts(server) == (0, 0, 0)
    assert server.objects("dicom") == []  # the object written before the index is gone

    with server.db() as db:
        db.restore_inserts("instances")
    assert _send(server, ds) == 0x0000
    assert _counts(server) == (1, 1, 1)
    assert len(server.objects("dicom")) == 1


def test_exam_still_becomes_ready_after_a_restart_during_receiving(
    rdc_env: dict[str, str], alliance: dict[str, str], testdata: Path, tmp_path: Path
) -> None:
    env = {**rdc_env, "RDC_STABLE_AGE_SECONDS": "4"}
    server = RdcServer(env, tmp_path / "serve.log")
    server.start()
    try:
        assert _send(server, pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")) == 0
        with server.db() as db:
            assert db.execute("SELECT state FROM exams").fetchone()[0] == "RECEIVING"
        server.stop(signal.SIGKILL)  # no chance to clean up
        server.start()
        reader = server.client("reader", alliance["reader"])
        page = wait_for(
            lambda: (p := reader.get("/api/v1/worklist").json())["total"] == 1 and p,
            timeout=30,
            what="exam READY after restart",
        )
        assert page["items"][0]["clinic_code"] == "CLINIC_A"
        with server.db() as db:
            assert db.execute("SELECT count(*) FROM work_items").fetchone()[0] == 1
    finally:
        server.stop()
