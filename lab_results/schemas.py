"""What the lab result API returns (pydantic models, times in UTC)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

__all__ = [
    "AutoreleaseSwitchIn",
    "AutoreleaseSwitchOut",
    "LabOrderOut",
    "LabOrderSummary",
    "LabResultOut",
    "LabResultVersionOut",
    "MappingQueueEntryOut",
    "RuleTraceOut",
]


class RuleTraceOut(BaseModel):
    """One rule's outcome: ``verdict`` pass, hold or critical, under the rule set ``version``."""

    rule_id: str
    version: str
    verdict: str
    reason: str


class LabResultVersionOut(BaseModel):
    """An earlier version of a result (kept when a correction replaced it)."""

    version: int
    value: str
    unit: str
    flags: list[str]
    status: str
    control_id: str
    created_at: datetime
    superseded_at: datetime | None = None


class LabResultOut(BaseModel):
    """One result (OBX) in its current version, with its history."""

    id: str
    key: str  # system|code|sub-ID: the result's identity within the order
    set_id: str
    code: str
    code_system: str
    code_text: str
    loinc: str | None
    analyte: str | None
    name_zh: str
    name_en: str
    value_type: str
    value: str
    numeric: float | None
    comparator: str
    unit: str
    unit_ok: bool
    reference_range: str
    flags: list[str]
    status: str  # OBX-11: F, C, P, X …
    method: str
    performing_lab: str
    observed_at: datetime | None
    version: int
    verdict: str  # pass, hold or critical
    critical: bool
    autoverification: list[RuleTraceOut]
    rules_version: str
    history: list[LabResultVersionOut] = Field(default_factory=list)


class LabOrderSummary(BaseModel):
    """An order as lists show it."""

    id: str  # the order's ID, which is also its exam's ID
    exam_id: str
    clinic: str  # the sending clinic's code
    patient_id: str  # as shown: a national ID (居民身份证号) masked, 110105********1234
    patient_id_masked: bool = False  # whether ``patient_id`` is a masked national ID
    issuer: str
    patient_name: str
    natural_key: str
    placer_number: str
    filler_number: str
    service_code: str
    service_text: str
    priority: str
    collected_at: datetime | None
    specimen_received_at: datetime | None
    reported_at: datetime | None
    arrived_at: datetime
    version: int
    verdict: str  # release or hold
    critical: bool
    released_at: datetime | None
    auto_released: bool
    exam_state: str
    result_count: int


class LabOrderOut(LabOrderSummary):
    """One order with its results (current versions), specimens and the order's rule trace."""

    sending_facility: str
    service_system: str
    result_status: str
    specimens: list[dict[str, object]]
    hil: dict[str, float | None]
    rules_version: str
    critical_version: str
    order_trace: list[RuleTraceOut]
    released_by: str | None  # username
    released_by_name: str | None = None  # the display name (else the username)
    report_id: str | None
    autoverified_mark: str | None  # 自动审核 when released automatically
    results: list[LabResultOut]


class MappingQueueEntryOut(BaseModel):
    id: str
    clinic: str | None
    facility: str
    code_system: str
    code: str
    text: str
    unit: str
    reason: str  # English
    reason_zh: str
    occurrences: int
    example_order_id: str | None
    first_seen_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    resolved_loinc: str | None


class AutoreleaseSwitchIn(BaseModel):
    """Turn automatic release on (``true``) or stop it (``false``)."""

    enabled: bool
    reason: str = ""


class AutoreleaseSwitchOut(BaseModel):
    enabled: bool  # what applies now: the setting and the run-time switch together
    setting_enabled: bool  # RDC_LAB_AUTORELEASE
    stopped: bool  # the run-time stop switch
    signer: str | None  # RDC_LAB_AUTORELEASE_SIGNER
    updated_at: datetime | None = None
    updated_by: str | None = None
    reason: str = ""
