"""The reading console's service functions (keyword-only, take the session, never commit)
and the ECG report-section provider registered with the hub's signing.

- :func:`ecg_signal`: the waveform for the console to draw (access-checked, audited);
- :func:`set_reader_measurements`: the reader's edited measurements, kept beside the
  machine's and the device's in ``ecg_studies.reader_measurements``;
- :func:`serial_comparison`: the measurement deltas against a prior ECG of the same person;
- :func:`ecg_report_sections`: what a signed ECG report carries (see
  :func:`ecg_service.reading.ecg_report_section`), registered by :func:`register`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from ecg_service.analysis import analyse
from ecg_service.models import EcgStudy
from ecg_service.reading import (
    ecg_report_section,
    reported_measurements,
    signal_payload,
    validate_reader_measurements,
)
from ecg_service.record import EcgFormatError
from ecg_service.serial import compare_measurements
from ecg_service.service import get_ecg, load_record
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError, StorageError
from rdc_core.storage import ObjectStore, get_object_store
from worklist.access import Principal, require_roles
from worklist.audit import record_access
from worklist.models import Discipline, Exam, Report, ReportStatus, Role
from worklist.patients.links import same_person_clause
from worklist.queries import visible_exam
from worklist.signing.sections import ReportSection, register_section_provider

__all__ = [
    "READER_ROLES",
    "ecg_report_sections",
    "ecg_signal",
    "register",
    "serial_comparison",
    "set_reader_measurements",
]

log = logging.getLogger(__name__)
READER_ROLES = frozenset({Role.READER, Role.SENIOR_READER})


def _study(session: Session, exam: Exam) -> EcgStudy:
    if exam.discipline is not Discipline.ECG:
        raise NotFoundError(f"exam {exam.id} is not an ECG")
    study = session.get(EcgStudy, exam.id)
    if study is None:
        raise NotFoundError(f"ECG exam {exam.id} has not been measured yet")
    return study


def ecg_signal(
    session: Session,
    *,
    principal: Principal,
    exam_id: str,
    store: ObjectStore,
    max_rate_hz: float = 500.0,
) -> dict[str, Any]:
    """The ECG's leads in µV (decimated to at most ``max_rate_hz``) and its median beats
    with the global fiducials (audited view). NotFoundError for an exam the principal may
    not see or that has no waveform; InvalidInputError when the stored file no longer
    parses."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    _study(session, exam)
    try:
        record = load_record(session, store=store, exam_id=exam.id)
    except EcgFormatError as exc:
        raise InvalidInputError(f"the stored ECG cannot be read: {exc}") from exc
    analysis = analyse(record)
    payload = signal_payload(record, analysis, max_rate_hz=max_rate_hz)
    if payload["median"] is not None:
        # Where R sits in the median window (the analysis cuts 0.7 RR before R, 250-500 ms).
        peaks = np.asarray(analysis.rhythm.r_peaks_s, dtype=float)
        rr_s = float(np.median(np.diff(peaks))) if peaks.size > 1 else 0.8
        fs = analysis.median_beat.sampling_rate_hz if analysis.median_beat else 500.0
        pre = int(min(0.5, max(0.25, 0.7 * rr_s)) * fs)
        payload["median"]["r_offset_ms"] = round(pre / fs * 1000.0, 1)
        payload["median"]["fiducials_ms"] = {
            k: (None if v is None else round(v + pre / fs * 1000.0, 1))
            for k, v in payload["median"]["fiducials_ms"].items()
        }
    payload["exam_id"] = exam.id
    record_access(session, principal, action="view", object_type="ecg", object_id=exam.id)
    return payload


def _final_report(session: Session, exam_id: str) -> bool:
    return (
        session.execute(
            select(Report.id)
            .where(Report.exam_id == exam_id, Report.status == ReportStatus.FINAL)
            .limit(1)
        ).scalar_one_or_none()
        is not None
    )


