"""C-MOVE destinations reached over DICOM TLS; the referring clinician of an exam.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dicom_move_destinations") as batch:
        batch.add_column(
            sa.Column("tls", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("exams") as batch:
        batch.add_column(sa.Column("referring_physician", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exams") as batch:
        batch.drop_column("referring_physician")
    with op.batch_alter_table("dicom_move_destinations") as batch:
        batch.drop_column("tls")
