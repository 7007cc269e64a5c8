"""Tables of critical values: alerts, their escalations, the clinics' contact lists, the
centre's duty list, and the general notifications (every kind, also report versions)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from rdc_core.db import Base, utcnow
from worklist.models import Exam, Organization, Patient, Report, User, _enum

__all__ = [
    "AckChannel",
    "AlertState",
    "CriticalAlert",
    "CriticalContact",
    "CriticalEscalation",
    "DutyEntry",
    "Notification",
]


class AlertState(enum.StrEnum):
    """An alert is open until somebody at the clinic read it back; escalation is a level
    beside the state, not a state of its own. An open alert is closed without a read-back
    when the senior verifying a preliminary report un-ticks critical (withdrawn), or when a
    newer version of the report is signed (superseded); neither escalates any more."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    SUPERSEDED = "superseded"
    WITHDRAWN = "withdrawn"


class AckChannel(enum.StrEnum):
    """How the acknowledgement reached us: in the clinic portal, or by telephone (recorded
    by lead-hospital staff on the clinic's behalf)."""

    PORTAL = "portal"
    PHONE = "phone"


class CriticalAlert(Base):
    """One critical finding of one signed report version, sent to the exam's clinic.

    ``deadline_at`` is when the clinic must have acknowledged (raised + the configured
    minutes); ``next_escalation_at`` is when the scan next escalates an open alert (None
    once the last level fired).
    """

    __tablename__ = "critical_alerts"
    __table_args__ = (
        Index("ix_critical_alerts_state_next_escalation_at", "state", "next_escalation_at"),
        Index("ix_critical_alerts_org_id_raised_at", "org_id", "raised_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    report_id: Mapped[str] = mapped_column(
        ForeignKey("reports.id", ondelete="CASCADE"), unique=True
    )
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    patient_ref: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    finding: Mapped[str] = mapped_column(Text)
    raised_by: Mapped[str] = mapped_column(ForeignKey("users.id"))
    raised_at: Mapped[datetime] = mapped_column()
    deadline_at: Mapped[datetime] = mapped_column()
    # When the clinic's notifications were created (portal): "notified within 10 minutes".
    notified_at: Mapped[datetime | None] = mapped_column(nullable=True)
    state: Mapped[AlertState] = mapped_column(
        _enum(AlertState, "critical_alert_state"), default=AlertState.OPEN
    )
    escalation_level: Mapped[int] = mapped_column(Integer, default=0)
    escalated_at: Mapped[datetime | None] = mapped_column(nullable=True)
    next_escalation_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # The clinic's side: who read it back (a user for the portal; by name on the phone),
    # what they read back, when and how; and who at the centre took a phone call.
    acknowledged_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    receiver_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(nullable=True)
    read_back: Mapped[str | None] = mapped_column(Text, nullable=True)
    ack_via: Mapped[AckChannel | None] = mapped_column(
        _enum(AckChannel, "critical_ack_channel"), nullable=True
    )
    recorded_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    # Closed without a read-back (withdrawn, superseded): when and by whom (the signer).
    closed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    closed_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    # The links between report versions: the version signed after this alert's (set on
    # open alerts it superseded and on acknowledged ones, which stay acknowledged), and
    # the alert of an earlier version this one follows.
    superseded_by_report_id: Mapped[str | None] = mapped_column(
        ForeignKey("reports.id", ondelete="SET NULL"), nullable=True
    )
    previous_alert_id: Mapped[str | None] = mapped_column(
        ForeignKey("critical_alerts.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    report: Mapped[Report] = relationship(foreign_keys=[report_id], lazy="joined")
    superseding_report: Mapped[Report | None] = relationship(
        foreign_keys=[superseded_by_report_id], lazy="joined"
    )
    closer: Mapped[User | None] = relationship(foreign_keys=[closed_by], lazy="joined")
    # The alert(s) raised for a later version following this one (normally at most one).
    successors: Mapped[list[CriticalAlert]] = relationship(
        foreign_keys=[previous_alert_id], viewonly=True, lazy="selectin"
    )
    exam: Mapped[Exam] = relationship(lazy="joined")
    organization: Mapped[Organization] = relationship(lazy="joined")
    patient: Mapped[Patient] = relationship(lazy="joined")
    raiser: Mapped[User] = relationship(foreign_keys=[raised_by], lazy="joined")
    acknowledger: Mapped[User | None] = relationship(foreign_keys=[acknowledged_by], lazy="joined")
    recorder: Mapped[User | None] = relationship(foreign_keys=[recorded_by], lazy="joined")
    escalations: Mapped[list[CriticalEscalation]] = relationship(
        lazy="selectin", order_by="CriticalEscalation.level"
    )


class CriticalEscalation(Base):
    """One escalation level of an alert (1: clinic's second contact and the duty list,
    2: the lead hospital's QC and admins), with whom it went to."""

    __tablename__ = "critical_escalations"
    __table_args__ = (UniqueConstraint("alert_id", "level"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    alert_id: Mapped[str] = mapped_column(ForeignKey("critical_alerts.id", ondelete="CASCADE"))
    level: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column()
    # [{"role": "clinic_secondary" | "duty" | ..., "name": ..., "phone": ..., "username": ...}]
    recipients: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)


class CriticalContact(Base):
    """Whom a clinic wants called about a critical value: first the primary, then (on
    escalation) the secondary contact. A username also puts the alert in their portal."""

    __tablename__ = "critical_contacts"

    org_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    primary_name: Mapped[str] = mapped_column(String(200))
    primary_phone: Mapped[str] = mapped_column(String(64))
    primary_username: Mapped[str | None] = mapped_column(String(64), nullable=True)
    secondary_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    secondary_phone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    secondary_username: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    organization: Mapped[Organization] = relationship(lazy="joined")


class DutyEntry(Base):
    """A lead-hospital user on the centre's critical-value duty list, optionally only
    within a window (``on_from``/``on_until``, either open-ended)."""

    __tablename__ = "critical_duty"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    on_from: Mapped[datetime | None] = mapped_column(nullable=True)
    on_until: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship(lazy="joined")


class Notification(Base):
    """Something a user (``user_id``) or everybody of an organisation (``user_id`` None)
    should see in the portal: a critical value, a new report version, ...

    ``recipient_name``/``recipient_phone`` name a contact person who has no login; the
    row then goes to the whole organisation and tells the centre whom to call.
    """

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_user_id_read_at", "user_id", "read_at"),
        Index("ix_notifications_org_id_read_at", "org_id", "read_at"),
        Index("ix_notifications_subject", "subject_type", "subject_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    recipient_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    recipient_phone: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(100))
    text_zh: Mapped[str] = mapped_column(Text)
    text_en: Mapped[str] = mapped_column(Text)
    channel: Mapped[str] = mapped_column(String(16), default="portal")
    created_at: Mapped[datetime] = mapped_column()
    notified_at: Mapped[datetime | None] = mapped_column(nullable=True)
    read_at: Mapped[datetime | None] = mapped_column(nullable=True)
