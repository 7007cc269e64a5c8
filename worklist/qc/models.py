"""The QC target table: one row per change, so every target has its full history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow
from worklist.models import (
    Discipline,
    Exam,
    ExamState,
    Priority,
    QualityGrade,
    Report,
)

__all__ = [
    "QC_FACT_SOURCES",
    "QC_INDEXES",
    "QC_PENDING_INDEX",
    "ROLLUP_CODES",
    "QcDaily",
    "QcExamFact",
    "QcFactQueue",
    "QcMonthly",
    "QcReportCheck",
    "QcReportFact",
    "QcTarget",
    "QcTatHist",
    "rollup_column",
]

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


def _type(table: str, column: str) -> Any:
    """The type of a source column (the same stored strings for the same enums)."""
    return Base.metadata.tables[table].c[column].type


class QcExamFact(Base):
    """One exam's QC facts, denormalised: the exam's dimensions and stage times, its first
    report's (version 1) final time, reader and film grade, its work item's due time. The
    exam indicators read this one narrow table instead of joining exams, reports, work items,
    organisations and users; the attribute names are the source columns' so the indicator
    definitions (``worklist.qc.service``) run unchanged over either.

    Kept by the task ``worklist.qc.refresh_facts`` from ``qc_fact_queue``; an exam still in
    the queue is read from the source tables, so the figures never lag."""

    __tablename__ = "qc_exam_facts"
    __table_args__ = (
        Index("ix_qc_exam_facts_first_received_at", "first_received_at"),
        Index("ix_qc_exam_facts_final_at", "final_at"),
        Index("ix_qc_exam_facts_rescan_requested_at", "rescan_requested_at"),
    )

    # No foreign key: the facts of a deleted exam stay until the task has taken them out
    # of the roll-up (migration 0022).
    id: Mapped[str] = mapped_column("exam_id", String(36), primary_key=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True)
    org_id: Mapped[str] = mapped_column(String(36))
    clinic: Mapped[str] = mapped_column(String(64))
    discipline: Mapped[Discipline] = mapped_column(_type("exams", "discipline"))
    modality: Mapped[str] = mapped_column(String(16))
    priority: Mapped[Priority] = mapped_column(_type("exams", "priority"))
    state: Mapped[ExamState] = mapped_column(_type("exams", "state"))
    performed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    first_received_at: Mapped[datetime] = mapped_column()
    ready_at: Mapped[datetime | None] = mapped_column(nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    preliminary_at: Mapped[datetime | None] = mapped_column(nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(nullable=True)
    rescan_requested_at: Mapped[datetime | None] = mapped_column(nullable=True)
    rescan_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The first report (version 1): first final signing, author, film grade.
    final_at: Mapped[datetime | None] = mapped_column(nullable=True)
    reader: Mapped[str | None] = mapped_column(String(64), nullable=True)
    quality_grade: Mapped[QualityGrade | None] = mapped_column(
        _type("reports", "quality_grade"), nullable=True
    )
    quality_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The work item: whether there is one, and its due time.
    has_work_item: Mapped[bool] = mapped_column(Boolean)
    due_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Seconds of the turnaround stages TAT-01 .. TAT-07 (worklist.qc.service.TAT_STAGES),
    # computed by the same expression as over the source tables: the same values.
    tat_01: Mapped[float | None] = mapped_column(Float, nullable=True)
    tat_02: Mapped[float | None] = mapped_column(Float, nullable=True)
    tat_03: Mapped[float | None] = mapped_column(Float, nullable=True)
    tat_04: Mapped[float | None] = mapped_column(Float, nullable=True)
    tat_05: Mapped[float | None] = mapped_column(Float, nullable=True)
    tat_06: Mapped[float | None] = mapped_column(Float, nullable=True)
    tat_07: Mapped[float | None] = mapped_column(Float, nullable=True)
    refreshed_at: Mapped[datetime] = mapped_column(default=utcnow)


class QcFactQueue(Base):
    """Exams whose facts are to be (re)computed: database triggers (migration 0018) add a
    row whenever an exam, its first report, its work item, its clinic's code or its
    reader's username is written, from any code path. A row per change (never merged), so
    a change committed while the task runs is never lost: the task removes only the rows it
    read."""

    __tablename__ = "qc_fact_queue"
    __table_args__ = {"sqlite_autoincrement": True}  # noqa: RUF012

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    exam_id: Mapped[str] = mapped_column(String(36), index=True)


# The tables and columns whose writes queue an exam (migration 0018 creates the triggers;
# the test of the facts checks that every column an exam indicator reads is listed).
QC_FACT_SOURCES: dict[str, tuple[str, ...]] = {
    "exams": (
        "accession_number",
        "org_id",
        "discipline",
        "modality",
        "priority",
        "state",
        "performed_at",
        "first_received_at",
        "ready_at",
        "claimed_at",
        "preliminary_at",
        "delivered_at",
        "acknowledged_at",
        "rescan_requested_at",
        "rescan_reason",
    ),
    "reports": ("exam_id", "version", "final_at", "author_id", "quality_grade", "quality_reason"),
    "work_items": ("exam_id", "due_at"),
}


# The indicators the daily roll-up holds: every exam indicator, and report writing (RWS-03).
ROLLUP_CODES = (
    "TAT-01", "TAT-02", "TAT-03", "TAT-04", "TAT-05", "TAT-06", "TAT-07", "SLA-01",
    "RRC-02", "ECG-01", "IQ-01", "IQ-02", "ALL-01", "ALL-02", "ALL-06", "RWS-03",
)  # fmt: skip


def rollup_column(code: str, what: str) -> str:
    """The roll-up column of ``code``: ``n`` (cases, the denominator) or ``s`` (numerator)."""
    return f"{what}_{code.lower().replace('-', '_')}"


class QcDaily(Base):
    """Daily roll-up of the facts: per local day (the configured time zone) × clinic ×
    discipline × modality × priority, the number of cases ``n_<code>`` and of numerator
    cases ``s_<code>`` of every indicator of ``ROLLUP_CODES`` whose case time falls on that
    day (arrival, first final, re-scan or report signing, as the indicator places its
    cases). Kept equal to the sums over ``qc_exam_facts`` and ``qc_report_facts`` by the
    task that refreshes them (deltas, in the same transaction). SLA-01 holds only the
    reported exams here (the overdue unreported ones depend on the time of the query)."""

    __tablename__ = "qc_daily"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD
    clinic: Mapped[str] = mapped_column(String(64), primary_key=True)
    discipline: Mapped[str] = mapped_column(String(32), primary_key=True)
    modality: Mapped[str] = mapped_column(String(16), primary_key=True)
    priority: Mapped[str] = mapped_column(String(32), primary_key=True)


class QcMonthly(Base):
    """The daily roll-up summed by local month (``YYYY-MM``), same dimensions and columns:
    what a period of whole months (a month, a quarter, a year) reads, a few rows per
    clinic instead of a month of days. Kept with ``qc_daily`` (the same differences, in
    the same transaction), so it always equals the sums of its days."""

    __tablename__ = "qc_monthly"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    clinic: Mapped[str] = mapped_column(String(64), primary_key=True)
    discipline: Mapped[str] = mapped_column(String(32), primary_key=True)
    modality: Mapped[str] = mapped_column(String(16), primary_key=True)
    priority: Mapped[str] = mapped_column(String(32), primary_key=True)


for _code in ROLLUP_CODES:
    for _what in ("n", "s"):
        _name = rollup_column(_code, _what)
        for _table in (QcDaily, QcMonthly):
            setattr(_table, _name, mapped_column(_name, BigInteger, nullable=False, default=0))


class QcTatHist(Base):
    """Monthly histograms of the turnaround stages' seconds per clinic: how many exams that
    arrived in ``month`` (local) had stage ``stage`` (1..7) in bucket ``bucket``
    (``worklist.qc.service.duration_bucket``: log scale). P50/P90 of whole months are read
    from here; kept with the daily roll-up."""

    __tablename__ = "qc_tat_hist"

    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    clinic: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class QcReportFact(Base):
    """The report-writing result (RWS-03) of one signed imaging report version, as counted
    in the roll-up: written with its exam's facts (the exam is queued whenever one of its
    reports changes or is signed)."""

    __tablename__ = "qc_report_facts"

    # No foreign keys: a deleted report or exam stays until the task takes it out.
    report_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    exam_id: Mapped[str] = mapped_column(String(36), index=True)
    final_at: Mapped[datetime] = mapped_column()
    compliant: Mapped[bool] = mapped_column(Boolean)


# Exams without a first final report, by arrival: SLA-01's overdue unreported exams.
QC_PENDING_INDEX = Index(
    "ix_qc_exam_facts_pending",
    QcExamFact.first_received_at,
    postgresql_where=QcExamFact.final_at.is_(None),
    sqlite_where=QcExamFact.final_at.is_(None),
)
