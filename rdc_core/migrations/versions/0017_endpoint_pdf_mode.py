"""Delivery endpoints: how the signed PDF travels in an HL7 push (embedded or linked).

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("delivery_endpoints") as batch:
        batch.add_column(
            sa.Column("pdf_mode", sa.String(length=8), nullable=False, server_default="embed")
        )


def downgrade() -> None:
    with op.batch_alter_table("delivery_endpoints") as batch:
        batch.drop_column("pdf_mode")
