"""lab result model: orders, observations (versions), the mapping queue, local-code
mappings, lab settings (auto-release stop switch); processing columns of lab_messages

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _dt(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, rdc_core.db.UTCDateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("lab_messages", schema=None) as batch_op:
        batch_op.add_column(_dt("processed_at"))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("app_ack_code", sa.String(length=2), nullable=True))
        batch_op.add_column(sa.Column("app_ack", sa.LargeBinary(), nullable=True))
        batch_op.create_index(
            "ix_lab_messages_status_received_at", ["status", "received_at"], unique=False
        )

    op.create_table(
        "lab_orders",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("natural_key", sa.String(length=128), nullable=False),
        sa.Column("sending_facility", sa.String(length=255), nullable=False),
        sa.Column("placer_number", sa.String(length=128), nullable=False),
        sa.Column("filler_number", sa.String(length=128), nullable=False),
        sa.Column("service_code", sa.String(length=64), nullable=False),
        sa.Column("service_text", sa.String(length=255), nullable=False),
        sa.Column("service_system", sa.String(length=64), nullable=False),
        sa.Column("priority", sa.String(length=16), nullable=False),
        sa.Column("result_status", sa.String(length=8), nullable=False),
        _dt("collected_at"),
        _dt("specimen_received_at"),
        _dt("reported_at"),
        _dt("arrived_at", nullable=False),
        sa.Column("specimens", sa.JSON(), nullable=False),
        sa.Column("hil", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("version_doc", sa.JSON(), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=True),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("rules_version", sa.String(length=64), nullable=False),
        sa.Column("critical_version", sa.String(length=64), nullable=False),
        sa.Column("order_trace", sa.JSON(), nullable=False),
        sa.Column("critical", sa.Boolean(), nullable=False),
        _dt("released_at"),
        sa.Column("released_by", sa.String(length=36), nullable=True),
        sa.Column("auto_released", sa.Boolean(), nullable=False),
        sa.Column("report_id", sa.String(length=36), nullable=True),
        _dt("created_at", nullable=False),
        _dt("updated_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"], ["exams.id"], name=op.f("fk_lab_orders_exam_id_exams"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_lab_orders_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["patient_ref"], ["patients.id"], name=op.f("fk_lab_orders_patient_ref_patients")
        ),
        sa.ForeignKeyConstraint(
            ["message_id"], ["lab_messages.id"], name=op.f("fk_lab_orders_message_id_lab_messages")
        ),
        sa.ForeignKeyConstraint(
            ["released_by"], ["users.id"], name=op.f("fk_lab_orders_released_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["report_id"], ["reports.id"], name=op.f("fk_lab_orders_report_id_reports")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_orders")),
        sa.UniqueConstraint("exam_id", name=op.f("uq_lab_orders_exam_id")),
    )
    with op.batch_alter_table("lab_orders", schema=None) as batch_op:
        batch_op.create_index(
            "ix_lab_orders_org_id_arrived_at", ["org_id", "arrived_at"], unique=False
        )
        batch_op.create_index("ix_lab_orders_patient_ref", ["patient_ref"], unique=False)

    op.create_table(
        "lab_observations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("order_id", sa.String(length=36), nullable=False),
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("result_key", sa.String(length=255), nullable=False),
        sa.Column("set_id", sa.String(length=16), nullable=False),
        sa.Column("sub_id", sa.String(length=32), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("code_system", sa.String(length=64), nullable=False),
        sa.Column("code_text", sa.String(length=255), nullable=False),
        sa.Column("loinc", sa.String(length=16), nullable=True),
        sa.Column("analyte", sa.String(length=32), nullable=True),
        sa.Column("name_zh", sa.String(length=128), nullable=False),
        sa.Column("name_en", sa.String(length=255), nullable=False),
        sa.Column("value_type", sa.String(length=8), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("numeric", sa.Float(), nullable=True),
        sa.Column("comparator", sa.String(length=4), nullable=False),
        sa.Column("unit", sa.String(length=64), nullable=False),
        sa.Column("unit_ok", sa.Boolean(), nullable=False),
        sa.Column("reference_range", sa.String(length=128), nullable=False),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=4), nullable=False),
        sa.Column("method", sa.String(length=255), nullable=False),
        sa.Column("performing_lab", sa.String(length=255), nullable=False),
        _dt("observed_at"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("order_version", sa.Integer(), nullable=False),
        sa.Column("current", sa.Boolean(), nullable=False),
        _dt("superseded_at"),
        sa.Column("control_id", sa.String(length=199), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("rules_version", sa.String(length=64), nullable=False),
        sa.Column("autoverification", sa.JSON(), nullable=False),
        sa.Column("critical", sa.Boolean(), nullable=False),
        _dt("created_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["lab_orders.id"],
            name=op.f("fk_lab_observations_order_id_lab_orders"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["patient_ref"], ["patients.id"], name=op.f("fk_lab_observations_patient_ref_patients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_observations")),
        sa.UniqueConstraint(
            "order_id", "result_key", "version", name="uq_lab_observations_version"
        ),
    )
    with op.batch_alter_table("lab_observations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_lab_observations_order_id_current", ["order_id", "current"], unique=False
        )
        batch_op.create_index(
            "ix_lab_observations_patient_analyte",
            ["patient_ref", "analyte", "observed_at"],
            unique=False,
        )

    op.create_table(
        "lab_mapping_queue",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=True),
        sa.Column("facility", sa.String(length=255), nullable=False),
        sa.Column("code_system", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("text", sa.String(length=255), nullable=False),
        sa.Column("unit", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("occurrences", sa.Integer(), nullable=False),
        sa.Column("example_order_id", sa.String(length=36), nullable=True),
        _dt("first_seen_at", nullable=False),
        _dt("last_seen_at", nullable=False),
        _dt("resolved_at"),
        sa.Column("resolved_loinc", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_lab_mapping_queue_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_mapping_queue")),
        sa.UniqueConstraint("facility", "code_system", "code", name="uq_lab_mapping_queue_code"),
    )

    op.create_table(
        "lab_code_mappings",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("facility", sa.String(length=255), nullable=False),
        sa.Column("code_system", sa.String(length=64), nullable=False),
        sa.Column("local_code", sa.String(length=64), nullable=False),
        sa.Column("loinc", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=True),
        _dt("created_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"], ["users.id"], name=op.f("fk_lab_code_mappings_created_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_code_mappings")),
        sa.UniqueConstraint(
            "facility", "code_system", "local_code", name="uq_lab_code_mappings"
        ),
    )

    op.create_table(
        "lab_settings",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_by", sa.String(length=36), nullable=True),
        _dt("updated_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["updated_by"], ["users.id"], name=op.f("fk_lab_settings_updated_by_users")
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_lab_settings")),
    )


def downgrade() -> None:
    op.drop_table("lab_settings")
    op.drop_table("lab_code_mappings")
    op.drop_table("lab_mapping_queue")
    with op.batch_alter_table("lab_observations", schema=None) as batch_op:
        batch_op.drop_index("ix_lab_observations_patient_analyte")
        batch_op.drop_index("ix_lab_observations_order_id_current")
    op.drop_table("lab_observations")
    with op.batch_alter_table("lab_orders", schema=None) as batch_op:
        batch_op.drop_index("ix_lab_orders_patient_ref")
        batch_op.drop_index("ix_lab_orders_org_id_arrived_at")
    op.drop_table("lab_orders")
    with op.batch_alter_table("lab_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_lab_messages_status_received_at")
        batch_op.drop_column("app_ack")
        batch_op.drop_column("app_ack_code")
        batch_op.drop_column("error")
        batch_op.drop_column("processed_at")
