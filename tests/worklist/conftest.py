"""A small alliance with READY exams, for the reading-workflow service tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest
from sqlalchemy import select

from dicom_gateway.records import InstanceHeader, record_instance
from rdc_core.db import session_scope, utcnow
from worklist.access import Principal
from worklist.directory import add_organization, add_user, principal_for_user
from worklist.models import OrgKind, Priority, ReaderLevel, Role, User, WorkItem
from worklist.readiness import mark_stable_exams_ready


@dataclass
class Reading:
    """Principals by name and the work item IDs by study UID."""

    people: dict[str, Principal]
    items: dict[str, str]
    exams: dict[str, str]


_PEOPLE = {
    "resident": (Role.READER, "LEAD", ReaderLevel.RESIDENT),
    "resident2": (Role.READER, "LEAD", ReaderLevel.RESIDENT),
    "attending": (Role.READER, "LEAD", ReaderLevel.ATTENDING),
    "chief": (Role.SENIOR_READER, "LEAD", ReaderLevel.CHIEF),
    "qc": (Role.QC, "LEAD", None),
    "tech": (Role.TECHNICIAN, "C1", None),
}

STUDIES = {
    # study UID: (modality, body part, priority, patient)
    "1.2.9.1": ("CT", "CHEST", Priority.ROUTINE, "P1"),
    "1.2.9.2": ("CT", "HEAD", Priority.EMERGENCY, "P2"),
    "1.2.9.3": ("DX", "CHEST", Priority.URGENT, "P1"),
    "1.2.9.4": ("US", "ABDOMEN", Priority.ROUTINE, "P3"),
}


def receive_exam(study: str, modality: str, body_part: str, priority: Priority, pid: str) -> None:
    """Record one instance of ``study`` from clinic C1, received a minute ago."""
    with session_scope() as session:
        org = add_organization(session, code="C1", name="Clinic 1", kind=OrgKind.CLINIC)
        record_instance(
            session,
            header=InstanceHeader(
                sop_instance_uid=f"{study}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                patient_id=pid,
                patient_name=f"Patient^{pid}",
                modality=modality,
                body_part=body_part,
                priority=priority,
            ),
            org_id=org.id,
            org_code=org.code,
            storage_key=f"k/{study}",
            size_bytes=1,
            sha256="0" * 64,
            calling_ae="AE",
            now=utcnow() - timedelta(minutes=1),
        )


@pytest.fixture
def reading(database: str) -> Reading:
    """Lead hospital + clinic C1, one user per kind, the STUDIES READY on the worklist."""
    with session_scope() as session:
        add_organization(session, code="LEAD", name="Lead", kind=OrgKind.LEAD)
        add_organization(session, code="C1", name="Clinic 1", kind=OrgKind.CLINIC)
        add_organization(session, code="C2", name="Clinic 2", kind=OrgKind.CLINIC)
        for name, (role, org, level) in _PEOPLE.items():
            add_user(
                session,
                username=name,
                password="pw-123456",
                role=role,
                org_code=org,
                level=level,
            )
    for study, spec in STUDIES.items():
        receive_exam(study, *spec)
    with session_scope() as session:
        mark_stable_exams_ready(session, now=utcnow(), stable_age_seconds=30)
    with session_scope() as session:
        users = session.execute(select(User)).scalars().all()
        people = {u.username: principal_for_user(u) for u in users}
        rows = session.execute(select(WorkItem)).scalars().all()
        items = {item.exam.study_instance_uid: item.id for item in rows}
        exams = {item.exam.study_instance_uid: item.exam_id for item in rows}
    return Reading(people=people, items=items, exams=exams)
