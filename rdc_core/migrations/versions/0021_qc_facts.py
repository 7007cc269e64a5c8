"""qc: per-exam QC facts, the queue of exams to refresh, and the triggers that fill it

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04 22:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Keep in step with worklist.qc.models.QC_FACT_SOURCES (a test compares them).
_EXAM_COLUMNS = (
    "accession_number, org_id, discipline, modality, priority, state, performed_at,"
    " first_received_at, ready_at, claimed_at, preliminary_at, delivered_at, acknowledged_at,"
    " rescan_requested_at, rescan_reason"
)
_REPORT_COLUMNS = "exam_id, version, final_at, author_id, quality_grade, quality_reason"
_WORK_ITEM_COLUMNS = "exam_id, due_at"
_Q = "INSERT INTO qc_fact_queue (exam_id)"

_SQLITE = [
    f"CREATE TRIGGER qc_fact_exams_i AFTER INSERT ON exams BEGIN {_Q} VALUES (NEW.id); END",
    f"CREATE TRIGGER qc_fact_exams_u AFTER UPDATE OF {_EXAM_COLUMNS} ON exams"
    f" BEGIN {_Q} VALUES (NEW.id); END",
    f"CREATE TRIGGER qc_fact_exams_d AFTER DELETE ON exams BEGIN {_Q} VALUES (OLD.id); END",
    f"CREATE TRIGGER qc_fact_reports_i AFTER INSERT ON reports WHEN NEW.version = 1"
    f" BEGIN {_Q} VALUES (NEW.exam_id); END",
    f"CREATE TRIGGER qc_fact_reports_u AFTER UPDATE OF {_REPORT_COLUMNS} ON reports"
    f" WHEN OLD.version = 1 OR NEW.version = 1"
    f" BEGIN {_Q} VALUES (OLD.exam_id); {_Q} SELECT NEW.exam_id WHERE NEW.exam_id <> OLD.exam_id;"
    " END",
    f"CREATE TRIGGER qc_fact_reports_d AFTER DELETE ON reports WHEN OLD.version = 1"
    f" BEGIN {_Q} VALUES (OLD.exam_id); END",
    f"CREATE TRIGGER qc_fact_work_items_i AFTER INSERT ON work_items"
    f" BEGIN {_Q} VALUES (NEW.exam_id); END",
    f"CREATE TRIGGER qc_fact_work_items_u AFTER UPDATE OF {_WORK_ITEM_COLUMNS} ON work_items"
    f" BEGIN {_Q} VALUES (OLD.exam_id); {_Q} SELECT NEW.exam_id WHERE NEW.exam_id <> OLD.exam_id;"
    " END",
    f"CREATE TRIGGER qc_fact_work_items_d AFTER DELETE ON work_items"
    f" BEGIN {_Q} VALUES (OLD.exam_id); END",
    f"CREATE TRIGGER qc_fact_organizations_u AFTER UPDATE OF code ON organizations"
    f" BEGIN {_Q} SELECT id FROM exams WHERE org_id = NEW.id; END",
    f"CREATE TRIGGER qc_fact_users_u AFTER UPDATE OF username ON users"
    f" BEGIN {_Q} SELECT exam_id FROM reports WHERE author_id = NEW.id AND version = 1; END",
]

_POSTGRESQL = [
    "CREATE FUNCTION qc_fact_queue_exam() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    f" IF TG_OP = 'DELETE' THEN {_Q} VALUES (OLD.id); ELSE {_Q} VALUES (NEW.id); END IF;"
    " RETURN NULL; END $$",
    "CREATE FUNCTION qc_fact_queue_child() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    f" IF TG_OP <> 'INSERT' THEN {_Q} VALUES (OLD.exam_id); END IF;"
    " IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.exam_id <> OLD.exam_id) THEN"
    f" {_Q} VALUES (NEW.exam_id); END IF;"
    " RETURN NULL; END $$",
    "CREATE FUNCTION qc_fact_queue_org() RETURNS trigger LANGUAGE plpgsql AS $$"
    f" BEGIN {_Q} SELECT id FROM exams WHERE org_id = NEW.id; RETURN NULL; END $$",
    "CREATE FUNCTION qc_fact_queue_user() RETURNS trigger LANGUAGE plpgsql AS $$"
    f" BEGIN {_Q} SELECT exam_id FROM reports WHERE author_id = NEW.id AND version = 1;"
    " RETURN NULL; END $$",
    "CREATE TRIGGER qc_fact_exams_i AFTER INSERT ON exams"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_exam()",
    f"CREATE TRIGGER qc_fact_exams_u AFTER UPDATE OF {_EXAM_COLUMNS} ON exams"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_exam()",
    "CREATE TRIGGER qc_fact_exams_d AFTER DELETE ON exams"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_exam()",
    "CREATE TRIGGER qc_fact_reports_i AFTER INSERT ON reports FOR EACH ROW"
    " WHEN (NEW.version = 1) EXECUTE PROCEDURE qc_fact_queue_child()",
    f"CREATE TRIGGER qc_fact_reports_u AFTER UPDATE OF {_REPORT_COLUMNS} ON reports"
    " FOR EACH ROW WHEN (OLD.version = 1 OR NEW.version = 1)"
    " EXECUTE PROCEDURE qc_fact_queue_child()",
    "CREATE TRIGGER qc_fact_reports_d AFTER DELETE ON reports FOR EACH ROW"
    " WHEN (OLD.version = 1) EXECUTE PROCEDURE qc_fact_queue_child()",
    "CREATE TRIGGER qc_fact_work_items_i AFTER INSERT ON work_items"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_child()",
    f"CREATE TRIGGER qc_fact_work_items_u AFTER UPDATE OF {_WORK_ITEM_COLUMNS} ON work_items"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_child()",
    "CREATE TRIGGER qc_fact_work_items_d AFTER DELETE ON work_items"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_child()",
    "CREATE TRIGGER qc_fact_organizations_u AFTER UPDATE OF code ON organizations"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_org()",
    "CREATE TRIGGER qc_fact_users_u AFTER UPDATE OF username ON users"
    " FOR EACH ROW EXECUTE PROCEDURE qc_fact_queue_user()",
]

_TRIGGERS = (
    ("exams", "qc_fact_exams_i"),
    ("exams", "qc_fact_exams_u"),
    ("exams", "qc_fact_exams_d"),
    ("reports", "qc_fact_reports_i"),
    ("reports", "qc_fact_reports_u"),
    ("reports", "qc_fact_reports_d"),
    ("work_items", "qc_fact_work_items_i"),
    ("work_items", "qc_fact_work_items_u"),
    ("work_items", "qc_fact_work_items_d"),
    ("organizations", "qc_fact_organizations_u"),
    ("users", "qc_fact_users_u"),
)
_FUNCTIONS = (
    "qc_fact_queue_exam",
    "qc_fact_queue_child",
    "qc_fact_queue_org",
    "qc_fact_queue_user",
)


def upgrade() -> None:
    op.create_table(
        "qc_exam_facts",
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("org_id", sa.String(length=36), nullable=False),
        sa.Column("clinic", sa.String(length=64), nullable=False),
        sa.Column("discipline", sa.String(length=32), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("performed_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("first_received_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("ready_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("preliminary_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("acknowledged_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("rescan_requested_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("rescan_reason", sa.Text(), nullable=True),
        sa.Column("final_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("reader", sa.String(length=64), nullable=True),
        sa.Column("quality_grade", sa.String(length=32), nullable=True),
        sa.Column("quality_reason", sa.Text(), nullable=True),
        sa.Column("has_work_item", sa.Boolean(), nullable=False),
        sa.Column("due_at", rdc_core.db.UTCDateTime(timezone=True), nullable=True),
        *[sa.Column(f"tat_{i:02d}", sa.Float(), nullable=True) for i in range(1, 8)],
        sa.Column("refreshed_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["exam_id"],
            ["exams.id"],
            name=op.f("fk_qc_exam_facts_exam_id_exams"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("exam_id", name=op.f("pk_qc_exam_facts")),
    )
    for column in ("first_received_at", "final_at", "rescan_requested_at"):
        op.create_index(f"ix_qc_exam_facts_{column}", "qc_exam_facts", [column], unique=False)
    op.create_table(
        "qc_fact_queue",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("exam_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_qc_fact_queue")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_qc_fact_queue_exam_id"), "qc_fact_queue", ["exam_id"], unique=False)
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(statement)
    if postgresql:
        # A small table of short-lived rows, read by every indicator query: vacuumed and
        # analysed often, so its dead rows and stale statistics never slow the reads.
        op.execute(
            "ALTER TABLE qc_fact_queue SET (autovacuum_vacuum_scale_factor = 0,"
            " autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0,"
            " autovacuum_analyze_threshold = 1000)"
        )
    # Every existing exam: the task builds its facts (until then it is read from the source).
    op.execute(f"{_Q} SELECT id FROM exams ORDER BY id")


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for table, name in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if postgresql else ""))
    if postgresql:
        for function in _FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    op.drop_index(op.f("ix_qc_fact_queue_exam_id"), table_name="qc_fact_queue")
    op.drop_table("qc_fact_queue")
    for column in ("first_received_at", "final_at", "rescan_requested_at"):
        op.drop_index(f"ix_qc_exam_facts_{column}", table_name="qc_exam_facts")
    op.drop_table("qc_exam_facts")
