"""Serial comparison: how the measurements changed since the prior ECG of the same person."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ecg_service.analysis import MEASUREMENT_KEYS, EcgAnalysis

__all__ = ["DEFAULT_CHANGE_THRESHOLDS", "MeasurementDelta", "compare_measurements"]

# Seed thresholds for flagging a change worth a look (not from a standard: the MUSE and
# IntelliSpace serial-comparison tables could not be read, DOMAIN.md "Not confirmed").
DEFAULT_CHANGE_THRESHOLDS: Mapping[str, float] = {
    "heart_rate_bpm": 20.0,
    "rr_ms": 200.0,
    "pr_ms": 40.0,
    "qrs_ms": 20.0,
    "qt_ms": 40.0,
    "qtc_bazett_ms": 40.0,
    "qtc_fridericia_ms": 40.0,
    "p_axis_deg": 45.0,
    "qrs_axis_deg": 45.0,
    "t_axis_deg": 45.0,
}


@dataclass(frozen=True, slots=True)
class MeasurementDelta:
    key: str
    current: float | None
    prior: float | None
    delta: float | None  # current - prior (axes: the shortest signed angle)
    notable: bool


def _angle_delta(a: float, b: float) -> float:
    return (a - b + 180.0) % 360.0 - 180.0


def compare_measurements(
    current: EcgAnalysis | Mapping[str, float | None],
    prior: EcgAnalysis | Mapping[str, float | None],
    *,
    thresholds: Mapping[str, float] = DEFAULT_CHANGE_THRESHOLDS,
) -> list[MeasurementDelta]:
    """One delta per measurement key (``None`` where either side was not measured). Takes
    analyses or plain measurement mappings (e.g. the reader's edited values)."""
    cur = current.measurements if isinstance(current, EcgAnalysis) else current
    old = prior.measurements if isinstance(prior, EcgAnalysis) else prior
    out = []
    for key in MEASUREMENT_KEYS:
        a, b = cur.get(key), old.get(key)
        delta = None
        if a is not None and b is not None:
            delta = _angle_delta(a, b) if key.endswith("_deg") else a - b
            delta = round(delta, 1)
        limit = thresholds.get(key)
        notable = delta is not None and limit is not None and abs(delta) >= limit
        out.append(MeasurementDelta(key=key, current=a, prior=b, delta=delta, notable=notable))
    return out
