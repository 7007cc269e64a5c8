"""What the critical-value services accept and return (the API's shapes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from worklist.critical_values.models import AckChannel, AlertState

__all__ = [
    "AcknowledgementIn",
    "AlertOut",
    "ContactIn",
    "ContactOut",
    "DutyIn",
    "DutyOut",
    "EscalationOut",
    "NotificationOut",
    "PersonOut",
]


class PersonOut(BaseModel):
    """A user as the register names them."""

    username: str
    name: str


class EscalationOut(BaseModel):
    level: int
    at: datetime
    to: list[dict[str, Any]]


class AlertOut(BaseModel):
    """One row of the critical-value register: who/what/when on both sides."""

    id: str
    exam_id: str
    report_id: str
    clinic_code: str
    clinic_name: str
    patient: dict[str, Any]
    exam: dict[str, Any]
    finding: str
    raised_by: PersonOut
    raised_at: datetime
    deadline_at: datetime
    notified_at: datetime | None
    minutes_to_notify: float | None
    notified_within_deadline: bool | None
    state: AlertState
    escalated: bool
    escalation_level: int
    escalations: list[EscalationOut]
    acknowledged_by: PersonOut | None
    receiver_name: str | None
    acknowledged_at: datetime | None
    read_back: str | None
    via: AckChannel | None
    recorded_by: PersonOut | None
    minutes_to_acknowledge: float | None
    # True/False once decided: acknowledged in time, or late; None while still in time.
    within_deadline: bool | None
    # The report version the alert belongs to, and whether it is (still) critical: a
    # senior may un-tick a resident's critical flag when verifying (then withdrawn).
    report_version: int
    report_critical: bool
    # Closed without a read-back (withdrawn or superseded): when, by whom.
    closed_at: datetime | None = None
    closed_by: PersonOut | None = None
    # The links between versions: the version signed after this one (also on acknowledged
    # alerts, which stay acknowledged), the alert raised for it if any, and the alert of an
    # earlier version this one follows.
    superseded_by_report_id: str | None = None
    superseded_by_version: int | None = None
    superseded_by_alert_id: str | None = None
    previous_alert_id: str | None = None


class AcknowledgementIn(BaseModel):
    """The clinic's read-back. ``via`` "phone" is for lead-hospital staff recording a
    telephone acknowledgement (then ``receiver_name`` is who answered at the clinic)."""

    read_back: str = Field(max_length=4000)
    receiver_name: str | None = Field(default=None, max_length=200)
    via: AckChannel = AckChannel.PORTAL


class ContactIn(BaseModel):
    primary_name: str = Field(max_length=200)
    primary_phone: str = Field(max_length=64)
    primary_username: str | None = Field(default=None, max_length=64)
    secondary_name: str | None = Field(default=None, max_length=200)
    secondary_phone: str | None = Field(default=None, max_length=64)
    secondary_username: str | None = Field(default=None, max_length=64)


class ContactOut(ContactIn):
    org_code: str
    updated_at: datetime


class DutyIn(BaseModel):
    username: str
    on_from: datetime | None = None
    on_until: datetime | None = None


class DutyOut(DutyIn):
    name: str
    on_duty_now: bool


class NotificationOut(BaseModel):
    id: str
    kind: str
    subject_type: str
    subject_id: str
    text: str
    text_zh: str
    text_en: str
    channel: str
    recipient_name: str | None
    recipient_phone: str | None
    created_at: datetime
    read_at: datetime | None
