"""What delivery returns to its callers (API, CLI, portal): pydantic models, times in UTC."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worklist.delivery.models import DeliveryChannel, DeliveryState
from worklist.models import Discipline, Priority, ReportStatus

__all__ = [
    "AcknowledgementOut",
    "DeliveryAttemptOut",
    "DeliveryOut",
    "EndpointIn",
    "EndpointOut",
    "RecognitionOut",
    "ReportVersionOut",
]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class EndpointIn(BaseModel):
    """A clinic's push-back endpoint as an administrator enters it."""

    clinic: str = Field(description="clinic code")
    channel: DeliveryChannel
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    ae_title: str | None = Field(default=None, max_length=16, description="DICOM: called AE")
    receiving_application: str | None = Field(default=None, max_length=100)
    receiving_facility: str | None = Field(default=None, max_length=100)
    name: str | None = Field(default=None, max_length=100, description="default: derived")
    pdf_mode: Literal["embed", "link"] = Field(
        default="embed",
        description="HL7: embed the signed PDF (OBX ED, Base64) or link it (OBX RP URL and "
        "SHA-256), for receivers that refuse large messages",
    )
    enabled: bool = True
    tls: bool = Field(default=False, description="push over TLS (DICOM TLS, MLLP over TLS)")


class EndpointOut(_Out):
    id: str
    clinic_code: str
    name: str
    channel: DeliveryChannel
    host: str
    port: int
    ae_title: str | None
    receiving_application: str | None
    receiving_facility: str | None
    pdf_mode: str
    enabled: bool
    tls: bool
    created_at: datetime
    updated_at: datetime


class DeliveryAttemptOut(_Out):
    number: int
    at: datetime
    outcome: str
    error: str | None
    detail: dict[str, Any]
    worker: str


class DeliveryOut(_Out):
    id: str
    report_id: str
    exam_id: str
    clinic_code: str
    target: str
    endpoint_name: str | None
    channel: DeliveryChannel
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    acknowledged_at: datetime | None
    detail: dict[str, Any]
    attempt_log: list[DeliveryAttemptOut] = []


class RecognitionOut(BaseModel):
    """The mutual-recognition (HR) mark of a report version, as recorded at signing."""

    granted: bool = False
    mark: str | None = None
    scope_note: str | None = None
    recognizable_until: date | datetime | str | None = None
    item_code: str | None = None
    item_name: str | None = None


class ReportVersionOut(BaseModel):
    """One submitted report version with its exam and patient, as a clinic downloads it."""

    report_id: str
    exam_id: str
    version: int
    status: ReportStatus
    current: bool
    amendment_kind: str | None
    amendment_reason: str | None
    previous_id: str | None
    submitted_at: datetime | None
    final_at: datetime | None
    signer: str
    impression: str
    critical: bool
    study_instance_uid: str | None  # DICOM exams only
    accession_number: str | None
    discipline: Discipline
    modality: str
    body_part: str
    description: str
    priority: Priority
    performed_at: datetime | None
    clinic_code: str
    clinic_name: str
    patient_id: str
    patient_issuer: str
    patient_name: str
    patient_sex: str | None
    patient_birth_date: str | None
    hr: RecognitionOut
    delivered_at: datetime | None
    acknowledged_at: datetime | None
    version_fetched_at: datetime | None
    report_number: str | None = None  # RDC-2026-000123, the same for every version
    links: dict[str, str]


class AcknowledgementOut(BaseModel):
    """The acknowledged version's own delivered and acknowledged times."""

    report_id: str
    exam_id: str
    version: int = 1
    delivered_at: datetime | None
    acknowledged_at: datetime