def set_reader_measurements(
    session: Session,
    *,
    principal: Principal,
    exam_id: str,
    values: Mapping[str, float | None],
    now: datetime,
) -> Any:
    """Store the reader's edited measurements (the whole set: a key left out or null goes
    back to the machine value) and answer the ECG as :func:`get_ecg` does. Readers of the
    lead hospital only; refused (409) once the exam has a final report (an amendment is
    the way to change a signed report)."""
    require_roles(principal, READER_ROLES, lead_only=True)
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    study = _study(session, exam)
    if _final_report(session, exam.id):
        raise ConflictError(f"ECG exam {exam.id} has a final report; amend the report instead")
    try:
        edited = validate_reader_measurements(values)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(str(exc)) from exc
    before = study.reader_measurements
    study.reader_measurements = edited or None
    session.flush()
    record_access(
        session,
        principal,
        action="edit",
        object_type="ecg",
        object_id=exam.id,
        detail={"reader_measurements": edited, "before": before, "at": now.isoformat()},
    )
    return get_ecg(session, principal=principal, exam_id=exam.id)


def serial_comparison(
    session: Session, *, principal: Principal, exam_id: str, prior_id: str
) -> dict[str, Any]:
    """The measurement deltas (current - prior; the reported values: the reader's over the
    machine's) between an ECG and a prior ECG of the same person (audited)."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    prior = visible_exam(session, principal=principal, exam_id=prior_id)
    if prior.id == exam.id:
        raise InvalidInputError("the prior ECG must be another exam")
    same = session.execute(
        select(Exam.id).where(
            Exam.id == prior.id, same_person_clause(Exam.patient_ref, [exam.patient_ref])
        )
    ).scalar_one_or_none()
    if same is None:
        raise InvalidInputError(f"exam {prior.id} is not the same person's")
    current_study, prior_study = _study(session, exam), _study(session, prior)
    current = reported_measurements(
        current_study.measurements or {}, current_study.reader_measurements
    )
    old = reported_measurements(prior_study.measurements or {}, prior_study.reader_measurements)
    deltas = compare_measurements(current, old)
    record_access(
        session,
        principal,
        action="view",
        object_type="ecg",
        object_id=exam.id,
        detail={"serial_prior": prior.id},
    )
    return {
        "exam_id": exam.id,
        "prior_exam_id": prior.id,
        "prior_acquired_at": (
            prior_study.acquired_at.isoformat() if prior_study.acquired_at else None
        ),
        "prior_performed_at": prior.performed_at.isoformat() if prior.performed_at else None,
        "deltas": [
            {
                "key": d.key,
                "current": d.current,
                "prior": d.prior,
                "delta": d.delta,
                "notable": d.notable,
            }
            for d in deltas
        ],
    }


def _statement_codes(report: Report) -> list[str]:
    codes = (report.structured or {}).get("ecg_statements") or []
    if not isinstance(codes, Sequence) or isinstance(codes, str):
        raise InvalidInputError("structured.ecg_statements must be a list of statement codes")
    return [str(c) for c in codes]


def ecg_report_sections(session: Session, /, *, exam: Exam, report: Report) -> list[ReportSection]:
    """The ECG section of a report being signed: the trace (re-drawn from the stored
    waveform), the measurements by source, the chosen statements (``ecg_statements`` in
    the report's structured data), the observations. An ECG exam without a measured
    waveform signs without the section; a stored waveform that cannot be read signs
    with the measurements and without the trace."""
    study = session.get(EcgStudy, exam.id)
    if study is None:
        return []
    record = None
    try:
        record = load_record(session, store=get_object_store(), exam_id=exam.id)
    except (NotFoundError, EcgFormatError, StorageError) as exc:
        log.warning("ECG %s: no trace for the report (%s)", exam.id, exc)
    try:
        section = ecg_report_section(
            record=record,
            machine=study.measurements or {},
            device=study.device_measurements or [],
            reader=study.reader_measurements,
            statement_codes=_statement_codes(report),
            analysis_version=study.analysis_version,
            unreliable=bool(study.unreliable),
            flags=[study.unreliable_reason] if study.unreliable_reason else [],
        )
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    return [section]


def register() -> None:
    """Install the ECG report-section provider (idempotent; the web app calls it)."""
    register_section_provider(Discipline.ECG.value, ecg_report_sections)
