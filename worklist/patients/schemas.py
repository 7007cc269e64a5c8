"""What the patient index takes and returns: typed values at its seams."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel

from worklist.models import Discipline, ExamState

__all__ = [
    "Candidate",
    "ExamBrief",
    "IdentifierOut",
    "IntakeLinkOutcome",
    "OtherIdentifier",
    "PersonOut",
]


@dataclass(frozen=True, slots=True)
class OtherIdentifier:
    """Another identifier a message carries for its patient: a DICOM Other Patient IDs
    Sequence item (Issuer of Patient ID, Patient ID, Type of Patient ID) or an HL7 PID-3
    repetition (assigning authority, ID, identifier type code such as ``NNCHN``)."""

    issuer: str
    value: str
    type_code: str = ""


@dataclass(frozen=True, slots=True)
class IntakeLinkOutcome:
    """What intake's national-ID linking did: ``linked`` (moved into the national ID's
    person), ``unchanged``, ``refused`` (invalid or conflicting national ID: nothing linked),
    ``blocked`` (an administrator unlinked this identifier), or ``none`` (no national ID)."""

    person_id: str
    result: str
    reason: str = ""


class IdentifierOut(BaseModel):
    """One clinic identifier of a person. A national ID is shown masked only."""

    issuer: str
    patient_id: str
    clinic_code: str
    clinic_name: str
    name: str
    birth_date: str | None
    sex: str | None
    source: str
    linked_at: datetime
    national_id: str | None = None


class ExamBrief(BaseModel):
    id: str
    clinic_code: str
    identifier: str
    discipline: Discipline
    modality: str
    modalities: str
    body_part: str
    description: str
    state: ExamState
    performed_at: datetime | None
    first_received_at: datetime


class PersonOut(BaseModel):
    """A person of the alliance patient index with every linked identifier and the exams
    the caller may see."""

    id: str
    national_id: str | None
    identifiers: list[IdentifierOut]
    exams: list[ExamBrief] = []


class Candidate(BaseModel):
    """Two persons whose identifiers agree on name (either script), birth date and sex:
    proposed for an administrator to link, never linked automatically."""

    persons: list[str]
    identifiers: list[str]  # the matching identifier of each person
    name: str
    birth_date: str
    sex: str
