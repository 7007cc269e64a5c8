"""mutual recognition: catalogue of recognised items, accreditations, decisions, declines

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 21:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _discipline() -> sa.Enum:
    return sa.Enum("imaging", "ecg", "lab", name="discipline", native_enum=False, length=32)


def upgrade() -> None:
    op.create_table(
        "recognition_catalog_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=300), nullable=False),
        sa.Column("loaded_by", sa.String(length=100), nullable=False),
        sa.Column("loaded_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_recognition_catalog_versions")),
    )
    with op.batch_alter_table("recognition_catalog_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_recognition_catalog_versions_content_sha256"),
            ["content_sha256"],
            unique=False,
        )

    op.create_table(
        "recognition_catalog_items",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("catalog_version", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("discipline", _discipline(), nullable=False),
        sa.Column("name_zh", sa.String(length=200), nullable=False),
        sa.Column("name_en", sa.String(length=200), nullable=False),
        sa.Column("scope_mark", sa.String(length=16), nullable=False),
        sa.Column("scope_note", sa.Text(), nullable=False),
        sa.Column("valid_days", sa.Integer(), nullable=False),
        sa.Column(
            "min_grade",
            sa.Enum("甲", "乙", "丙", "废", name="quality_grade", native_enum=False, length=32),
            nullable=True,
        ),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("test_codes", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["catalog_version"],
            ["recognition_catalog_versions.version"],
            name="fk_recognition_catalog_items_version",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recognition_catalog_items")),
        sa.UniqueConstraint(
            "catalog_version",
            "code",
            name=op.f("uq_recognition_catalog_items_catalog_version_code"),
        ),
    )

    op.create_table(
        "recognition_accreditations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("discipline", _discipline(), nullable=False),
        sa.Column("item_code", sa.String(length=64), nullable=False),
        sa.Column("valid_from", sa.Date(), nullable=False),
        sa.Column("valid_to", sa.Date(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("updated_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_recognition_accreditations_org_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recognition_accreditations")),
        sa.UniqueConstraint(
            "org_id",
            "discipline",
            "item_code",
            "valid_from",
            name="uq_recognition_accreditations_scope",
        ),
    )
    with op.batch_alter_table("recognition_accreditations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_recognition_accreditations_org_id"), ["org_id"], unique=False
        )

    op.create_table(
        "recognition_decisions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("item_code", sa.String(length=64), nullable=True),
        sa.Column("catalog_version", sa.Integer(), nullable=True),
        sa.Column("mark", sa.String(length=16), nullable=True),
        sa.Column("exam_date", sa.Date(), nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("signer_id", sa.String(length=36), nullable=False),
        sa.Column("decided_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"],
            ["exams.id"],
            name=op.f("fk_recognition_decisions_exam_id_exams"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_recognition_decisions_org_id_organizations"),
        ),
        sa.ForeignKeyConstraint(
            ["patient_ref"],
            ["patients.id"],
            name=op.f("fk_recognition_decisions_patient_ref_patients"),
        ),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.id"],
            name=op.f("fk_recognition_decisions_report_id_reports"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["signer_id"], ["users.id"], name=op.f("fk_recognition_decisions_signer_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recognition_decisions")),
        sa.UniqueConstraint("report_id", name=op.f("uq_recognition_decisions_report_id")),
    )
    with op.batch_alter_table("recognition_decisions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_recognition_decisions_exam_id"), ["exam_id"], unique=False
        )
        batch_op.create_index(
            "ix_recognition_decisions_granted_until", ["granted", "valid_until"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_recognition_decisions_patient_ref"), ["patient_ref"], unique=False
        )

    op.create_table(
        "recognition_declines",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("decision_id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column(
            "reason",
            sa.Enum(
                "condition_changed_or_inconsistent",
                "fast_changing_value",
                "high_stakes_decision",
                "emergency",
                "forensic_or_disability_appraisal",
                "patient_request",
                "other",
                name="decline_reason",
                native_enum=False,
                length=48,
            ),
            nullable=False,
        ),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("patient_informed", sa.Boolean(), nullable=False),
        sa.Column("declined_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["decision_id"],
            ["recognition_decisions.id"],
            name=op.f("fk_recognition_declines_decision_id_recognition_decisions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_recognition_declines_org_id_organizations"),
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_recognition_declines_user_id_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recognition_declines")),
    )
    with op.batch_alter_table("recognition_declines", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_recognition_declines_decision_id"), ["decision_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_recognition_declines_org_id"), ["org_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("recognition_declines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recognition_declines_org_id"))
        batch_op.drop_index(batch_op.f("ix_recognition_declines_decision_id"))
    op.drop_table("recognition_declines")
    with op.batch_alter_table("recognition_decisions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recognition_decisions_patient_ref"))
        batch_op.drop_index("ix_recognition_decisions_granted_until")
        batch_op.drop_index(batch_op.f("ix_recognition_decisions_exam_id"))
    op.drop_table("recognition_decisions")
    with op.batch_alter_table("recognition_accreditations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recognition_accreditations_org_id"))
    op.drop_table("recognition_accreditations")
    op.drop_table("recognition_catalog_items")
    with op.batch_alter_table("recognition_catalog_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recognition_catalog_versions_content_sha256"))
    op.drop_table("recognition_catalog_versions")
