"""Alembic environment: runs the product's migrations against the configured database."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

from alembic import context
from sqlalchemy.engine import Connection, Engine

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


@contextlib.contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """On SQLite, foreign keys off while migrating. A batch migration re-creates a table
    (copy, DROP, rename), and with foreign keys on, dropping a parent table deletes its
    children's rows through their ON DELETE CASCADE. The pragma works only outside a
    transaction, so it is set on the driver connection before the migration begins; the
    migration checks the keys itself (see run_migrations_online)."""
    if connection.dialect.name != "sqlite":
        yield
        return
    driver = connection.connection.dbapi_connection
    assert driver is not None
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        # Not handed back to the pool: switching the keys on again is a no-op while a
        # transaction is open on it, and a process that migrates at start (rdc serve) would
        # then run on a connection without foreign keys. A new connection gets them.
        connection.invalidate()


def run_migrations_online() -> None:
    engine = get_engine(url)
    with (
        _sqlite_file_lock(engine),
        engine.connect() as connection,
        _sqlite_foreign_keys_off(connection),
    ):
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
            if connection.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:  # rolls the migration back
                    raise RuntimeError(f"migration broke foreign keys: {broken[:10]}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
