"""What the ECG API returns (pydantic models; times in UTC)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from worklist.models import ExamState, Priority

__all__ = [
    "DeviceMeasurementOut",
    "EcgIngested",
    "EcgMeasurements",
    "EcgOut",
    "LeadQualityOut",
    "PrescreenOut",
    "RhythmOut",
]


class EcgMeasurements(BaseModel):
    """RDC's global measurements on the median beat fused over the leads: exactly these
    keys, null where not derivable (the reason is in ``missing_reasons``)."""

    model_config = ConfigDict(extra="forbid")

    heart_rate_bpm: float | None = None
    rr_ms: float | None = None
    pr_ms: float | None = None
    qrs_ms: float | None = None
    qt_ms: float | None = None
    qtc_bazett_ms: float | None = Field(default=None, description="QT / sqrt(RR) (Bazett)")
    qtc_fridericia_ms: float | None = Field(default=None, description="QT / RR^(1/3) (Fridericia)")
    p_axis_deg: float | None = None
    qrs_axis_deg: float | None = None
    t_axis_deg: float | None = None


class LeadQualityOut(BaseModel):
    lead: str
    status: str = Field(description="ok, flat, noisy or lead_off")
    reason: str | None = None
    amplitude_uv: float | None = None
    noise_uv: float | None = None


class DeviceMeasurementOut(BaseModel):
    """A measurement the acquiring device wrote in the file, shown beside ours."""

    key: str | None = Field(default=None, description="our measurement key, when it maps")
    label: str
    value: float
    unit: str = ""
    source: str = Field(description="where it came from (device, file section)")


class PrescreenOut(BaseModel):
    """A pre-screen rule the ECG matched: triage only, the reader confirms."""

    rule: str
    reason: str
    critical: bool
    tier: str = "critical"
    label_zh: str = ""
    label_en: str = ""


class RhythmOut(BaseModel):
    beat_count: int | None = None
    mean_rate_bpm: float | None = None
    mean_rr_ms: float | None = None
    min_rr_ms: float | None = None
    max_rr_ms: float | None = None
    rr_cv: float | None = None
    irregular: bool | None = None


class EcgOut(BaseModel):
    """One ECG exam as measured: ``GET /api/v1/ecg/{exam_id}``."""

    exam_id: str
    artifact_id: str
    clinic_code: str
    exam_state: ExamState
    priority: Priority
    triage_reason: str | None = None
    source_format: str
    sampling_rate_hz: float | None
    leads: list[str]
    duration_s: float | None
    quality: list[LeadQualityOut]
    measurements: EcgMeasurements
    measurement_source: str = "RDC median-beat analysis"
    missing_reasons: dict[str, str]
    device_measurements: list[DeviceMeasurementOut]
    reader_measurements: dict[str, Any] | None = None
    unreliable: bool
    unreliable_reason: str | None = None
    prescreen: list[PrescreenOut]
    rhythm: RhythmOut
    fiducials_ms: dict[str, float | None]
    device: str | None = None
    device_statements: list[str] = []
    acquired_at: datetime | None = None
    analysis_error: str | None = None
    analysis_version: str
    analysed_at: datetime


class EcgIngested(BaseModel):
    """The answer to an upload: the exam the ECG is (201 new, 200 already received)."""

    exam_id: str
    duplicate: bool = False
