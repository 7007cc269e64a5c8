"""Auto-verification (自动审核) of one lab order: WS/T 616-2018, CLSI AUTO15 in spirit.

Each result runs through the rules of a versioned rule set (data:
``lab_results/data/autoverification_rules.yaml``, critical limits in
``critical_limits.yaml``) and gets a trace, one line per rule::

    {"rule_id": "delta_check", "version": "autoverify-2026.1", "verdict": "hold",
     "reason": "change +35.0 % since 2026-02-20 exceeds RCV 13.9 %"}

Rules, in order: result status (OBX-11 must be final or corrected), mapping (unmapped codes
wait in the mapping queue), rules configured for the analyte, missing / non-numeric value,
unit, instrument and sender flags (OBX-8), specimen quality (SPM-24 condition, HIL indices),
reportable range, critical limits (and OBX-8 LL/HH/AA, and positive blood cultures),
reference range (or the wider auto-verification release limits), delta check against the
prior result (RCV = √2·Z·√(CVa²+CVi²), percent, absolute, or change per day, within a
look-back window), and logic checks across analytes of the order (LDL-C + HDL-C ≤ TC…).

The order is released only if every result passed every rule and the stop switch is off;
a critical result is never released automatically, and each critical finding names its
analyte, value, unit, limit and direction for the critical-value loop. Pure: the caller
looks up the priors and passes them in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from lab_results.mapping import Mapped, MappedOrder, MappedResult, units_match

__all__ = [
    "AUTOVERIFIED_MARK",
    "AutoverificationResult",
    "CriticalFinding",
    "CriticalLimits",
    "PriorResult",
    "ResultVerdict",
    "RuleOutcome",
    "RuleSet",
    "autoverify",
    "load_critical_limits",
    "load_rules",
    "reference_change_value",
]

#: The mark a released report carries (signed under the responsible lab physician).
AUTOVERIFIED_MARK = "自动审核"

Verdict = Literal["pass", "hold", "critical"]
_RANK = {"pass": 0, "hold": 1, "critical": 2}
_LIMIT = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*([+-]?\d+(?:\.\d+)?)\s*$")


# --- rule set --------------------------------------------------------------------------


class Limit(BaseModel):
    op: Literal["<", "<=", ">", ">="]
    value: float

    @classmethod
    def parse(cls, text: str) -> Limit:
        m = _LIMIT.match(str(text))
        if m is None:
            raise ValueError(f"limit {text!r} is not like '<= 2.8' or '> 30'")
        op = {"≤": "<=", "≥": ">="}.get(m.group(1), m.group(1))
        return cls(op=op, value=float(m.group(2)))  # type: ignore[arg-type]

    def hit(self, value: float) -> bool:
        return {
            "<": value < self.value,
            "<=": value <= self.value,
            ">": value > self.value,
            ">=": value >= self.value,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


class NumericCritical(BaseModel):
    unit: str
    low: Limit | None = None
    high: Limit | None = None

    @model_validator(mode="before")
    @classmethod
    def _limits(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("low", "high"):
                if isinstance(data.get(key), str | int | float):
                    data[key] = Limit.parse(str(data[key]))
        return data


class QualitativeCritical(BaseModel):
    label: str
    positive_codes: list[str] = Field(default_factory=list)
    positive_text: list[str] = Field(default_factory=list)
    negative_codes: list[str] = Field(default_factory=list)
    negative_text: list[str] = Field(default_factory=list)
    organism_is_positive: bool = False


class CriticalLimits(BaseModel):
    version: str
    source: str = ""
    flags: list[str] = Field(default_factory=lambda: ["LL", "HH"])
    limits: dict[str, NumericCritical] = Field(default_factory=dict)
    qualitative: dict[str, QualitativeCritical] = Field(default_factory=dict)


class DeltaRule(BaseModel):
    method: Literal["rcv", "percent", "absolute", "rate"]
    limit: float | None = None  # percent, absolute units, or units per day
    cva: float | None = None  # analytical CV, %
    cvi: float | None = None  # within-subject biological CV, %
    z: float | None = None
    lookback_days: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> DeltaRule:
        if self.method == "rcv" and (self.cva is None or self.cvi is None):
            raise ValueError("an rcv delta check needs cva and cvi")
        if self.method != "rcv" and self.limit is None:
            raise ValueError(f"a {self.method} delta check needs a limit")
        return self


class HilThresholds(BaseModel):
    hemolysis: float | None = None
    icterus: float | None = None
    lipemia: float | None = None


class AnalyteRules(BaseModel):
    reportable_range: tuple[float, float] | None = None
    reference_range: tuple[float, float] | None = None
    by_sex: dict[str, tuple[float, float]] = Field(default_factory=dict)
    release_range: tuple[float, float] | None = None
    delta: DeltaRule | None = None
    hil: HilThresholds = Field(default_factory=HilThresholds)
    allow_censored_below: bool = False


class LogicRule(BaseModel):
    id: str
    description: str
    left: list[str]
    le: list[str] | None = None
    between: tuple[float, float] | None = None
    tolerance: float = 0.0

    @model_validator(mode="after")
    def _one_kind(self) -> LogicRule:
        if (self.le is None) == (self.between is None):
            raise ValueError(f"logic rule {self.id}: give exactly one of 'le' and 'between'")
        return self

    @property
    def analytes(self) -> list[str]:
        return [*self.left, *(self.le or [])]


class RuleSet(BaseModel):
    version: str
    name: str = ""
    release_statuses: list[str] = Field(default_factory=lambda: ["F", "C"])
    accepted_flags: list[str] = Field(default_factory=lambda: ["N", "L", "H", "LL", "HH", ""])
    specimen_conditions: dict[str, str | list[str]] = Field(default_factory=dict)
    qualitative_normal: list[str] = Field(default_factory=list)
    delta_defaults: dict[str, float] = Field(default_factory=dict)
    analytes: dict[str, AnalyteRules] = Field(default_factory=dict)
    logic: list[LogicRule] = Field(default_factory=list)
    critical: CriticalLimits

    @model_validator(mode="before")
    @classmethod
    def _none_is_empty(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("analytes"), dict):
            data = dict(data)
            data["analytes"] = {k: (v or {}) for k, v in data["analytes"].items()}
        return data


def _load_yaml(path: Path | None, name: str) -> dict[str, Any]:
    if path is None:
        text = resources.files("lab_results").joinpath("data", name).read_text("utf-8")
    else:
        text = path.read_text("utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path or name}: not a mapping")
    return data


def load_critical_limits(path: Path | None = None) -> CriticalLimits:
    """The shipped critical-value table, or the alliance's own YAML at ``path``."""
    return CriticalLimits.model_validate(_load_yaml(path, "critical_limits.yaml"))


