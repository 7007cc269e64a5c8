"""Matching DICOM Person Names (PN) in the index, group by group.

A stored name is ``alphabetic=ideographic=phonetic`` (``Wang^Fang=王^芳=ワン^ファン``).
A query value without ``=`` is matched against each group in turn (so ``王*``, ``王^芳`` and
``wang^fang`` all find the name above); with ``=`` each non-empty query group is matched
against its own group (``=王*``: the ideographic group only). ``*`` and ``?`` are the DICOM
wildcards (PS3.4 C.2.2.2.4). The alphabetic group matches case-insensitively (the
"fuzzy" matching QIDO-RS ``fuzzymatching`` asks for); the other groups as written.

The groups are cut out of the stored name in SQL (``split_part`` on PostgreSQL, ``instr`` /
``substr`` elsewhere), so the match runs in the database, paging and counts included, and a
wildcard never spans two groups.
"""

from __future__ import annotations

from typing import Any, Final

from sqlalchemy import ColumnElement, String, and_, case, false, func, literal, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

__all__ = ["person_name_matches"]

_GROUPS: Final = 3
_MAX_QUERY_LENGTH: Final = 320  # 3 groups of 64 characters, with generous room for ^ and =


class _PnGroup(FunctionElement[str]):
    """Component group ``index`` (1-based) of a PN column; "" when the name has none."""

    type = String()
    name = "pn_group"
    # The group number is compiled into the SQL text, so statements are not cached.
    inherit_cache = False

    def __init__(self, column: Any, index: int) -> None:
        super().__init__(column)
        self.index = index


@compiles(_PnGroup, "postgresql")
def _pn_group_postgresql(element: _PnGroup, compiler: Any, **kw: Any) -> str:
    (column,) = list(element.clauses)
    return f"split_part({compiler.process(column, **kw)}, '=', {int(element.index)})"


def _first(expr: Any) -> Any:
    cut = func.instr(expr, "=")
    return case((cut > 0, func.substr(expr, 1, cut - 1)), else_=expr)


def _rest(expr: Any) -> Any:
    cut = func.instr(expr, "=")
    return case((cut > 0, func.substr(expr, cut + 1)), else_=literal(""))


@compiles(_PnGroup)
def _pn_group_default(element: _PnGroup, compiler: Any, **kw: Any) -> str:
    (column,) = list(element.clauses)
    expr: Any = column
    for _ in range(element.index - 1):
        expr = _rest(expr)
    return str(compiler.process(_first(expr), **kw))


def _group(column: Any, index: int) -> Any:
    return _PnGroup(column, index)


def _match(expr: Any, pattern: str, *, ignore_case: bool) -> ColumnElement[bool]:
    if ignore_case:
        expr, pattern = func.lower(expr), pattern.lower()
    if "*" not in pattern and "?" not in pattern:
        return expr == pattern
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return expr.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def _one_value(column: Any, value: str) -> ColumnElement[bool]:
    groups = value.split("=")
    if len(groups) > _GROUPS:
        return false()
    if len(groups) == 1:
        return or_(
            *(
                _match(_group(column, index), value, ignore_case=index == 1)
                for index in range(1, _GROUPS + 1)
            )
        )
    asked = [
        _match(_group(column, index), group, ignore_case=index == 1)
        for index, group in enumerate(groups, start=1)
        if group not in ("", "*")
    ]
    return and_(*asked) if asked else true()


def person_name_matches(column: Any, values: list[str]) -> ColumnElement[bool]:
    """A condition: the PN ``column`` matches any of ``values`` (each one query value as
    described in the module docstring). Values longer than a PN can be match nothing."""
    conditions = [
        _one_value(column, value.strip())
        for value in values
        if value.strip() and len(value) <= _MAX_QUERY_LENGTH
    ]
    return or_(*conditions) if conditions else false()
