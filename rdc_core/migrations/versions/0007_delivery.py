"""delivery: clinic endpoints for push-back, deliveries and their attempts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 21:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHANNEL = sa.Enum(
    "portal", "dicom", "hl7", name="delivery_channel", native_enum=False, length=32
)
_STATE = sa.Enum(
    "pending", "failing", "delivered", name="delivery_state", native_enum=False, length=32
)


def upgrade() -> None:
    op.create_table(
        "delivery_endpoints",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("channel", _CHANNEL, nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=True),
        sa.Column("receiving_application", sa.String(length=100), nullable=True),
        sa.Column("receiving_facility", sa.String(length=100), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_delivery_endpoints_org_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_endpoints")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_delivery_endpoints_org_id_name")),
    )
    with op.batch_alter_table("delivery_endpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_delivery_endpoints_org_id"), ["org_id"], unique=False)

    op.create_table(
        "report_deliveries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("target", sa.String(length=36), nullable=False),
        sa.Column("endpoint_id", sa.String(length=36), nullable=True),
        sa.Column("channel", _CHANNEL, nullable=False),
        sa.Column("state", _STATE, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["delivery_endpoints.id"],
            name=op.f("fk_report_deliveries_endpoint_id_delivery_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["exam_id"],
            ["exams.id"],
            name=op.f("fk_report_deliveries_exam_id_exams"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_report_deliveries_org_id_organizations"),
        ),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.id"],
            name=op.f("fk_report_deliveries_report_id_reports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report_deliveries")),
        sa.UniqueConstraint(
            "report_id", "target", name=op.f("uq_report_deliveries_report_id_target")
        ),
    )
    with op.batch_alter_table("report_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_report_deliveries_due", ["state", "next_attempt_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_deliveries_endpoint_id"), ["endpoint_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_report_deliveries_exam_id"), ["exam_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_report_deliveries_org_id"), ["org_id"], unique=False)

    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("worker", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["report_deliveries.id"],
            name=op.f("fk_delivery_attempts_delivery_id_report_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
        sa.UniqueConstraint(
            "delivery_id", "number", name=op.f("uq_delivery_attempts_delivery_id_number")
        ),
    )


def downgrade() -> None:
    op.drop_table("delivery_attempts")
    with op.batch_alter_table("report_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_report_deliveries_org_id"))
        batch_op.drop_index(batch_op.f("ix_report_deliveries_exam_id"))
        batch_op.drop_index(batch_op.f("ix_report_deliveries_endpoint_id"))
        batch_op.drop_index("ix_report_deliveries_due")
    op.drop_table("report_deliveries")
    with op.batch_alter_table("delivery_endpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_endpoints_org_id"))
    op.drop_table("delivery_endpoints")
