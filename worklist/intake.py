"""The intake contract: the one way every ingester (DICOM, ECG, lab) hands the hub what it
received.

An ingester parses and validates its own format, then:

1. **stores first**: :func:`store_object` starts writing the bytes to the object store under
   a key the ingester chose (in the background, so the disk sync overlaps the index work);
2. **indexes** in the caller's transaction: :func:`register_artifact` upserts the patient
   (:class:`PatientIn`), the exam keyed by (discipline, natural key) (:class:`ExamIn`) and the
   generic artifact row (:class:`ArtifactIn`: kind, ref, object key, size, SHA-256, received
   at, source), lets the ingester write its own detail row (``detail``), and returns once
   the object is durable;
3. **removes on rollback**: if the transaction rolls back, the object this call wrote is
   deleted again unless an index row refers to it;
4. **quarantines** what cannot be understood: :func:`quarantine_object` keeps the bytes with
   the reason.

The caller (the edge) commits, then acknowledges. The hub never sees the format: no header
type of any ingester is named here. A lab result, for example::

    pending = store_object(store=store, key=f"lab/{sha[:2]}/{sha}.hl7", source=path,
                           size=size, sha256=sha)
    registration = register_artifact(
        session,
        org=org,  # worklist.directory.OrgRef of the sending clinic
        patient=PatientIn(patient_id="12345", issuer="CLINIC_A", name="Wang^Fang"),
        exam=ExamIn(discipline=Discipline.LAB, natural_key=filler_number,
                    key_kind=ExamKeyKind.ORDER, modality="LAB"),
        artifact=ArtifactIn(kind="oru", ref=message_control_id, object=pending,
                            source=peer),
        detail=write_lab_message,  # (session, exam_id, artifact_id): the detail row
    )
    if registration.outcome is RecordOutcome.DUPLICATE:
        known = find_artifact(session, artifact_id=registration.artifact_id)  # judge it

DICOM goes the same way (``dicom_gateway.records.register_instance``).
"""

from __future__ import annotations

import enum
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    exists,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from rdc_core.db import (
    execute_direct,
    insert_ignore,
    on_rollback,
    session_connection,
    stable_id,
    upsert,
    utcnow,
)
from rdc_core.errors import PermissionDeniedError
from rdc_core.storage import ObjectStore, StoredObject
from worklist.directory import OrgRef
from worklist.models import (
    Artifact,
    Discipline,
    Exam,
    ExamKeyKind,
    ExamState,
    Patient,
    Priority,
    QuarantineItem,
)
from worklist.patients import OtherIdentifier, link_identifiers_from_intake

__all__ = [
    "ArtifactIn",
    "DetailWriter",
    "ExamIn",
    "ExamKeyKind",
    "KnownArtifact",
    "PatientIn",
    "PendingObject",
    "RecordOutcome",
    "References",
    "Registration",
    "artifact_id_for",
    "exam_id_for",
    "find_artifact",
    "flag_conflicts",
    "object_referenced",
    "quarantine_object",
    "record_quarantine",
    "register_artifact",
    "remove_unreferenced",
    "store_object",
]

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


class RecordOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class PatientIn:
    """The patient as the sender identified them.

    ``issuer`` is the assigning authority of ``patient_id`` (None: the sending clinic's code).
    ``original`` keeps the values exactly as received (kept once, with the first artifact).
    """

    patient_id: str
    issuer: str | None = None
    name: str = ""
    birth_date: str | None = None  # YYYYMMDD
    sex: str | None = None
    original: Mapping[str, Any] = field(default_factory=dict)
    # Further identifiers the message carries (DICOM Other Patient IDs Sequence, HL7 PID-3
    # repetitions): where a national ID (居民身份证号) arrives for the alliance patient index.
    other_ids: tuple[OtherIdentifier, ...] = ()


@dataclass(frozen=True, slots=True)
class ExamIn:
    """The exam an artifact belongs to: its discipline and natural key, and what the
    worklist routes and shows. Values of the first artifact create the exam; later ones add
    their modality, fill a missing body part and raise the priority."""

    discipline: Discipline
    natural_key: str  # Study Instance UID, order/filler number, derived file key
    key_kind: ExamKeyKind = ExamKeyKind.STUDY_UID
    accession_number: str | None = None
    modality: str = ""
    body_part: str = ""
    description: str = ""
    referring_physician: str | None = None  # as received (DICOM PN value); None: unknown
    performed_at: datetime | None = None
    priority: Priority | None = None


