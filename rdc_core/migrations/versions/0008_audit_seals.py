"""audit: append-only records, the chain in audit_seals, UPDATE/DELETE refused

Records lose their hash columns (appending takes no lock any more); the chain moves to
``audit_seals``, built by the sealer. The records already there are sealed here: the chain
of the earlier scheme is checked first, and a record where it did not verify gets a seal
with a note, so the verification keeps reporting it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 18:30:00
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

import rdc_core.db

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GENESIS = "0" * 64
_TABLES = ("audit_events", "audit_seals")
_BATCH = 5000
_LEGACY_BREAK = "the chain before migration 0008 did not verify at this record"


def _canonical(values: list[Any]) -> str:
    return json.dumps(
        values, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str
    )


def _digest(prev: str, row: Any) -> str:
    canonical = _canonical(
        [
            prev,
            row.at.isoformat(),
            row.actor,
            row.org_id,
            row.action,
            row.object_type,
            row.object_id,
            row.detail,
        ]
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _rolled_back(prev: str, seq: int) -> str:
    return hashlib.sha256(_canonical([prev, "rolled_back", seq]).encode("utf-8")).hexdigest()


def _events(*, legacy: bool) -> sa.TableClause:
    columns: list[sa.ColumnClause[Any]] = [
        sa.column("seq", sa.BigInteger()),
        sa.column("at", rdc_core.db.UTCDateTime()),
        sa.column("actor", sa.String()),
        sa.column("org_id", sa.String()),
        sa.column("action", sa.String()),
        sa.column("object_type", sa.String()),
        sa.column("object_id", sa.String()),
        sa.column("detail", sa.JSON()),
    ]
    if legacy:
        columns += [sa.column("prev_hash", sa.String()), sa.column("hash", sa.String())]
    return sa.table("audit_events", *columns)


_SEALS = sa.table(
    "audit_seals",
    sa.column("seq", sa.BigInteger()),
    sa.column("kind", sa.String()),
    sa.column("hash", sa.String()),
    sa.column("records", sa.BigInteger()),
    sa.column("sealed_at", rdc_core.db.UTCDateTime()),
    sa.column("note", sa.String()),
)


def _seal_existing(bind: sa.Connection) -> None:
    events = _events(legacy=True)
    now = datetime.now(UTC)
    legacy_prev = prev = _GENESIS
    legacy_ok = True
    count, expected = 0, 1
    while True:
        page = bind.execute(
            sa.select(events).where(events.c.seq >= expected).order_by(events.c.seq).limit(_BATCH)
        ).fetchall()
        if not page:
            return
        rows: list[dict[str, Any]] = []
        for row in page:
            for missing in range(expected, row.seq):
                prev = _rolled_back(prev, missing)
                rows.append(_seal(missing, "rolled_back", prev, count, now, None))
            note = None
            if legacy_ok and (
                row.prev_hash != legacy_prev or row.hash != _digest(legacy_prev, row)
            ):
                legacy_ok = False
                note = _LEGACY_BREAK
            legacy_prev = row.hash
            count += 1
            prev = _digest(prev, row)
            rows.append(_seal(row.seq, "event", prev, count, now, note))
            expected = row.seq + 1
        bind.execute(sa.insert(_SEALS), rows)


def _seal(
    seq: int, kind: str, digest: str, count: int, now: datetime, note: str | None
) -> dict[str, Any]:
    return {
        "seq": seq,
        "kind": kind,
        "hash": digest,
        "records": count,
        "sealed_at": now,
        "note": note,
    }


def _refuse_changes(bind: sa.Connection) -> None:
    if bind.dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION rdc_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'the audit trail is append-only: % on % refused', "
            "TG_OP, TG_TABLE_NAME USING ERRCODE = '42501'; END $$"
        )
        for table in _TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION rdc_audit_append_only()"
            )
            # The owner too (it may grant them back, a deliberate act; superusers bypass
            # privileges, not the trigger).
            op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON {table} FROM PUBLIC, CURRENT_USER")
        return
    for table in _TABLES:
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only: {operation} "
                f"on {table} refused'); END"
            )


def upgrade() -> None:
    op.create_table(
        "audit_seals",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("records", sa.BigInteger(), nullable=False),
        sa.Column("sealed_at", rdc_core.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("note", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_seals")),
    )
    bind = op.get_bind()
    _seal_existing(bind)
    # SQLite rebuilds the table (AUTOINCREMENT: sequence numbers are never reused).
    # PostgreSQL drops the columns in place: a rebuilt table would restart its sequence at 1
    # below the rows it copied.
    sqlite = bind.dialect.name == "sqlite"
    with op.batch_alter_table(
        "audit_events",
        recreate="always" if sqlite else "auto",
        table_kwargs={"sqlite_autoincrement": True} if sqlite else {},
    ) as batch_op:
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
    _refuse_changes(bind)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for table in _TABLES:
            op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
            op.execute(f"GRANT UPDATE, DELETE, TRUNCATE ON {table} TO CURRENT_USER")
        op.execute("DROP FUNCTION rdc_audit_append_only()")
    else:
        for table in _TABLES:
            for operation in ("update", "delete"):
                op.execute(f"DROP TRIGGER {table}_no_{operation}")
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
    events = _events(legacy=True)
    prev = _GENESIS
    for row in bind.execute(sa.select(events).order_by(events.c.seq)).fetchall():
        digest = _digest(prev, row)
        bind.execute(
            sa.update(events).where(events.c.seq == row.seq).values(prev_hash=prev, hash=digest)
        )
        prev = digest
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.alter_column("prev_hash", nullable=False)
        batch_op.alter_column("hash", nullable=False)
    op.drop_table("audit_seals")
