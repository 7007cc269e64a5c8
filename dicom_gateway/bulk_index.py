"""Index a group-commit batch of received instances in a few set-wise statements.

The bulk writer (:data:`rdc_core.group_commit.BulkWriter`) of the C-STORE path: given every
instance of a batch, it writes those of the common case, a new SOP instance of an exam
already indexed for the same clinic that adds nothing to the exam's modalities, body part
or priority, with two reads, one ``executemany`` per table and one exam update per exam,
instead of some six statements (savepoint, exam touch, artifact, instance, release) per
instance. Each of the others (first instance of a study, duplicates and conflicts, another
clinic's study, ECG waveforms, an exam to amend) is answered ``None`` and indexed one by one
by :func:`dicom_gateway.ingest.index_dicom_file`, as before: the rows written are the same.

Why: on SQLite the batch is written while the database's one writer lock is held; the
statements per instance were the serial section that capped ingest (issue 23). On
PostgreSQL the rows read may be stale (another gateway writes meanwhile), which is safe: an
exam's modalities, body part and priority only ever grow, so a stale read can only leave
an instance to the one-by-one path; an artifact inserted meanwhile by another writer fails
the bulk write (primary key), and its units go one by one. Deadlocks with other writers are
avoided by the lock order and retried by group commit.

Nothing is removed from the store here unless the transaction rolls back (an object this
ingest created, as :func:`worklist.intake.register_artifact` does); objects are durable
before their instance queues for the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, cast

from sqlalchemy import (
    CompoundSelect,
    Select,
    Table,
    bindparam,
    insert,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import Session

from dicom_gateway.ingest import IngestResult, PreparedInstance
from dicom_gateway.models import Instance
from dicom_gateway.records import (
    ECG_WAVEFORM_SOP_CLASSES,
    INSTANCE_KIND,
    conflict_references,
    exam_id_for_study,
    instance_row,
)
from rdc_core.db import execute_direct, execute_direct_many, on_rollback, utcnow
from rdc_core.storage import ObjectStore
from worklist.directory import OrgRef
from worklist.intake import RecordOutcome, artifact_id_for, remove_unreferenced
from worklist.models import Artifact, Exam, ExamState, Priority

__all__ = ["BulkItem", "index_many"]

_artifacts = cast(Table, Artifact.__table__)
_exams = cast(Table, Exam.__table__)
_instances = cast(Table, Instance.__table__)

# The reads of a batch: IN lists of a fixed number of binds (a power of two, padded with an
# ID no row has), so each statement is compiled once and run straight on the driver
# (rdc_core.db.execute_direct) rather than expanded and executed by SQLAlchemy per batch.
_SMALLEST_READ = 8
_RESCAN = ExamState.RESCAN_REQUESTED.value
_PAD = ""  # no exam, artifact or SOP instance has an empty ID


def _read_size(count: int) -> int:
    size = _SMALLEST_READ
    while size < count:
        size *= 2
    return size


def _binds(prefix: str, size: int) -> list[Any]:
    return [bindparam(f"{prefix}{k}") for k in range(size)]


@lru_cache(maxsize=32)
def _exams_read(size: int) -> Select[Any]:
    columns = (_exams.c.id, _exams.c.org_id, _exams.c.modalities, _exams.c.body_part)
    return select(*columns, _exams.c.priority, _exams.c.state).where(
        _exams.c.id.in_(_binds("e", size))
    )


@lru_cache(maxsize=32)
def _known_read(size: int) -> CompoundSelect:
    """Which of the artifact IDs (rows ``'a', id``) and SOP Instance UIDs (``'s', uid``)
    are indexed already: one statement for both."""
    return union_all(
        select(literal_column("'a'"), _artifacts.c.id).where(
            _artifacts.c.id.in_(_binds("a", size))
        ),
        select(literal_column("'s'"), _instances.c.sop_instance_uid).where(
            _instances.c.sop_instance_uid.in_(_binds("s", size))
        ),
    )


def _padded(prefix: str, values: list[str], size: int) -> dict[str, str]:
    bound = {f"{prefix}{k}": value for k, value in enumerate(values)}
    bound.update({f"{prefix}{k}": _PAD for k in range(len(values), size)})
    return bound


# Plain INSERTs: the rows were just found absent in this transaction; a row there after all
# (another writer on PostgreSQL) fails the bulk write, and its units go one by one.
_ARTIFACT_COLUMNS = (
    "id",
    "exam_id",
    "kind",
    "ref",
    "storage_key",
    "size_bytes",
    "sha256",
    "received_at",
    "source",
)
_INSERT_ARTIFACT = insert(_artifacts)
_INSTANCE_COLUMNS = (
    "id",
    "sop_instance_uid",
    "exam_id",
    "series_instance_uid",
    "series_number",
    "instance_number",
    "frame_count",
    "sop_class_uid",
    "modality",
    "body_part",
    "transfer_syntax_uid",
    "storage_key",
    "size_bytes",
    "sha256",
    "calling_ae",
    "received_at",
    "coerced",
)
_INSERT_INSTANCE = insert(_instances)
# What worklist.intake's exam touch does for one artifact, for ``added`` of them at once (an
# exam sent back for a re-scan goes one by one: its state changes). No column the QC facts
# are made of is set, so the batch queues no QC refresh.
_COUNT_EXAM = (
    update(_exams)
    .where(_exams.c.id == bindparam("exam"))
    .values(
        instance_count=_exams.c.instance_count + bindparam("added"),
        last_received_at=bindparam("now", type_=_exams.c.last_received_at.type),
    )
)


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One instance of a batch: prepared (its object durable), from whom, where stored, and
    the IDs derived from its UIDs (computed before it queues: not in the serial section)."""

    prepared: PreparedInstance
    organization: OrgRef
    calling_ae: str
    store: ObjectStore
    exam_id: str
    artifact_id: str

    @classmethod
    def of(
        cls, prepared: PreparedInstance, organization: OrgRef, calling_ae: str, store: ObjectStore
    ) -> BulkItem:
        """The item of a prepared instance, its IDs derived here."""
        header = prepared.header
        return cls(
            prepared,
            organization,
            calling_ae,
            store,
            exam_id_for_study(header.study_instance_uid),
            artifact_id_for(INSTANCE_KIND, header.sop_instance_uid),
        )