@dataclass(frozen=True, slots=True)
class PendingObject:
    """An object on its way into the store (see :func:`store_object`), or one stored
    already (:meth:`durable`)."""

    stored: StoredObject
    writing: Future[bool]  # True when this call created the object
    store: ObjectStore | None = None  # where it is written; None: never removed here

    @classmethod
    def durable(cls, stored: StoredObject) -> PendingObject:
        """An object already durable in the store and not written by this ingest (it is
        never removed on rollback)."""
        done: Future[bool] = Future()
        done.set_result(False)
        return cls(stored, done)

    def wait(self) -> None:
        """Return once the object is durable in the store; raises StorageError otherwise."""
        self.writing.result()

    def created(self) -> bool:
        """Whether this call wrote the object (False also when writing failed)."""
        try:
            return self.writing.result()
        except Exception:
            return False


@dataclass(frozen=True, slots=True)
class ArtifactIn:
    """One received object: ``kind`` names the ingester's detail table (``instance`` for a
    DICOM SOP instance), ``ref`` the artifact's own key within its kind (SOP Instance UID,
    message control ID, file hash), ``source`` the sender (AE title, MLLP peer, user)."""

    kind: str
    ref: str
    object: PendingObject
    source: str = ""

    @property
    def id(self) -> str:
        return artifact_id_for(self.kind, self.ref)


@dataclass(frozen=True, slots=True)
class Registration:
    """What :func:`register_artifact` did: STORED (new artifact) or DUPLICATE (its ID was
    indexed already: nothing changed; judge the copy against :func:`find_artifact`)."""

    outcome: RecordOutcome
    exam_id: str
    artifact_id: str


@dataclass(frozen=True, slots=True)
class KnownArtifact:
    """What the index holds for an artifact received before."""

    exam_id: str
    org_id: str
    storage_key: str
    sha256: str


# Writes the ingester's detail row of a new artifact: (session, exam ID, artifact ID).
DetailWriter = Callable[[Session, str, str], None]
# SQL conditions under which rows of an ingester's own tables refer to the artifact's object
# (e.g. a kept conflicting copy); built only when a rollback asks.
References = Callable[[], Sequence[ColumnElement[bool]]]


def exam_id_for(discipline: Discipline | str, natural_key: str, key_kind: ExamKeyKind) -> str:
    """The exam ID: derived from the key alone for a Study Instance UID (as it always was),
    from discipline, key kind and key otherwise. Every replica and retry computes the same."""
    if key_kind is ExamKeyKind.STUDY_UID:
        return stable_id("exam", natural_key)
    return stable_id("exam", str(discipline), key_kind.value, natural_key)


def artifact_id_for(kind: str, ref: str) -> str:
    """The artifact ID (also its detail row's): derived from kind and ref."""
    return stable_id(kind, ref)


@lru_cache(maxsize=1)
def _store_io() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="rdc-store-io")


def store_object(
    *, store: ObjectStore, key: str, source: Path, size: int, sha256: str, move: bool = False
) -> PendingObject:
    """Store first: start writing ``source`` to the store under ``key`` in the background
    (moving it with ``move``, for a file spooled in the store's own directory). No database
    work, so run it before the index transaction: the disk sync then overlaps the index
    statements. ``key`` must name the exact bytes (e.g. include a hash prefix): an existing
    object under it is kept, never replaced."""
    writing = _store_io().submit(partial(store.put_once, key, source, move=move))
    return PendingObject(StoredObject(key=key, size=size, sha256=sha256), writing, store)


