"""ECG intake: the ECG detail table (ecg_studies) and the exam's triage reason

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("exams") as batch:
        batch.add_column(sa.Column("triage_reason", sa.Text(), nullable=True))
    op.create_table(
        "ecg_studies",
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("artifact_id", sa.String(length=36), nullable=False),
        sa.Column("object_keys", sa.JSON(), nullable=False),
        sa.Column("source_format", sa.String(length=16), nullable=False),
        sa.Column("sampling_rate_hz", sa.Float(), nullable=True),
        sa.Column("lead_names", sa.JSON(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("quality", sa.JSON(), nullable=False),
        sa.Column("measurements", sa.JSON(), nullable=False),
        sa.Column("missing_reasons", sa.JSON(), nullable=False),
        sa.Column("device_measurements", sa.JSON(), nullable=False),
        sa.Column("reader_measurements", sa.JSON(), nullable=True),
        sa.Column("prescreen", sa.JSON(), nullable=False),
        sa.Column("unreliable", sa.Boolean(), nullable=False),
        sa.Column("unreliable_reason", sa.Text(), nullable=True),
        sa.Column("rhythm", sa.JSON(), nullable=False),
        sa.Column("fiducials", sa.JSON(), nullable=False),
        sa.Column("device", sa.String(length=200), nullable=True),
        sa.Column("device_statements", sa.JSON(), nullable=False),
        sa.Column("acquired_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("analysis_error", sa.Text(), nullable=True),
        sa.Column("analysis_version", sa.String(length=32), nullable=False),
        sa.Column("analysed_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"],
            ["exams.id"],
            name=op.f("fk_ecg_studies_exam_id_exams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("exam_id", name=op.f("pk_ecg_studies")),
    )
    with op.batch_alter_table("ecg_studies") as batch:
        batch.create_index(batch.f("ix_ecg_studies_artifact_id"), ["artifact_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ecg_studies") as batch:
        batch.drop_index(batch.f("ix_ecg_studies_artifact_id"))
    op.drop_table("ecg_studies")
    with op.batch_alter_table("exams") as batch:
        batch.drop_column("triage_reason")
