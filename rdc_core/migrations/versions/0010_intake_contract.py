"""intake contract: exams keyed by (discipline, natural key), generic artifacts

Carries the data: every exam's natural key is its Study Instance UID (key kind
``study_uid``, so its ID stays what it was), and every DICOM instance gets its artifact row
with the instance's own ID. The quarantine's SOP Instance UID becomes the generic
``artifact_ref``. No ID a client holds changes (exam, report, instance IDs, UIDs).

Revision ID: 0010
Revises: 0007
Create Date: 2026-12-04 18:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY_KIND = sa.Enum(
    "study_uid", "order", "file", name="exam_key_kind", native_enum=False, length=32
)


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("ref", sa.String(length=128), nullable=False),
        sa.Column("storage_key", sa.String(length=300), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("received_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"],
            ["exams.id"],
            name=op.f("fk_artifacts_exam_id_exams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
    )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_artifacts_exam_id"), ["exam_id"], unique=False)

    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("natural_key", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("key_kind", _KEY_KIND, nullable=True))
    # Every exam so far is a DICOM study: its natural key is its Study Instance UID.
    op.execute(
        "UPDATE exams SET natural_key = study_instance_uid, key_kind = 'study_uid' "
        "WHERE natural_key IS NULL"
    )
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.alter_column("natural_key", existing_type=sa.String(length=128), nullable=False)
        batch_op.alter_column("key_kind", existing_type=_KEY_KIND, nullable=False)
        batch_op.alter_column(
            "study_instance_uid", existing_type=sa.String(length=64), nullable=True
        )
        batch_op.create_unique_constraint(
            batch_op.f("uq_exams_discipline_natural_key"), ["discipline", "natural_key"]
        )

    # One artifact per stored DICOM instance, with the instance's ID
    # (stable_id("instance", SOP Instance UID), what the intake contract derives).
    op.execute(
        "INSERT INTO artifacts "
        "(id, exam_id, kind, ref, storage_key, size_bytes, sha256, received_at, source) "
        "SELECT id, exam_id, 'instance', sop_instance_uid, storage_key, size_bytes, sha256, "
        "received_at, calling_ae FROM instances"
    )

    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.alter_column(
            "sop_instance_uid",
            new_column_name="artifact_ref",
            existing_type=sa.String(length=64),
            type_=sa.String(length=128),
            existing_nullable=True,
        )


def downgrade() -> None:
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.alter_column(
            "artifact_ref",
            new_column_name="sop_instance_uid",
            existing_type=sa.String(length=128),
            type_=sa.String(length=64),
            existing_nullable=True,
        )
    # Exams without a Study Instance UID (lab, uploaded files) cannot exist in the old schema.
    op.execute("DELETE FROM exams WHERE study_instance_uid IS NULL")
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_exams_discipline_natural_key"), type_="unique")
        batch_op.alter_column(
            "study_instance_uid", existing_type=sa.String(length=64), nullable=False
        )
        batch_op.drop_column("key_kind")
        batch_op.drop_column("natural_key")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artifacts_exam_id"))
    op.drop_table("artifacts")