_artifacts, _exams = cast(Table, Artifact.__table__), cast(Table, Exam.__table__)
# Statements of the ingest path, built once (see rdc_core.db.upsert for why).
_FIND_ARTIFACT = (
    select(_artifacts.c.exam_id, _exams.c.org_id, _artifacts.c.storage_key, _artifacts.c.sha256)
    .join(_exams, _exams.c.id == _artifacts.c.exam_id)
    .where(_artifacts.c.id == bindparam("artifact"))
)
# A new artifact of an exam already known (the common case): one statement counts it,
# moves the last-received time and reads what the checks below need. It touches nothing
# when the artifact is indexed already, so a re-sent copy leaves the exam as it was. It sets
# no column the QC facts are made of (migration 0021's triggers), so an instance received
# queues no QC refresh; the state changes only for an exam sent back for a re-scan
# (_RESCAN_RECEIVED).
_TOUCH_EXAM = (
    update(_exams)
    .where(
        _exams.c.id == bindparam("exam"),
        ~exists().where(_artifacts.c.id == bindparam("artifact")),
    )
    .values(
        instance_count=_exams.c.instance_count + 1,
        last_received_at=bindparam("now", type_=_exams.c.last_received_at.type),
    )
    .returning(
        _exams.c.id,
        _exams.c.org_id,
        _exams.c.modalities,
        _exams.c.body_part,
        _exams.c.priority,
        _exams.c.state,
    )
)
# New images for an exam sent back for a re-scan: it is received again, and the readiness
# check puts it back on the reading queue.
RESCAN_RECEIVED = (
    update(_exams)
    .where(
        _exams.c.id == bindparam("exam"),
        # Literal SQL, not bound values: this statement is compiled once with its named
        # parameters only (see rdc_core.db.execute_direct).
        _exams.c.state == literal_column(f"'{ExamState.RESCAN_REQUESTED.value}'"),
    )
    .values(state=literal_column(f"'{ExamState.RECEIVING.value}'"))
)


class _TouchedExam(NamedTuple):
    """What _TOUCH_EXAM returns, with the names of the exam columns."""

    id: str
    org_id: str
    modalities: str
    body_part: str
    priority: str
    state: str


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
_UNCOUNT_ARTIFACT = (
    update(_exams)
    .where(_exams.c.id == bindparam("exam"))
    .values(instance_count=_exams.c.instance_count - 1)
)


def find_artifact(session: Session, *, artifact_id: str) -> KnownArtifact | None:
    """The indexed artifact with this ID (see :func:`artifact_id_for`), if any."""
    row = (
        session_connection(session).execute(_FIND_ARTIFACT, {"artifact": artifact_id}).one_or_none()
    )
    return KnownArtifact(*row) if row else None


def object_referenced(
    session: Session,
    *,
    storage_key: str,
    artifact_id: str | None,
    also: Sequence[ColumnElement[bool]] = (),
) -> bool:
    """Whether an index row refers to the stored object ``storage_key``: the artifact
    ``artifact_id``, a quarantine record, or any of the ingester's own ``also`` conditions
    (e.g. a kept conflicting copy).

    Asked before removing an object after a rollback: a content-addressed key may have been
    written before by another ingest of the same data, whose row must keep its object.
    """
    quarantine = cast(Table, QuarantineItem.__table__)
    candidates: list[ColumnElement[bool]] = [
        exists().where(quarantine.c.storage_key == storage_key),
        *also,
    ]
    if artifact_id:
        # By ID: the primary key is indexed, storage_key is not.
        candidates.append(
            exists().where(_artifacts.c.id == artifact_id, _artifacts.c.storage_key == storage_key)
        )
    return bool(session_connection(session).execute(select(or_(*candidates))).scalar())


def remove_unreferenced(
    session: Session,
    store: ObjectStore,
    key: str,
    *,
    artifact_id: str | None,
    also: Sequence[ColumnElement[bool]] = (),
) -> None:
    """Delete the stored object ``key`` unless an index row refers to it (see
    :func:`object_referenced`). Never raises: when that cannot be checked the object is kept
    (an orphan costs space; deleting an object a row refers to loses data)."""
    try:
        if object_referenced(session, storage_key=key, artifact_id=artifact_id, also=also):
            return
        store.delete(key)
    except Exception as exc:
        log.warning("unreferenced object %s was kept: %s", key, exc)


def _undo_store(session: Session, artifact: ArtifactIn, also: References | None) -> None:
    # After a rollback: remove the object again if this ingest created it.
    store = artifact.object.store
    if store is not None and artifact.object.created():
        remove_unreferenced(
            session,
            store,
            artifact.object.stored.key,
            artifact_id=artifact.id,
            also=also() if also else (),
        )


