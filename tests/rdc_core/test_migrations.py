"""The Alembic migrations create exactly the schema the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import worklist.audit
import worklist.tables  # registers every table
from rdc_core.db import Base, get_engine
from rdc_core.migrate import upgrade_database


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
