"""Machine pre-screen (triage) of an ECG against a configurable rule table.

The rules only decide which ECGs a reader sees first and why; they never sign, release or
notify anything. The default table (``data/prescreen_rules.yaml``) is seeded from the 2017
Chinese expert consensus on ECG critical values."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ecg_service.analysis import MEASUREMENT_KEYS, EcgAnalysis

__all__ = [
    "DEFAULT_RULES_PATH",
    "PrescreenMatch",
    "PrescreenRule",
    "RuleTable",
    "load_rules",
    "prescreen",
]

DEFAULT_RULES_PATH = Path(__file__).with_name("data") / "prescreen_rules.yaml"
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_SHOW = {"<=": "≤", ">=": "≥", "==": "=", "!=": "≠", "<": "<", ">": ">"}
_RHYTHM_FIELDS = {
    "mean_rate_bpm",
    "mean_rr_ms",
    "min_rr_ms",
    "max_rr_ms",
    "rr_cv",
    "irregular",
    "beat_count",
}
Tier = Literal["critical", "major-positive"]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    field: str
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: float | bool

    @field_validator("field")
    @classmethod
    def _known(cls, v: str) -> str:
        scope, _, key = v.partition(".")
        if (scope == "measurements" and key in MEASUREMENT_KEYS) or (
            scope == "rhythm" and key in _RHYTHM_FIELDS
        ):
            return v
        raise ValueError(f"unknown field {v!r}")


class PrescreenRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    code: str
    label_zh: str
    label_en: str
    tier: Tier
    all: tuple[Condition, ...] = Field(min_length=1)


class RuleTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = 1
    source: str = ""
    rules: tuple[PrescreenRule, ...]

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: tuple[PrescreenRule, ...]) -> tuple[PrescreenRule, ...]:
        codes = [r.code for r in v]
        if len(set(codes)) != len(codes):
            raise ValueError("rule codes must be unique")
        return v


@dataclass(frozen=True, slots=True)
class PrescreenMatch:
    code: str
    label_zh: str
    label_en: str
    tier: Tier
    reasons: tuple[str, ...]


def load_rules(source: str | Path | dict[str, Any] | None = None) -> RuleTable:
    """The rule table from a YAML/JSON file or an already-parsed mapping (``None``: the
    shipped default). Raises ``ValueError`` naming what is wrong in the table."""
    if source is None:
        return _default_rules()
    data = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text("utf-8"))
    try:
        return RuleTable.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"ECG pre-screen rule table is invalid: {exc}") from exc


@lru_cache(maxsize=1)
def _default_rules() -> RuleTable:
    return RuleTable.model_validate(yaml.safe_load(DEFAULT_RULES_PATH.read_text("utf-8")))


def _lookup(analysis: EcgAnalysis, field: str) -> Any:
    scope, _, key = field.partition(".")
    if scope == "measurements":
        return analysis.measurements.get(key)
    return getattr(analysis.rhythm, key, None)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def prescreen(analysis: EcgAnalysis, rules: RuleTable | None = None) -> list[PrescreenMatch]:
    """The rules the analysis matches, critical first, each with the values that matched."""
    table = rules or _default_rules()
    matches: list[PrescreenMatch] = []
    for rule in table.rules:
        reasons: list[str] = []
        for cond in rule.all:
            actual = _lookup(analysis, cond.field)
            if actual is None:
                break
            if isinstance(cond.value, bool) != isinstance(actual, bool):
                break
            if not _OPS[cond.op](actual, cond.value):
                break
            reasons.append(f"{cond.field} = {_show(actual)} {_SHOW[cond.op]} {_show(cond.value)}")
        else:
            matches.append(
                PrescreenMatch(
                    code=rule.code,
                    label_zh=rule.label_zh,
                    label_en=rule.label_en,
                    tier=rule.tier,
                    reasons=tuple(reasons),
                )
            )
    matches.sort(key=lambda m: 0 if m.tier == "critical" else 1)
    return matches
