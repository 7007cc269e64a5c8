"""Tables of report signing: the alliance CA's and readers' signing credentials, and the
signed artefacts of each report version."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from rdc_core.db import Base, utcnow
from worklist.models import _enum

__all__ = ["CredentialKind", "SignedArtifact", "SigningCredential", "SigningStage"]


class CredentialKind(enum.StrEnum):
    """The alliance's root CA, or a reader's signing certificate issued by it."""

    CA = "ca"
    READER = "reader"


class SigningStage(enum.StrEnum):
    """A resident's preliminary report is signed by the resident; the final version by
    the reader who made it final (author or verifying senior)."""

    PRELIMINARY = "preliminary"
    FINAL = "final"


class SigningCredential(Base):
    """A certificate and its private key, encrypted at rest (PKCS#8, see ``pki``).

    A reader has at most one current credential (``superseded_at`` unset); a renewed one is
    superseded but kept, because the reports it signed still verify with it.
    """

    __tablename__ = "signing_credentials"
    __table_args__ = (Index("ix_signing_credentials_kind_user", "kind", "user_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[CredentialKind] = mapped_column(_enum(CredentialKind, "credential_kind"))
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    # Certificate serial number in lower-case hex: the key verifiers look credentials up by.
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    subject: Mapped[str] = mapped_column(String(500))
    issuer: Mapped[str] = mapped_column(String(500))
    certificate_pem: Mapped[str] = mapped_column(Text)
    encrypted_key_pem: Mapped[str] = mapped_column(Text)
    not_before: Mapped[datetime] = mapped_column()
    not_after: Mapped[datetime] = mapped_column()
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    superseded_at: Mapped[datetime | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SignedArtifact(Base):
    """The signed JSON document and the PAdES PDF of one report version at one stage.

    The bytes live in the object store under keys derived from the report ID; the hashes
    here let anyone check that the stored objects are the ones that were signed.
    """

    __tablename__ = "signed_artifacts"

    report_id: Mapped[str] = mapped_column(
        ForeignKey("reports.id", ondelete="CASCADE"), primary_key=True
    )
    stage: Mapped[SigningStage] = mapped_column(
        _enum(SigningStage, "signing_stage"), primary_key=True
    )
    document_key: Mapped[str] = mapped_column(String(300))
    # Indexed: a file uploaded for verification is matched to its record by its hash.
    document_sha256: Mapped[str] = mapped_column(String(64), index=True)
    pdf_key: Mapped[str] = mapped_column(String(300))
    pdf_sha256: Mapped[str] = mapped_column(String(64), index=True)
    signer_id: Mapped[str] = mapped_column(ForeignKey("users.id"))
    signer_username: Mapped[str] = mapped_column(String(64))
    signer_name: Mapped[str] = mapped_column(String(200), default="")
    certificate_serial: Mapped[str] = mapped_column(String(64))
    certificate_issuer: Mapped[str] = mapped_column(String(500))
    signed_at: Mapped[datetime] = mapped_column()
