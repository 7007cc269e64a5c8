"""The DICOM side of the intake contract: an object's header turned into what the hub's
:func:`worklist.intake.register_artifact` takes, and the DICOM detail rows (``instances``,
``instance_conflicts``) this package owns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, partial
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, exists, select
from sqlalchemy.orm import Session

from dicom_gateway.models import INSTANCE_KIND, Instance, InstanceConflict
from rdc_core.db import insert_ignore, session_connection, stable_id
from rdc_core.storage import StoredObject
from rdc_core.tasks import submit_after_commit
from worklist.directory import OrgRef
from worklist.intake import (
    ArtifactIn,
    ExamIn,
    ExamKeyKind,
    PatientIn,
    PendingObject,
    RecordOutcome,
    Registration,
    exam_id_for,
    flag_conflicts,
    register_artifact,
)
from worklist.models import Discipline, Exam, OrgKind, Priority
from worklist.patients import OtherIdentifier

__all__ = [
    "ANALYSE_ECG_TASK",
    "ECG_WAVEFORM_SOP_CLASSES",
    "INSTANCE_KIND",
    "InstanceHeader",
    "KnownInstance",
    "conflict_references",
    "exam_id_for_study",
    "find_instance",
    "instance_row",
    "lock_order",
    "record_conflict",
    "record_instance",
    "register_instance",
]

# INSTANCE_KIND (dicom_gateway.models): the artifact ID of a DICOM SOP instance is
# stable_id("instance", SOP Instance UID), the ID instances always had.
ECG_WAVEFORM_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform
        "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform
        "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform
    }
)
# The ECG centre measures a received ECG waveform in this task (registered by
# ecg_service.tasks, which this package may not import; tasks are called by name).
ANALYSE_ECG_TASK = "ecg.analyse_exam"


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The parts of an object's header the index needs, already decoded and validated."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str
    issuer_of_patient_id: str | None = None
    patient_name: str = ""
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    patient_original: dict[str, Any] = field(default_factory=dict)
    # Other Patient IDs Sequence items: where a national ID (居民身份证号) arrives.
    other_patient_ids: tuple[OtherIdentifier, ...] = ()
    coerced: dict[str, str] = field(default_factory=dict)
    accession_number: str | None = None
    discipline: Discipline = Discipline.IMAGING
    modality: str = ""
    body_part: str = ""
    study_description: str = ""
    referring_physician: str | None = None  # Referring Physician's Name (DICOM PN)
    performed_at: datetime | None = None
    series_number: int | None = None
    instance_number: int | None = None
    frame_count: int = 1
    priority: Priority | None = None


def exam_id_for_study(study_instance_uid: str) -> str:
    """The exam ID derived from the Study Instance UID."""
    return exam_id_for(Discipline.IMAGING, study_instance_uid, ExamKeyKind.STUDY_UID)


@dataclass(frozen=True, slots=True)
class KnownInstance:
    """What the index holds for a SOP Instance UID already received."""

    exam_id: str
    org_id: str
    storage_key: str
    sha256: str


_instances, _exams = cast(Table, Instance.__table__), cast(Table, Exam.__table__)
_conflicts = cast(Table, InstanceConflict.__table__)
_FIND_INSTANCE = (
    select(_instances.c.exam_id, _exams.c.org_id, _instances.c.storage_key, _instances.c.sha256)
    .join(_exams, _exams.c.id == _instances.c.exam_id)
    .where(_instances.c.sop_instance_uid == bindparam("sop"))
)


def find_instance(session: Session, *, sop_instance_uid: str) -> KnownInstance | None:
    """The indexed instance with this SOP Instance UID, if any."""
    row = (
        session_connection(session).execute(_FIND_INSTANCE, {"sop": sop_instance_uid}).one_or_none()
    )
    return KnownInstance(*row) if row else None


def conflict_references(storage_key: str, sop_instance_uid: str) -> list[ColumnElement[bool]]:
    """The condition under which a kept conflicting copy refers to ``storage_key`` (for
    :func:`worklist.intake.object_referenced`)."""
    return [
        exists().where(
            _conflicts.c.sop_instance_uid == sop_instance_uid,
            _conflicts.c.storage_key == storage_key,
        )
    ]


@lru_cache(maxsize=1)
def _dicom_org(org_id: str, org_code: str) -> OrgRef:
    return OrgRef(id=org_id, code=org_code, kind=OrgKind.CLINIC)


def _contract(header: InstanceHeader) -> tuple[PatientIn, ExamIn]:
    patient = PatientIn(
        patient_id=header.patient_id,
        issuer=header.issuer_of_patient_id,
        name=header.patient_name,
        birth_date=header.patient_birth_date,
        sex=header.patient_sex,
        other_ids=header.other_patient_ids,
        original={
            **header.patient_original,
            **(
                {"_coerced": {"PatientID": header.patient_id}}
                if "PatientID" in header.coerced
                else {}
            ),
        },
    )
    exam = ExamIn(
        discipline=header.discipline,
        natural_key=header.study_instance_uid,
        key_kind=ExamKeyKind.STUDY_UID,
        accession_number=header.accession_number,
        modality=header.modality,
        body_part=header.body_part,
        description=header.study_description,
        referring_physician=header.referring_physician,
        performed_at=header.performed_at,
        priority=header.priority,
    )
    return patient, exam


def lock_order(
    header: InstanceHeader, org: OrgRef, *, exam_id: str | None = None
) -> tuple[str, ...]:
    """The order in which a group-commit batch indexes its instances (see
    :mod:`rdc_core.group_commit`): by patient (the patient row is written with a new exam),
    then exam (``exam_id``, when the caller has derived it already), then SOP instance, so
    that writers in other processes lock shared rows in the same order."""
    return (
        org.id,
        header.issuer_of_patient_id or org.code,
        header.patient_id,
        exam_id or exam_id_for_study(header.study_instance_uid),
        header.sop_instance_uid,
    )


def instance_row(
    header: InstanceHeader,
    *,
    exam_id: str,
    artifact_id: str,
    stored: StoredObject,
    calling_ae: str,
    now: datetime,
) -> dict[str, Any]:
    """The ``instances`` row of a new SOP instance (one at a time or a batch at once)."""
    return {
        "id": artifact_id,
        "sop_instance_uid": header.sop_instance_uid,
        "exam_id": exam_id,
        "series_instance_uid": header.series_instance_uid,
        "series_number": header.series_number,
        "instance_number": header.instance_number,
        "frame_count": header.frame_count,
        "sop_class_uid": header.sop_class_uid,
        "modality": header.modality,
        "body_part": header.body_part,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "storage_key": stored.key,
        "size_bytes": stored.size,
        "sha256": stored.sha256,
        "calling_ae": calling_ae,
        "received_at": now,
        "coerced": header.coerced or None,
    }


def register_instance(
    session: Session,
    *,
    header: InstanceHeader,
    org: OrgRef,
    pending: PendingObject,
    calling_ae: str,
    now: datetime,
) -> Registration:
    """Index a DICOM object through the hub's contract: patient, exam keyed by its Study
    Instance UID, the artifact row, and the ``instances`` detail row (same ID)."""
    patient, exam = _contract(header)
    stored = pending.stored

    def write_instance(session: Session, exam_id: str, artifact_id: str) -> None:
        insert_ignore(
            session,
            Instance.__table__,
            instance_row(
                header,
                exam_id=exam_id,
                artifact_id=artifact_id,
                stored=stored,
                calling_ae=calling_ae,
                now=now,
            ),
            conflict=(),  # the ID and the SOP instance UID: a clash on either is a duplicate,
        )

    registration = register_artifact(
        session,
        org=org,
        patient=patient,
        exam=exam,
        artifact=ArtifactIn(
            kind=INSTANCE_KIND, ref=header.sop_instance_uid, object=pending, source=calling_ae
        ),
        detail=write_instance,
        also_referenced=partial(conflict_references, stored.key, header.sop_instance_uid),
        now=now,
    )
    if (
        registration.outcome is RecordOutcome.STORED
        and header.sop_class_uid in ECG_WAVEFORM_SOP_CLASSES
    ):
        # A new ECG waveform: measured once the transaction committed (C-STORE, STOW and
        # import alike); the ECG centre's periodic sweep catches a lost task.
        submit_after_commit(session, ANALYSE_ECG_TASK, exam_id=registration.exam_id)
    return registration


def record_instance(
    session: Session,
    *,
    header: InstanceHeader,
    org_id: str,
    org_code: str,
    storage_key: str,
    size_bytes: int,
    sha256: str,
    calling_ae: str,
    now: datetime,
) -> tuple[RecordOutcome, str]:
    """Index an object already durable in the store (nothing is removed on rollback):
    upsert patient and exam, insert the artifact and the instance. Idempotent; an instance
    indexed already changes nothing and comes back as DUPLICATE."""
    registration = register_instance(
        session,
        header=header,
        org=_dicom_org(org_id, org_code),
        pending=PendingObject.durable(
            StoredObject(key=storage_key, size=size_bytes, sha256=sha256)
        ),
        calling_ae=calling_ae,
        now=now,
    )
    return registration.outcome, registration.exam_id


def record_conflict(
    session: Session,
    *,
    header: InstanceHeader,
    existing: KnownInstance,
    storage_key: str,
    size_bytes: int,
    sha256: str,
    calling_ae: str,
    now: datetime,
) -> None:
    """Keep a differing copy of a known SOP instance for review and flag its exam."""
    insert_ignore(
        session,
        InstanceConflict.__table__,
        {
            "id": stable_id("conflict", header.sop_instance_uid, sha256),
            "sop_instance_uid": header.sop_instance_uid,
            "exam_id": existing.exam_id,
            "storage_key": storage_key,
            "size_bytes": size_bytes,
            "sha256": sha256,
            "calling_ae": calling_ae,
            "received_at": now,
        },
        conflict=["id"],
    )
    flag_conflicts(session, exam_id=existing.exam_id)
