"""Matching of DICOM query values on the index's text columns (PS3.4 C.2.2.2), shared by
Query/Retrieve (C-FIND, dicom_gateway) and QIDO-RS (web): a single value, or a list of
values any of which may match; ``*`` (any run) and ``?`` (one character) are wildcards."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, func, or_

__all__ = ["match_values", "wildcard_like"]


def wildcard_like(column: Any, pattern: str, *, ignore_case: bool) -> ColumnElement[bool]:
    """``column`` LIKE the DICOM wildcard ``pattern``; SQL's own wildcards in the value are
    escaped."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    sql = escaped.replace("*", "%").replace("?", "_")
    if ignore_case:
        return func.lower(column).like(sql.lower(), escape="\\")
    result: ColumnElement[bool] = column.like(sql, escape="\\")
    return result


def match_values(column: Any, values: list[str], *, ignore_case: bool = False) -> Any:
    """``column`` matches any of ``values`` (each a single value or a wildcard pattern)."""
    clauses = []
    for value in values:
        if "*" in value or "?" in value:
            clauses.append(wildcard_like(column, value, ignore_case=ignore_case))
        elif ignore_case:
            clauses.append(func.lower(column) == value.lower())
        else:
            clauses.append(column == value)
    return or_(*clauses)
