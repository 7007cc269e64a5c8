"""Query parameter types the routes share, bounded so that any value the client can send is
either accepted and safe to use, or refused with 422 before a route runs.

Why: an integer beyond 2^63 reached SQLite (which cannot bind it) and a time with an extreme
zone offset overflowed once converted to UTC; both answered 500. The bounds here are far
beyond any real value.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated

from fastapi import Query
from pydantic import AfterValidator, AwareDatetime

__all__ = [
    "MAX_OFFSET",
    "MAX_VERSION",
    "CalendarMonth",
    "LocalDay",
    "Offset",
    "UtcDateTime",
    "to_utc",
]

MAX_OFFSET = 1_000_000_000
MAX_VERSION = 2**31 - 1
# Local days and months (QC periods, monthly reports): a period, the one of the same length
# before it (for comparison) and the eleven months before a month must stay on the calendar
# in UTC, which the first and last years of the calendar do not.
_FIRST_DAY = date(1900, 1, 1)
_LAST_DAY = date(2999, 12, 31)


def to_utc(value: datetime) -> datetime:
    """``value`` (with a zone) in UTC; a time that falls outside the calendar in UTC (year 1
    with an eastern offset, year 9999 with a western one) is an invalid value, not a crash."""
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("the time is out of range once converted to UTC") from exc


def _calendar_day(value: date) -> date:
    if not _FIRST_DAY <= value <= _LAST_DAY:
        raise ValueError(f"the day must be between {_FIRST_DAY} and {_LAST_DAY}")
    return value


Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")]
"""Paging offset."""

UtcDateTime = Annotated[AwareDatetime, AfterValidator(to_utc)]
"""A time that must carry a zone (``2026-01-01T08:00:00+08:00``), handed on in UTC."""

LocalDay = Annotated[date, AfterValidator(_calendar_day)]
"""A day of the local calendar (QC periods), 1900-01-01 to 2999-12-31."""


def _calendar_month(value: str) -> str:
    match = re.fullmatch(r"(\d{4})-(\d{2})", value)
    if not match or not (
        _FIRST_DAY.year <= int(match[1]) <= _LAST_DAY.year and 1 <= int(match[2]) <= 12
    ):
        raise ValueError(f"the month must be YYYY-MM, {_FIRST_DAY.year} to {_LAST_DAY.year}")
    return value


CalendarMonth = Annotated[str, AfterValidator(_calendar_month)]
"""A month, ``YYYY-MM``, 1900-01 to 2999-12."""
