"""The ECG centre's detail table: one row per ECG exam with what RDC measured.

``ecg_studies`` is the ECG detail of an exam (``exams.discipline = 'ecg'``), written by the
upload intake (:func:`ecg_service.service.ingest_ecg`) in the intake transaction, and by the
analysis task after a DICOM ECG waveform arrived by C-STORE or STOW
(:mod:`ecg_service.tasks`). The waveform itself stays in the object store
(``object_keys``; a WFDB record is a header and one or more signal files); the reading
console parses it again with :func:`ecg_service.service.load_record`.

JSON shapes (what the API and the reading console rely on):

- ``lead_names``: ``["I", "II", ...]`` in the record's order;
- ``quality``: one object per lead, in lead order:
  ``{"lead", "status": ok|flat|noisy|lead_off, "reason", "amplitude_uv", "noise_uv"}``;
- ``measurements``: exactly :data:`ecg_service.MEASUREMENT_KEYS`, a number or null;
- ``missing_reasons``: measurement key -> why it is null;
- ``device_measurements``: ``[{"key", "label", "value", "unit", "source"}]`` as the device
  wrote them (``source`` names the device / file section); ``key`` is our measurement key
  when the label maps to one;
- ``reader_measurements``: the reader's edited values (key -> number), written by the
  reading console; null until a reader edits;
- ``prescreen``: ``[{"rule", "reason", "critical", "tier", "label_zh", "label_en"}]``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow

__all__ = ["EcgStudy"]


class EcgStudy(Base):
    """What RDC measured on an ECG exam's waveform (one row per exam)."""

    __tablename__ = "ecg_studies"

    exam_id: Mapped[str] = mapped_column(
        ForeignKey("exams.id", ondelete="CASCADE"), primary_key=True
    )
    # The artifact whose waveform was measured (a DICOM instance's artifact for C-STORE).
    artifact_id: Mapped[str] = mapped_column(String(36), index=True)
    object_keys: Mapped[list[str]] = mapped_column(JSON, default=list)
    source_format: Mapped[str] = mapped_column(String(16))  # dicom, wfdb, hl7_aecg, scp_ecg
    sampling_rate_hz: Mapped[float | None] = mapped_column(Float, nullable=True)
    lead_names: Mapped[list[str]] = mapped_column(JSON, default=list)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    quality: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    measurements: Mapped[dict[str, float | None]] = mapped_column(JSON, default=dict)
    missing_reasons: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    device_measurements: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    reader_measurements: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    prescreen: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    unreliable: Mapped[bool] = mapped_column(Boolean, default=False)
    unreliable_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Rhythm summary (beat count, mean/min/max RR, irregular) and the median beat's global
    # fiducials (ms from R), for the console's calipers and median-beat view.
    rhythm: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fiducials: Mapped[dict[str, float | None]] = mapped_column(JSON, default=dict)
    device: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device_statements: Mapped[list[str]] = mapped_column(JSON, default=list)
    acquired_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Set when the waveform could not be read at all (a DICOM ECG whose waveform is broken):
    # the exam is still read by a human, with "measurement not possible".
    analysis_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    analysis_version: Mapped[str] = mapped_column(String(32))
    analysed_at: Mapped[datetime] = mapped_column(default=utcnow)
