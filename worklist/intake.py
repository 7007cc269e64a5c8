"""Recording what arrives: patients, exams and instances upserted in the caller's transaction.

The header is already parsed and validated by the intake package that received the object
(DICOM gateway, STOW, import); this module only knows the domain.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, bindparam, case, exists, literal_column, or_, select, update
from sqlalchemy.orm import Session

from rdc_core.db import execute_direct, insert_ignore, session_connection, stable_id, upsert
from rdc_core.errors import PermissionDeniedError
from worklist.models import (
    Discipline,
    Exam,
    ExamState,
    Instance,
    InstanceConflict,
    Patient,
    Priority,
    QuarantineItem,
)

__all__ = [
    "InstanceHeader",
    "KnownInstance",
    "RecordOutcome",
    "exam_id_for",
    "find_instance",
    "object_referenced",
    "record_conflict",
    "record_instance",
    "record_quarantine",
]


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The parts of an object's header the domain needs, already decoded and validated."""

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
    coerced: dict[str, str] = field(default_factory=dict)
    accession_number: str | None = None
    discipline: Discipline = Discipline.IMAGING
    modality: str = ""
    body_part: str = ""
    study_description: str = ""
    performed_at: datetime | None = None
    series_number: int | None = None
    instance_number: int | None = None
    frame_count: int = 1
    priority: Priority | None = None


class RecordOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


def exam_id_for(study_instance_uid: str) -> str:
    """The exam ID derived from the Study Instance UID."""
    return stable_id("exam", study_instance_uid)


@dataclass(frozen=True, slots=True)
class KnownInstance:
    """What the index holds for a SOP Instance UID already received."""

    exam_id: str
    org_id: str
    storage_key: str
    sha256: str


_instances, _exams = cast(Table, Instance.__table__), cast(Table, Exam.__table__)
# Statements of the ingest path, built once (see rdc_core.db.upsert for why).
_FIND_INSTANCE = (
    select(_instances.c.exam_id, _exams.c.org_id, _instances.c.storage_key, _instances.c.sha256)
    .join(_exams, _exams.c.id == _instances.c.exam_id)
    .where(_instances.c.sop_instance_uid == bindparam("sop"))
)
# A new instance of a study already known (the common case): one statement counts it,
# moves the last-received time and reads what the checks below need. It touches nothing
# when the instance is indexed already, so a re-sent copy leaves the exam as it was.
_TOUCH_EXAM = (
    update(_exams)
    .where(
        _exams.c.id == bindparam("exam"),
        ~exists().where(_instances.c.sop_instance_uid == bindparam("sop")),
    )
    .values(
        instance_count=_exams.c.instance_count + 1,
        last_received_at=bindparam("now", type_=_exams.c.last_received_at.type),
        # New images for an exam sent back for a re-scan: it is received again, and the
        # readiness check puts it back on the reading queue.
        state=case(
            # Literal SQL, not bound values: this statement is compiled once with its
            # named parameters only (see rdc_core.db.execute_direct).
            (
                _exams.c.state == literal_column(f"'{ExamState.RESCAN_REQUESTED.value}'"),
                literal_column(f"'{ExamState.RECEIVING.value}'"),
            ),
            else_=_exams.c.state,
        ),
    )
    .returning(
        _exams.c.id, _exams.c.org_id, _exams.c.modalities, _exams.c.body_part, _exams.c.priority
    )
)


class _TouchedExam(NamedTuple):
    """What _TOUCH_EXAM returns, with the names of the exam columns."""

    id: str
    org_id: str
    modalities: str
    body_part: str
    priority: str


_AMEND_EXAM = (
    update(_exams)
    .where(_exams.c.id == bindparam("exam"))
    .values(
        instance_count=_exams.c.instance_count + bindparam("added"),
        modalities=bindparam("new_modalities"),
        body_part=bindparam("new_body_part"),
        priority=bindparam("new_priority"),
    )
)
_UNCOUNT_INSTANCE = (
    update(_exams)
    .where(_exams.c.id == bindparam("exam"))
    .values(instance_count=_exams.c.instance_count - 1)
)


def find_instance(session: Session, *, sop_instance_uid: str) -> KnownInstance | None:
    """The indexed instance with this SOP Instance UID, if any."""
    row = (
        session_connection(session).execute(_FIND_INSTANCE, {"sop": sop_instance_uid}).one_or_none()
    )
    return KnownInstance(*row) if row else None


def object_referenced(session: Session, *, storage_key: str, sop_instance_uid: str | None) -> bool:
    """Whether an index row (an instance, a kept conflicting copy or a quarantine record)
    refers to the stored object ``storage_key``.

    Asked before removing an object after a rollback: a content-addressed key may have been
    written before by another ingest of the same data, whose row must keep its object.
    """
    conflicts, quarantine = (
        cast(Table, InstanceConflict.__table__),
        cast(Table, QuarantineItem.__table__),
    )
    candidates = [exists().where(quarantine.c.storage_key == storage_key)]
    if sop_instance_uid:
        # By SOP Instance UID first: those columns are indexed, storage_key is not.
        candidates += [
            exists().where(
                _instances.c.sop_instance_uid == sop_instance_uid,
                _instances.c.storage_key == storage_key,
            ),
            exists().where(
                conflicts.c.sop_instance_uid == sop_instance_uid,
                conflicts.c.storage_key == storage_key,
            ),
        ]
    return bool(session_connection(session).execute(select(or_(*candidates))).scalar())


