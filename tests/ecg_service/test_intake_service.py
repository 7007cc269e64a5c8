"""The ECG intake's services in-process: the analysis task a DICOM ECG enqueues after its
commit (and what it records for a waveform it cannot read), and the configurable
pre-screen table."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

import ecg_service.service as service
import ecg_service.tasks  # noqa: F401  (registers the tasks)
from dicom_gateway.ingest import ingest_dicom_file
from ecg_service.models import EcgStudy
from ecg_service.tasks import analyse_pending_task
from rdc_core.db import read_session, session_scope
from rdc_core.settings import get_settings, reset_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import InProcessTaskRunner, active_runner
from worklist.directory import add_organization, org_ref
from worklist.models import Exam, OrgKind, Priority


def _ingest(path: Path) -> str:
    settings = get_settings()
    with session_scope() as session:
        org = org_ref(add_organization(session, code="CLINIC_A", name="A", kind=OrgKind.CLINIC))
    with session_scope() as session:
        result = ingest_dicom_file(
            session,
            store=get_object_store(settings),
            source=path,
            calling_ae="CLINIC_A_CT",
            zone=settings.zone,
            organization=org,
        )
    return result.exam_id


def _study(exam_id: str) -> SimpleNamespace | None:
    """The exam's ecg_studies row as plain values."""
    with read_session() as session:
        row = session.get(EcgStudy, exam_id)
        if row is None:
            return None
        return SimpleNamespace(**{c.key: getattr(row, c.key) for c in EcgStudy.__mapper__.columns})


def test_a_committed_dicom_ecg_is_measured_by_the_task(database: str, testdata: Path) -> None:
    runner = InProcessTaskRunner(threads=1, run_periodic=False)
    runner.start()
    try:
        assert active_runner() is runner
        exam_id = _ingest(testdata / "ecg" / "dicom" / "waveform_ecg.dcm")
        deadline = time.monotonic() + 60
        while (study := _study(exam_id)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        runner.stop()
    assert active_runner() is None
    assert study is not None and study.source_format == "dicom"
    assert study.sampling_rate_hz == 1000 and len(study.lead_names) == 12
    assert study.measurements["heart_rate_bpm"] is not None
    assert study.analysis_error is None and study.object_keys[0].startswith("dicom/")
    assert analyse_pending_task() == 0  # measured already: the sweep finds nothing


def test_an_unreadable_waveform_is_recorded_not_retried(
    database: str, testdata: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(testdata / "ecg" / "dicom" / "waveform_ecg.dcm")
    del ds.WaveformSequence
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    exam_id = _ingest(broken)  # no runner in this process: nothing is enqueued
    assert _study(exam_id) is None
    assert analyse_pending_task() == 1  # the sweep catches it
    study = _study(exam_id)
    assert study is not None and study.unreliable
    assert "no Waveform Sequence" in (study.analysis_error or "")
    assert set(study.measurements) == set(study.missing_reasons)
    assert all(v is None for v in study.measurements.values())
    assert analyse_pending_task() == 0


def test_the_prescreen_table_is_configurable(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "rules.yaml"
    table.write_text(
        "rules:\n"
        "  - code: LOCAL-HR-60\n"
        "    label_zh: 心率≥60\n"
        "    label_en: Rate at least 60/min\n"
        "    tier: critical\n"
        "    all:\n"
        "      - {field: measurements.heart_rate_bpm, op: '>=', value: 60}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("RDC_ECG_PRESCREEN_RULES", str(table))
    reset_settings()
    from ecg_service import synthesize_ecg
    from ecg_service.writers import wfdb_files

    record, _ = synthesize_ecg(heart_rate_bpm=75, seed=5)
    prepared = service.prepare_ecg(wfdb_files(record, name="local"))
    assert [m.code for m in prepared.matches] == ["LOCAL-HR-60"]
    with session_scope() as session:
        org = org_ref(add_organization(session, code="CLINIC_A", name="A", kind=OrgKind.CLINIC))
    with session_scope() as session:
        result = service.ingest_ecg(
            session,
            store=get_object_store(get_settings()),
            prepared=prepared,
            org=org,
            form=service.EcgForm(patient_id="P-1"),
            source="test",
        )
    assert result.triaged
    with read_session() as session:
        exam = session.get(Exam, result.exam_id)
        assert exam is not None and exam.priority is Priority.EMERGENCY
        assert "Rate at least 60/min" in (exam.triage_reason or "")
        assert exam.work_item is not None and exam.work_item.priority_rank == -1
