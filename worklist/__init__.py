"""The domain hub: organisations and users, patients, exams, instances, work items, routing,
SLA targets and the audit trail. Intake packages record into it; the web layer reads from it.
"""

from worklist.access import Principal
from worklist.intake import InstanceHeader, RecordOutcome
from worklist.models import (
    Discipline,
    Exam,
    ExamState,
    OrgKind,
    Priority,
    ReaderLevel,
    Role,
    WorkItem,
)

__all__ = [
    "Discipline",
    "Exam",
    "ExamState",
    "InstanceHeader",
    "OrgKind",
    "Principal",
    "Priority",
    "ReaderLevel",
    "RecordOutcome",
    "Role",
    "WorkItem",
]
