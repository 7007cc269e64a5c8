"""qc: monthly roll-up (the daily roll-up summed by local month), filled from qc_daily

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Keep in step with worklist.qc.models.ROLLUP_CODES (as migration 0022's list).
_CODES = (
    "tat_01", "tat_02", "tat_03", "tat_04", "tat_05", "tat_06", "tat_07", "sla_01",
    "rrc_02", "ecg_01", "iq_01", "iq_02", "all_01", "all_02", "all_06", "rws_03",
)  # fmt: skip
_COUNTERS = [f"{what}_{code}" for code in _CODES for what in ("n", "s")]
_DIMS = "clinic, discipline, modality, priority"


def upgrade() -> None:
    op.create_table(
        "qc_monthly",
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("clinic", sa.String(length=64), nullable=False),
        sa.Column("discipline", sa.String(length=32), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=32), nullable=False),
        *[sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTERS],
        sa.PrimaryKeyConstraint(
            "month", "clinic", "discipline", "modality", "priority", name=op.f("pk_qc_monthly")
        ),
    )
    # The months of the daily roll-up as it stands (the refresh task keeps both from now on;
    # on PostgreSQL its lock keeps a running refresh from changing the days meanwhile).
    if op.get_bind().dialect.name == "postgresql":
        op.execute("SELECT pg_advisory_xact_lock(1363345442)")  # worklist.qc _ROLLUP_LOCK
    sums = ", ".join(f"SUM({name})" for name in _COUNTERS)
    op.execute(
        f"INSERT INTO qc_monthly (month, {_DIMS}, {', '.join(_COUNTERS)})"
        f" SELECT substr(day, 1, 7), {_DIMS}, {sums} FROM qc_daily"
        f" GROUP BY substr(day, 1, 7), {_DIMS}"
    )


def downgrade() -> None:
    op.drop_table("qc_monthly")
