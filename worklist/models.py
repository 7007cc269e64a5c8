"""Tables of the domain hub: organisations, users, patients, exams, artifacts, work items.

The ingesters own their detail tables (DICOM instances: :mod:`dicom_gateway.models`)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from rdc_core.db import Base, utcnow

__all__ = [
    "AETitle",
    "AmendmentKind",
    "Artifact",
    "AuthFailure",
    "Discipline",
    "Exam",
    "ExamKeyKind",
    "ExamState",
    "HL7Facility",
    "OrgKind",
    "Organization",
    "Patient",
    "Priority",
    "QualityGrade",
    "QuarantineItem",
    "ReaderLevel",
    "Report",
    "ReportStatus",
    "Role",
    "RoutingRule",
    "SlaTarget",
    "User",
    "WorkItem",
    "WorkItemState",
]


class OrgKind(enum.StrEnum):
    LEAD = "lead"
    CLINIC = "clinic"


class Role(enum.StrEnum):
    TECHNICIAN = "technician"
    CLINICIAN = "clinician"
    READER = "reader"
    SENIOR_READER = "senior_reader"
    QC = "qc"
    ADMIN = "admin"


class ReaderLevel(enum.StrEnum):
    RESIDENT = "resident"
    ATTENDING = "attending"
    CHIEF = "chief"


class Discipline(enum.StrEnum):
    IMAGING = "imaging"
    ECG = "ecg"
    LAB = "lab"


class Priority(enum.StrEnum):
    """Exam urgency, most urgent first when sorted by :attr:`rank`."""

    EMERGENCY = "emergency"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        return {"emergency": 0, "urgent": 1, "routine": 2}[self.value]


class ExamKeyKind(enum.StrEnum):
    """What an exam's natural key is.

    STUDY_UID: a DICOM Study Instance UID (imaging, DICOM ECG). Globally unique on its own,
    so the exam ID is derived from the key alone: the objects of one study share an exam
    whatever their discipline, and IDs made before the intake contract stay the same.
    ORDER: a lab order, accession or filler number. FILE: a key derived from an uploaded
    file (e.g. an ECG record without an order). The ID of those is derived from discipline,
    kind and key.
    """

    STUDY_UID = "study_uid"
    ORDER = "order"
    FILE = "file"


class ExamState(enum.StrEnum):
    """Where an exam is: receiving, ready to read, reported (preliminary / final), or sent
    back to the clinic for a re-scan."""

    RECEIVING = "RECEIVING"
    READY = "READY"
    PRELIMINARY = "PRELIMINARY"
    FINAL = "FINAL"
    RESCAN_REQUESTED = "RESCAN_REQUESTED"
    CANCELLED = "CANCELLED"


class WorkItemState(enum.StrEnum):
    """OPEN: to be read; AWAITING_VERIFICATION: a resident's preliminary report waits for a
    senior; DONE: final report signed or exam sent back."""

    OPEN = "OPEN"
    AWAITING_VERIFICATION = "AWAITING_VERIFICATION"
    DONE = "DONE"
    CANCELLED = "CANCELLED"


class ReportStatus(enum.StrEnum):
    DRAFT = "draft"
    PRELIMINARY = "preliminary"
    FINAL = "final"


class AmendmentKind(enum.StrEnum):
    """Why a signed report has a later version: its content changed (amended), an error was
    fixed (corrected), or something was added without changing what was said (appended)."""

    AMENDED = "amended"
    CORRECTED = "corrected"
    APPENDED = "appended"


class QualityGrade(enum.StrEnum):
    """Image-quality grades of Chinese radiology QC: 甲 (A), 乙 (B), 丙 (C), 废 (reject)."""

    A = "甲"
    B = "乙"
    C = "丙"
    REJECT = "废"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: readable in SQL and portable.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        values_callable=lambda e: [m.value for m in e],
        length=32,
        validate_strings=True,
    )


class Organization(Base):
    """The lead hospital or a member clinic."""

    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[OrgKind] = mapped_column(_enum(OrgKind, "org_kind"))
    # A disabled clinic's modalities are refused (its AE titles no longer match) and its
    # users cannot sign in; its data stays.
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    ae_titles: Mapped[list[AETitle]] = relationship(back_populates="organization")
    hl7_facilities: Mapped[list[HL7Facility]] = relationship(back_populates="organization")


class AETitle(Base):
    """A calling AE title a clinic's modalities use; unknown titles are rejected."""

    __tablename__ = "ae_titles"

    ae_title: Mapped[str] = mapped_column(String(16), primary_key=True)
    org_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    organization: Mapped[Organization] = relationship(back_populates="ae_titles")


class HL7Facility(Base):
    """A sending facility (MSH-4) a clinic's LIS or analysers send HL7 v2 messages as; the
    name matches MSH-4's namespace ID or its universal ID. Unknown senders are rejected."""

    __tablename__ = "hl7_facilities"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    org_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    organization: Mapped[Organization] = relationship(back_populates="hl7_facilities")