@lru_cache(maxsize=1)
def _shipped_rules() -> RuleSet:
    data = _load_yaml(None, "autoverification_rules.yaml")
    return RuleSet.model_validate({**data, "critical": load_critical_limits()})


def load_rules(path: Path | None = None, *, critical_limits: Path | None = None) -> RuleSet:
    """The shipped rule set (with the shipped critical limits), or the YAML files given."""
    if path is None and critical_limits is None:
        return _shipped_rules()
    data = _load_yaml(path, "autoverification_rules.yaml")
    return RuleSet.model_validate({**data, "critical": load_critical_limits(critical_limits)})


# --- inputs and outputs ----------------------------------------------------------------


class PriorResult(BaseModel):
    """An earlier result of the same person, looked up by the caller."""

    analyte: str
    value: float
    unit: str
    observed_at: datetime


class RuleOutcome(BaseModel):
    rule_id: str
    version: str
    verdict: Verdict
    reason: str


class CriticalFinding(BaseModel):
    analyte: str
    name_zh: str = ""
    code: str
    value: str
    numeric: float | None = None
    unit: str
    limit: str  # "<= 2.8", "flag HH", "positive blood culture"
    direction: Literal["low", "high", "abnormal"]


class ResultVerdict(BaseModel):
    set_id: str
    code: str
    analyte: str | None
    verdict: Verdict
    trace: list[RuleOutcome]


class AutoverificationResult(BaseModel):
    verdict: Literal["release", "hold"]
    rules_version: str
    critical_version: str
    results: list[ResultVerdict]
    critical_findings: list[CriticalFinding]
    order_trace: list[RuleOutcome]
    mark: str | None = None  # 自动审核 when released

    @property
    def hold_reasons(self) -> list[str]:
        reasons = [o.reason for o in self.order_trace if o.verdict != "pass"]
        for r in self.results:
            reasons += [f"{r.code}: {o.reason}" for o in r.trace if o.verdict != "pass"]
        return reasons


