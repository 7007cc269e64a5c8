"""Logging set-up shared by every process."""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr with timestamps; quiet the chatty DICOM library."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
