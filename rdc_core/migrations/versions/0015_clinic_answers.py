"""exams: who asked for a re-scan, the clinic's decline, the reason for a hand-set urgency;
reports: the human report number, drawn from the per-year counters in report_counters

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "report_counters",
        sa.Column("year", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("year", name=op.f("pk_report_counters")),
    )
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report_number", sa.String(length=32), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_reports_report_number"), ["report_number"], unique=False
        )
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rescan_requested_by", sa.String(length=36), nullable=True))
        batch_op.add_column(
            sa.Column("rescan_declined_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("rescan_decline_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("priority_reason", sa.Text(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_exams_rescan_requested_by_users"), "users", ["rescan_requested_by"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reports_report_number"))
        batch_op.drop_column("report_number")
    op.drop_table("report_counters")
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_exams_rescan_requested_by_users"), type_="foreignkey")
        batch_op.drop_column("priority_reason")
        batch_op.drop_column("rescan_decline_reason")
        batch_op.drop_column("rescan_declined_at")
        batch_op.drop_column("rescan_requested_by")
