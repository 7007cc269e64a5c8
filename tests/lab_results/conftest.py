"""A lab deployment shared by a test module: ``rdc serve`` with CLINIC_A's HL7 sending
facilities registered (every facility of the shared HL7 test data) and CLINIC_B's."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy
import sqlalchemy.pool

from tests.helpers import RdcServer, Stack, free_port, rdc_cli, seed_alliance

# MSH-4 of the test data's messages, by namespace ID or (for two) universal ID; MSH-3 for
# the message whose MSH-4 is empty; GHHSFacility sends the ADT message.
CLINIC_A_FACILITIES = (
    "ELAB-3",
    "10D0876999",  # Avante at Ormond Beach^10D0876999^CLIA
    "00Z0000024",  # CAREEVOLUTION^00Z0000024^CLIA
    "CDC FTC",
    "TEST",
    "NIST Lab Facility",
    "CASECENTER FACILITY",
    "SomeSystem",
    "GHHSFacility",
)
CLINIC_B_FACILITY = "CLINIC_B_LIS"


@dataclass
class LabDeployment:
    server: RdcServer
    env: dict[str, str]
    passwords: dict[str, str]
    workdir: Path

    def client(self, username: str) -> httpx.Client:
        return self.server.client(username, self.passwords[username])


def postgres_database() -> Iterator[str | None]:
    """A fresh PostgreSQL database for a module's deployment on the production pass."""
    if os.environ.get("RDC_TEST_DATABASE", "sqlite") != "postgresql":
        yield None
        return
    admin_url = os.environ.get(
        "RDC_TEST_POSTGRES_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"
    )
    name = f"rdc_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(
        admin_url, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
    )
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL is required for this run and did not answer: {exc}")
    try:
        yield (
            sqlalchemy.engine.make_url(admin_url)
            .set(database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def lab_env(workdir: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDC_")}
    if database_url:
        env["RDC_DATABASE_URL"] = database_url
    env.update(
        RDC_DATA_DIR=str(workdir / "data"),
        RDC_HTTP_HOST="127.0.0.1",
        RDC_HTTP_PORT=str(free_port()),
        RDC_DICOM_HOST="127.0.0.1",
        RDC_DICOM_PORT=str(free_port()),
        RDC_MLLP_HOST="127.0.0.1",
        RDC_MLLP_PORT=str(free_port()),
        RDC_SECRET_KEY="test-secret-key-not-for-production-000000",
        RDC_PASSWORD_HASH_ROUNDS="4",
        # Auto-verified orders are signed under the seeded senior reader (the lab physician).
        RDC_LAB_AUTORELEASE_SIGNER="senior",
        RDC_LAB_PROCESS_SCAN_INTERVAL_SECONDS="5",
        # Push-backs to a clinic's HIS are retried within seconds (the ACK tests).
        RDC_DELIVERY_SCAN_INTERVAL_SECONDS="1",
        RDC_DELIVERY_MAX_BACKOFF_SECONDS="2",
    )
    return env


def register_facilities(env: dict[str, str]) -> None:
    """Through the CLI, on the clinics seed_alliance created (``--update``)."""
    args = [a for name in CLINIC_A_FACILITIES for a in ("--hl7-facility", name)]
    rdc_cli(env, "clinic", "add", "--code", "CLINIC_A", "--update", *args)
    rdc_cli(
        env, "clinic", "add", "--code", "CLINIC_B", "--update", "--hl7-facility", CLINIC_B_FACILITY
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, stack: Stack) -> Iterator[LabDeployment]:
    """One ``rdc serve`` for the module, clinics and facilities registered."""
    workdir = tmp_path_factory.mktemp("lab")
    database = postgres_database()
    try:
        env = lab_env(workdir, next(database))
        with stack.deployment() as backends:
            env.update(backends)
            passwords = seed_alliance(env)
            register_facilities(env)
            with RdcServer(env, workdir / "serve.log") as server:
                yield LabDeployment(server, env, passwords, workdir)
    finally:
        for _ in database:
            pass