# --- formulas ----------------------------------------------------------------------------


def reference_change_value(cva: float, cvi: float, z: float = 1.96) -> float:
    """RCV in % = √2 · Z · √(CVa² + CVi²) (Fraser), CVs in %."""
    return math.sqrt(2) * z * math.sqrt(cva**2 + cvi**2)


# --- the rules ---------------------------------------------------------------------------


class _Ctx:
    def __init__(self, rules: RuleSet, result: MappedResult, sex: str) -> None:
        self.rules = rules
        self.result = result
        self.obs = result.observation
        self.sex = sex.upper()[:1]
        self.trace: list[RuleOutcome] = []
        self.findings: list[CriticalFinding] = []

    def add(self, rule_id: str, verdict: Verdict, reason: str, *, critical: bool = False) -> None:
        version = self.rules.critical.version if critical else self.rules.version
        self.trace.append(
            RuleOutcome(rule_id=rule_id, version=version, verdict=verdict, reason=reason)
        )

    @property
    def verdict(self) -> Verdict:
        return max((o.verdict for o in self.trace), key=_RANK.__getitem__, default="pass")


def _finding(
    ctx: _Ctx, entry_analyte: str, limit: str, direction: Literal["low", "high", "abnormal"]
) -> CriticalFinding:
    mapping = ctx.result.mapping
    return CriticalFinding(
        analyte=entry_analyte,
        name_zh=mapping.entry.name_zh if isinstance(mapping, Mapped) else "",
        code=ctx.obs.code.identifier,
        value=ctx.obs.value,
        numeric=ctx.obs.numeric,
        unit=ctx.obs.unit,
        limit=limit,
        direction=direction,
    )


def _check_flags_critical(ctx: _Ctx, analyte: str) -> None:
    critical_flags = {f.upper() for f in ctx.rules.critical.flags}
    for flag in ctx.obs.flags:
        if flag.upper() in critical_flags:
            direction: Literal["low", "high", "abnormal"] = (
                "low" if flag.upper() == "LL" else "high" if flag.upper() == "HH" else "abnormal"
            )
            ctx.add("critical_flag", "critical", f"sender flagged {flag} (OBX-8)", critical=True)
            ctx.findings.append(_finding(ctx, analyte, f"flag {flag}", direction))


