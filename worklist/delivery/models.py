"""Tables of report delivery: the clinics' push-back endpoints, one delivery per report
version and target (an endpoint, or the portal), and every push attempt."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from rdc_core.db import Base, utcnow
from worklist.models import Organization, _enum

__all__ = [
    "DeliveryAttempt",
    "DeliveryChannel",
    "DeliveryEndpoint",
    "DeliveryState",
    "ReportDelivery",
]


class DeliveryChannel(enum.StrEnum):
    """How a report reaches the clinic: fetched from the portal/API, or pushed by DICOM
    C-STORE (encapsulated PDF) or HL7 v2 ORU^R01 over MLLP."""

    PORTAL = "portal"
    DICOM = "dicom"
    HL7 = "hl7"


class DeliveryState(enum.StrEnum):
    """PENDING: waiting for its (next) attempt; FAILING: still retried, but it failed often
    enough that people should look; DELIVERED: the peer acknowledged (or the clinic fetched
    it from the portal)."""

    PENDING = "pending"
    FAILING = "failing"
    DELIVERED = "delivered"


class DeliveryEndpoint(Base):
    """A clinic's own system that signed reports are pushed to: a DICOM AE (title, host,
    port) or an HIS/LIS receiving HL7 over MLLP (host, port, receiving application and
    facility). Disabled endpoints get no new deliveries and their pending ones wait."""

    __tablename__ = "delivery_endpoints"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    channel: Mapped[DeliveryChannel] = mapped_column(_enum(DeliveryChannel, "delivery_channel"))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    ae_title: Mapped[str | None] = mapped_column(String(16), nullable=True)
    receiving_application: Mapped[str | None] = mapped_column(String(100), nullable=True)
    receiving_facility: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # HL7: "embed" the signed PDF (OBX ED, Base64) or "link" it (OBX RP with its URL and an
    # OBX ST with its SHA-256), for receivers that refuse large messages.
    pdf_mode: Mapped[str] = mapped_column(String(8), default="embed", server_default="embed")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    tls: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    organization: Mapped[Organization] = relationship(lazy="joined")


class ReportDelivery(Base):
    """One report version on its way to one target of its clinic.

    ``target`` is the endpoint's ID for a push, or ``portal`` for the first fetch from the
    portal/API; (report_id, target) is unique, so scheduling twice creates nothing new. A
    push is claimed with a lease (``lease_owner`` until ``lease_expires_at``) by a
    conditional UPDATE, so two workers never send the same delivery at once.
    """

    __tablename__ = "report_deliveries"
    __table_args__ = (
        UniqueConstraint("report_id", "target"),
        Index("ix_report_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    report_id: Mapped[str] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"))
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    target: Mapped[str] = mapped_column(String(36))
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("delivery_endpoints.id"), nullable=True, index=True
    )
    channel: Mapped[DeliveryChannel] = mapped_column(_enum(DeliveryChannel, "delivery_channel"))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState, "delivery_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # The peer's acknowledgement (DICOM status, HL7 MSA) or, for the portal, who fetched.
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    endpoint: Mapped[DeliveryEndpoint | None] = relationship(lazy="joined")


class DeliveryAttempt(Base):
    """One try at pushing a delivery: when, how it ended, and the peer's answer."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "number"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("report_deliveries.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column()
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    worker: Mapped[str] = mapped_column(String(100), default="")
