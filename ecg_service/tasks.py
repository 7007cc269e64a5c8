"""Background tasks of the ECG centre (edges: each opens and commits its own transaction).

``ecg.analyse_exam`` measures the DICOM ECG waveform of an exam after it was received by
C-STORE or STOW: the DICOM intake enqueues it once the instance's transaction committed
(:func:`rdc_core.tasks.submit_after_commit`), on the in-process worker or on Celery. It is
idempotent: an exam measured already with the current analysis is left alone. A periodic
sweep (``ecg.analyse_pending``) catches what was received where no task runner runs (DICOM
listener processes) or whose task was lost.
"""

from __future__ import annotations

import logging

from ecg_service.parsers import parse_ecg
from ecg_service.record import EcgFormatError, EcgRecord
from ecg_service.service import exams_awaiting_analysis, pending_dicom_waveform, record_analysis
from rdc_core.db import read_session, session_scope
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import periodic, task

__all__ = [
    "ANALYSE_EXAM",
    "ANALYSE_PENDING",
    "analyse_exam_task",
    "analyse_pending_task",
]

log = logging.getLogger(__name__)

# dicom_gateway.records enqueues this name (it may not import this package).
ANALYSE_EXAM = "ecg.analyse_exam"
ANALYSE_PENDING = "ecg.analyse_pending"
_SWEEP_BATCH = 50


@task(ANALYSE_EXAM)
def analyse_exam_task(exam_id: str) -> bool:
    """Measure the exam's DICOM ECG waveform (if not measured yet); returns whether it was
    measured now."""
    with read_session() as session:
        waveform = pending_dicom_waveform(session, exam_id=exam_id)
    if waveform is None:
        return False
    store = get_object_store(get_settings())
    with store.open(waveform.storage_key) as stored:
        data = stored.read()
    record: EcgRecord | None = None
    error: str | None = None
    try:
        record = parse_ecg(data)
    except EcgFormatError as exc:
        error = str(exc)
    except Exception as exc:  # a broken waveform must not be retried forever
        error = f"{type(exc).__name__}: {exc}"
    if error:
        log.warning("ECG exam %s: waveform not measurable: %s", exam_id, error)
    with session_scope() as session:
        # Measured meanwhile by another worker: the same values, written again.
        triaged = record_analysis(session, waveform=waveform, record=record, error=error)
    if triaged:
        log.info("ECG exam %s: suspected critical, first in the reading queue", exam_id)
    return True


@task(ANALYSE_PENDING)
def analyse_pending_task() -> int:
    """Measure ECG exams holding a DICOM waveform and no measurements; returns how many."""
    with read_session() as session:
        exam_ids = exams_awaiting_analysis(session, limit=_SWEEP_BATCH)
    done = 0
    for exam_id in exam_ids:
        try:
            done += analyse_exam_task(exam_id)
        except Exception:
            log.exception("ECG exam %s: analysis failed", exam_id)
    return done


periodic(ANALYSE_PENDING, interval=lambda: max(5.0, get_settings().stable_scan_interval))
