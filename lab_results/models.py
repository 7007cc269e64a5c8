"""Tables of the lab intake: every HL7 v2 message accepted, as received.

One row per accepted message, keyed by what the sender made unique: (MSH-3 sending
application, MSH-4 sending facility, MSH-10 message control ID). The raw bytes are in the
object store (``object_key``); the acknowledgement that was answered is kept byte for byte,
so that a re-sent message gets the very same answer. Rejected messages (AR/AE) are not
kept: their sender is told why and sends again.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Enum, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow

__all__ = ["LabMessage", "LabMessageStatus"]


class LabMessageStatus(enum.StrEnum):
    """Where a message is in the lab flow."""

    RECEIVED = "received"  # stored and acknowledged; not yet turned into an exam
    PROCESSED = "processed"  # its results are in the result model (a later step)
    FAILED = "failed"  # could not be processed after it was accepted


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
        Index("ix_lab_messages_org_id_received_at", "org_id", "received_at"),
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
    object_key: Mapped[str] = mapped_column(String(255))  # the bytes as received
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
    exam_id: Mapped[str | None] = mapped_column(ForeignKey("exams.id"), nullable=True, index=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
