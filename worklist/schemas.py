"""What the worklist returns to its callers (API and CLI): pydantic models, times in UTC."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from worklist.models import Discipline, ExamState, Priority, WorkItemState

T = TypeVar("T")

__all__ = ["ExamDetail", "ExamSummary", "InstanceOut", "Page", "PatientOut", "WorkItemOut"]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class PatientOut(_Out):
    id: str
    issuer: str
    patient_id: str
    name: str
    birth_date: str | None
    sex: str | None


class ExamSummary(_Out):
    id: str
    study_instance_uid: str
    org_id: str
    clinic_code: str
    accession_number: str | None
    discipline: Discipline
    modality: str
    modalities: str
    body_part: str
    description: str
    priority: Priority
    state: ExamState
    instance_count: int
    has_conflicts: bool
    patient: PatientOut
    performed_at: datetime | None
    first_received_at: datetime
    last_received_at: datetime
    ready_at: datetime | None


class InstanceOut(_Out):
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    series_number: int | None
    instance_number: int | None
    modality: str
    transfer_syntax_uid: str
    size_bytes: int
    sha256: str
    received_at: datetime


class ExamDetail(ExamSummary):
    instances: list[InstanceOut]


class WorkItemOut(_Out):
    id: str
    state: WorkItemState
    pool: str
    priority: Priority
    due_at: datetime
    created_at: datetime
    exam_id: str
    study_instance_uid: str
    clinic_code: str
    discipline: Discipline
    modality: str
    body_part: str
    description: str
    patient_name: str
    patient_id: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
