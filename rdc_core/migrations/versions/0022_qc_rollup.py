"""qc: daily roll-up and monthly turnaround histograms of the facts, per-report
report-writing facts; every report change and signature queues its exam

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05 01:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Keep in step with worklist.qc.models.ROLLUP_CODES (a test compares the tables).
_CODES = (
    "tat_01", "tat_02", "tat_03", "tat_04", "tat_05", "tat_06", "tat_07", "sla_01",
    "rrc_02", "ecg_01", "iq_01", "iq_02", "all_01", "all_02", "all_06", "rws_03",
)  # fmt: skip
# Any report version: what the report-writing check reads (version 1 is also watched by 0021).
_REPORT_COLUMNS = "exam_id, status, final_at, findings, impression, quality_grade"
_Q = "INSERT INTO qc_fact_queue (exam_id)"

_SQLITE = [
    f"CREATE TRIGGER qc_fact_report_versions_i AFTER INSERT ON reports"
    f" BEGIN {_Q} VALUES (NEW.exam_id); END",
    f"CREATE TRIGGER qc_fact_report_versions_u AFTER UPDATE OF {_REPORT_COLUMNS} ON reports"
    f" BEGIN {_Q} VALUES (OLD.exam_id); {_Q} SELECT NEW.exam_id WHERE NEW.exam_id <> OLD.exam_id;"
    " END",
    f"CREATE TRIGGER qc_fact_report_versions_d AFTER DELETE ON reports"
    f" BEGIN {_Q} VALUES (OLD.exam_id); END",
    f"CREATE TRIGGER qc_fact_signed_artifacts_i AFTER INSERT ON signed_artifacts"
    f" BEGIN {_Q} SELECT exam_id FROM reports WHERE id = NEW.report_id; END",
]
_POSTGRESQL = [
    "CREATE FUNCTION qc_fact_queue_signed() RETURNS trigger LANGUAGE plpgsql AS $$"
    f" BEGIN {_Q} SELECT exam_id FROM reports WHERE id = NEW.report_id; RETURN NULL; END $$",
    "CREATE TRIGGER qc_fact_report_versions_i AFTER INSERT ON reports"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_child()",
    f"CREATE TRIGGER qc_fact_report_versions_u AFTER UPDATE OF {_REPORT_COLUMNS} ON reports"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_child()",
    "CREATE TRIGGER qc_fact_report_versions_d AFTER DELETE ON reports"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_child()",
    "CREATE TRIGGER qc_fact_signed_artifacts_i AFTER INSERT ON signed_artifacts"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_signed()",
]
_TRIGGERS = (
    ("reports", "qc_fact_report_versions_i"),
    ("reports", "qc_fact_report_versions_u"),
    ("reports", "qc_fact_report_versions_d"),
    ("signed_artifacts", "qc_fact_signed_artifacts_i"),
)


def upgrade() -> None:
    # The facts of a deleted exam must stay until the task has taken them out of the
    # roll-up: no cascade from exams (qc_exam_facts carries no trigger: rebuilding it on
    # SQLite drops none).
    with op.batch_alter_table("qc_exam_facts") as batch:
        batch.drop_constraint("fk_qc_exam_facts_exam_id_exams", type_="foreignkey")
    op.create_table(
        "qc_daily",
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("clinic", sa.String(length=64), nullable=False),
        sa.Column("discipline", sa.String(length=32), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=32), nullable=False),
        *[
            sa.Column(f"{what}_{code}", sa.BigInteger(), nullable=False)
            for code in _CODES
            for what in ("n", "s")
        ],
        sa.PrimaryKeyConstraint(
            "day", "clinic", "discipline", "modality", "priority", name=op.f("pk_qc_daily")
        ),
    )
    op.create_table(
        "qc_tat_hist",
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("clinic", sa.String(length=64), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("month", "clinic", "stage", "bucket", name=op.f("pk_qc_tat_hist")),
    )
    op.create_table(
        "qc_report_facts",
        sa.Column("report_id", sa.String(length=36), nullable=False),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("final_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("compliant", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("report_id", name=op.f("pk_qc_report_facts")),
    )
    op.create_index(
        op.f("ix_qc_report_facts_exam_id"), "qc_report_facts", ["exam_id"], unique=False
    )
    op.create_index(
        "ix_qc_exam_facts_pending",
        "qc_exam_facts",
        ["first_received_at"],
        unique=False,
        postgresql_where=sa.text("final_at IS NULL"),
        sqlite_where=sa.text("final_at IS NULL"),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)
    # The roll-up is the sum over the facts: start both empty, every exam queued (until the
    # task has built them, the queued exams are read from the source tables).
    op.execute("DELETE FROM qc_exam_facts")
    op.execute("DELETE FROM qc_fact_queue")
    op.execute(f"{_Q} SELECT id FROM exams ORDER BY id")


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for table, name in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if postgresql else ""))
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS qc_fact_queue_signed()")
    op.drop_index("ix_qc_exam_facts_pending", table_name="qc_exam_facts")
    op.drop_index(op.f("ix_qc_report_facts_exam_id"), table_name="qc_report_facts")
    op.drop_table("qc_report_facts")
    op.drop_table("qc_tat_hist")
    op.drop_table("qc_daily")
    with op.batch_alter_table("qc_exam_facts") as batch:
        batch.create_foreign_key(
            "fk_qc_exam_facts_exam_id_exams", "exams", ["exam_id"], ["id"], ondelete="CASCADE"
        )
