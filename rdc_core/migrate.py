"""Schema migrations (Alembic) run from code: ``rdc db upgrade`` and ``rdc serve`` call these."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from rdc_core.settings import get_settings

__all__ = ["alembic_config", "upgrade_database"]

_SCRIPTS = Path(__file__).with_name("migrations")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the product's migration scripts and ``url``."""
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.set_main_option("sqlalchemy.url", url or get_settings().resolved_database_url)
    return config


def upgrade_database(url: str | None = None, revision: str = "head") -> None:
    """Bring the database schema up to ``revision`` (idempotent)."""
    command.upgrade(alembic_config(url), revision)