def _verify_result(
    ctx: _Ctx,
    order_hil: Mapping[str, float | None],
    conditions: Sequence[str],
    priors: Sequence[PriorResult],
    result_time: datetime | None,
) -> None:
    rules, obs = ctx.rules, ctx.obs
    mapping = ctx.result.mapping
    analyte = mapping.entry.analyte if isinstance(mapping, Mapped) else obs.code.identifier
    # OBX-8 LL/HH count whatever else is known about the result
    _check_flags_critical(ctx, analyte)

    if obs.status in rules.release_statuses:
        ctx.add("result_status", "pass", f"OBX-11 {obs.status}")
    else:
        ctx.add("result_status", "hold", f"OBX-11 {obs.status or 'empty'} is not final")

    if not isinstance(mapping, Mapped):
        ctx.add("mapping", "hold", f"{mapping.reason}: waiting in the mapping queue")
        return
    entry = mapping.entry
    ctx.add("mapping", "pass", f"{entry.analyte} LOINC {entry.loinc} ({mapping.via})")

    analyte_rules = rules.analytes.get(entry.analyte)
    if obs.status == "X" or not obs.value.strip():
        ctx.add("missing_value", "hold", "no result value")
        return
    ctx.add("missing_value", "pass", "value present")

    if entry.kind == "qualitative":
        # critical values first: they count whether or not the analyte has rules
        if entry.analyte in rules.critical.qualitative:
            _qualitative_critical(ctx, entry.analyte)
        if analyte_rules is None:
            ctx.add("rules_configured", "hold", f"no auto-verification rules for {entry.analyte}")
            return
        _specimen_quality(ctx, entry.analyte, analyte_rules, order_hil, conditions)
        if entry.analyte not in rules.critical.qualitative:
            _qualitative(ctx)
        return

    value = obs.numeric
    if value is None:
        ctx.add("non_numeric", "hold", f"value {obs.value!r} is not a number")
        return
    ctx.add("non_numeric", "pass", "numeric value")
    if mapping.unit_ok:
        ctx.add("unit", "pass", f"unit {entry.unit}")
        _numeric_critical(ctx, entry.analyte, value)
    else:
        ctx.add("unit", "hold", f"unit {obs.unit or 'empty'} is not the catalogue's {entry.unit}")
    if analyte_rules is None:
        ctx.add("rules_configured", "hold", f"no auto-verification rules for {entry.analyte}")
        return

    accepted = {a.upper() for a in rules.accepted_flags} | {c.upper() for c in rules.critical.flags}
    bad_flags = [f for f in obs.flags if f.upper() not in accepted]
    if bad_flags:
        ctx.add("instrument_flags", "hold", f"flag {', '.join(bad_flags)} (OBX-8)")
    elif obs.comparator and not (
        obs.comparator.startswith("<") and analyte_rules.allow_censored_below
    ):
        ctx.add("instrument_flags", "hold", f"censored value {obs.value} (outside measuring range)")
    else:
        ctx.add("instrument_flags", "pass", "no instrument flags")

    _specimen_quality(ctx, entry.analyte, analyte_rules, order_hil, conditions)
    if not mapping.unit_ok:
        return  # a number in another unit is not compared with this unit's ranges

    if analyte_rules.reportable_range is not None:
        low, high = analyte_rules.reportable_range
        if low <= value <= high:
            ctx.add("reportable_range", "pass", f"{value:g} within [{low:g}, {high:g}]")
        else:
            ctx.add(
                "reportable_range",
                "hold",
                f"{value:g} outside the reportable range [{low:g}, {high:g}]: dilute or repeat",
            )

    _reference_range(ctx, analyte_rules, value)
    if analyte_rules.delta is not None:
        _delta(ctx, entry.analyte, entry.unit, analyte_rules.delta, value, priors, result_time)


def _numeric_critical(ctx: _Ctx, analyte: str, value: float) -> None:
    limits = ctx.rules.critical.limits.get(analyte)
    if limits is None:
        ctx.add("critical_limits", "pass", f"no critical limits for {analyte}", critical=True)
        return
    if not units_match(limits.unit, ctx.obs.unit):
        ctx.add(
            "critical_limits",
            "hold",
            f"critical limits are in {limits.unit}, the result in {ctx.obs.unit}: not compared",
            critical=True,
        )
        return
    for limit, direction in ((limits.low, "low"), (limits.high, "high")):
        if limit is not None and limit.hit(value):
            ctx.add(
                "critical_limits",
                "critical",
                f"{value:g} {ctx.obs.unit} is critical ({direction}: {limit} {limits.unit})",
                critical=True,
            )
            ctx.findings.append(_finding(ctx, analyte, str(limit), direction))  # type: ignore[arg-type]
            return
    shown = ", ".join(str(x) for x in (limits.low, limits.high) if x is not None)
    ctx.add("critical_limits", "pass", f"{value:g} not critical ({shown})", critical=True)


def _qualitative_critical(ctx: _Ctx, analyte: str) -> None:
    """Positive blood culture and the like: critical; a known negative passes; else held."""
    spec = ctx.rules.critical.qualitative[analyte]
    coded = ctx.obs.value_coded
    codes = {c.upper() for _, c in coded.pairs()} if coded else set()
    text = " ".join([ctx.obs.value, coded.display if coded else ""]).lower()
    negative = codes & {c.upper() for c in spec.negative_codes} or any(
        t.lower() in text for t in spec.negative_text
    )
    positive = codes & {c.upper() for c in spec.positive_codes} or (
        not negative and any(t.lower() in text for t in spec.positive_text)
    )
    if not positive and not negative and spec.organism_is_positive and codes:
        positive = True
    if positive:
        ctx.add("critical_qualitative", "critical", f"{spec.label}: {ctx.obs.value}", critical=True)
        ctx.findings.append(_finding(ctx, analyte, spec.label, "abnormal"))
    elif negative:
        ctx.add("critical_qualitative", "pass", f"negative ({ctx.obs.value})", critical=True)
    else:
        ctx.add(
            "critical_qualitative",
            "hold",
            f"result {ctx.obs.value!r} not recognised",
            critical=True,
        )


