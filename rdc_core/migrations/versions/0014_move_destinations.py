"""dicom move destinations (the AE titles a clinic's C-MOVE may send its own studies to);
delivery endpoints: tls

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 19:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dicom_move_destinations",
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("created_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_dicom_move_destinations_org_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("org_id", "ae_title", name=op.f("pk_dicom_move_destinations")),
    )
    with op.batch_alter_table("delivery_endpoints", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tls", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("delivery_endpoints", schema=None) as batch_op:
        batch_op.drop_column("tls")
    op.drop_table("dicom_move_destinations")
