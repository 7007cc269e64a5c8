"""The QC target table: one row per change, so every target has its full history."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow
from worklist.models import Exam, Report

__all__ = ["QC_INDEXES", "QcReportCheck", "QcTarget"]

# The times that place cases in a period: a quarter's indicators read an index range
# instead of every exam and report (bench/qc.py).
QC_INDEXES = (
    Index("ix_exams_first_received_at", Exam.first_received_at),
    Index("ix_reports_final_at", Report.final_at),
)


class QcTarget(Base):
    """Version ``version`` of the target of indicator ``code``; the highest version is in
    force. ``target`` None means "no target" (the indicator is shown without a status)."""

    __tablename__ = "qc_targets"
    __table_args__ = (UniqueConstraint("code", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(32), index=True)
    version: Mapped[int] = mapped_column(Integer)
    target: Mapped[float | None] = mapped_column(Float, nullable=True)
    warn_margin: Mapped[float] = mapped_column(Float, default=0.0)
    note: Mapped[str] = mapped_column(Text, default="")
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class QcReportCheck(Base):
    """The report-writing check (RWS-03) of one signed report version, stored once: a final
    report never changes, so its result never does. Written by the periodic task
    ``worklist.qc.check_reports``; reports not checked yet are checked when read."""

    __tablename__ = "qc_report_checks"

    report_id: Mapped[str] = mapped_column(
        ForeignKey("reports.id", ondelete="CASCADE"), primary_key=True
    )
    compliant: Mapped[bool] = mapped_column(Boolean)
    reasons: Mapped[str | None] = mapped_column(String(200), nullable=True)
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)
