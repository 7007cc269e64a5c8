"""The domain hub: organisations and users, patients, exams, artifacts, work items, routing,
SLA targets and the audit trail. Intake packages record into it through one contract
(``worklist.intake``: :func:`store_object`, :func:`register_artifact`,
:func:`quarantine_object`); the web layer reads from it.
"""

from worklist.access import Principal
from worklist.intake import (
    ArtifactIn,
    ExamIn,
    PatientIn,
    PendingObject,
    RecordOutcome,
    Registration,
    quarantine_object,
    register_artifact,
    store_object,
)
from worklist.models import (
    Discipline,
    Exam,
    ExamKeyKind,
    ExamState,
    OrgKind,
    Priority,
    ReaderLevel,
    Role,
    WorkItem,
)

__all__ = [
    "ArtifactIn",
    "Discipline",
    "Exam",
    "ExamIn",
    "ExamKeyKind",
    "ExamState",
    "OrgKind",
    "PatientIn",
    "PendingObject",
    "Principal",
    "Priority",
    "ReaderLevel",
    "RecordOutcome",
    "Registration",
    "Role",
    "WorkItem",
    "quarantine_object",
    "register_artifact",
    "store_object",
]