def _elsewhere(exam: ExamIn) -> PermissionDeniedError:
    what = "study" if exam.key_kind is ExamKeyKind.STUDY_UID else f"{exam.discipline} exam"
    return PermissionDeniedError(f"{what} {exam.natural_key} belongs to another organisation")


def _upsert_patient(session: Session, patient: PatientIn, org: OrgRef, now: datetime) -> str:
    issuer = patient.issuer or org.code
    patient_ref = stable_id("patient", org.id, issuer, patient.patient_id)
    upsert(
        session,
        Patient.__table__,
        {
            "id": patient_ref,
            "org_id": org.id,
            "issuer": issuer,
            "patient_id": patient.patient_id,
            "name": patient.name,
            "birth_date": patient.birth_date,
            "sex": patient.sex,
            "original": dict(patient.original),
            "created_at": now,
            "updated_at": now,
        },
        conflict=["id"],
        # The first values stay (reports cite them); only the last-seen time moves.
        update=["updated_at"],
        other_keys=True,  # (org_id, issuer, patient_id): the ID derives from it
    )
    link_identifiers_from_intake(
        session,
        patient_ref=patient_ref,
        issuer=issuer,
        patient_id=patient.patient_id,
        other_ids=patient.other_ids,
        now=now,
    )
    return patient_ref


def _upsert_exam(
    session: Session, exam: ExamIn, exam_id: str, org: OrgRef, patient_ref: str, now: datetime
) -> Any:
    row = upsert(
        session,
        Exam.__table__,
        {
            "id": exam_id,
            "natural_key": exam.natural_key,
            "key_kind": exam.key_kind.value,
            "study_instance_uid": (
                exam.natural_key if exam.key_kind is ExamKeyKind.STUDY_UID else None
            ),
            "org_id": org.id,
            "patient_ref": patient_ref,
            "accession_number": exam.accession_number,
            "discipline": exam.discipline.value,
            "modality": exam.modality,
            "modalities": exam.modality,
            "body_part": exam.body_part,
            "description": exam.description,
            "referring_physician": exam.referring_physician,
            "priority": (exam.priority or Priority.ROUTINE).value,
            "state": ExamState.RECEIVING.value,
            "instance_count": 0,
            "has_conflicts": False,
            "performed_at": exam.performed_at,
            "first_received_at": now,
            "last_received_at": now,
            "created_at": now,
        },
        conflict=["id"],
        update=["last_received_at"],
        returning=["id", "org_id", "modalities", "body_part", "priority"],
        other_keys=True,  # (discipline, natural_key) and the study UID: the ID derives from them
    )
    if row.org_id != org.id:
        raise _elsewhere(exam)
    return row


def register_artifact(
    session: Session,
    *,
    org: OrgRef,
    patient: PatientIn,
    exam: ExamIn,
    artifact: ArtifactIn,
    detail: DetailWriter | None = None,
    also_referenced: References | None = None,
    now: datetime | None = None,
) -> Registration:
    """Index an artifact stored with :func:`store_object`, in the caller's transaction, and
    return once its object is durable: the caller may then commit and acknowledge.

    Upserts the patient (first values stay) and the exam (created RECEIVING; its count and
    last-received time move, which is what READY detection, routing and SLA work from),
    inserts the artifact row and, for a new artifact, calls ``detail(session, exam_id,
    artifact_id)`` so the ingester writes its own detail row with the same ID. If the
    transaction rolls back, the object is removed again when this call wrote it and no row
    (artifact, quarantine, the conditions ``also_referenced()`` returns) refers to it.

    Idempotent: an artifact ID is inserted once; racing writers are settled by the primary
    key, not by a read-then-write. An artifact indexed already changes nothing and comes
    back as DUPLICATE.

    Raises PermissionDeniedError (the exam belongs to another organisation), StorageError
    and DatabaseUnavailableError (answer "retry").
    """
    on_rollback(session, partial(_undo_store, session, artifact, also_referenced))
    registration = _index(
        session, org=org, patient=patient, exam=exam, artifact=artifact, detail=detail, now=now
    )
    artifact.object.wait()
    return registration


