"""report versions and key images; delivery and acknowledgement stage times

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_images", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(
            sa.Column(
                "amendment_kind",
                sa.Enum(
                    "amended",
                    "corrected",
                    "appended",
                    name="amendment_kind",
                    native_enum=False,
                    length=32,
                ),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("amendment_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("delivered_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("acknowledged_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_column("acknowledged_at")
        batch_op.drop_column("delivered_at")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_column("amendment_reason")
        batch_op.drop_column("amendment_kind")
        batch_op.drop_column("key_images")
