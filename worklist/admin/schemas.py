"""What the administration console reads and writes (API, CLI and UI share these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worklist.models import Discipline, Priority, ReaderLevel, Role

__all__ = [
    "AuditEventOut",
    "AuditVerifyOut",
    "ClinicIn",
    "ClinicOut",
    "ClinicPatch",
    "PasswordIn",
    "Qualification",
    "RoutingRuleIn",
    "RoutingRuleOut",
    "RoutingRulesOut",
    "SlaTargetIn",
    "SlaTargetOut",
    "SlaTargetsOut",
    "UserIn",
    "UserOut",
    "UserPatch",
]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClinicOut(BaseModel):
    code: str
    name: str
    kind: str
    active: bool
    ae_titles: list[str]
    hl7_facilities: list[str] = Field(default_factory=list)
    users: int = 0


class ClinicIn(_In):
    code: str = Field(max_length=32)
    name: str = Field(max_length=200)
    ae_titles: list[str] = Field(default_factory=list)
    hl7_facilities: list[str] = Field(default_factory=list)


class ClinicPatch(_In):
    """Fields left out stay as they are; ``ae_titles`` replaces the clinic's AE titles,
    ``hl7_facilities`` its HL7 sending facilities (MSH-4)."""

    name: str | None = Field(default=None, max_length=200)
    active: bool | None = None
    ae_titles: list[str] | None = None
    hl7_facilities: list[str] | None = None


class Qualification(_In):
    discipline: Discipline
    modality: str | None = Field(default=None, max_length=16)

    @field_validator("discipline", mode="before")
    @classmethod
    def _known(cls, value: object) -> object:
        if value not in {d.value for d in Discipline} and not isinstance(value, Discipline):
            raise ValueError(f"unknown discipline {value!r} (imaging, ecg or lab)")
        return value


class UserOut(BaseModel):
    username: str
    display_name: str
    role: Role
    level: ReaderLevel | None
    org_code: str
    pools: list[str]
    qualifications: list[dict[str, str]]
    active: bool


class UserIn(_In):
    username: str = Field(max_length=64)
    password: str = Field(min_length=8, max_length=256)
    role: Role
    org_code: str
    level: ReaderLevel | None = None
    display_name: str = Field(default="", max_length=200)
    pools: list[str] | None = None
    qualifications: list[Qualification] | None = None


class UserPatch(_In):
    """Fields left out stay as they are."""

    display_name: str | None = Field(default=None, max_length=200)
    role: Role | None = None
    level: ReaderLevel | None = None
    pools: list[str] | None = None
    qualifications: list[Qualification] | None = None
    active: bool | None = None


class PasswordIn(_In):
    password: str = Field(min_length=8, max_length=256)


class RoutingRuleIn(_In):
    """Exams matching every non-empty criterion go to ``pool``; the first matching rule of
    the list wins, and an exam no rule matches goes to its discipline's pool."""

    discipline: Discipline | None = None
    modality: str | None = Field(default=None, max_length=16)
    body_part: str | None = Field(default=None, max_length=64)
    clinic: str | None = Field(default=None, max_length=32, description="clinic code")
    priority: Priority | None = None
    pool: str = Field(min_length=1, max_length=64)


class RoutingRuleOut(RoutingRuleIn):
    position: int


class RoutingRulesOut(BaseModel):
    rules: list[RoutingRuleOut]


class SlaTargetIn(_In):
    discipline: Discipline
    priority: Priority
    minutes: int = Field(ge=1, le=60 * 24 * 60)


class SlaTargetOut(SlaTargetIn):
    default_minutes: int
    configured: bool


class SlaTargetsOut(BaseModel):
    targets: list[SlaTargetOut]
    rescheduled: int = Field(
        default=0, description="open work items of READY exams whose due time was recomputed"
    )


class AuditEventOut(BaseModel):
    seq: int
    at: datetime
    actor: str
    org_id: str | None
    action: str
    object_type: str
    object_id: str
    detail: dict[str, Any]


class AuditVerifyOut(BaseModel):
    intact: bool
    first_bad_seq: int | None
    events: int
    checked_at: datetime
