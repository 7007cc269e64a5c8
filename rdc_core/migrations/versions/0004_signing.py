"""signing: the alliance CA, readers' signing credentials, signed report artefacts

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 21:50:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc(name: str, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, rdc_core.db.UTCDateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "signing_credentials",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("ca", "reader", name="credential_kind", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=500), nullable=False),
        sa.Column("issuer", sa.String(length=500), nullable=False),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        sa.Column("encrypted_key_pem", sa.Text(), nullable=False),
        _utc("not_before"),
        _utc("not_after"),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        _utc("revoked_at", nullable=True),
        _utc("superseded_at", nullable=True),
        _utc("created_at"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_signing_credentials_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signing_credentials")),
        sa.UniqueConstraint("serial", name=op.f("uq_signing_credentials_serial")),
    )
    with op.batch_alter_table("signing_credentials", schema=None) as batch_op:
        batch_op.create_index("ix_signing_credentials_kind_user", ["kind", "user_id"], unique=False)
    op.create_table(
        "signed_artifacts",
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column(
            "stage",
            sa.Enum("preliminary", "final", name="signing_stage", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("document_key", sa.String(length=300), nullable=False),
        sa.Column("document_sha256", sa.String(length=64), nullable=False),
        sa.Column("pdf_key", sa.String(length=300), nullable=False),
        sa.Column("pdf_sha256", sa.String(length=64), nullable=False),
        sa.Column("signer_id", sa.String(length=36), nullable=False),
        sa.Column("signer_username", sa.String(length=64), nullable=False),
        sa.Column("signer_name", sa.String(length=200), nullable=False),
        sa.Column("certificate_serial", sa.String(length=64), nullable=False),
        sa.Column("certificate_issuer", sa.String(length=500), nullable=False),
        _utc("signed_at"),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.id"],
            name=op.f("fk_signed_artifacts_report_id_reports"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["signer_id"], ["users.id"], name=op.f("fk_signed_artifacts_signer_id_users")
        ),
        sa.PrimaryKeyConstraint("report_id", "stage", name=op.f("pk_signed_artifacts")),
    )
    with op.batch_alter_table("signed_artifacts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_signed_artifacts_document_sha256", ["document_sha256"], unique=False
        )
        batch_op.create_index("ix_signed_artifacts_pdf_sha256", ["pdf_sha256"], unique=False)


def downgrade() -> None:
    op.drop_table("signed_artifacts")
    with op.batch_alter_table("signing_credentials", schema=None) as batch_op:
        batch_op.drop_index("ix_signing_credentials_kind_user")
    op.drop_table("signing_credentials")