def _upsert_patient(
    session: Session, header: InstanceHeader, org_id: str, org_code: str, now: datetime
) -> str:
    issuer = header.issuer_of_patient_id or org_code
    patient_ref = stable_id("patient", org_id, issuer, header.patient_id)
    upsert(
        session,
        Patient.__table__,
        {
            "id": patient_ref,
            "org_id": org_id,
            "issuer": issuer,
            "patient_id": header.patient_id,
            "name": header.patient_name,
            "birth_date": header.patient_birth_date,
            "sex": header.patient_sex,
            "original": {
                **header.patient_original,
                **(
                    {"_coerced": {"PatientID": header.patient_id}}
                    if "PatientID" in header.coerced
                    else {}
                ),
            },
            "created_at": now,
            "updated_at": now,
        },
        conflict=["id"],
        # The first values stay (reports cite them); only the last-seen time moves.
        update=["updated_at"],
    )
    return patient_ref


def _upsert_exam(
    session: Session, header: InstanceHeader, org_id: str, patient_ref: str, now: datetime
) -> Any:
    exam_id = exam_id_for(header.study_instance_uid)
    table = Exam.__table__
    exam = upsert(
        session,
        table,
        {
            "id": exam_id,
            "study_instance_uid": header.study_instance_uid,
            "org_id": org_id,
            "patient_ref": patient_ref,
            "accession_number": header.accession_number,
            "discipline": header.discipline.value,
            "modality": header.modality,
            "modalities": header.modality,
            "body_part": header.body_part,
            "description": header.study_description,
            "priority": (header.priority or Priority.ROUTINE).value,
            "state": ExamState.RECEIVING.value,
            "instance_count": 0,
            "has_conflicts": False,
            "performed_at": header.performed_at,
            "first_received_at": now,
            "last_received_at": now,
            "created_at": now,
        },
        conflict=["id"],
        update=["last_received_at"],
        returning=["id", "org_id", "modalities", "body_part", "priority"],
    )
    if exam.org_id != org_id:
        raise PermissionDeniedError(
            f"study {header.study_instance_uid} belongs to another organisation"
        )
    return exam


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
    """Index a stored object: upsert patient and exam, insert the instance.

    Idempotent: the same SOP Instance UID is inserted once; racing writers are settled by
    the unique constraint, not by a read-then-write. For a study already indexed only the
    exam moves (count, last-received time); the patient row is upserted with the exam. An
    instance indexed already changes nothing and comes back as DUPLICATE: the caller judges
    the copy against :func:`find_instance`.
    """
    conn = session_connection(session)
    exam_id = exam_id_for(header.study_instance_uid)
    touched = execute_direct(
        session, _TOUCH_EXAM, {"exam": exam_id, "now": now, "sop": header.sop_instance_uid}
    )
    exam: Any = _TouchedExam(*touched[0]) if touched else None
    counted = exam is not None
    if exam is None:
        known = find_instance(session, sop_instance_uid=header.sop_instance_uid)
        if known is not None:
            return RecordOutcome.DUPLICATE, known.exam_id
        patient_ref = _upsert_patient(session, header, org_id, org_code, now)
        exam = _upsert_exam(session, header, org_id, patient_ref, now)
    elif exam.org_id != org_id:
        raise PermissionDeniedError(
            f"study {header.study_instance_uid} belongs to another organisation"
        )
    inserted = insert_ignore(
        session,
        Instance.__table__,
        {
            "id": stable_id("instance", header.sop_instance_uid),
            "sop_instance_uid": header.sop_instance_uid,
            "exam_id": exam.id,
            "series_instance_uid": header.series_instance_uid,
            "series_number": header.series_number,
            "instance_number": header.instance_number,
            "frame_count": header.frame_count,
            "sop_class_uid": header.sop_class_uid,
            "modality": header.modality,
            "body_part": header.body_part,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "storage_key": storage_key,
            "size_bytes": size_bytes,
            "sha256": sha256,
            "calling_ae": calling_ae,
            "received_at": now,
            "coerced": header.coerced or None,
        },
        conflict=["sop_instance_uid"],
    )
    if not inserted:
        if counted:  # another writer indexed this SOP instance meanwhile
            conn.execute(_UNCOUNT_INSTANCE, {"exam": exam.id})
        return RecordOutcome.DUPLICATE, exam.id
    modalities = [m for m in exam.modalities.split("\\") if m]
    if header.modality and header.modality not in modalities:
        modalities.append(header.modality)
    priority = Priority(exam.priority)
    if header.priority is not None and header.priority.rank < priority.rank:
        priority = header.priority
    body_part = exam.body_part or header.body_part
    new_modalities = "\\".join(modalities)
    if (
        not counted
        or new_modalities != exam.modalities
        or body_part != exam.body_part
        or priority.value != exam.priority
    ):
        conn.execute(
            _AMEND_EXAM,
            {
                "exam": exam.id,
                "added": 0 if counted else 1,
                "new_modalities": new_modalities,
                "new_body_part": body_part,
                "new_priority": priority.value,
            },
        )
    return RecordOutcome.STORED, exam.id


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
    session.execute(update(Exam).where(Exam.id == existing.exam_id).values(has_conflicts=True))


def record_quarantine(
    session: Session,
    *,
    storage_key: str,
    reason: str,
    source: str,
    size_bytes: int,
    sha256: str,
    calling_ae: str = "",
    org_id: str | None = None,
    sop_instance_uid: str | None = None,
    now: datetime,
) -> str:
    """Record rejected input kept in the quarantine area; returns the record ID."""
    item_id = stable_id("quarantine", sha256, source, calling_ae)
    upsert(
        session,
        QuarantineItem.__table__,
        {
            "id": item_id,
            "storage_key": storage_key,
            "reason": reason[:4000],
            "source": source,
            "calling_ae": calling_ae,
            "org_id": org_id,
            "sop_instance_uid": sop_instance_uid,
            "size_bytes": size_bytes,
            "sha256": sha256,
            "received_at": now,
        },
        conflict=["id"],
        update=["received_at", "reason"],
    )
    return item_id
