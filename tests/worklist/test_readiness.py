"""Stable-study detection: READY exactly once, routed, due time from the SLA table."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import func, select

from dicom_gateway.records import InstanceHeader, record_instance
from rdc_core.db import session_scope, utcnow
from worklist.directory import add_organization
from worklist.models import Exam, ExamState, OrgKind, Priority, RoutingRule, WorkItem
from worklist.readiness import mark_stable_exams_ready


def _receive(
    study: str,
    *,
    modality: str = "CT",
    body_part: str = "CHEST",
    priority: Priority | None = None,
    age_seconds: float = 60,
) -> None:
    with session_scope() as session:
        org = add_organization(session, code="C1", name="Clinic", kind=OrgKind.CLINIC)
        header = InstanceHeader(
            sop_instance_uid=f"{study}.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study,
            series_instance_uid=f"{study}.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            patient_id="P1",
            modality=modality,
            body_part=body_part,
            priority=priority,
        )
        record_instance(
            session,
            header=header,
            org_id=org.id,
            org_code=org.code,
            storage_key=f"k/{study}",
            size_bytes=1,
            sha256="0" * 64,
            calling_ae="AE",
            now=utcnow() - timedelta(seconds=age_seconds),
        )


def test_only_quiet_exams_become_ready(database: str) -> None:
    _receive("1.2.3.1", age_seconds=60)
    _receive("1.2.3.2", age_seconds=1)
    with session_scope() as session:
        ready = mark_stable_exams_ready(session, now=utcnow(), stable_age_seconds=30)
    assert len(ready) == 1
    with session_scope() as session:
        states = dict(session.execute(select(Exam.study_instance_uid, Exam.state)).all())
    assert states == {"1.2.3.1": ExamState.READY, "1.2.3.2": ExamState.RECEIVING}


def test_concurrent_detectors_make_each_exam_ready_once(database: str) -> None:
    for i in range(20):
        _receive(f"1.2.4.{i}")
    barrier = threading.Barrier(4)
    made: list[int] = []
    errors: list[BaseException] = []

    def detector() -> None:
        try:
            barrier.wait()
            with session_scope() as session:
                made.append(
                    len(mark_stable_exams_ready(session, now=utcnow(), stable_age_seconds=30))
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=detector) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(made) == 20
    with session_scope() as session:
        assert session.execute(select(func.count()).select_from(WorkItem)).scalar_one() == 20


def test_routing_rules_and_sla_due_time(database: str) -> None:
    with session_scope() as session:
        session.add(RoutingRule(position=1, modality="MR", body_part="HEAD", pool="neuro"))
        session.add(RoutingRule(position=2, priority="emergency", pool="emergency-desk"))
    _receive("1.2.5.1", modality="MR", body_part="HEAD")
    _receive("1.2.5.2", priority=Priority.EMERGENCY)
    _receive("1.2.5.3")
    with session_scope() as session:
        ready = {
            r.exam_id: r
            for r in mark_stable_exams_ready(session, now=utcnow(), stable_age_seconds=30)
        }
        exams = {e.study_instance_uid: e for e in session.execute(select(Exam)).scalars()}
        due = {
            e.study_instance_uid: ready[e.id].due_at - e.first_received_at for e in exams.values()
        }
        pools = {e.study_instance_uid: ready[e.id].pool for e in exams.values()}
    assert pools == {"1.2.5.1": "neuro", "1.2.5.2": "emergency-desk", "1.2.5.3": "imaging"}
    assert due["1.2.5.2"] == timedelta(minutes=30)
    assert due["1.2.5.3"] == timedelta(hours=24)
