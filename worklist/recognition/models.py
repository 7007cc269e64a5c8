"""Tables of mutual recognition: catalogue versions and their items, institutions' QC
accreditations, the decision recorded for each final report version, and declines."""

from __future__ import annotations

import enum
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow
from worklist.models import Discipline, QualityGrade, _enum

__all__ = [
    "Accreditation",
    "CatalogItem",
    "CatalogVersion",
    "DeclineReason",
    "RecognitionDecision",
    "RecognitionDecline",
]


class DeclineReason(enum.StrEnum):
    """The standard reasons a clinician may decline a recognised result."""

    CONDITION_CHANGED = "condition_changed_or_inconsistent"
    FAST_CHANGING = "fast_changing_value"
    HIGH_STAKES = "high_stakes_decision"
    EMERGENCY = "emergency"
    FORENSIC = "forensic_or_disability_appraisal"
    PATIENT_REQUEST = "patient_request"
    OTHER = "other"


class CatalogVersion(Base):
    """One loaded version of the catalogue; the highest version is the current one."""

    __tablename__ = "recognition_catalog_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # SHA-256 of the canonical item list: loading the same content again is a no-op.
    content_sha256: Mapped[str] = mapped_column(String(64), index=True)
    item_count: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(300), default="")
    loaded_by: Mapped[str] = mapped_column(String(100), default="")
    loaded_at: Mapped[datetime] = mapped_column(default=utcnow)


class CatalogItem(Base):
    """A recognised item of one catalogue version, with what exams it covers."""

    __tablename__ = "recognition_catalog_items"
    __table_args__ = (UniqueConstraint("catalog_version", "code"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    catalog_version: Mapped[int] = mapped_column(
        ForeignKey(
            "recognition_catalog_versions.version",
            ondelete="CASCADE",
            name="fk_recognition_catalog_items_version",
        )
    )
    code: Mapped[str] = mapped_column(String(64))
    discipline: Mapped[Discipline] = mapped_column(_enum(Discipline, "discipline"))
    name_zh: Mapped[str] = mapped_column(String(200))
    name_en: Mapped[str] = mapped_column(String(200), default="")
    scope_mark: Mapped[str] = mapped_column(String(16))
    scope_note: Mapped[str] = mapped_column(Text, default="")
    valid_days: Mapped[int] = mapped_column(Integer)
    min_grade: Mapped[QualityGrade | None] = mapped_column(
        _enum(QualityGrade, "quality_grade"), nullable=True
    )
    # Match criteria: imaging by modality (and body part when given); lab by test codes.
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    test_codes: Mapped[list[str]] = mapped_column(JSON, default=list)


class Accreditation(Base):
    """An institution's QC accreditation (external quality assessment passed) for one item
    (``item_code``) or a whole discipline (``item_code`` empty), valid from/to (inclusive,
    local dates)."""

    __tablename__ = "recognition_accreditations"
    __table_args__ = (
        UniqueConstraint(
            "org_id",
            "discipline",
            "item_code",
            "valid_from",
            name="uq_recognition_accreditations_scope",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    discipline: Mapped[Discipline] = mapped_column(_enum(Discipline, "discipline"))
    item_code: Mapped[str] = mapped_column(String(64), default="")
    valid_from: Mapped[date] = mapped_column(Date)
    valid_to: Mapped[date] = mapped_column(Date)
    note: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RecognitionDecision(Base):
    """Whether a final report version's result carries the mark, and why (one per version)."""

    __tablename__ = "recognition_decisions"
    __table_args__ = (Index("ix_recognition_decisions_granted_until", "granted", "valid_until"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    report_id: Mapped[str] = mapped_column(
        ForeignKey("reports.id", ondelete="CASCADE"), unique=True
    )
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), index=True)
    patient_ref: Mapped[str] = mapped_column(ForeignKey("patients.id"), index=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    granted: Mapped[bool] = mapped_column(Boolean)
    item_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    catalog_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mark: Mapped[str | None] = mapped_column(String(16), nullable=True)
    exam_date: Mapped[date] = mapped_column(Date)
    valid_until: Mapped[date | None] = mapped_column(Date, nullable=True)
    reasons: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # The decision exactly as handed to signing (and printed), for recognition_for_report.
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    signer_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    decided_at: Mapped[datetime] = mapped_column(default=utcnow)


class RecognitionDecline(Base):
    """A clinician declined a recognised result (repeated the test) for a standard reason,
    and told the patient."""

    __tablename__ = "recognition_declines"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    decision_id: Mapped[str] = mapped_column(
        ForeignKey("recognition_decisions.id", ondelete="CASCADE"), index=True
    )
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    reason: Mapped[DeclineReason] = mapped_column(
        Enum(
            DeclineReason,
            name="decline_reason",
            native_enum=False,
            values_callable=lambda e: [m.value for m in e],
            length=48,
            validate_strings=True,
        )
    )
    note: Mapped[str] = mapped_column(Text, default="")
    patient_informed: Mapped[bool] = mapped_column(Boolean)
    declined_at: Mapped[datetime] = mapped_column(default=utcnow)