@dataclass(frozen=True, slots=True)
class _ExamRow:
    id: str
    org_id: str
    modalities: str
    body_part: str
    priority: str
    state: str


def _adds_to_exam(row: _ExamRow, prepared: PreparedInstance) -> bool:
    """Whether the instance changes the exam's modalities, body part or priority (the
    amendment worklist.intake makes one instance at a time)."""
    header = prepared.header
    if header.modality and header.modality not in row.modalities.split("\\"):
        return True
    if not row.body_part and header.body_part:
        return True
    return header.priority is not None and header.priority.rank < Priority(row.priority).rank


def _undo(session: Session, store: ObjectStore, key: str, artifact_id: str, sop: str) -> None:
    remove_unreferenced(
        session, store, key, artifact_id=artifact_id, also=conflict_references(key, sop)
    )


def index_many(session: Session, items: list[BulkItem]) -> list[IngestResult | None]:
    """Index the items of the common case (see the module) in the caller's transaction;
    ``None`` for each of the others, left to the caller."""
    exam_ids = [item.exam_id for item in items]
    artifact_ids = [item.artifact_id for item in items]
    sops = [item.prepared.header.sop_instance_uid for item in items]
    wanted = sorted(set(exam_ids))
    size = _read_size(len(wanted))
    exams = {
        row[0]: _ExamRow(*row)
        for row in execute_direct(session, _exams_read(size), _padded("e", wanted, size))
    }
    size = _read_size(len(items))
    known: set[str] = set()
    known_sops: set[str] = set()
    for kind, value in execute_direct(
        session, _known_read(size), _padded("a", artifact_ids, size) | _padded("s", sops, size)
    ):
        (known if kind == "a" else known_sops).add(value)
    now = utcnow()
    results: list[IngestResult | None] = [None] * len(items)
    artifact_rows: list[dict[str, Any]] = []
    instance_rows: list[dict[str, Any]] = []
    added: dict[str, int] = {}
    undos = []
    for n, (item, exam_id, artifact_id) in enumerate(
        zip(items, exam_ids, artifact_ids, strict=True)
    ):
        header, pending = item.prepared.header, item.prepared.pending
        row = exams.get(exam_id)
        if (
            row is None
            or row.org_id != item.organization.id
            or artifact_id in known
            or header.sop_instance_uid in known_sops
            or header.sop_class_uid in ECG_WAVEFORM_SOP_CLASSES
            or row.state == _RESCAN
            or _adds_to_exam(row, item.prepared)
        ):
            continue
        known.add(artifact_id)  # a second copy in the same batch goes one by one
        known_sops.add(header.sop_instance_uid)
        stored = pending.stored
        artifact_rows.append(
            {
                "id": artifact_id,
                "exam_id": exam_id,
                "kind": INSTANCE_KIND,
                "ref": header.sop_instance_uid,
                "storage_key": stored.key,
                "size_bytes": stored.size,
                "sha256": stored.sha256,
                "received_at": now,
                "source": item.calling_ae,
            }
        )
        instance_rows.append(
            instance_row(
                header,
                exam_id=exam_id,
                artifact_id=artifact_id,
                stored=stored,
                calling_ae=item.calling_ae,
                now=now,
            )
        )
        added[exam_id] = added.get(exam_id, 0) + 1
        if pending.store is not None and pending.created():
            undos.append((pending.store, stored.key, artifact_id, header.sop_instance_uid))
        results[n] = IngestResult(
            RecordOutcome.STORED,
            exam_id,
            header.study_instance_uid,
            header.sop_instance_uid,
            stored.key,
            stored.size,
        )
    if not artifact_rows:
        return results
    # Exams in the order of the items (group commit's lock order: patient, exam), which is
    # the order every writer on PostgreSQL locks them in.
    execute_direct_many(
        session,
        _COUNT_EXAM,
        [{"exam": exam, "added": count, "now": now} for exam, count in added.items()],
    )
    execute_direct_many(session, _INSERT_ARTIFACT, artifact_rows, column_keys=_ARTIFACT_COLUMNS)
    execute_direct_many(session, _INSERT_INSTANCE, instance_rows, column_keys=_INSTANCE_COLUMNS)
    for store, key, artifact_id, sop in undos:
        on_rollback(session, partial(_undo, session, store, key, artifact_id, sop))
    return results
