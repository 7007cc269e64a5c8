"""The Alembic migrations create exactly the schema the models describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import dicom_gateway.models  # noqa: F401  (the DICOM intake's tables)
import ecg_service.models  # noqa: F401  (the ECG intake's table)
import lab_results.models  # noqa: F401  (the lab intake's tables)
import worklist.audit
import worklist.tables  # registers every table
from rdc_core.db import Base, get_engine
from rdc_core.migrate import alembic_config, upgrade_database


def test_migrated_schema_matches_models(database: str) -> None:
    upgrade_database()  # a second run is a no-op
    with get_engine(database).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], diff
    assert worklist.audit.AuditEvent.__tablename__ in Base.metadata.tables


def test_shipped_sla_defaults(database: str) -> None:
    with get_engine(database).connect() as connection:
        rows = dict(
            ((d, p), m)
            for d, p, m in connection.exec_driver_sql(
                "SELECT discipline, priority, minutes FROM sla_targets"
            )
        )
    assert rows[("imaging", "emergency")] == 30
    assert rows[("imaging", "routine")] == 24 * 60
    assert rows[("ecg", "emergency")] == 15
    assert rows[("lab", "routine")] == 240


def test_replicas_starting_together_migrate_the_database_once(
    database_url: str | None, tmp_path: Path
) -> None:
    """rdc serve, worker and beat each migrate on start; on a fresh database they may all
    start at once (compose, Kubernetes, the test harness)."""
    from alembic.script import ScriptDirectory

    url = database_url or f"sqlite:///{tmp_path / 'rdc.db'}"
    upgrade = (
        "import sys; from rdc_core.migrate import upgrade_database; upgrade_database(sys.argv[1])"
    )
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", upgrade, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    for replica in replicas:
        _, errors = replica.communicate(timeout=180)
        assert replica.returncode == 0, errors.decode()[-3000:]
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = get_engine(url)
    with engine.connect() as connection:
        versions = [
            v for (v,) in connection.exec_driver_sql("SELECT version_num FROM alembic_version")
        ]
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert versions == [head]
    assert diff == [], diff


def test_connections_after_migrating_enforce_foreign_keys(tmp_path: Path) -> None:
    """SQLite migrates with foreign keys off; the process that migrated (rdc serve does at
    start) must not go on with a pooled connection that still has them off."""
    url = f"sqlite:///{tmp_path / 'rdc.db'}"
    upgrade_database(url)
    engine = get_engine(url)
    try:
        for _ in range(3):  # the pool hands out the connection the migration used first
            with engine.connect() as connection:
                enforced = connection.execution_options(rdc_readonly=True).exec_driver_sql(
                    "PRAGMA foreign_keys"
                )
                assert enforced.scalar() == 1
    finally:
        engine.dispose()
