"""What the worklist returns to its callers (API and CLI): pydantic models, times in UTC."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

import rfc8785
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from worklist.models import (
    AmendmentKind,
    Discipline,
    ExamState,
    Priority,
    QualityGrade,
    ReaderLevel,
    ReportStatus,
    WorkItemState,
)
from worklist.patients.national_id import shown_patient_id

T = TypeVar("T")


def _signable_structured(value: dict[str, Any] | None) -> dict[str, Any] | None:
    # The structured fields are signed as RFC 8785 canonical JSON, whose numbers are IEEE
    # doubles: NaN, infinities and integers beyond 2^53 have no canonical form (and would
    # otherwise fail at signing, after the reader pressed submit).
    if value is None:
        return None
    try:
        rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(
            "structured: numbers must be finite and integers within ±(2^53-1), text valid "
            f"Unicode (RFC 8785 JSON) / 结构化字段含无法签名的数值或字符: {exc}"
        ) from exc
    return value


__all__ = [
    "ExamDetail",
    "ExamSummary",
    "InstanceOut",
    "KeyImageRef",
    "LeaseOut",
    "Me",
    "Page",
    "PatientOut",
    "ReaderOut",
    "ReportAmendIn",
    "ReportDetailOut",
    "ReportIn",
    "ReportOut",
    "ReportVersionOut",
    "WorkItemOut",
    "WorklistCounts",
    "WorklistPage",
]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class PatientOut(_Out):
    id: str
    issuer: str
    patient_id: str
    name: str
    birth_date: str | None
    sex: str | None

    # Set when ``patient_id`` is a national ID (居民身份证号), shown masked.
    _masked: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _mask_national_id(self) -> PatientOut:
        shown = shown_patient_id(self.issuer, self.patient_id)
        if shown != self.patient_id:
            self.patient_id, self._masked = shown, True
        return self

    @property
    def masked(self) -> bool:
        return self._masked


class ExamSummary(_Out):
    id: str
    study_instance_uid: str | None = None  # DICOM exams; None for an uploaded ECG file
    org_id: str
    clinic_code: str
    clinic_name: str = ""
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
    claimed_at: datetime | None = None
    preliminary_at: datetime | None = None
    final_at: datetime | None = None
    rescan_requested_at: datetime | None = None
    rescan_reason: str | None = None
    rescan_requested_by: str | None = None  # the reader's name, as people read it
    rescan_declined_at: datetime | None = None
    rescan_decline_reason: str | None = None
    priority_reason: str | None = None
    # Why a machine pre-screen put the exam first in the queue (a suspicion to confirm).
    triage_reason: str | None = None
    report_status: ReportStatus | None = None


class InstanceOut(_Out):
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    series_number: int | None
    instance_number: int | None
    frame_count: int = 1
    modality: str
    transfer_syntax_uid: str
    size_bytes: int
    sha256: str
    received_at: datetime


class ExamDetail(ExamSummary):
    instances: list[InstanceOut]
    # The alliance patient index's person of the exam's patient (the patient page), and
    # whether the patient ID is a national ID shown masked (link to the person, not the ID).
    person_id: str | None = None
    patient_id_masked: bool = False
    work_item_id: str | None = None
    due_at: datetime | None = None


class WorkItemOut(_Out):
    id: str
    state: WorkItemState
    pool: str
    priority: Priority
    due_at: datetime
    created_at: datetime
    exam_id: str
    study_instance_uid: str | None
    clinic_code: str
    discipline: Discipline
    modality: str
    body_part: str
    description: str
    patient_name: str
    patient_id: str
    clinic_name: str = ""
    exam_state: ExamState | None = None
    claimed_by: str | None = None
    lease_expires_at: datetime | None = None
    taken: bool = False
    mine: bool = False
    overdue: bool = False
    report_status: ReportStatus | None = None
    # A machine pre-screen's reason for putting the exam first (e.g. "QTc ≥550 ms"): a
    # suspicion the reader confirms; nothing is signed or released by it.
    triage_reason: str | None = None


class WorklistCounts(BaseModel):
    """How many visible items are in each reading state (with the other filters applied)."""

    open: int = 0
    claimed: int = 0
    awaiting_verification: int = 0
    overdue: int = 0
    mine: int = 0


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class WorklistPage(Page[WorkItemOut]):
    counts: WorklistCounts
    server_time: datetime


class LeaseOut(BaseModel):
    """A claim on a work item, valid until ``lease_expires_at``."""

    item_id: str
    exam_id: str
    claimed_by: str
    lease_expires_at: datetime
    lease_seconds: int


class KeyImageRef(BaseModel):
    """A frame the reader marked for the printed report."""

    sop_instance_uid: str = Field(min_length=1, max_length=64)
    frame: int = Field(default=1, ge=1)


MAX_KEY_IMAGES = 12


class ReportIn(BaseModel):
    """A draft save: only the fields given change. ``revision``, when given, must match the
    stored one (two editors do not overwrite each other)."""

    template_code: str | None = Field(default=None, max_length=64)
    findings: str | None = Field(default=None, max_length=20_000)
    impression: str | None = Field(default=None, max_length=10_000)
    recommendation: str | None = Field(default=None, max_length=10_000)
    structured: dict[str, Any] | None = None
    quality_grade: QualityGrade | None = None
    quality_reason: str | None = Field(default=None, max_length=2_000)
    critical: bool | None = None
    key_images: list[KeyImageRef] | None = Field(default=None, max_length=MAX_KEY_IMAGES)
    revision: int | None = None

    _structured = field_validator("structured")(_signable_structured)

    @field_validator("quality_grade", mode="before")
    @classmethod
    def _grade_alias(cls, value: Any) -> Any:
        # Accept the letter codes too (A/B/C/D or REJECT) for clients without CJK input.
        aliases = {"A": "甲", "B": "乙", "C": "丙", "D": "废", "REJECT": "废"}
        return aliases.get(value.upper(), value) if isinstance(value, str) else value


class ReportOut(_Out):
    id: str
    exam_id: str
    version: int
    status: ReportStatus
    template_code: str | None
    findings: str
    impression: str
    recommendation: str
    structured: dict[str, Any]
    quality_grade: QualityGrade | None
    quality_reason: str
    critical: bool
    author: str  # username
    author_level: ReaderLevel | None
    verified_by: str | None  # username
    # The people's display names (what a report shows: 报告医师 / 审核医师), else the login.
    author_name: str = ""
    verified_by_name: str | None = None
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    verified_at: datetime | None
    final_at: datetime | None
    revision: int
    locked: bool
    notice: str | None
    key_images: list[KeyImageRef] = []
    previous_id: str | None = None
    amendment_kind: AmendmentKind | None = None
    amendment_reason: str | None = None


class SigningPreviewOut(BaseModel):
    """What a signature would sign, for the signing dialog: the outcome (``final`` or
    ``preliminary``) and, for a final report, the mutual-recognition decision it would get."""

    report_id: str
    exam_id: str
    action: str
    outcome: ReportStatus
    impression: str
    critical: bool
    recognition: dict[str, Any] | None = None


class ReportAmendIn(BaseModel):
    """A new version of a signed final report: what kind of change, why, and the fields
    that change (the others are copied; for ``appended`` the given text is added)."""

    kind: AmendmentKind
    reason: str = Field(min_length=1, max_length=2_000)
    findings: str | None = Field(default=None, max_length=20_000)
    impression: str | None = Field(default=None, max_length=10_000)
    recommendation: str | None = Field(default=None, max_length=10_000)
    structured: dict[str, Any] | None = None
    critical: bool | None = None
    key_images: list[KeyImageRef] | None = Field(default=None, max_length=MAX_KEY_IMAGES)

    _structured = field_validator("structured")(_signable_structured)


class ReportVersionOut(BaseModel):
    """One version in a report's history."""

    id: str
    version: int
    status: ReportStatus
    kind: AmendmentKind | None
    reason: str | None
    final_at: datetime | None
    current: bool


class ReportDetailOut(ReportOut):
    """A report version with its history, signature and recognition decision."""

    versions: list[ReportVersionOut]
    current_id: str
    signature: dict[str, Any] | None
    recognition: dict[str, Any] | None


class ReaderOut(BaseModel):
    username: str
    display_name: str
    role: str
    level: ReaderLevel | None


class Me(BaseModel):
    username: str
    display_name: str
    role: str
    level: ReaderLevel | None
    org_code: str
    org_kind: str
