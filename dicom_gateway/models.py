"""The DICOM gateway's own tables: the detail of each stored DICOM object (an
:class:`~worklist.models.Artifact` of kind ``instance``, same ID) and the differing copies of
known SOP instances kept for review. The hub never imports them; it learns what it needs
through :mod:`worklist.artifact_details`, which this module registers with at import."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, ForeignKey, Integer, String, exists, select
from sqlalchemy.orm import Mapped, QueryableAttribute, Session, mapped_column, relationship
from sqlalchemy.types import JSON

from rdc_core.db import Base, utcnow
from worklist.artifact_details import register_artifact_details
from worklist.models import Exam

__all__ = ["INSTANCE_KIND", "DicomInstanceDetails", "Instance", "InstanceConflict"]

INSTANCE_KIND = "instance"
"""The artifact kind of a DICOM SOP instance (its ``ref`` is the SOP Instance UID)."""


class Instance(Base):
    """One stored DICOM object (SOP instance): the DICOM detail of an :class:`Artifact` of
    kind ``instance`` (same ID). Written by ``dicom_gateway``."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    exam_id: Mapped[str] = mapped_column(ForeignKey("exams.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    frame_count: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Values we had to make up to index the object (e.g. a missing Study Instance UID);
    # the stored object itself is never changed.
    coerced: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)

    exam: Mapped[Exam] = relationship()


class InstanceConflict(Base):
    """A second copy of a known SOP Instance UID with different bytes.

    Policy: the first stored copy stays the instance of record (a report may already cite
    it); the differing copy is kept under its own key for review and the exam is flagged.
    """

    __tablename__ = "instance_conflicts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    exam_id: Mapped[str | None] = mapped_column(
        ForeignKey("exams.id", ondelete="SET NULL"), nullable=True
    )
    storage_key: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class DicomInstanceDetails:
    """What the hub may ask about DICOM instances (:mod:`worklist.artifact_details`)."""

    kind = INSTANCE_KIND

    def signed_objects(self, session: Session, *, exam_id: str) -> list[dict[str, Any]]:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.sha256)
            .where(Instance.exam_id == exam_id)
            .order_by(Instance.sop_instance_uid)
        ).all()
        return [{"sop_instance_uid": uid, "sha256": digest} for uid, digest in rows]

    def exam_objects(self, session: Session, *, exam_id: str) -> list[Mapping[str, Any]]:
        rows = session.execute(
            select(Instance)
            .where(Instance.exam_id == exam_id)
            .order_by(Instance.series_instance_uid, Instance.instance_number)
        ).scalars()
        return [{c: getattr(row, c) for c in _LISTED} for row in rows]

    def frame_counts(
        self, session: Session, *, exam_id: str, refs: Collection[str]
    ) -> dict[str, int]:
        if not refs:
            return {}
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.frame_count).where(
                Instance.exam_id == exam_id, Instance.sop_instance_uid.in_(set(refs))
            )
        ).all()
        return {uid: frames for uid, frames in rows}

    def format_clause(
        self, artifact_id: ColumnElement[str] | QueryableAttribute[str], formats: Collection[str]
    ) -> ColumnElement[bool]:
        return exists().where(Instance.id == artifact_id, Instance.sop_class_uid.in_(list(formats)))


_LISTED = (
    "sop_instance_uid",
    "sop_class_uid",
    "series_instance_uid",
    "series_number",
    "instance_number",
    "frame_count",
    "modality",
    "transfer_syntax_uid",
    "size_bytes",
    "sha256",
    "received_at",
)

register_artifact_details(DicomInstanceDetails())
