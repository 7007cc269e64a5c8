"""patient index: persons and the links of clinic patient rows to them

Revision ID: 0011
Revises: 0007
Create Date: 2026-12-04 18:30:00

Every existing patient row gets a person of its own (the ID intake derives for it), so the
index covers the data already held.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    persons = op.create_table(
        "persons",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("national_id_hash", sa.String(length=64), nullable=True),
        sa.Column("national_id_enc", sa.Text(), nullable=True),
        sa.Column("merged_into", sa.String(length=36), nullable=True),
        sa.Column("created_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_persons")),
        sa.UniqueConstraint("national_id_hash", name=op.f("uq_persons_national_id_hash")),
    )
    links = op.create_table(
        "person_links",
        sa.Column("patient_ref", sa.String(length=36), nullable=False),
        sa.Column("person_id", sa.String(length=36), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("national_id_hash", sa.String(length=64), nullable=True),
        sa.Column("national_id_enc", sa.Text(), nullable=True),
        sa.Column("auto_link_blocked", sa.Boolean(), nullable=False),
        sa.Column("linked_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("linked_by", sa.String(length=100), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["patient_ref"],
            ["patients.id"],
            name=op.f("fk_person_links_patient_ref_patients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["person_id"], ["persons.id"], name=op.f("fk_person_links_person_id_persons")
        ),
        sa.PrimaryKeyConstraint("patient_ref", name=op.f("pk_person_links")),
    )
    with op.batch_alter_table("person_links", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_person_links_national_id_hash"), ["national_id_hash"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_person_links_person_id"), ["person_id"], unique=False)

    # Each patient already held becomes a person of its own.
    bind = op.get_bind()
    now = datetime.now(UTC)
    refs = [r for (r,) in bind.execute(sa.text("SELECT id FROM patients ORDER BY id"))]
    for start in range(0, len(refs), 1000):
        chunk = refs[start : start + 1000]
        ids = {ref: rdc_core.db.stable_id("person", ref) for ref in chunk}
        op.bulk_insert(
            persons,
            [{"id": ids[r], "created_at": now, "updated_at": now} for r in chunk],
        )
        op.bulk_insert(
            links,
            [
                {
                    "patient_ref": r,
                    "person_id": ids[r],
                    "source": "intake",
                    "auto_link_blocked": False,
                    "linked_at": now,
                }
                for r in chunk
            ],
        )


def downgrade() -> None:
    with op.batch_alter_table("person_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_person_links_person_id"))
        batch_op.drop_index(batch_op.f("ix_person_links_national_id_hash"))
    op.drop_table("person_links")
    op.drop_table("persons")