def _index(
    session: Session,
    *,
    org: OrgRef,
    patient: PatientIn,
    exam: ExamIn,
    artifact: ArtifactIn,
    detail: DetailWriter | None,
    now: datetime | None,
) -> Registration:
    now = now or utcnow()
    conn = session_connection(session)
    exam_id = exam_id_for(exam.discipline, exam.natural_key, exam.key_kind)
    artifact_id = artifact.id
    touched = execute_direct(
        session, _TOUCH_EXAM, {"exam": exam_id, "now": now, "artifact": artifact_id}
    )
    row: Any = _TouchedExam(*touched[0]) if touched else None
    counted = row is not None
    if counted and row.state == ExamState.RESCAN_REQUESTED.value:
        conn.execute(RESCAN_RECEIVED, {"exam": exam_id})
    if row is None:
        known = find_artifact(session, artifact_id=artifact_id)
        if known is not None:
            return Registration(RecordOutcome.DUPLICATE, known.exam_id, artifact_id)
        patient_ref = _upsert_patient(session, patient, org, now)
        row = _upsert_exam(session, exam, exam_id, org, patient_ref, now)
    elif row.org_id != org.id:
        raise _elsewhere(exam)
    stored = artifact.object.stored
    inserted = insert_ignore(
        session,
        Artifact.__table__,
        {
            "id": artifact_id,
            "exam_id": row.id,
            "kind": artifact.kind,
            "ref": artifact.ref,
            "storage_key": stored.key,
            "size_bytes": stored.size,
            "sha256": stored.sha256,
            "received_at": now,
            "source": artifact.source,
        },
        conflict=["id"],
    )
    if not inserted:
        if counted:  # another writer indexed this artifact meanwhile
            conn.execute(_UNCOUNT_ARTIFACT, {"exam": row.id})
        return Registration(RecordOutcome.DUPLICATE, row.id, artifact_id)
    if detail is not None:
        detail(session, row.id, artifact_id)
    modalities = [m for m in row.modalities.split("\\") if m]
    if exam.modality and exam.modality not in modalities:
        modalities.append(exam.modality)
    priority = Priority(row.priority)
    if exam.priority is not None and exam.priority.rank < priority.rank:
        priority = exam.priority
    body_part = row.body_part or exam.body_part
    new_modalities = "\\".join(modalities)
    if (
        not counted
        or new_modalities != row.modalities
        or body_part != row.body_part
        or priority.value != row.priority
    ):
        conn.execute(
            _AMEND_EXAM,
            {
                "exam": row.id,
                "added": 0 if counted else 1,
                "new_modalities": new_modalities,
                "new_body_part": body_part,
                "new_priority": priority.value,
            },
        )
    return Registration(RecordOutcome.STORED, row.id, artifact_id)


def flag_conflicts(session: Session, *, exam_id: str) -> None:
    """Flag an exam as holding a differing copy of one of its artifacts (kept by the
    ingester for review; the first copy stays the artifact of record)."""
    session.execute(update(Exam).where(Exam.id == exam_id).values(has_conflicts=True))


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
    artifact_ref: str | None = None,
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
            "artifact_ref": artifact_ref,
            "size_bytes": size_bytes,
            "sha256": sha256,
            "received_at": now,
        },
        conflict=["id"],
        update=["received_at", "reason"],
    )
    return item_id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def quarantine_object(
    session: Session,
    *,
    store: ObjectStore,
    source: Path,
    reason: str,
    origin: str,
    sender: str = "",
    org_id: str | None = None,
    artifact_ref: str | None = None,
) -> str:
    """Quarantine: keep input that cannot be understood byte for byte under ``quarantine/``
    with the reason, in the caller's transaction (removed again on rollback when this call
    wrote it). ``origin`` names the way it came (``c-store``, ``stow``, ``mllp``…),
    ``sender`` who sent it. Returns the quarantine record's ID."""
    sha256 = _sha256(source)
    key = f"quarantine/{sha256[:2]}/{sha256}.bin"
    if store.put_once(key, source):
        on_rollback(session, partial(remove_unreferenced, session, store, key, artifact_id=None))
    return record_quarantine(
        session,
        storage_key=key,
        reason=reason,
        source=origin,
        size_bytes=source.stat().st_size,
        sha256=sha256,
        calling_ae=sender[:16],
        org_id=org_id,
        artifact_ref=artifact_ref,
        now=utcnow(),
    )
