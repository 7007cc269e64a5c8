"""Production stack, scaled out: two DICOM gateways, two Celery workers and one beat sharing
one PostgreSQL, one S3 bucket and one Redis behave as one service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.helpers import (
    RdcServer,
    S3Server,
    free_port,
    index_db,
    seed_alliance,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.production  # needs PostgreSQL/S3/Redis: the production pass


@pytest.fixture
def production_env(tmp_path: Path, s3_server: S3Server, s3_bucket: str) -> Iterator[dict[str, str]]:
    """PostgreSQL (a fresh database), S3 and Redis: fails when any of them is missing."""
    import redis

    admin_url = os.environ.get(
        "RDC_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
    )
    broker = os.environ.get("RDC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
    name = f"rdc_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(
        admin_url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        redis.Redis.from_url(broker).ping()
    except Exception as exc:
        pytest.fail(f"the production stack needs PostgreSQL and Redis: {exc}")
    queue = f"rdc-test-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDC_")}
    env.update(
        RDC_DATA_DIR=str(tmp_path / "data"),
        RDC_DATABASE_URL=sqlalchemy.engine.make_url(admin_url)
        .set(database=name)
        .render_as_string(hide_password=False),
        RDC_TASK_BACKEND="celery",
        RDC_BROKER_URL=broker,
        RDC_TASK_QUEUE=queue,
        RDC_STABLE_AGE_SECONDS="3",
        RDC_STABLE_SCAN_INTERVAL_SECONDS="1",
        RDC_SECRET_KEY="test-secret-key-not-for-production-000000",
        RDC_HTTP_HOST="127.0.0.1",
        RDC_DICOM_HOST="127.0.0.1",
        RDC_DICOM_AE_TITLE="RDC",
        **s3_server.env(s3_bucket),
    )
    yield env
    redis.Redis.from_url(broker).delete(queue)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _replica(env: dict[str, str], tmp_path: Path, name: str, *args: str) -> RdcServer:
    # Each replica has its own data directory (spool) and ports; everything else is shared.
    own = {
        **env,
        "RDC_DATA_DIR": str(tmp_path / name),
        "RDC_HTTP_PORT": str(free_port()),
        "RDC_DICOM_PORT": str(free_port()),
    }
    server = RdcServer(own, tmp_path / f"{name}.log", *args)
    server.start()
    return server


def _background(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "web.cli", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _generate(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    pixels = np.random.default_rng(3).integers(0, 4096, (128, 128), np.uint16).tobytes()
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "KILL1", "Kill^Test", "CT", i
        ds.Rows = ds.Columns = 128
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_two_gateways_two_workers_one_beat(
    production_env: dict[str, str],
    s3_server: S3Server,
    s3_bucket: str,
    dcmtk: Path,
    testdata: Path,
    tmp_path: Path,
) -> None:
    env = production_env
    seed_alliance(env)
    gateways = [_replica(env, tmp_path, f"gw{i}", "--role", "dicom") for i in (1, 2)]
    web = _replica(env, tmp_path, "web", "--role", "web")
    helpers = [
        _background(env, tmp_path / "worker1.log", "worker", "--pool", "threads"),
        _background(env, tmp_path / "worker2.log", "worker", "--pool", "threads"),
        _background(env, tmp_path / "beat.log", "beat"),
    ]
    try:
        # The same six studies pushed to both gateways at once.
        files = sorted(
            p
            for p in (testdata / "dicom" / "study_dicomdir").rglob("*")
            if p.is_file() and p.name != "DICOMDIR"
        )
        results: list = []
        senders = [
            threading.Thread(
                target=lambda gw=gw: results.extend(
                    storescu(dcmtk, files, port=gw.dicom_port, calling_ae="CLINIC_A_CT")
                )
            )
            for gw in gateways
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]

        def counts() -> tuple[int, ...]:
            with index_db(env) as db:
                return tuple(
                    db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("instances", "exams", "patients", "work_items", "instance_conflicts")
                )

        wait_for(lambda: counts()[3] == 6, timeout=60, what="six work items")
        assert counts() == (31, 6, 2, 6, 0)
        keys = [o.object_name for o in s3_server.client().list_objects(s3_bucket, recursive=True)]
        assert len(keys) == len(set(keys)) == 31
        with index_db(env) as db:
            states = {r[0] for r in db.execute("SELECT state FROM exams")}
        assert states == {"READY"}
        reader = web.client("reader", "pw-reader-123")
        assert reader.get("/api/v1/worklist").json()["total"] == 6

        # Kill -9 one gateway in the middle of a transfer; the sender re-sends what was not
        # acknowledged to the other one. Every acknowledged object must be there.
        batch = _generate(tmp_path / "batch", 120)
        acknowledged: list[str] = []
        ae = AE(ae_title="CLINIC_A_CT")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", gateways[0].dicom_port, ae_title="RDC")
        for index, path in enumerate(batch):
            if index == 40:
                gateways[0].stop(signal.SIGKILL)
            try:
                status = assoc.send_c_store(path)
            except Exception:
                break
            if not assoc.is_established or "Status" not in status:
                break
            if status.Status == 0x0000:
                acknowledged.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert 40 <= len(acknowledged) < 120
        with index_db(env) as db:
            indexed = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
        assert set(acknowledged) <= indexed

        retry = [
            p
            for p in batch
            if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID not in acknowledged
        ]
        results = storescu(dcmtk, retry, port=gateways[1].dicom_port, calling_ae="CLINIC_A_CT")
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        assert counts()[0] == 31 + 120
        keys = [o.object_name for o in s3_server.client().list_objects(s3_bucket, recursive=True)]
        assert len(keys) == 31 + 120
        wait_for(lambda: counts()[3] == 7, timeout=60, what="the seventh study queued")
    finally:
        for proc in helpers:
            proc.terminate()
        for proc in helpers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in [*gateways, web]:
            server.stop()
