"""The intake contract without any DICOM: a plain file becomes an exam, is made READY,
routed and given its SLA due time; rollback removes its object; quarantine keeps bytes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from rdc_core.db import session_scope, stable_id, utcnow
from rdc_core.errors import PermissionDeniedError
from rdc_core.storage import get_object_store
from worklist.directory import OrgRef, add_organization
from worklist.intake import (
    ArtifactIn,
    ExamIn,
    ExamKeyKind,
    PatientIn,
    RecordOutcome,
    Registration,
    exam_id_for,
    quarantine_object,
    register_artifact,
    store_object,
)
from worklist.models import (
    Artifact,
    Discipline,
    Exam,
    ExamState,
    OrgKind,
    Patient,
    Priority,
    QuarantineItem,
    RoutingRule,
    WorkItem,
    WorkItemState,
)
from worklist.readiness import mark_stable_exams_ready


def _clinic(code: str = "C1") -> OrgRef:
    with session_scope() as session:
        org = add_organization(session, code=code, name="Clinic", kind=OrgKind.CLINIC)
        return OrgRef(id=org.id, code=org.code, kind=org.kind)


def _register(
    org: OrgRef,
    path: Path,
    *,
    exam: ExamIn,
    ref: str,
    age_seconds: float = 120,
) -> Registration:
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    with session_scope() as session:
        pending = store_object(
            store=get_object_store(),
            key=f"files/{sha256[:2]}/{sha256}.txt",
            source=path,
            size=len(data),
            sha256=sha256,
        )
        return register_artifact(
            session,
            org=org,
            patient=PatientIn(
                patient_id="LAB-7",
                name="张三",
                birth_date="19800101",
                sex="M",
                original={"PID-3": "LAB-7^^^C1"},
            ),
            exam=exam,
            artifact=ArtifactIn(kind="file", ref=ref, object=pending, source="upload:tech_a"),
            now=utcnow() - timedelta(seconds=age_seconds),
        )


def _lab_order(key: str = "ORD-1", **kw: object) -> ExamIn:
    values: dict[str, object] = {
        "discipline": Discipline.LAB,
        "natural_key": key,
        "key_kind": ExamKeyKind.ORDER,
        "modality": "LAB",
        "description": "Blood panel",
    }
    values.update(kw)
    return ExamIn(**values)  # type: ignore[arg-type]


def test_plain_file_becomes_exam_ready_routed_with_sla(database: str, tmp_path: Path) -> None:
    org = _clinic()
    with session_scope() as session:
        session.add(RoutingRule(position=1, discipline="lab", pool="lab-desk"))
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("WBC 6.1\n")
    second.write_text("HGB 140\n")
    one = _register(org, first, exam=_lab_order(), ref="msg-1")
    two = _register(org, second, exam=_lab_order(priority=Priority.URGENT), ref="msg-2")
    again = _register(org, first, exam=_lab_order(), ref="msg-1")
    assert one.outcome is RecordOutcome.STORED and two.outcome is RecordOutcome.STORED
    assert again.outcome is RecordOutcome.DUPLICATE
    assert one.exam_id == two.exam_id == again.exam_id
    assert one.exam_id == exam_id_for(Discipline.LAB, "ORD-1", ExamKeyKind.ORDER)
    assert one.artifact_id == stable_id("file", "msg-1")

    with session_scope() as session:
        ready = mark_stable_exams_ready(session, now=utcnow(), stable_age_seconds=30)
    assert [r.exam_id for r in ready] == [one.exam_id]
    store = get_object_store()
    with session_scope() as session:
        exam = session.get(Exam, one.exam_id)
        assert exam is not None
        assert exam.state is ExamState.READY
        assert (exam.discipline, exam.natural_key, exam.key_kind) == (
            Discipline.LAB,
            "ORD-1",
            ExamKeyKind.ORDER,
        )
        assert exam.study_instance_uid is None
        assert exam.instance_count == 2  # the duplicate was not counted
        assert exam.priority is Priority.URGENT  # raised by the second artifact
        patient = session.get(Patient, exam.patient_ref)
        assert patient is not None
        assert (patient.issuer, patient.patient_id, patient.name) == ("C1", "LAB-7", "张三")
        item = session.execute(select(WorkItem).where(WorkItem.exam_id == exam.id)).scalar_one()
        assert item.state is WorkItemState.OPEN
        assert item.pool == "lab-desk"
        assert item.discipline is Discipline.LAB
        # Lab, urgent: the shipped SLA table's 40 minutes from the first receipt.
        assert item.due_at - exam.first_received_at == timedelta(minutes=40)
        artifacts = session.execute(
            select(Artifact).where(Artifact.exam_id == exam.id).order_by(Artifact.ref)
        ).scalars()
        rows = [(a.kind, a.ref, a.size_bytes, a.source) for a in artifacts]
        keys = [
            a.storage_key
            for a in session.execute(select(Artifact).order_by(Artifact.ref)).scalars()
        ]
    assert rows == [("file", "msg-1", 8, "upload:tech_a"), ("file", "msg-2", 8, "upload:tech_a")]
    with store.open(keys[0]) as f:
        assert f.read() == b"WBC 6.1\n"


def test_sla_due_time_follows_discipline_and_priority(database: str, tmp_path: Path) -> None:
    org = _clinic()
    path = tmp_path / "ecg.txt"
    path.write_text("ecg record")
    ecg = ExamIn(
        discipline=Discipline.ECG,
        natural_key="sha256-of-upload",
        key_kind=ExamKeyKind.FILE,
        modality="ECG",
        priority=Priority.EMERGENCY,
    )
    registration = _register(org, path, exam=ecg, ref="upload-1")
    with session_scope() as session:
        (ready,) = mark_stable_exams_ready(session, now=utcnow(), stable_age_seconds=30)
        exam = session.get(Exam, registration.exam_id)
        assert exam is not None
        assert ready.pool == "ecg"  # no rule: the discipline's pool
        assert ready.due_at - exam.first_received_at == timedelta(minutes=15)


def test_exam_keys_are_per_discipline_and_per_clinic(database: str, tmp_path: Path) -> None:
    org, other = _clinic("C1"), _clinic("C2")
    path = tmp_path / "x.txt"
    path.write_text("x")
    lab = _register(org, path, exam=_lab_order("123"), ref="a")
    ecg = _register(
        org,
        path,
        exam=ExamIn(discipline=Discipline.ECG, natural_key="123", key_kind=ExamKeyKind.FILE),
        ref="b",
    )
    assert lab.exam_id != ecg.exam_id
    with pytest.raises(PermissionDeniedError):
        _register(other, path, exam=_lab_order("123"), ref="c")
    with session_scope() as session:
        assert session.get(Artifact, stable_id("file", "c")) is None


def test_rollback_removes_the_object_and_quarantine_keeps_bytes(
    database: str, tmp_path: Path
) -> None:
    org = _clinic()
    path = tmp_path / "bad.txt"
    path.write_text("half a message")
    store = get_object_store()
    key = "files/rolled-back.txt"
    with pytest.raises(RuntimeError), session_scope() as session:
        register_artifact(
            session,
            org=org,
            patient=PatientIn(patient_id="P"),
            exam=_lab_order("ORD-9"),
            artifact=ArtifactIn(
                kind="file",
                ref="rolled-back",
                object=store_object(
                    store=store, key=key, source=path, size=path.stat().st_size, sha256="0" * 64
                ),
            ),
        )
        assert store.exists(key)
        raise RuntimeError("the edge failed before commit")
    assert not store.exists(key)
    with session_scope() as session:
        assert session.get(Exam, exam_id_for(Discipline.LAB, "ORD-9", ExamKeyKind.ORDER)) is None

    with session_scope() as session:
        item_id = quarantine_object(
            session,
            store=store,
            source=path,
            reason="cannot parse",
            origin="upload",
            sender="tech_a",
            org_id=org.id,
            artifact_ref="msg-9",
        )
    with session_scope() as session:
        item = session.get(QuarantineItem, item_id)
        assert item is not None
        assert (item.reason, item.source, item.artifact_ref) == ("cannot parse", "upload", "msg-9")
        with store.open(item.storage_key) as f:
            assert f.read() == b"half a message"


def test_the_contract_loads_no_dicom_code() -> None:
    code = (
        "import sys, worklist, worklist.intake, worklist.readiness, worklist.tables\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pydicom', 'pynetdicom', 'dicom_gateway'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
