"""The ECG reading console's service side and the ECG report section.

- :func:`signal_payload`: the record (and its median beats) as JSON-ready µV integers for
  the console to draw on its own grid;
- :func:`reported_measurements`: the reader's edited values over the machine's;
- :func:`ecg_report_section`: the typed section a signed ECG report carries (the 12-lead
  trace at true 25 mm/s on an A4 landscape page, the measurements by source, the chosen
  statements, the measurements as LOINC-coded observations), handed to the hub through
  :mod:`worklist.signing.sections`.

Pure functions here; the database edges are in :mod:`ecg_service.reading_db`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ecg_service.analysis import MEASUREMENT_KEYS, EcgAnalysis
from ecg_service.record import EcgRecord
from ecg_service.render import HEADER_MM, render_trace
from ecg_service.statements import Statement, get_statement
from worklist.signing.sections import (
    ReportSection,
    SectionFigure,
    SectionObservation,
    SectionTable,
)

__all__ = [
    "MEASUREMENT_LABELS",
    "MEASUREMENT_LOINC",
    "ReaderMeasurements",
    "ecg_report_section",
    "reported_measurements",
    "signal_payload",
    "trace_figure",
    "validate_reader_measurements",
]


@dataclass(frozen=True, slots=True)
class _Label:
    zh: str
    en: str
    unit: str  # as printed
    ucum: str


MEASUREMENT_LABELS: Mapping[str, _Label] = {
    "heart_rate_bpm": _Label("心率", "HR", "/min", "/min"),
    "rr_ms": _Label("RR间期", "RR", "ms", "ms"),
    "pr_ms": _Label("PR间期", "PR", "ms", "ms"),
    "qrs_ms": _Label("QRS时限", "QRS", "ms", "ms"),
    "qt_ms": _Label("QT间期", "QT", "ms", "ms"),
    "qtc_bazett_ms": _Label("QTc (Bazett)", "QTcB", "ms", "ms"),
    "qtc_fridericia_ms": _Label("QTc (Fridericia)", "QTcF", "ms", "ms"),
    "p_axis_deg": _Label("P电轴", "P axis", "°", "deg"),
    "qrs_axis_deg": _Label("QRS电轴", "QRS axis", "°", "deg"),
    "t_axis_deg": _Label("T电轴", "T axis", "°", "deg"),
}

# LOINC codes of the ECG measurements exported as FHIR Observations. QTc is the Bazett
# value (8636-5 "QT interval corrected"); RR and QTc Fridericia have no code here and go
# out under RDC's own system.
MEASUREMENT_LOINC: Mapping[str, tuple[str, str]] = {
    "heart_rate_bpm": ("8867-4", "Heart rate"),
    "pr_ms": ("8625-6", "P-R Interval"),
    "qrs_ms": ("8633-2", "QRS duration"),
    "qt_ms": ("8634-0", "Q-T Interval"),
    "qtc_bazett_ms": ("8636-5", "Q-T Interval corrected"),
    "p_axis_deg": ("8626-4", "P wave axis"),
    "qrs_axis_deg": ("8632-0", "QRS axis"),
    "t_axis_deg": ("8638-3", "T wave axis"),
}
RDC_MEASUREMENT_SYSTEM = "urn:rdc:ecg-measurement"

# Plausible ranges for a reader's value (anything outside is a typing error).
_LIMITS: Mapping[str, tuple[float, float]] = {
    "heart_rate_bpm": (5, 400),
    "rr_ms": (100, 15000),
    "pr_ms": (20, 1000),
    "qrs_ms": (20, 400),
    "qt_ms": (100, 1000),
    "qtc_bazett_ms": (100, 1000),
    "qtc_fridericia_ms": (100, 1000),
    "p_axis_deg": (-180, 360),
    "qrs_axis_deg": (-180, 360),
    "t_axis_deg": (-180, 360),
}

ReaderMeasurements = dict[str, float]


def validate_reader_measurements(values: Mapping[str, float | None]) -> ReaderMeasurements:
    """The reader's edits, keys checked and values range-checked (ValueError naming the
    key); ``None`` drops an edit (back to the machine value)."""
    out: ReaderMeasurements = {}
    for key, value in values.items():
        if key not in MEASUREMENT_LABELS:
            raise ValueError(f"unknown measurement {key!r}; known: {', '.join(MEASUREMENT_KEYS)}")
        if value is None:
            continue
        number = float(value)
        lo, hi = _LIMITS[key]
        if not np.isfinite(number) or not lo <= number <= hi:
            raise ValueError(f"{key}: {value} is outside {lo:g}..{hi:g}")
        out[key] = round(number, 1)
    return out


def reported_measurements(
    machine: Mapping[str, float | None], reader: Mapping[str, float | None] | None
) -> dict[str, float | None]:
    """What the report states: the reader's value where edited, else the machine's."""
    reader = reader or {}
    return {
        key: (reader[key] if reader.get(key) is not None else machine.get(key))
        for key in MEASUREMENT_KEYS
    }


def _ints(x: np.ndarray) -> list[list[int]]:
    return np.rint(x).astype(np.int32).tolist()


def signal_payload(
    record: EcgRecord, analysis: EcgAnalysis | None = None, *, max_rate_hz: float = 500.0
) -> dict[str, Any]:
    """The leads in µV (integers), decimated by an integer factor to at most
    ``max_rate_hz``, plus the median beats and fiducials when ``analysis`` is given."""
    fs = record.sampling_rate_hz
    step = max(1, int(fs // max_rate_hz)) if max_rate_hz > 0 else 1
    x = record.signals_uv
    if step > 1:
        # Mean of each block (a box filter before decimation keeps the shape of a QRS).
        n = (x.shape[1] // step) * step
        x = x[:, :n].reshape(x.shape[0], -1, step).mean(axis=2)
    out: dict[str, Any] = {
        "sampling_rate_hz": fs / step,
        "source_rate_hz": fs,
        "units": "uV",
        "leads": list(record.leads),
        "duration_s": record.duration_s,
        "signals": _ints(x),
        "median": None,
    }
    if analysis is not None and analysis.median_beat is not None:
        beat = analysis.median_beat
        f = analysis.fiducials
        out["median"] = {
            "sampling_rate_hz": beat.sampling_rate_hz,
            "leads": list(beat.leads),
            "signals": _ints(beat.signals_uv),
            "fiducials_ms": {
                "p_on": f.p_on_ms,
                "p_off": f.p_off_ms,
                "qrs_on": f.qrs_on_ms,
                "qrs_off": f.qrs_off_ms,
                "t_end": f.t_end_ms,
            },
        }
    return out


def trace_figure(record: EcgRecord, *, px_per_mm: float = 6.0) -> SectionFigure:
    """The 3x4 + rhythm-strip trace at 25 mm/s and 10 mm/mV without its text header (the
    report page has its own), with its physical size for true-scale printing."""
    png = render_trace(record, layout="3x4", speed=25.0, gain=10.0, px_per_mm=px_per_mm)
    img = Image.open(io.BytesIO(png))
    top = round(HEADER_MM * px_per_mm) - 2
    cropped = img.crop((0, top, img.width, img.height))
    buffer = io.BytesIO()
    cropped.save(buffer, format="PNG", optimize=False, compress_level=6)
    return SectionFigure(
        png=buffer.getvalue(),
        width_mm=cropped.width / px_per_mm,
        height_mm=cropped.height / px_per_mm,
        caption=(
            f"12导联心电图 12-lead ECG · 25 mm/s · 10 mm/mV · {record.sampling_rate_hz:g} Hz"
            f" · {record.duration_s:.1f} s"
        ),
    )


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _device_values(device: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in device:
        key = item.get("key")
        if key in MEASUREMENT_LABELS and item.get("value") is not None and key not in out:
            out[str(key)] = float(item["value"])
    return out


def ecg_report_section(
    *,
    record: EcgRecord | None,
    machine: Mapping[str, float | None],
    device: Sequence[Mapping[str, Any]] = (),
    reader: Mapping[str, float | None] | None = None,
    statement_codes: Sequence[str] = (),
    analysis_version: str = "",
    unreliable: bool = False,
    flags: Sequence[str] = (),
) -> ReportSection:
    """The ECG section of a signed report (landscape page: trace, measurements by source,
    statements; observations with LOINC codes of the reported values)."""
    reader = {k: v for k, v in (reader or {}).items() if v is not None}
    device_values = _device_values(device)
    reported = reported_measurements(machine, reader)
    columns = ("来源 Source", *(f"{lab.en} ({lab.unit})" for lab in MEASUREMENT_LABELS.values()))

    def row(name: str, values: Mapping[str, float | None]) -> tuple[str, ...]:
        return (name, *(_fmt(values.get(k)) for k in MEASUREMENT_LABELS))

    rows = [row("机测 RDC" + (" ⚠" if unreliable else ""), machine)]
    if device_values:
        rows.append(row("设备 Device", device_values))
    if reader:
        rows.append(row("医师 Reader", reader))
    rows.append(row("报告 Reported", reported))
    statements: list[Statement] = []
    for code in statement_codes:
        st = get_statement(code)
        if st is None:
            raise ValueError(f"unknown ECG statement {code!r}")
        statements.append(st)
    paragraphs = [f"{i}. {st.zh} {st.en} [{st.code}]" for i, st in enumerate(statements, 1)]
    if unreliable or flags:
        paragraphs.append("注意 Note: " + "; ".join(flags or ["measurement unreliable"]))
    observations = []
    for key, value in reported.items():
        if value is None:
            continue
        label = MEASUREMENT_LABELS[key]
        system, code, display = RDC_MEASUREMENT_SYSTEM, key, f"{label.en} ({label.zh})"
        if key in MEASUREMENT_LOINC:
            code, display = MEASUREMENT_LOINC[key]
            system = "http://loinc.org"
        observations.append(
            SectionObservation(
                key=key,
                code=code,
                display=display,
                value=float(value),
                unit=label.ucum,
                system=system,
                source="reader" if key in reader else "machine",
            )
        )
    return ReportSection(
        key="ecg",
        title="心电图 Electrocardiogram",
        table=SectionTable(columns=columns, rows=tuple(rows)),
        table_title="测量值 Measurements",
        paragraphs=tuple(["诊断 Statements:", *paragraphs] if statements else paragraphs),
        figure=trace_figure(record) if record is not None else None,
        landscape=True,
        observations=tuple(observations),
        data={
            "machine": {k: machine.get(k) for k in MEASUREMENT_KEYS},
            "device": {k: v for k, v in device_values.items()},
            "reader": dict(reader),
            "reported": reported,
            "statements": [
                {"code": s.code, "zh": s.zh, "en": s.en, "category": s.category} for s in statements
            ],
            "analysis_version": analysis_version,
            "unreliable": unreliable,
        },
    )
