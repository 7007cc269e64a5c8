"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.String(length=100), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
    )
    op.create_table(
        "organizations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("lead", "clinic", name="org_kind", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
        sa.UniqueConstraint("code", name=op.f("uq_organizations_code")),
    )
    op.create_table(
        "sla_targets",
        sa.Column(
            "discipline",
            sa.Enum("imaging", "ecg", "lab", name="discipline", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column(
            "priority",
            sa.Enum(
                "emergency", "urgent", "routine", name="priority", native_enum=False, length=32
            ),
            nullable=False,
        ),
        sa.Column("minutes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("discipline", "priority", name=op.f("pk_sla_targets")),
    )
    op.create_table(
        "ae_titles",
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["organizations.id"],
            name=op.f("fk_ae_titles_org_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("ae_title", name=op.f("pk_ae_titles")),
    )
    with op.batch_alter_table("ae_titles", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ae_titles_org_id"), ["org_id"], unique=False)

    op.create_table(
        "patients",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("issuer", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("birth_date", sa.String(length=8), nullable=True),
        sa.Column("sex", sa.String(length=16), nullable=True),
        sa.Column("original", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_patients_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patients")),
        sa.UniqueConstraint(
            "org_id", "issuer", "patient_id", name=op.f("uq_patients_org_id_issuer_patient_id")
        ),
    )
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_patients_org_id"), ["org_id"], unique=False)

    op.create_table(
        "quarantine",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("storage_key", sa.String(length=300), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_quarantine_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantine")),
    )
    op.create_table(
        "routing_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("discipline", sa.String(length=16), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part", sa.String(length=64), nullable=True),
        sa.Column("org_id", sa.String(length=36), nullable=True),
        sa.Column("priority", sa.String(length=16), nullable=True),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_routing_rules_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_rules")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column(
            "role",
            sa.Enum(
                "technician",
                "clinician",
                "reader",
                "senior_reader",
                "qc",
                "admin",
                name="user_role",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "level",
            sa.Enum(
                "resident", "attending", "chief", name="reader_level", native_enum=False, length=32
            ),
            nullable=True,
        ),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_users_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_users_org_id"), ["org_id"], unique=False)

    op.create_table(
        "exams",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column(
            "discipline",
            sa.Enum("imaging", "ecg", "lab", name="discipline", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("modalities", sa.String(length=200), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column(
            "priority",
            sa.Enum(
                "emergency", "urgent", "routine", name="priority", native_enum=False, length=32
            ),
            nullable=False,
        ),
        sa.Column(
            "state",
            sa.Enum(
                "RECEIVING", "READY", "CANCELLED", name="exam_state", native_enum=False, length=32
            ),
            nullable=False,
        ),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("has_conflicts", sa.Boolean(), nullable=False),
        sa.Column("performed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_exams_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["patient_ref"], ["patients.id"], name=op.f("fk_exams_patient_ref_patients")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exams")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_exams_study_instance_uid")),
    )
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_exams_accession_number"), ["accession_number"], unique=False
        )
        batch_op.create_index("ix_exams_org_state", ["org_id", "state"], unique=False)
        batch_op.create_index(batch_op.f("ix_exams_patient_ref"), ["patient_ref"], unique=False)
        batch_op.create_index(
            "ix_exams_state_last_received", ["state", "last_received_at"], unique=False
        )

    op.create_table(
        "instance_conflicts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=True),
        sa.Column("storage_key", sa.String(length=300), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"],
            ["exams.id"],
            name=op.f("fk_instance_conflicts_exam_id_exams"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_conflicts")),
    )
    with op.batch_alter_table("instance_conflicts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instance_conflicts_sop_instance_uid"), ["sop_instance_uid"], unique=False
        )

    op.create_table(
        "instances",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.String(length=300), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("coerced", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["exam_id"], ["exams.id"], name=op.f("fk_instances_exam_id_exams"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_exam_id"), ["exam_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_instances_series_instance_uid"), ["series_instance_uid"], unique=False
        )

    op.create_table(
        "work_items",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column(
            "state",
            sa.Enum("OPEN", "CANCELLED", name="work_item_state", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column(
            "priority",
            sa.Enum(
                "emergency", "urgent", "routine", name="priority", native_enum=False, length=32
            ),
            nullable=False,
        ),
        sa.Column("priority_rank", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"], ["exams.id"], name=op.f("fk_work_items_exam_id_exams"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_work_items")),
        sa.UniqueConstraint("exam_id", name=op.f("uq_work_items_exam_id")),
    )
    with op.batch_alter_table("work_items", schema=None) as batch_op:
        batch_op.create_index(
            "ix_work_items_queue", ["state", "priority_rank", "due_at"], unique=False
        )

    # Turnaround targets shipped as defaults (DESIGN.md §5), in minutes; editable later.
    sla = sa.table(
        "sla_targets",
        sa.column("discipline", sa.String),
        sa.column("priority", sa.String),
        sa.column("minutes", sa.Integer),
    )
    op.bulk_insert(
        sla,
        [
            {"discipline": d, "priority": p, "minutes": m}
            for d, p, m in [
                ("imaging", "emergency", 30),
                ("imaging", "urgent", 120),
                ("imaging", "routine", 1440),
                ("ecg", "emergency", 15),
                ("ecg", "urgent", 15),
                ("ecg", "routine", 30),
                ("lab", "emergency", 40),
                ("lab", "urgent", 40),
                ("lab", "routine", 240),
            ]
        ],
    )


def downgrade() -> None:
    with op.batch_alter_table("work_items", schema=None) as batch_op:
        batch_op.drop_index("ix_work_items_queue")

    op.drop_table("work_items")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_series_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_instances_exam_id"))

    op.drop_table("instances")
    with op.batch_alter_table("instance_conflicts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instance_conflicts_sop_instance_uid"))

    op.drop_table("instance_conflicts")
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_index("ix_exams_state_last_received")
        batch_op.drop_index(batch_op.f("ix_exams_patient_ref"))
        batch_op.drop_index("ix_exams_org_state")
        batch_op.drop_index(batch_op.f("ix_exams_accession_number"))

    op.drop_table("exams")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_org_id"))

    op.drop_table("users")
    op.drop_table("routing_rules")
    op.drop_table("quarantine")
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_patients_org_id"))

    op.drop_table("patients")
    with op.batch_alter_table("ae_titles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ae_titles_org_id"))

    op.drop_table("ae_titles")
    op.drop_table("sla_targets")
    op.drop_table("organizations")
    op.drop_table("audit_events")