def _qualitative(ctx: _Ctx) -> None:
    coded = ctx.obs.value_coded
    candidates = {ctx.obs.value.strip().lower()}
    if coded is not None:
        candidates |= {c.lower() for _, c in coded.pairs()} | {coded.display.lower()}
    normal = {n.lower() for n in ctx.rules.qualitative_normal}
    if candidates & normal:
        ctx.add("qualitative_value", "pass", f"normal ({ctx.obs.value})")
    else:
        ctx.add("qualitative_value", "hold", f"not a normal result ({ctx.obs.value})")


def _specimen_quality(
    ctx: _Ctx,
    analyte: str,
    analyte_rules: AnalyteRules,
    order_hil: Mapping[str, float | None],
    conditions: Sequence[str],
) -> None:
    problems = []
    for code in conditions:
        applies = ctx.rules.specimen_conditions.get(code.upper())
        if applies == "*" or (isinstance(applies, list) and analyte in applies):
            problems.append(f"specimen condition {code} (SPM-24)")
    for name, threshold in analyte_rules.hil.model_dump().items():
        index = order_hil.get(name)
        if threshold is not None and index is not None and index > threshold:
            problems.append(f"{name} index {index:g} > {threshold:g}")
    if problems:
        ctx.add("specimen_quality", "hold", "; ".join(problems))
    else:
        ctx.add("specimen_quality", "pass", "specimen acceptable")


def _reference_range(ctx: _Ctx, analyte_rules: AnalyteRules, value: float) -> None:
    ref = analyte_rules.by_sex.get(ctx.sex) or analyte_rules.reference_range
    source = "rule set"
    if ref is None and (ctx.obs.reference_low is not None or ctx.obs.reference_high is not None):
        low = ctx.obs.reference_low if ctx.obs.reference_low is not None else -math.inf
        high = ctx.obs.reference_high if ctx.obs.reference_high is not None else math.inf
        ref, source = (low, high), "OBX-7"
    if ref is None:
        ctx.add("reference_range", "hold", "no reference range configured or sent")
        return
    low, high = ref
    if low <= value <= high:
        ctx.add("reference_range", "pass", f"{value:g} within [{low:g}, {high:g}] ({source})")
        return
    release = analyte_rules.release_range
    if release is not None and release[0] <= value <= release[1]:
        ctx.add(
            "reference_range",
            "pass",
            f"{value:g} outside [{low:g}, {high:g}] but within the release limits "
            f"[{release[0]:g}, {release[1]:g}]",
        )
        return
    ctx.add("reference_range", "hold", f"{value:g} outside [{low:g}, {high:g}] ({source})")


def _delta(
    ctx: _Ctx,
    analyte: str,
    unit: str,
    rule: DeltaRule,
    value: float,
    priors: Sequence[PriorResult],
    result_time: datetime | None,
) -> None:
    defaults = ctx.rules.delta_defaults
    lookback = rule.lookback_days or defaults.get("lookback_days", 30.0)
    candidates = [p for p in priors if p.analyte == analyte]
    if not candidates:
        ctx.add("delta_check", "pass", "no prior result")
        return
    if result_time is None:
        ctx.add("delta_check", "hold", "result has no time: the look-back window cannot be placed")
        return
    window = [
        p
        for p in candidates
        if result_time - timedelta(days=lookback) <= p.observed_at < result_time
    ]
    if not window:
        ctx.add("delta_check", "pass", f"no prior result within {lookback:g} days")
        return
    prior = max(window, key=lambda p: p.observed_at)
    if not units_match(prior.unit, unit):
        ctx.add("delta_check", "hold", f"prior result is in {prior.unit}, not {unit}")
        return
    change = value - prior.value
    when = prior.observed_at.date().isoformat()
    if rule.method in ("rcv", "percent"):
        if rule.method == "rcv":
            assert rule.cva is not None and rule.cvi is not None
            threshold = reference_change_value(
                rule.cva, rule.cvi, rule.z or defaults.get("z", 1.96)
            )
            label = "RCV"
        else:
            assert rule.limit is not None
            threshold, label = rule.limit, "limit"
        if prior.value == 0:
            exceeded, shown = change != 0, f"from 0 to {value:g}"
        else:
            percent = change / abs(prior.value) * 100
            exceeded, shown = abs(percent) > threshold, f"change {percent:+.1f} %"
        detail = f"{shown} since {when} (prior {prior.value:g}) vs {label} {threshold:.1f} %"
    elif rule.method == "absolute":
        assert rule.limit is not None
        exceeded = abs(change) > rule.limit
        detail = f"change {change:+g} {unit} since {when} vs limit {rule.limit:g}"
    else:
        assert rule.limit is not None
        days = max((result_time - prior.observed_at).total_seconds() / 86400, 1 / 24)
        rate = change / days
        exceeded = abs(rate) > rule.limit
        detail = f"change {rate:+.2f} {unit}/day since {when} vs limit {rule.limit:g}"
    ctx.add(
        "delta_check", "hold" if exceeded else "pass", ("exceeds: " if exceeded else "") + detail
    )


