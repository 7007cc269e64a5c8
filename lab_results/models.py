"""Tables of the lab intake: every HL7 v2 message accepted, as received.

One row per accepted message, keyed by what the sender made unique: (MSH-3 sending
application, MSH-4 sending facility, MSH-10 message control ID). The bytes as received are
committed in the row itself (``raw``), in the transaction that takes the key, before any
acknowledgement (DOMAIN.md B1: one transaction, one sync); processing then writes them to
the object store (``object_key``, named at intake) and empties ``raw``. The acknowledgement
that was answered is kept byte for byte, so that a re-sent message gets the very same answer.
Rejected messages (AR/AE) are not kept: their sender is told why and sends again.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow

__all__ = [
    "LabCodeMapping",
    "LabMappingQueueEntry",
    "LabMessage",
    "LabMessageStatus",
    "LabObservation",
    "LabOrder",
    "LabSetting",
]


class LabMessageStatus(enum.StrEnum):
    """Where a message is in the lab flow."""

    RECEIVED = "received"  # stored and acknowledged; not yet turned into an exam
    PROCESSED = "processed"  # its results are in the result model (a later step)
    FAILED = "failed"  # could not be processed after it was accepted


# The partial indexes' conditions (the same on both databases).
_WAITING = text(f"status = '{LabMessageStatus.RECEIVED.value}'")
_WITH_EXAM = text("exam_id IS NOT NULL")


class LabMessage(Base):
    """An HL7 v2 message the lab intake accepted (AA or CA answered after this row committed)."""

    __tablename__ = "lab_messages"
    __table_args__ = (
        UniqueConstraint(
            "sending_application",
            "sending_facility",
            "control_id",
            name="uq_lab_messages_sender_control_id",
        ),
        # Accepted messages still to process, oldest first (the processing runs' look-up).
        # Partial, as is the exam index: each index the intake's INSERT touches is pages
        # written to the WAL and synced before the ACK (migration 0025, bench/README.md).
        Index(
            "ix_lab_messages_waiting",
            "received_at",
            "id",
            postgresql_where=_WAITING,
            sqlite_where=_WAITING,
        ),
        Index(
            "ix_lab_messages_exam_id",
            "exam_id",
            postgresql_where=_WITH_EXAM,
            sqlite_where=_WITH_EXAM,
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sending_application: Mapped[str] = mapped_column(String(255))  # MSH-3 as sent
    sending_facility: Mapped[str] = mapped_column(String(255))  # MSH-4 as sent
    control_id: Mapped[str] = mapped_column(String(199))  # MSH-10
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    message_type: Mapped[str] = mapped_column(String(64))  # MSH-9, e.g. ORU^R01^ORU_R01
    version: Mapped[str] = mapped_column(String(32))  # MSH-12
    channel: Mapped[str] = mapped_column(String(16))  # mllp or http
    # SHA-256 of the message's segments (BOM and segment terminators normalised): a re-sent
    # message is "the same" when this matches
    content_sha256: Mapped[str] = mapped_column(String(64))
    # Where the bytes as received are kept for good: written by processing (until then
    # they are in ``raw``); rows of before migration 0024 had them there from the start.
    object_key: Mapped[str] = mapped_column(String(255))
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    ack_code: Mapped[str] = mapped_column(String(2))  # AA (original mode) or CA (enhanced)
    ack: Mapped[bytes] = mapped_column(LargeBinary)  # the acknowledgement answered, as sent
    status: Mapped[LabMessageStatus] = mapped_column(
        Enum(
            LabMessageStatus,
            name="lab_message_status",
            native_enum=False,
            values_callable=lambda e: [m.value for m in e],
            length=32,
            validate_strings=True,
        ),
        default=LabMessageStatus.RECEIVED,
    )
    # The exam the message's order became (set when the result model processes it).
    exam_id: Mapped[str | None] = mapped_column(ForeignKey("exams.id"), nullable=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Processing (the result model): when it ended, why it failed, and in enhanced mode
    # the application acknowledgement (MSH-16) that processing produced.
    processed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    app_ack_code: Mapped[str | None] = mapped_column(String(2), nullable=True)
    app_ack: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


# --- the result model (migration 0018) --------------------------------------------------


class LabOrder(Base):
    """One lab order (an exam of discipline ``lab``): its ID is the exam's ID.

    The exam's natural key is ``filler@facility`` (OBR-3 and the sending facility, MSH-4),
    else ``placer@facility`` (OBR-2): a re-sent or corrected order upserts the same row.
    ``version`` counts the order's result versions (a correction, OBX-11 ``C``, makes the
    next one); ``version_doc`` is the current version as
    :class:`lab_results.corrections.OrderVersion` JSON, what the next message is compared
    with. Each result's versions are rows of :class:`LabObservation`.
    """

    __tablename__ = "lab_orders"
    __table_args__ = (
        Index("ix_lab_orders_org_id_arrived_at", "org_id", "arrived_at"),
        Index("ix_lab_orders_patient_ref", "patient_ref"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # = exam_id
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), unique=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    patient_ref: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    natural_key: Mapped[str] = mapped_column(String(128))
    sending_facility: Mapped[str] = mapped_column(String(255), default="")
    placer_number: Mapped[str] = mapped_column(String(128), default="")  # OBR-2 / ORC-2
    filler_number: Mapped[str] = mapped_column(String(128), default="")  # OBR-3 / ORC-3
    service_code: Mapped[str] = mapped_column(String(64), default="")  # OBR-4
    service_text: Mapped[str] = mapped_column(String(255), default="")
    service_system: Mapped[str] = mapped_column(String(64), default="")
    priority: Mapped[str] = mapped_column(String(16), default="")  # OBR-5 / TQ1-9 as sent
    result_status: Mapped[str] = mapped_column(String(8), default="")  # OBR-25
    collected_at: Mapped[datetime | None] = mapped_column(nullable=True)  # OBR-7
    specimen_received_at: Mapped[datetime | None] = mapped_column(nullable=True)  # OBR-14/SPM-18
    reported_at: Mapped[datetime | None] = mapped_column(nullable=True)  # OBR-22
    arrived_at: Mapped[datetime] = mapped_column(default=utcnow)  # first message received
    # [{"specimen_id", "type", "collected_at", "received_at", "condition": [..], "hil": {}}]
    specimens: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # Serum indices of the order (OBX HIL rows, else the specimen's): {"hemolysis": ..}
    hil: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    version_doc: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    message_id: Mapped[str | None] = mapped_column(
        ForeignKey("lab_messages.id"), nullable=True
    )  # the message of the current version
    # Auto-verification of the current version: release or hold, the rule-set versions,
    # the order-level trace ([{rule_id, version, verdict, reason}]).
    verdict: Mapped[str] = mapped_column(String(16), default="hold")
    rules_version: Mapped[str] = mapped_column(String(64), default="")
    critical_version: Mapped[str] = mapped_column(String(64), default="")
    order_trace: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    # Released to the clinic: automatically (自动审核, signed under the configured lab
    # physician) or by a lab physician's signature; the report that carries it.
    released_at: Mapped[datetime | None] = mapped_column(nullable=True)
    released_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    auto_released: Mapped[bool] = mapped_column(Boolean, default=False)
    report_id: Mapped[str | None] = mapped_column(ForeignKey("reports.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class LabObservation(Base):
    """One version of one result of an order (OBX). A result's key within the order is
    ``system|code|sub-ID``; a correction makes a new row with the next ``version`` and marks
    the earlier row not ``current`` (kept as history). ``order_version`` is the order version
    that made the row."""

    __tablename__ = "lab_observations"
    __table_args__ = (
        UniqueConstraint("order_id", "result_key", "version", name="uq_lab_observations_version"),
        Index("ix_lab_observations_order_id_current", "order_id", "current"),
        Index("ix_lab_observations_patient_analyte", "patient_ref", "analyte", "observed_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("lab_orders.id", ondelete="CASCADE"))
    patient_ref: Mapped[str] = mapped_column(ForeignKey("patients.id"))
    result_key: Mapped[str] = mapped_column(String(255))
    set_id: Mapped[str] = mapped_column(String(16), default="")  # OBX-1
    sub_id: Mapped[str] = mapped_column(String(32), default="")  # OBX-4
    code: Mapped[str] = mapped_column(String(64))  # OBX-3 as sent
    code_system: Mapped[str] = mapped_column(String(64), default="")
    code_text: Mapped[str] = mapped_column(String(255), default="")
    # The alliance catalogue entry it maps to (None: unmapped, in the mapping queue).
    loinc: Mapped[str | None] = mapped_column(String(16), nullable=True)
    analyte: Mapped[str | None] = mapped_column(String(32), nullable=True)
    name_zh: Mapped[str] = mapped_column(String(128), default="")
    name_en: Mapped[str] = mapped_column(String(255), default="")
    value_type: Mapped[str] = mapped_column(String(8), default="")  # OBX-2
    value: Mapped[str] = mapped_column(Text, default="")  # OBX-5 as sent
    numeric: Mapped[float | None] = mapped_column(Float, nullable=True)
    comparator: Mapped[str] = mapped_column(String(4), default="")
    unit: Mapped[str] = mapped_column(String(64), default="")  # OBX-6 (UCUM)
    unit_ok: Mapped[bool] = mapped_column(Boolean, default=True)
    reference_range: Mapped[str] = mapped_column(String(128), default="")  # OBX-7
    flags: Mapped[list[str]] = mapped_column(JSON, default=list)  # OBX-8
    status: Mapped[str] = mapped_column(String(4), default="")  # OBX-11
    method: Mapped[str] = mapped_column(String(255), default="")  # OBX-17
    performing_lab: Mapped[str] = mapped_column(String(255), default="")  # OBX-23
    observed_at: Mapped[datetime | None] = mapped_column(nullable=True)  # OBX-14, else OBR-7
    version: Mapped[int] = mapped_column(Integer, default=1)
    order_version: Mapped[int] = mapped_column(Integer, default=1)
    current: Mapped[bool] = mapped_column(Boolean, default=True)
    superseded_at: Mapped[datetime | None] = mapped_column(nullable=True)
    control_id: Mapped[str] = mapped_column(String(199), default="")  # MSH-10 that sent it
    # Auto-verification: pass / hold / critical and the trace
    # [{rule_id, version, verdict, reason}] under ``rules_version``.
    verdict: Mapped[str] = mapped_column(String(16), default="hold")
    rules_version: Mapped[str] = mapped_column(String(64), default="")
    autoverification: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LabMappingQueueEntry(Base):
    """A code no catalogue entry or local-code row maps (never guessed): the administrators
    add a mapping. One row per (facility, system, code), counted as it recurs."""

    __tablename__ = "lab_mapping_queue"
    __table_args__ = (
        UniqueConstraint("facility", "code_system", "code", name="uq_lab_mapping_queue_code"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id"), nullable=True)
    facility: Mapped[str] = mapped_column(String(255))
    code_system: Mapped[str] = mapped_column(String(64), default="")
    code: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(String(255), default="")
    unit: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    occurrences: Mapped[int] = mapped_column(Integer, default=1)
    example_order_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(nullable=True)
    resolved_loinc: Mapped[str | None] = mapped_column(String(16), nullable=True)


class LabCodeMapping(Base):
    """A sender's local code → LOINC (``facility`` ``*``: every sender)."""

    __tablename__ = "lab_code_mappings"
    __table_args__ = (
        UniqueConstraint("facility", "code_system", "local_code", name="uq_lab_code_mappings"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    facility: Mapped[str] = mapped_column(String(255))
    code_system: Mapped[str] = mapped_column(String(64), default="")
    local_code: Mapped[str] = mapped_column(String(64))
    loinc: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LabSetting(Base):
    """Lab-centre switches an administrator changes at run time (the auto-release stop
    switch: key ``autorelease_stopped``); audited by the API."""

    __tablename__ = "lab_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
