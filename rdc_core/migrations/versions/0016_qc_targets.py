"""qc: versioned targets of the QC indicators; indexes on the times of the periods

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 18:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "qc_targets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("target", sa.Float(), nullable=True),
        sa.Column("warn_margin", sa.Float(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("changed_by", sa.String(length=64), nullable=False),
        sa.Column("changed_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qc_targets")),
        sa.UniqueConstraint("code", "version", name=op.f("uq_qc_targets_code_version")),
    )
    op.create_index(op.f("ix_qc_targets_code"), "qc_targets", ["code"], unique=False)
    op.create_table(
        "qc_report_checks",
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column("compliant", sa.Boolean(), nullable=False),
        sa.Column("reasons", sa.String(length=200), nullable=True),
        sa.Column("checked_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.id"],
            name=op.f("fk_qc_report_checks_report_id_reports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("report_id", name=op.f("pk_qc_report_checks")),
    )
    op.create_index("ix_exams_first_received_at", "exams", ["first_received_at"], unique=False)
    op.create_index("ix_reports_final_at", "reports", ["final_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_reports_final_at", table_name="reports")
    op.drop_index("ix_exams_first_received_at", table_name="exams")
    op.drop_table("qc_report_checks")
    op.drop_index(op.f("ix_qc_targets_code"), table_name="qc_targets")
    op.drop_table("qc_targets")
