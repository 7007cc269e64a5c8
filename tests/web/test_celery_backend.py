"""Production task backend: Celery worker and beat on Redis run the stable-study detection."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.helpers import RdcServer, wait_for

pytestmark = pytest.mark.production  # needs PostgreSQL/S3/Redis: the production pass


@pytest.fixture
def celery_env(rdc_env: dict[str, str]) -> Iterator[dict[str, str]]:
    import redis

    broker = os.environ.get("RDC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(broker).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required for the Celery backend test and did not answer: {exc}")
    queue = f"rdc-test-{uuid.uuid4().hex[:12]}"
    yield {
        **rdc_env,
        "RDC_TASK_BACKEND": "celery",
        "RDC_BROKER_URL": broker,
        "RDC_TASK_QUEUE": queue,
        "RDC_STABLE_SCAN_INTERVAL_SECONDS": "1",
    }
    redis.Redis.from_url(broker).delete(queue)


def _start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "web.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def test_beat_and_worker_make_exams_ready(
    celery_env: dict[str, str], alliance: dict[str, str], testdata: Path, tmp_path: Path
) -> None:
    server = RdcServer(celery_env, tmp_path / "serve.log")
    server.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
        ae = AE(ae_title="CLINIC_A_CT")
        ae.add_requested_context(ds.SOPClassUID)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()

        # With the Celery backend the service itself runs no background work.
        time.sleep(4)  # twice the stable age
        with server.db() as db:
            assert db.execute("SELECT state FROM exams").fetchone()[0] == "RECEIVING"

        processes.append(_start(celery_env, tmp_path / "worker.log", "worker", "--pool", "threads"))
        processes.append(_start(celery_env, tmp_path / "beat.log", "beat"))
        reader = server.client("reader", alliance["reader"])
        page = wait_for(
            lambda: (p := reader.get("/api/v1/worklist").json())["total"] == 1 and p,
            timeout=60,
            what=f"beat + worker to queue the exam (logs in {tmp_path})",
        )
        assert page["items"][0]["study_instance_uid"] == ds.StudyInstanceUID
        with server.db() as db:
            assert db.execute("SELECT count(*) FROM work_items").fetchone()[0] == 1
        assert "worklist.mark_stable_exams_ready" in (tmp_path / "worker.log").read_text()
    finally:
        for proc in processes:
            _stop(proc)
        server.stop()