def _logic(rules: RuleSet, contexts: Sequence[_Ctx]) -> None:
    by_analyte: dict[str, _Ctx] = {}
    for ctx in contexts:
        mapping = ctx.result.mapping
        if isinstance(mapping, Mapped) and ctx.obs.numeric is not None and mapping.unit_ok:
            by_analyte.setdefault(mapping.entry.analyte, ctx)
    for rule in rules.logic:
        if not all(a in by_analyte for a in rule.analytes):
            continue
        involved = [by_analyte[a] for a in rule.analytes]
        left = sum(by_analyte[a].obs.numeric or 0.0 for a in rule.left)
        if rule.le is not None:
            right = sum(by_analyte[a].obs.numeric or 0.0 for a in rule.le)
            ok = left <= right + rule.tolerance
            detail = f"{' + '.join(rule.left)} = {left:g}, {' + '.join(rule.le)} = {right:g}"
        else:
            assert rule.between is not None
            low, high = rule.between
            ok = low <= left <= high
            detail = f"{' + '.join(rule.left)} = {left:g}, expected {low:g}–{high:g}"
        for ctx in involved:
            ctx.add(
                f"logic:{rule.id}",
                "pass" if ok else "hold",
                f"{rule.description}: {detail}" + ("" if ok else " (violated)"),
            )


def autoverify(
    order: MappedOrder,
    priors: Sequence[PriorResult],
    rules: RuleSet,
    stop_switch: bool = False,
    *,
    sex: str = "",
) -> AutoverificationResult:
    """Run the rule set over every result of ``order``. ``priors`` are the same person's
    earlier results (any analytes, any age: the look-back window is applied here). ``sex``
    (PID-8) selects sex-specific reference ranges. With ``stop_switch`` on nothing is
    released, but every rule still runs and critical findings are still reported."""
    o = order.order
    conditions = [c.identifier for s in o.specimens for c in s.condition]
    hil = o.hil.model_dump()
    contexts: list[_Ctx] = []
    for result in order.results:
        ctx = _Ctx(rules, result, sex)
        result_time = result.observation.observed_at or o.collected_at
        _verify_result(ctx, hil, conditions, priors, result_time)
        contexts.append(ctx)
    _logic(rules, contexts)

    order_trace: list[RuleOutcome] = []
    if not contexts:
        order_trace.append(
            RuleOutcome(
                rule_id="results_present",
                version=rules.version,
                verdict="hold",
                reason="the order has no results",
            )
        )
    if stop_switch:
        order_trace.append(
            RuleOutcome(
                rule_id="stop_switch",
                version=rules.version,
                verdict="hold",
                reason="auto-release is stopped (stop switch on)",
            )
        )
    else:
        order_trace.append(
            RuleOutcome(
                rule_id="stop_switch",
                version=rules.version,
                verdict="pass",
                reason="auto-release on",
            )
        )
    results = [
        ResultVerdict(
            set_id=c.obs.set_id,
            code=c.obs.code.identifier,
            analyte=c.result.analyte,
            verdict=c.verdict,
            trace=c.trace,
        )
        for c in contexts
    ]
    findings = [f for c in contexts for f in c.findings]
    released = all(r.verdict == "pass" for r in results) and all(
        t.verdict == "pass" for t in order_trace
    )
    return AutoverificationResult(
        verdict="release" if released else "hold",
        rules_version=rules.version,
        critical_version=rules.critical.version,
        results=results,
        critical_findings=findings,
        order_trace=order_trace,
        mark=AUTOVERIFIED_MARK if released else None,
    )
