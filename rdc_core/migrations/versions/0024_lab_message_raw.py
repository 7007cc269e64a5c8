"""lab_messages.raw: the bytes of an accepted message, kept in its index row until processing
has written them to the object store (one transaction, one sync before the ACK)

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05 14:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows already there have their bytes in the object store (object_key): raw stays NULL.
    op.add_column("lab_messages", sa.Column("raw", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # A downgrade needs every message's bytes in the object store: processing writes them
    # there before it clears raw, so process the waiting messages first.
    with op.batch_alter_table("lab_messages", schema=None) as batch_op:
        batch_op.drop_column("raw")
