"""Latency of audited reads while DICOM ingest runs: what writing an audit record costs a GET.

Starts ``rdc serve`` (embedded task runner) from the code at ``--repo`` (its directory goes
first on PYTHONPATH: point it at another checkout to compare, e.g. the main branch) on a
fresh SQLite file or a fresh PostgreSQL database, seeds an alliance, then measures
``GET /api/v1/exams`` and ``GET /api/v1/worklist`` (each writes an audit record) from
``--readers`` client threads:

1. ``idle``: nothing else runs, for ``--seconds``;
2. ``ingest``: while ``--associations`` dcmtk ``storescu`` processes send ``--instances``
   new instances (copies of the sample CT with fresh UIDs).

It prints, per phase, the number of requests, p50/p95/p99/max in ms, and the ingest rate.

    python3 bench/audit_reads.py --repo /work/main --database sqlite
    python3 bench/audit_reads.py --repo . --database postgresql --json /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
STORESCU = "/usr/bin/storescu"
ADMIN_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
PATHS = ("/api/v1/exams?limit=20", "/api/v1/worklist?limit=20")

_SEED = """
from rdc_core.db import session_scope
from rdc_core.migrate import upgrade_database
from worklist.directory import add_organization, add_user
from worklist.models import OrgKind, Role

upgrade_database()
with session_scope() as s:
    add_organization(s, code="LEAD", name="Lead", kind=OrgKind.LEAD)
    add_organization(s, code="CLINIC_A", name="Clinic A", kind=OrgKind.CLINIC,
                     ae_titles=["CLINIC_A_CT"])
    add_user(s, username="reader", role=Role.READER, org_code="LEAD", password="pw-reader-123")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_instances(sample: Path, dest: Path, count: int, studies: int) -> list[Path]:
    ds = pydicom.dcmread(sample)
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = [generate_uid() for _ in range(studies)]
    paths = []
    for i in range(count):
        ds.StudyInstanceUID = study_uids[i % studies]
        ds.SeriesInstanceUID = series_uids[i % studies]
        ds.PatientID = f"BENCH{i % studies}"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = dest / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Deployment:
    def __init__(self, repo: Path, database: str, workdir: Path) -> None:
        self.repo = repo
        self.workdir = workdir
        self.db_name: str | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RDC_")}
        self.env.update(
            PYTHONPATH=str(repo),
            RDC_DATA_DIR=str(workdir / "data"),
            RDC_HTTP_PORT=str(free_port()),
            RDC_DICOM_PORT=str(free_port()),
            RDC_SECRET_KEY="bench-secret-key-0000000000000000000000",
            RDC_PASSWORD_HASH_ROUNDS="4",
            RDC_STABLE_AGE_SECONDS="2",
            RDC_LOG_LEVEL="WARNING",
        )
        if database == "postgresql":
            import sqlalchemy

            self.db_name = f"rdc_bench_audit_{uuid.uuid4().hex[:10]}"
            admin = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{self.db_name}"')
            admin.dispose()
            url = sqlalchemy.engine.make_url(ADMIN_URL).set(database=self.db_name)
            self.env["RDC_DATABASE_URL"] = url.render_as_string(hide_password=False)
        self.http = f"http://127.0.0.1:{self.env['RDC_HTTP_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        subprocess.run(
            [sys.executable, "-c", _SEED], env=self.env, check=True, cwd=self.repo, timeout=300
        )
        log = open(self.workdir / "serve.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli", "serve"],
            env=self.env,
            cwd=self.repo,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.http}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        raise SystemExit(f"rdc serve did not start:\n{(self.workdir / 'serve.log').read_text()}")

    def token(self) -> str:
        answer = httpx.post(
            f"{self.http}/api/v1/auth/token",
            data={"username": "reader", "password": "pw-reader-123"},
        )
        answer.raise_for_status()
        token: str = answer.json()["access_token"]
        return token

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.db_name:
            import sqlalchemy

            admin = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            admin.dispose()


def read_loop(http: str, token: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=http, headers={"Authorization": f"Bearer {token}"}) as client:
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            response = client.get(PATHS[i % len(PATHS)], timeout=60)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise SystemExit(f"GET {PATHS[i % len(PATHS)]}: {response.status_code}")
            out.append(elapsed * 1000)
            i += 1


def measure(
    deployment: Deployment, token: str, readers: int, phase: str, run: Any
) -> dict[str, Any]:
    stop = threading.Event()
    samples: list[list[float]] = [[] for _ in range(readers)]
    threads = [
        threading.Thread(target=read_loop, args=(deployment.http, token, stop, samples[k]))
        for k in range(readers)
    ]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    extra = run()
    seconds = time.perf_counter() - started
    stop.set()
    for thread in threads:
        thread.join()
    values = sorted(v for s in samples for v in s)
    quantiles = statistics.quantiles(values, n=100)
    return {
        "phase": phase,
        "seconds": round(seconds, 1),
        "requests": len(values),
        "per_second": round(len(values) / seconds, 1),
        "p50_ms": round(quantiles[49], 1),
        "p95_ms": round(quantiles[94], 1),
        "p99_ms": round(quantiles[98], 1),
        "max_ms": round(values[-1], 1),
        **extra,
    }


def ingest(deployment: Deployment, files: list[Path], associations: int) -> dict[str, Any]:
    groups = [files[k::associations] for k in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                STORESCU,
                "-aet",
                "CLINIC_A_CT",
                "-aec",
                "RDC",
                "127.0.0.1",
                deployment.env["RDC_DICOM_PORT"],
                *map(str, group),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for group in groups
    ]
    for proc in procs:
        _, errors = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"storescu failed: {errors.decode()[-2000:]}")
    seconds = time.perf_counter() - started
    return {"instances": len(files), "instances_per_second": round(len(files) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=HERE.parent)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument(
        "--testdata",
        type=Path,
        default=Path(os.environ.get("RDC_TESTDATA", HERE.parent.parent / "shared" / "testdata")),
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="rdc-bench-audit-"))
    try:
        files = make_instances(
            args.testdata / "dicom" / "CT_small.dcm", workdir, args.instances, studies=20
        )
        deployment = Deployment(args.repo.resolve(), args.database, workdir)
        try:
            deployment.start()
            # Some exams to list: a first batch, not measured.
            ingest(deployment, files[:100], 1)
            token = deployment.token()
            results = [
                measure(
                    deployment,
                    token,
                    args.readers,
                    "idle",
                    lambda: time.sleep(args.seconds) or {},
                ),
                measure(
                    deployment,
                    token,
                    args.readers,
                    "ingest",
                    lambda: ingest(deployment, files[100:], args.associations),
                ),
            ]
        finally:
            deployment.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {"repo": str(args.repo), "database": args.database, "results": results}
    for row in results:
        print(
            f"{args.database:10} {row['phase']:6} {row['requests']:6} GETs "
            f"{row['per_second']:7.1f}/s  p50 {row['p50_ms']:7.1f}  p95 {row['p95_ms']:7.1f}  "
            f"p99 {row['p99_ms']:7.1f}  max {row['max_ms']:7.1f} ms"
            + (
                f"  ingest {row['instances_per_second']} inst/s"
                if "instances_per_second" in row
                else ""
            )
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
