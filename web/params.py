"""Query parameter types the routes share, bounded so that any value the client can send is
either accepted and safe to use, or refused with 422 before a route runs.

Why: an integer beyond 2^63 reached SQLite (which cannot bind it) and a time with an extreme
zone offset overflowed once converted to UTC; both answered 500. The bounds here are far
beyond any real value.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator, AwareDatetime

__all__ = ["MAX_OFFSET", "MAX_VERSION", "Offset", "UtcDateTime", "to_utc"]

MAX_OFFSET = 1_000_000_000
MAX_VERSION = 2**31 - 1


def to_utc(value: datetime) -> datetime:
    """``value`` (with a zone) in UTC; a time that falls outside the calendar in UTC (year 1
    with an eastern offset, year 9999 with a western one) is an invalid value, not a crash."""
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("the time is out of range once converted to UTC") from exc


Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")]
"""Paging offset."""

UtcDateTime = Annotated[AwareDatetime, AfterValidator(to_utc)]
"""A time that must carry a zone (``2026-01-01T08:00:00+08:00``), handed on in UTC."""
