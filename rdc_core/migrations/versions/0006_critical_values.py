"""critical values: alerts, acknowledgements, escalations, contacts

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 21:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UTC = rdc_core.db.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "critical_contacts",
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("primary_name", sa.String(length=200), nullable=False),
        sa.Column("primary_phone", sa.String(length=64), nullable=False),
        sa.Column("primary_username", sa.String(length=64), nullable=True),
        sa.Column("secondary_name", sa.String(length=200), nullable=True),
        sa.Column("secondary_phone", sa.String(length=64), nullable=True),
        sa.Column("secondary_username", sa.String(length=64), nullable=True),
        sa.Column("updated_at", _UTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_critical_contacts_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_critical_contacts")),
    )
    op.create_table(
        "critical_duty",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("on_from", _UTC(timezone=True), nullable=True),
        sa.Column("on_until", _UTC(timezone=True), nullable=True),
        sa.Column("created_at", _UTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_critical_duty_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_critical_duty")),
        sa.UniqueConstraint("user_id", name=op.f("uq_critical_duty_user_id")),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column("recipient_name", sa.String(length=200), nullable=True),
        sa.Column("recipient_phone", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("subject_type", sa.String(length=32), nullable=False),
        sa.Column("subject_id", sa.String(length=100), nullable=False),
        sa.Column("text_zh", sa.Text(), nullable=False),
        sa.Column("text_en", sa.Text(), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("created_at", _UTC(timezone=True), nullable=False),
        sa.Column("notified_at", _UTC(timezone=True), nullable=True),
        sa.Column("read_at", _UTC(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_notifications_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_notifications_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index("ix_notifications_org_id_read_at", ["org_id", "read_at"])
        batch_op.create_index("ix_notifications_subject", ["subject_type", "subject_id"])
        batch_op.create_index("ix_notifications_user_id_read_at", ["user_id", "read_at"])

    op.create_table(
        "critical_alerts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("finding", sa.Text(), nullable=False),
        sa.Column("raised_by", sa.String(length=36), nullable=False),
        sa.Column("raised_at", _UTC(timezone=True), nullable=False),
        sa.Column("deadline_at", _UTC(timezone=True), nullable=False),
        sa.Column("notified_at", _UTC(timezone=True), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "open",
                "acknowledged",
                "superseded",
                "withdrawn",
                name="critical_alert_state",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("escalation_level", sa.Integer(), nullable=False),
        sa.Column("escalated_at", _UTC(timezone=True), nullable=True),
        sa.Column("next_escalation_at", _UTC(timezone=True), nullable=True),
        sa.Column("acknowledged_by", sa.String(length=36), nullable=True),
        sa.Column("receiver_name", sa.String(length=200), nullable=True),
        sa.Column("acknowledged_at", _UTC(timezone=True), nullable=True),
        sa.Column("read_back", sa.Text(), nullable=True),
        sa.Column(
            "ack_via",
            sa.Enum("portal", "phone", name="critical_ack_channel", native_enum=False, length=32),
            nullable=True,
        ),
        sa.Column("recorded_by", sa.String(length=36), nullable=True),
        sa.Column("closed_at", _UTC(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(length=36), nullable=True),
        sa.Column("superseded_by_report_id", sa.String(length=36), nullable=True),
        sa.Column("previous_alert_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", _UTC(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["acknowledged_by"], ["users.id"], name=op.f("fk_critical_alerts_acknowledged_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["closed_by"], ["users.id"], name=op.f("fk_critical_alerts_closed_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["superseded_by_report_id"],
            ["reports.id"],
            name=op.f("fk_critical_alerts_superseded_by_report_id_reports"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["previous_alert_id"],
            ["critical_alerts.id"],
            name=op.f("fk_critical_alerts_previous_alert_id_critical_alerts"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["exam_id"],
            ["exams.id"],
            name=op.f("fk_critical_alerts_exam_id_exams"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_critical_alerts_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["patient_ref"], ["patients.id"], name=op.f("fk_critical_alerts_patient_ref_patients")
        ),
        sa.ForeignKeyConstraint(
            ["raised_by"], ["users.id"], name=op.f("fk_critical_alerts_raised_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["recorded_by"], ["users.id"], name=op.f("fk_critical_alerts_recorded_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reports.id"],
            name=op.f("fk_critical_alerts_report_id_reports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_critical_alerts")),
        sa.UniqueConstraint("report_id", name=op.f("uq_critical_alerts_report_id")),
    )
    with op.batch_alter_table("critical_alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_critical_alerts_exam_id"), ["exam_id"])
        batch_op.create_index("ix_critical_alerts_org_id_raised_at", ["org_id", "raised_at"])
        batch_op.create_index(
            "ix_critical_alerts_state_next_escalation_at", ["state", "next_escalation_at"]
        )

    op.create_table(
        "critical_escalations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("at", _UTC(timezone=True), nullable=False),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["critical_alerts.id"],
            name=op.f("fk_critical_escalations_alert_id_critical_alerts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_critical_escalations")),
        sa.UniqueConstraint(
            "alert_id", "level", name=op.f("uq_critical_escalations_alert_id_level")
        ),
    )


def downgrade() -> None:
    op.drop_table("critical_escalations")
    with op.batch_alter_table("critical_alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_critical_alerts_state_next_escalation_at")
        batch_op.drop_index("ix_critical_alerts_org_id_raised_at")
        batch_op.drop_index(batch_op.f("ix_critical_alerts_exam_id"))
    op.drop_table("critical_alerts")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_user_id_read_at")
        batch_op.drop_index("ix_notifications_subject")
        batch_op.drop_index("ix_notifications_org_id_read_at")
    op.drop_table("notifications")
    op.drop_table("critical_duty")
    op.drop_table("critical_contacts")
