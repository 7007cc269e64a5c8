"""Tables of the alliance patient index: persons and the clinic identifiers linked to them.

A clinic's patient row (``patients``: issuer + patient ID within one clinic) is never changed
here; each row is linked to exactly one person. A national ID is kept only encrypted, with a
keyed hash to match on.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow

__all__ = ["Person", "PersonLink"]


class Person(Base):
    """One person across the alliance. ``national_id_hash`` (HMAC-SHA256 under the index
    key) is set on persons identified by a national ID; the ID itself is stored encrypted
    (AES-GCM) in ``national_id_enc``."""

    __tablename__ = "persons"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    national_id_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    national_id_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set when an administrator's link or a national ID merged this person into another:
    # the old ID still leads to the identifiers.
    merged_into: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class PersonLink(Base):
    """The person a clinic's patient row belongs to, how it was linked, and the national ID
    that arrived with that identifier (encrypted, as received).

    ``auto_link_blocked``: an administrator unlinked this identifier, so a national ID
    arriving with it later no longer links it again (an explicit link clears it).
    """

    __tablename__ = "person_links"

    patient_ref: Mapped[str] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), primary_key=True
    )
    person_id: Mapped[str] = mapped_column(ForeignKey("persons.id"), index=True)
    source: Mapped[str] = mapped_column(String(32), default="intake")
    national_id_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    national_id_enc: Mapped[str | None] = mapped_column(Text, nullable=True)
    auto_link_blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    linked_at: Mapped[datetime] = mapped_column(default=utcnow)
    linked_by: Mapped[str | None] = mapped_column(String(100), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
