"""What the QC service returns: indicators with their breakdowns, case lists, histograms,
targets."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

__all__ = [
    "CaseOut",
    "CasePage",
    "GroupOut",
    "HistogramOut",
    "IndicatorOut",
    "IndicatorsOut",
    "TargetIn",
    "TargetOut",
]


class GroupOut(BaseModel):
    """One row of a breakdown (``key``: the clinic, month, reader, ... of the group)."""

    key: str | None
    numerator: int
    denominator: int | None
    rate: float | None
    value: float | None
    p50: float | None = None
    p90: float | None = None
    status: str


class IndicatorOut(BaseModel):
    """One indicator over the period. ``value`` is what a card shows: the rate (%) of a
    rate, the P90 (minutes) of a turnaround, the number of a count. ``status``: met,
    warning, not_met, no_target (no target set) or no_data (nothing to measure: never 0)."""

    code: str
    family: str
    name_zh: str
    name_en: str
    source: str
    kind: str
    unit: str
    direction: str
    numerator: int | None
    denominator: int | None
    rate: float | None
    value: float | None
    p50: float | None = None
    p90: float | None = None
    target: float | None
    warn_margin: float
    status: str
    previous_value: float | None = None
    change: float | None = None
    numerator_label_zh: str = ""
    numerator_label_en: str = ""
    denominator_label_zh: str = ""
    denominator_label_en: str = ""
    note: str | None = None
    groups: list[GroupOut] | None = None


class CaseOut(BaseModel):
    """One case behind a figure, with its times (UTC) and the reason codes it fails on."""

    case_id: str
    exam_id: str | None
    accession: str | None
    clinic: str | None
    discipline: str | None
    modality: str | None
    priority: str | None
    reader: str | None
    at: datetime | None
    start_at: datetime | None
    end_at: datetime | None
    due_at: datetime | None
    minutes: float | None
    in_numerator: bool
    reason: str | None


class CasePage(BaseModel):
    code: str
    subset: str
    total: int
    items: list[CaseOut]
    note: str | None = None


class HistogramOut(BaseModel):
    """Counts of cases per bin of minutes (``edges`` has one more entry than ``counts``)."""

    code: str
    edges: list[float]
    counts: list[int]
    p50: float | None
    p90: float | None
    n: int
    threshold: float | None = None
    note: str | None = None


class TargetIn(BaseModel):
    target: float | None = Field(description="null: no target")
    warn_margin: float = Field(0.0, ge=0)
    note: str = Field("", max_length=500)


class TargetOut(BaseModel):
    code: str
    name_zh: str
    name_en: str
    direction: str
    unit: str
    target: float | None
    warn_margin: float
    version: int
    changed_by: str | None
    changed_at: datetime | None
    note: str


class IndicatorsOut(BaseModel):
    """The indicators over [period_start, period_end) (UTC instants of the local days)."""

    period_start: datetime
    period_end: datetime
    group_by: str | None
    indicators: list[IndicatorOut]