class User(Base):
    """A person who logs in; belongs to exactly one organisation."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(_enum(Role, "user_role"))
    level: Mapped[ReaderLevel | None] = mapped_column(
        _enum(ReaderLevel, "reader_level"), nullable=True
    )
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    # Reader pools this reader works from (empty: every pool) and what they may read:
    # [{"discipline": "imaging", "modality": "CT"}, ...] (empty: everything).
    pools: Mapped[list[str]] = mapped_column(JSON, default=list)
    qualifications: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Every token carries the generation it was issued in; logout, a password reset and
    # disabling the user raise it, so every earlier token fails at once.
    token_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    organization: Mapped[Organization] = relationship(lazy="joined")


class AuthFailure(Base):
    """One failed login (counted per username and per client address) or wrong signing
    password (per user). Kept in the database so that every replica counts the same."""

    __tablename__ = "auth_failures"
    __table_args__ = (Index("ix_auth_failures_scope_key_at", "scope", "key", "at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    scope: Mapped[str] = mapped_column(String(16))  # login_user, login_address, signing
    key: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Patient(Base):
    """A patient as one clinic identifies them: (issuer, patient ID) within that clinic.

    ``original`` keeps the DICOM values exactly as received; the typed columns hold the
    decoded values used for display and search.
    """

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("org_id", "issuer", "patient_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    issuer: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    birth_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    original: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Exam(Base):
    """One examination sent by a clinic, keyed by (discipline, natural key), with its stage
    times. The natural key is the Study Instance UID for DICOM (then also kept in
    ``study_instance_uid``), the order or filler number for lab, a derived key for an
    uploaded file; see :class:`ExamKeyKind`."""

    __tablename__ = "exams"
    __table_args__ = (
        Index("ix_exams_state_last_received", "state", "last_received_at"),
        Index("ix_exams_org_state", "org_id", "state"),
        UniqueConstraint("discipline", "natural_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    natural_key: Mapped[str] = mapped_column(String(128))
    key_kind: Mapped[ExamKeyKind] = mapped_column(_enum(ExamKeyKind, "exam_key_kind"))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"))
    patient_ref: Mapped[str] = mapped_column(ForeignKey("patients.id"), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    discipline: Mapped[Discipline] = mapped_column(_enum(Discipline, "discipline"))
    modality: Mapped[str] = mapped_column(String(16), default="")
    modalities: Mapped[str] = mapped_column(String(200), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(String(200), default="")
    # Referring Physician's Name as received (DICOM PN, every component group); None: unknown.
    referring_physician: Mapped[str | None] = mapped_column(String(200), nullable=True)
    priority: Mapped[Priority] = mapped_column(
        _enum(Priority, "priority"), default=Priority.ROUTINE
    )
    state: Mapped[ExamState] = mapped_column(
        _enum(ExamState, "exam_state"), default=ExamState.RECEIVING
    )
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    has_conflicts: Mapped[bool] = mapped_column(Boolean, default=False)
    performed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    preliminary_at: Mapped[datetime | None] = mapped_column(nullable=True)
    final_at: Mapped[datetime | None] = mapped_column(nullable=True)
    rescan_requested_at: Mapped[datetime | None] = mapped_column(nullable=True)
    rescan_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    rescan_requested_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    # The clinic's answer when it cannot repeat the exam: the exam is read as it is.
    rescan_declined_at: Mapped[datetime | None] = mapped_column(nullable=True)
    rescan_decline_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Why the urgency was set by hand (DICOM priority absent or wrong); audited.
    priority_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Why a machine pre-screen put the exam at the top of the reading queue (e.g. an ECG
    # whose QTc is >= 550 ms): a suspicion for the reader to confirm, never a finding.
    triage_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # First fetch of the final report by the clinic (or first acknowledged push), and the
    # clinic's acknowledgement of it: the last two turnaround stages.
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    patient: Mapped[Patient] = relationship(lazy="joined")
    organization: Mapped[Organization] = relationship(lazy="joined")
    work_item: Mapped[WorkItem | None] = relationship(back_populates="exam", uselist=False)
    rescan_requester: Mapped[User | None] = relationship(
        foreign_keys=[rescan_requested_by], lazy="select"
    )


class Artifact(Base):
    """One stored object of an exam, whatever its format: the generic row every intake
    writes through :func:`worklist.intake.register_artifact`.

    ``kind`` names the ingester's detail table (``instance``: a DICOM SOP instance, in the
    gateway's ``instances``); ``ref`` is the artifact's own key within its kind (SOP
    Instance UID, message control ID, file hash). The ID is derived from both, so a re-sent
    artifact is recognised, and the detail row shares it.
    """

    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    ref: Mapped[str] = mapped_column(String(128))
    storage_key: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Who sent it: the calling AE title, the MLLP peer, the uploading user.
    source: Mapped[str] = mapped_column(String(64), default="")


class QuarantineItem(Base):
    """Input we could not accept, kept byte for byte with the reason for inspection."""

    __tablename__ = "quarantine"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    storage_key: Mapped[str] = mapped_column(String(300))
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(32))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id"), nullable=True)
    # The artifact's own key when the input got that far (a DICOM SOP Instance UID).
    artifact_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class RoutingRule(Base):
    """Sends READY exams matching its non-empty criteria to a reader pool.

    Rules are tried by ascending ``position``; the first match wins.
    """

    __tablename__ = "routing_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    position: Mapped[int] = mapped_column(Integer, default=100)
    discipline: Mapped[str | None] = mapped_column(String(16), nullable=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    body_part: Mapped[str | None] = mapped_column(String(64), nullable=True)
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id"), nullable=True)
    priority: Mapped[str | None] = mapped_column(String(16), nullable=True)
    pool: Mapped[str] = mapped_column(String(64))


class SlaTarget(Base):
    """Turnaround target (minutes from READY to final report) per discipline and priority."""

    __tablename__ = "sla_targets"

    discipline: Mapped[Discipline] = mapped_column(
        _enum(Discipline, "discipline"), primary_key=True
    )
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"), primary_key=True)
    minutes: Mapped[int] = mapped_column(Integer)


class WorkItem(Base):
    """An exam waiting to be read: at most one per exam, created exactly once.

    A claim is a lease: ``claimed_by`` holds the item until ``lease_expires_at``; the
    claim is a conditional UPDATE, so of two readers claiming at once exactly one wins.
    """

    __tablename__ = "work_items"
    __table_args__ = (
        Index("ix_work_items_queue", "state", "priority_rank", "due_at"),
        # The reading queue in the worklist's order, holding only the items still to read:
        # the page stops after its rows instead of sorting the whole backlog.
        Index(
            "ix_work_items_active_queue",
            "priority_rank",
            "due_at",
            "id",
            postgresql_where=text("state IN ('OPEN', 'AWAITING_VERIFICATION')"),
            sqlite_where=text("state IN ('OPEN', 'AWAITING_VERIFICATION')"),
        ),
        Index("ix_work_items_pool_queue", "pool", "state", "priority_rank", "due_at"),
        Index("ix_work_items_org_state", "org_id", "state"),
        Index("ix_work_items_claimed_by", "claimed_by"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), unique=True)
    # The exam's clinic, copied so the worklist filters without joining the exams.
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id"), nullable=True)
    state: Mapped[WorkItemState] = mapped_column(_enum(WorkItemState, "work_item_state"))
    pool: Mapped[str] = mapped_column(String(64))
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"))
    priority_rank: Mapped[int] = mapped_column(Integer)
    due_at: Mapped[datetime] = mapped_column()
    discipline: Mapped[Discipline] = mapped_column(
        _enum(Discipline, "discipline"), default=Discipline.IMAGING
    )
    modality: Mapped[str] = mapped_column(String(16), default="")
    claimed_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(nullable=True)

    exam: Mapped[Exam] = relationship(back_populates="work_item", lazy="joined")
    claimant: Mapped[User | None] = relationship(lazy="joined")


class Report(Base):
    """A reader's report on an exam. Version 1 is the first report; later versions
    (amended / corrected / appended) are linked by ``previous_id``. A final report is signed
    and locked; the highest version of an exam is its current report."""

    __tablename__ = "reports"
    __table_args__ = (UniqueConstraint("exam_id", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    previous_id: Mapped[str | None] = mapped_column(ForeignKey("reports.id"), nullable=True)
    # The number people quote (RDC-2026-000123): drawn from the year's counter when the
    # exam's report is first signed; later versions keep it.
    report_number: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    status: Mapped[ReportStatus] = mapped_column(_enum(ReportStatus, "report_status"))
    template_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    recommendation: Mapped[str] = mapped_column(Text, default="")
    structured: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    quality_grade: Mapped[QualityGrade | None] = mapped_column(
        _enum(QualityGrade, "quality_grade"), nullable=True
    )
    quality_reason: Mapped[str] = mapped_column(Text, default="")
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    # Images the reader marked for the printed report: [{"sop_instance_uid": ..., "frame": 1}].
    key_images: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # Set on versions after the first: what kind of change, and why.
    amendment_kind: Mapped[AmendmentKind | None] = mapped_column(
        _enum(AmendmentKind, "amendment_kind"), nullable=True
    )
    amendment_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    author_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    author_level: Mapped[ReaderLevel | None] = mapped_column(
        _enum(ReaderLevel, "reader_level"), nullable=True
    )
    verified_by: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(nullable=True)
    verified_at: Mapped[datetime | None] = mapped_column(nullable=True)
    final_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Bumped by every save: a stale editor (two tabs) gets a conflict instead of
    # silently overwriting.
    revision: Mapped[int] = mapped_column(Integer, default=1)

    author: Mapped[User] = relationship(foreign_keys=[author_id], lazy="joined")
    verifier: Mapped[User | None] = relationship(foreign_keys=[verified_by], lazy="joined")


class ReportCounter(Base):
    """The last report number handed out in a year: one row per year, advanced by an
    atomic UPDATE in the signer's transaction, so numbers are unique across replicas."""

    __tablename__ = "report_counters"

    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last: Mapped[int] = mapped_column(Integer, default=0)
