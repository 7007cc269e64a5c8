"""Alembic environment: runs the product's migrations against the configured database."""

from __future__ import annotations

from alembic import context

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


def run_migrations_online() -> None:
    engine = get_engine(url)
    with engine.connect() as connection:
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
