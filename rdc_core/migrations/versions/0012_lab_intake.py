"""lab intake: HL7 sending facilities of clinics, and the HL7 messages accepted

Revision ID: 0012
Revises: 0007
Create Date: 2026-12-04 18:09:48.180985
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hl7_facilities",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_hl7_facilities_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_hl7_facilities")),
    )
    with op.batch_alter_table("hl7_facilities", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hl7_facilities_org_id"), ["org_id"], unique=False)

    op.create_table(
        "lab_messages",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("sending_application", sa.String(length=255), nullable=False),
        sa.Column("sending_facility", sa.String(length=255), nullable=False),
        sa.Column("control_id", sa.String(length=199), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("message_type", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("object_key", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=False),
        sa.Column("ack", sa.LargeBinary(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "received",
                "processed",
                "failed",
                name="lab_message_status",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("exam_id", sa.String(length=36), nullable=True),
        sa.Column("received_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"], ["exams.id"], name=op.f("fk_lab_messages_exam_id_exams")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_lab_messages_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_messages")),
        sa.UniqueConstraint(
            "sending_application",
            "sending_facility",
            "control_id",
            name="uq_lab_messages_sender_control_id",
        ),
    )
    with op.batch_alter_table("lab_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_lab_messages_exam_id"), ["exam_id"], unique=False)
        batch_op.create_index(
            "ix_lab_messages_org_id_received_at", ["org_id", "received_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("lab_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_lab_messages_org_id_received_at")
        batch_op.drop_index(batch_op.f("ix_lab_messages_exam_id"))

    op.drop_table("lab_messages")
    with op.batch_alter_table("hl7_facilities", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hl7_facilities_org_id"))

    op.drop_table("hl7_facilities")
