"""Alembic environment: runs the product's migrations against the configured database."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

from alembic import context
from sqlalchemy.engine import Engine

from rdc_core.db import Base, get_engine

config = context.config
_MIGRATION_LOCK = 726_380  # pg_advisory_xact_lock key; worklist.audit uses 726_381
url = config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(
        url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """On SQLite, one migrating process at a time: alembic runs SQLite's DDL outside one
    transaction, so replicas starting together would race to alter the same tables."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def run_migrations_online() -> None:
    engine = get_engine(url)
    with _sqlite_file_lock(engine), engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=True
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Every replica migrates on start (rdc serve, worker, beat): one at a time,
                # so the others find the schema current instead of racing to create it.
                # Released when the migration transaction ends.
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
