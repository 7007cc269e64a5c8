"""lab_messages: fewer index pages per accepted message (the intake's WAL sync)

The lab intake commits each round of messages and syncs the WAL before it answers; every
index its INSERT touches is pages in that sync. The clinic index (org_id, received_at) was
read by nothing and goes; the exam index keeps only the rows that have an exam (processing
sets it); the look-up of the messages still to process keeps only those (status
'received'), ordered as processing reads them (received_at, id).

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-05 20:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WAITING = sa.text("status = 'received'")
_WITH_EXAM = sa.text("exam_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_lab_messages_org_id_received_at", table_name="lab_messages")
    op.drop_index("ix_lab_messages_status_received_at", table_name="lab_messages")
    op.drop_index("ix_lab_messages_exam_id", table_name="lab_messages")
    op.create_index(
        "ix_lab_messages_waiting",
        "lab_messages",
        ["received_at", "id"],
        postgresql_where=_WAITING,
        sqlite_where=_WAITING,
    )
    op.create_index(
        "ix_lab_messages_exam_id",
        "lab_messages",
        ["exam_id"],
        postgresql_where=_WITH_EXAM,
        sqlite_where=_WITH_EXAM,
    )


def downgrade() -> None:
    op.drop_index("ix_lab_messages_exam_id", table_name="lab_messages")
    op.drop_index("ix_lab_messages_waiting", table_name="lab_messages")
    op.create_index("ix_lab_messages_exam_id", "lab_messages", ["exam_id"])
    op.create_index(
        "ix_lab_messages_status_received_at", "lab_messages", ["status", "received_at"]
    )
    op.create_index(
        "ix_lab_messages_org_id_received_at", "lab_messages", ["org_id", "received_at"]
    )
