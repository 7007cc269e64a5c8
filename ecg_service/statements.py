"""The ECG statement library (seed data in ``data/statements.yaml``) and its search."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml

__all__ = [
    "STATEMENT_CATEGORIES",
    "Statement",
    "get_statement",
    "search_statements",
    "statement_library",
]

STATEMENT_CATEGORIES: tuple[str, ...] = (
    "overall",
    "rhythm",
    "conduction",
    "axis_voltage",
    "hypertrophy",
    "ischaemia_infarction",
    "repolarisation",
    "modifier",
    "comparison",
)
Severity = Literal["normal", "minor", "major", "critical"]
_PATH = Path(__file__).with_name("data") / "statements.yaml"


@dataclass(frozen=True, slots=True)
class Statement:
    code: str
    zh: str
    en: str
    category: str
    severity: Severity
    maps_to_critical: bool


@lru_cache(maxsize=1)
def statement_library() -> tuple[Statement, ...]:
    """Every statement, in the file's order (validated: unique codes, known categories)."""
    raw = yaml.safe_load(_PATH.read_text("utf-8"))["statements"]
    out: list[Statement] = []
    seen: set[str] = set()
    for item in raw:
        st = Statement(
            code=str(item["code"]),
            zh=str(item["zh"]),
            en=str(item["en"]),
            category=str(item["category"]),
            severity=item["severity"],
            maps_to_critical=bool(item["maps_to_critical"]),
        )
        if st.code in seen:
            raise ValueError(f"statement code {st.code} appears twice")
        if st.category not in STATEMENT_CATEGORIES:
            raise ValueError(f"statement {st.code}: unknown category {st.category}")
        if st.severity not in ("normal", "minor", "major", "critical"):
            raise ValueError(f"statement {st.code}: unknown severity {st.severity}")
        seen.add(st.code)
        out.append(st)
    return tuple(out)


def get_statement(code: str) -> Statement | None:
    return next((s for s in statement_library() if s.code == code), None)


def search_statements(
    query: str = "", *, category: str | None = None, limit: int = 50
) -> list[Statement]:
    """Statements whose code, Chinese or English text contains ``query`` (case-insensitive),
    optionally in one category; code and prefix matches first."""
    q = query.strip().lower()
    hits: list[tuple[int, int, Statement]] = []
    for pos, st in enumerate(statement_library()):
        if category and st.category != category:
            continue
        if not q:
            hits.append((1, pos, st))
            continue
        fields = (st.code.lower(), st.zh.lower(), st.en.lower())
        if q == fields[0]:
            rank = 0
        elif any(f.startswith(q) for f in fields):
            rank = 1
        elif any(q in f for f in fields):
            rank = 2
        else:
            continue
        hits.append((rank, pos, st))
    hits.sort(key=lambda h: (h[0], h[1]))
    return [h[2] for h in hits[:limit]]
