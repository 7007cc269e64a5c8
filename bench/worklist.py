"""Worklist latency benchmark: ``list_worklist`` on PostgreSQL with 100k and 1M exams.

For each dataset size the script creates a dedicated database, builds the schema with the
product's Alembic migrations, fills it in SQL (``INSERT ... SELECT FROM generate_series``)
with a realistic archive (most exams old and FINAL with their work item DONE and a final
report; about 2 % of them in the open backlog, READY or PRELIMINARY, some claimed with live
or expired leases; rows in chronological order, as years of use would leave them), runs
VACUUM ANALYZE, then times the product's service function
``worklist.claims.list_worklist`` inside ``rdc_core.db.session_scope()`` (one transaction per
call, audit record and commit included, as the API does it) for several query shapes. It
prints mean, p50, p95 and p99 in milliseconds per shape and size, checked against the
target of the issue (p95 <= 50 ms at 1M exams), and the EXPLAIN (ANALYZE, BUFFERS) timings of
the SQL statements of the default shape (``--explain`` prints the plans too).

    python3 bench/worklist.py                              # 100k and 1M exams, 200 calls each
    python3 bench/worklist.py --sizes 1M --explain --keep  # keep rdc_bench_worklist_1m
    python3 bench/worklist.py --sizes 1M --reuse --extra-sql "CREATE INDEX ..."  # try an index
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python3 bench/worklist.py``, this directory comes first on sys.path and this file
# would shadow the product's ``worklist`` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any, cast  # noqa: E402

from sqlalchemy import Engine, create_engine, event, text  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from rdc_core.db import dispose_engines, get_engine, session_scope, stable_id  # noqa: E402
from rdc_core.migrate import upgrade_database  # noqa: E402
from rdc_core.settings import reset_settings  # noqa: E402
from worklist.access import Principal  # noqa: E402
from worklist.claims import WorklistFilter, list_worklist  # noqa: E402
from worklist.models import OrgKind, Priority, ReaderLevel, Role  # noqa: E402
from worklist.readiness import DEFAULT_SLA_MINUTES  # noqa: E402
from worklist.schemas import WorklistPage  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATABASE = "rdc_bench_worklist"
TARGET_P95_MS = 50.0
TARGET_SIZE = 1_000_000
PAGE = 50
CLINICS = 30
LEAD_CODE = "LEAD"
FILTER_CLINIC = "C07"
EXPLAIN_RUNS = 5
SEED = 0.4242
BULK_TABLES = ("patients", "exams", "work_items", "reports")

# Share of exams per state (the rest is FINAL). READY + PRELIMINARY = 2 %: the open backlog.
STATE_SHARES = (
    ("RECEIVING", 0.001),
    ("READY", 0.015),
    ("PRELIMINARY", 0.005),
    ("RESCAN_REQUESTED", 0.003),
    ("CANCELLED", 0.001),
)
LIVE_CLAIMS = 0.02  # of READY exams: claimed, lease running
EXPIRED_CLAIMS = 0.03  # of READY exams: claimed, lease expired (free to claim again)
SENIOR_CLAIMS = 0.10  # of PRELIMINARY exams: claimed by a senior for verification
# Routing rules written to routing_rules, and the pool the SQL below gives the same exams.
ROUTING = (
    (10, "imaging", "CT", "imaging-ct"),
    (20, "imaging", "MR", "imaging-mr"),
)
MODALITIES = (("CT", 0.30), ("MR", 0.15), ("DX", 0.25), ("CR", 0.10), ("US", 0.15), ("MG", 0.05))
BODY_PARTS = ("HEAD", "CHEST", "ABDOMEN", "SPINE", "PELVIS", "KNEE", "SHOULDER", "NECK")


@dataclass(frozen=True)
class Reader:
    username: str
    role: Role
    level: ReaderLevel | None
    pools: tuple[str, ...] = ()
    qualifications: tuple[tuple[str, str | None], ...] = ()

    @property
    def id(self) -> str:
        return stable_id("user", self.username)


GENERAL = tuple(
    Reader(f"bench.reader{k:02d}", Role.READER, ReaderLevel.RESIDENT) for k in range(1, 11)
)
SENIORS = tuple(
    Reader(f"bench.senior{k:02d}", Role.SENIOR_READER, ReaderLevel.ATTENDING) for k in range(1, 6)
)
CT_MR = tuple(
    Reader(
        f"bench.ctmr{k:02d}",
        Role.READER,
        ReaderLevel.ATTENDING,
        pools=("imaging-ct", "imaging-mr"),
        qualifications=(("imaging", "CT"), ("imaging", "MR")),
    )
    for k in range(1, 6)
)
ECG = tuple(
    Reader(
        f"bench.ecg{k:02d}",
        Role.READER,
        ReaderLevel.ATTENDING,
        pools=("ecg",),
        qualifications=(("ecg", None),),
    )
    for k in range(1, 4)
)
OTHERS = (Reader("bench.qc", Role.QC, None), Reader("bench.admin", Role.ADMIN, None))
READERS = GENERAL + SENIORS + CT_MR + ECG + OTHERS
ME = GENERAL[0]  # the reader of the shapes without pools; holds some claims ("mine")


@dataclass(frozen=True)
class Shape:
    """One way of calling the worklist."""

    name: str
    reader: Reader
    filters: dict[str, Any] = field(default_factory=dict)
    offset: int = 0


SHAPES = (
    Shape("default (no pools)", ME),
    Shape("pools + qualifications", CT_MR[0]),
    Shape("modality=CT", ME, {"modality": "CT"}),
    Shape(f"clinic={FILTER_CLINIC}", ME, {"clinic": FILTER_CLINIC}),
    Shape("state=open", ME, {"state": "open"}),
    Shape("mine=true", ME, {"mine": True}),
    Shape("page 2 (offset 50)", ME, offset=PAGE),
)


@dataclass(frozen=True)
class Result:
    size: int
    shape: str
    total: int
    rows: int
    calls: list[float]  # seconds per call
    sql: list[float]  # seconds spent in cursor.execute per call

    def pct(self, q: int) -> float:
        """The q-th percentile in ms."""
        return statistics.quantiles(self.calls, n=100, method="inclusive")[q - 1] * 1000

    @property
    def mean(self) -> float:
        return statistics.fmean(self.calls) * 1000

    @property
    def sql_p50(self) -> float:
        return statistics.median(self.sql) * 1000


@dataclass(frozen=True)
class Explained:
    size: int
    query: str
    planning_ms: float
    execution_ms: float
    buffers: str
    plan: str


class BenchError(RuntimeError):
    """The benchmark cannot go on."""


def parse_size(value: str) -> int:
    """100000, 100k, 1M."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {value!r}")
    number, unit = int(match[1]), match[2].lower()
    return number * {"": 1, "k": 1_000, "m": 1_000_000}[unit]


def label(size: int) -> str:
    """1000000 -> 1m, 100000 -> 100k."""
    if size % 1_000_000 == 0:
        return f"{size // 1_000_000}m"
    if size % 1_000 == 0:
        return f"{size // 1_000}k"
    return str(size)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="100000,1000000",
        help="comma-separated numbers of exams, e.g. 100000,1M (default 100000,1000000)",
    )
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per shape")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per shape first")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("RDC_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL),
        help=f"admin URL used to create and drop the databases (default {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help=f"database name prefix; the size is appended (default {DEFAULT_DATABASE}_1m ...)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases at the end")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure an existing database of the same name and size (made with --keep) "
        "instead of creating and loading it; it is kept",
    )
    parser.add_argument(
        "--extra-sql",
        action="append",
        default=[],
        metavar="SQL",
        help="statement run after loading, before VACUUM ANALYZE (e.g. a candidate "
        "CREATE INDEX); may be repeated",
    )
    parser.add_argument(
        "--list-worklist",
        metavar="MODULE:FUNCTION",
        help="time this function (same signature, e.g. a candidate change in a scratch file "
        "path/to/file.py:list_worklist) instead of worklist.claims.list_worklist; it must "
        "return the same pages for every shape",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print the EXPLAIN (ANALYZE, BUFFERS) plans of the default shape",
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not args.sizes or min(args.sizes) < 1000 or args.iterations < 2 or args.warmup < 0:
        parser.error("need sizes >= 1000, --iterations >= 2 and --warmup >= 0")
    url = make_url(args.database_url)
    if url.get_backend_name() != "postgresql":
        parser.error("--database-url must be a PostgreSQL URL")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the product's driver
    args.admin_url = url
    return args


# --------------------------------------------------------------------------- database


def admin_engine(url: URL) -> Engine:
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def database_exists(admin: Engine, name: str) -> bool:
    with admin.connect() as conn:
        found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
        return found.first() is not None


def drop_database(admin: Engine, name: str) -> None:
    dispose_engines()  # the product's pooled connections to it
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def product_database(url: URL) -> Iterator[None]:
    """Point the product's settings (RDC_DATABASE_URL) and engines at ``url``."""
    previous = os.environ.get("RDC_DATABASE_URL")
    os.environ["RDC_DATABASE_URL"] = url.render_as_string(hide_password=False)
    reset_settings()
    dispose_engines()
    try:
        yield
    finally:
        dispose_engines()
        if previous is None:
            os.environ.pop("RDC_DATABASE_URL", None)
        else:
            os.environ["RDC_DATABASE_URL"] = previous
        reset_settings()


# --------------------------------------------------------------------------- data


def clinic_code(k: int) -> str:
    return f"C{k:02d}"


def org_ids() -> list[str]:
    """IDs of the clinics 1..CLINICS, as the product derives them."""
    return [stable_id("org", clinic_code(k)) for k in range(1, CLINICS + 1)]


def case_sla() -> str:
    """SLA minutes of (discipline, priority) from the product's defaults, as a CASE."""
    arms = " ".join(
        f"WHEN discipline = '{d.value}' AND priority = '{p.value}' THEN {m}"
        for (d, p), m in DEFAULT_SLA_MINUTES.items()
    )
    return f"CASE {arms} END"


def case_pool() -> str:
    arms = " ".join(
        f"WHEN discipline = '{d}' AND modality = '{m}' THEN '{pool}'" for _, d, m, pool in ROUTING
    )
    return f"CASE {arms} ELSE discipline END"


def case_modality() -> str:
    arms, bound = [], 0.0
    for modality, share in MODALITIES:
        bound += share
        arms.append(f"WHEN u_mod < {bound:.4f} THEN '{modality}'")
    return f"CASE {' '.join(arms[:-1])} ELSE '{MODALITIES[-1][0]}' END"


def case_state() -> str:
    arms, bound = [], 0.0
    for state, share in STATE_SHARES:
        bound += share
        arms.append(f"WHEN u_state < {bound:.4f} THEN '{state}'")
    return f"CASE {' '.join(arms)} ELSE 'FINAL' END"


def rank_case() -> str:
    arms = " ".join(f"WHEN '{p.value}' THEN {p.rank}" for p in Priority)
    return f"CASE priority {arms} END"


# One row per exam with every random choice made once; exams, work items and reports are
# then inserted from it, so they agree with each other. Dropped after loading.
GEN_SQL = f"""
CREATE UNLOGGED TABLE bench_gen AS
WITH r AS MATERIALIZED (
    SELECT i, random() AS u_state, random() AS u_disc, random() AS u_mod, random() AS u_part,
           random() AS u_prio, random() AS u_age, random() AS u_claim, random() AS u_user,
           random() AS u_report, random() AS u_patient, random() AS u_time
    FROM generate_series(1, :n) AS i
), a AS (
    SELECT r.*,
        1 + floor(u_patient * :patients)::int AS patient_no,
        CASE WHEN u_disc < 0.70 THEN 'imaging' WHEN u_disc < 0.90 THEN 'ecg' ELSE 'lab' END
            AS discipline,
        CASE WHEN u_prio < 0.05 THEN 'emergency' WHEN u_prio < 0.20 THEN 'urgent'
             ELSE 'routine' END AS priority,
        {case_state()} AS state
    FROM r
), b AS (
    SELECT a.*,
        1 + (patient_no - 1) % {CLINICS} AS clinic_no,
        CASE discipline WHEN 'imaging' THEN {case_modality()} WHEN 'ecg' THEN 'ECG' ELSE '' END
            AS modality,
        {rank_case()} AS priority_rank
    FROM a
), c AS (
    SELECT b.*,
        {case_sla()} AS sla_minutes,
        {case_pool()} AS pool,
        CASE discipline
            WHEN 'imaging' THEN (CAST(:parts AS text[]))[1 + floor(u_part * :n_parts)::int]
            WHEN 'ecg' THEN 'CHEST' ELSE '' END AS body_part
    FROM b
), d AS (
    SELECT c.*,
        md5('exam:' || i)::uuid::text AS exam_id,
        CASE
            WHEN state = 'RECEIVING' THEN :now - u_age * interval '5 minutes'
            -- the open backlog: received within 1.5 SLA periods, so due times spread around
            -- now and about a third of it is overdue
            WHEN state IN ('READY', 'PRELIMINARY')
                THEN :now - u_age * 1.5 * sla_minutes * interval '1 minute'
            ELSE :now - interval '3 days' - u_age * interval '730 days'
        END AS received,
        CASE state WHEN 'RECEIVING' THEN NULL WHEN 'READY' THEN 'OPEN'
            WHEN 'PRELIMINARY' THEN 'AWAITING_VERIFICATION' WHEN 'CANCELLED' THEN 'CANCELLED'
            ELSE 'DONE' END AS item_state,
        CASE
            WHEN state = 'READY' AND u_claim < :live THEN 'live'
            WHEN state = 'READY' AND u_claim < :live + :expired THEN 'expired'
            WHEN state = 'PRELIMINARY' AND u_claim < :senior THEN 'senior'
        END AS claim,
        CASE WHEN discipline = 'imaging' THEN 1 + floor(u_time * 400)::int
             WHEN discipline = 'ecg' THEN 1 ELSE 0 END AS instance_count
    FROM c
)
SELECT d.*,
    CASE claim
        WHEN 'senior' THEN (CAST(:seniors AS text[]))[1 + floor(u_user * :n_seniors)::int]
        WHEN 'live' THEN (CAST(:general AS text[]))[1 + floor(u_user * :n_general)::int]
        WHEN 'expired' THEN (CAST(:general AS text[]))[1 + floor(u_user * :n_general)::int]
    END AS claimed_by,
    CASE claim
        WHEN 'expired' THEN :now - interval '15 minutes' - u_time * interval '2 hours'
        WHEN 'live' THEN :now + interval '1 minute' + u_time * interval '14 minutes'
        WHEN 'senior' THEN :now + interval '1 minute' + u_time * interval '14 minutes'
    END AS lease_expires_at,
    received + interval '2 minutes' AS last_received,
    CASE WHEN state <> 'RECEIVING' THEN received + interval '2 minutes 30 seconds' END
        AS ready_at,
    -- FINAL: 70 % signed by a senior directly, 30 % by a resident and verified by a senior
    CASE state WHEN 'FINAL' THEN 'final' WHEN 'PRELIMINARY' THEN 'preliminary'
        WHEN 'READY' THEN CASE WHEN claim = 'live' AND u_report < 0.5 THEN 'draft' END
    END AS report_status,
    (state = 'PRELIMINARY' OR (state = 'FINAL' AND u_report >= 0.7)) AS by_resident,
    received + interval '3 minutes' + u_time * 0.8 * sla_minutes * interval '1 minute'
        AS done_at
FROM d
ORDER BY received
"""

INSERT_PATIENTS = f"""
INSERT INTO patients
    (id, org_id, issuer, patient_id, name, birth_date, sex, original, created_at, updated_at)
SELECT md5('patient:' || p)::uuid::text,
       (CAST(:orgs AS text[]))[1 + (p - 1) % {CLINICS}],
       'C' || lpad((1 + (p - 1) % {CLINICS})::text, 2, '0'),
       'BP' || lpad(p::text, 9, '0'),
       'BENCH^PATIENT' || p,
       to_char(date '1930-01-01' + ((p::bigint * 7919) % 32000)::int, 'YYYYMMDD'),
       CASE p % 2 WHEN 0 THEN 'F' ELSE 'M' END,
       '{{}}', :now - interval '3 years', :now - interval '3 years'
FROM generate_series(1, :patients) AS p
"""

INSERT_EXAMS = """
INSERT INTO exams
    (id, study_instance_uid, org_id, patient_ref, accession_number, discipline, modality,
     modalities, body_part, description, priority, state, instance_count, has_conflicts,
     performed_at, first_received_at, last_received_at, ready_at, cancelled_at, created_at,
     claimed_at, preliminary_at, final_at, rescan_requested_at, rescan_reason /*columns*/)
SELECT exam_id,
       '1.2.826.0.1.3680043.10.543.' || i,
       (CAST(:orgs AS text[]))[clinic_no],
       md5('patient:' || patient_no)::uuid::text,
       'BA' || lpad(i::text, 10, '0'),
       discipline, modality, modality, body_part,
       trim(CASE discipline WHEN 'lab' THEN 'Blood panel' WHEN 'ecg' THEN '12-lead ECG'
            ELSE modality || ' ' || initcap(body_part) END),
       priority, state, instance_count, false,
       received - interval '10 minutes', received, last_received, ready_at,
       CASE WHEN state = 'CANCELLED' THEN ready_at + interval '1 hour' END,
       received,
       CASE WHEN state IN ('PRELIMINARY', 'FINAL') OR claim IS NOT NULL
            THEN ready_at + interval '1 minute' END,
       CASE WHEN state = 'PRELIMINARY' OR (state = 'FINAL' AND by_resident)
            THEN done_at - interval '1 minute' END,
       CASE WHEN state = 'FINAL' THEN done_at END,
       CASE WHEN state = 'RESCAN_REQUESTED' THEN done_at END,
       CASE WHEN state = 'RESCAN_REQUESTED' THEN 'motion artefacts' END
       /*values*/
FROM bench_gen
ORDER BY received
"""

INSERT_WORK_ITEMS = """
INSERT INTO work_items
    (id, exam_id, state, pool, priority, priority_rank, due_at, created_at, discipline,
     modality, claimed_by, claimed_at, lease_expires_at, updated_at /*columns*/)
SELECT md5('work_item:' || i)::uuid::text, exam_id, item_state, pool, priority,
       priority_rank, received + sla_minutes * interval '1 minute', ready_at, discipline,
       modality, claimed_by,
       CASE WHEN claimed_by IS NOT NULL THEN lease_expires_at - interval '15 minutes' END,
       lease_expires_at,
       CASE WHEN item_state IN ('DONE', 'CANCELLED') THEN done_at
            WHEN claimed_by IS NOT NULL THEN lease_expires_at - interval '15 minutes' END
       /*values*/
FROM bench_gen
WHERE item_state IS NOT NULL
ORDER BY ready_at
"""

# Columns that only some revisions of the schema have: filled when the migrations made them.
OPTIONAL_COLUMNS = {
    "work_items": {"org_id": "(CAST(:orgs AS text[]))[clinic_no]"},
    "exams": {
        "natural_key": "'1.2.826.0.1.3680043.10.543.' || i",
        "key_kind": "'study_uid'",
    },
}

INSERT_REPORTS = """
INSERT INTO reports
    (id, exam_id, version, previous_id, status, template_code, findings, impression,
     recommendation, structured, quality_grade, quality_reason, critical, author_id,
     author_level, verified_by, created_at, updated_at, submitted_at, verified_at, final_at,
     revision)
SELECT md5('report:' || i)::uuid::text, exam_id, 1, NULL, report_status, NULL,
       'No acute abnormality. Findings of benchmark exam ' || i || '.',
       CASE WHEN report_status = 'draft' THEN '' ELSE 'Normal study.' END,
       '', '{}',
       CASE WHEN discipline = 'imaging' AND report_status <> 'draft' THEN '甲' END,
       '', u_report < 0.01,
       CASE WHEN report_status = 'draft' THEN claimed_by
            WHEN by_resident
                THEN (CAST(:general AS text[]))[1 + floor(u_user * :n_general)::int]
            ELSE (CAST(:seniors AS text[]))[1 + floor(u_user * :n_seniors)::int] END,
       CASE WHEN report_status = 'draft' OR by_resident THEN 'resident' ELSE 'attending' END,
       CASE WHEN report_status = 'final' AND by_resident
            THEN (CAST(:seniors AS text[]))[1 + floor(u_report * :n_seniors)::int] END,
       ready_at + interval '2 minutes',
       CASE WHEN report_status = 'draft' THEN :now ELSE done_at END,
       CASE WHEN report_status = 'preliminary' OR by_resident
            THEN done_at - interval '1 minute'
            WHEN report_status = 'final' THEN done_at END,
       CASE WHEN report_status = 'final' AND by_resident THEN done_at END,
       CASE WHEN report_status = 'final' THEN done_at END,
       CASE WHEN report_status = 'draft' THEN 1 ELSE 2 END
FROM bench_gen
WHERE report_status IS NOT NULL
ORDER BY ready_at
"""


def insert_reference_data(conn: Any, now: datetime) -> None:
    """Organisations, AE titles, users, routing rules: a few rows, with the product's IDs."""
    lead_id = stable_id("org", LEAD_CODE)
    # The lead's created_at is the reference time of the data set (read back by --reuse).
    orgs = [{"id": lead_id, "code": LEAD_CODE, "name": "Lead hospital", "kind": "lead"}]
    orgs += [
        {"id": oid, "code": clinic_code(k), "name": f"Clinic {k:02d}", "kind": "clinic"}
        for k, oid in enumerate(org_ids(), start=1)
    ]
    conn.execute(
        text(
            "INSERT INTO organizations (id, code, name, kind, created_at) "
            "VALUES (:id, :code, :name, :kind, :now)"
        ),
        [o | {"now": now} for o in orgs],
    )
    conn.execute(
        text("INSERT INTO ae_titles (ae_title, org_id, created_at) VALUES (:ae, :org, :now)"),
        [
            {"ae": f"{clinic_code(k)}CT", "org": oid, "now": now}
            for k, oid in enumerate(org_ids(), start=1)
        ],
    )
    users = [
        {
            "id": r.id,
            "username": r.username,
            "role": r.role.value,
            "level": r.level.value if r.level else None,
            "org": lead_id,
            "pools": json.dumps(list(r.pools)),
            "quals": json.dumps(
                [{"discipline": d} | ({"modality": m} if m else {}) for d, m in r.qualifications]
            ),
        }
        for r in READERS
    ]
    users += [
        {
            "id": stable_id("user", f"bench.tech.{clinic_code(k).lower()}"),
            "username": f"bench.tech.{clinic_code(k).lower()}",
            "role": Role.TECHNICIAN.value,
            "level": None,
            "org": oid,
            "pools": "[]",
            "quals": "[]",
        }
        for k, oid in enumerate(org_ids(), start=1)
    ]
    conn.execute(
        text(
            "INSERT INTO users (id, username, display_name, password_hash, role, level, org_id,"
            " active, created_at, pools, qualifications) VALUES (:id, :username, :username,"
            " '!bench-no-login', :role, :level, :org, true, :now, CAST(:pools AS json),"
            " CAST(:quals AS json))"
        ),
        [u | {"now": now} for u in users],
    )
    conn.execute(
        text(
            "INSERT INTO routing_rules (position, discipline, modality, pool)"
            " VALUES (:position, :discipline, :modality, :pool)"
        ),
        [
            {"position": pos, "discipline": d, "modality": m, "pool": pool}
            for pos, d, m, pool in ROUTING
        ],
    )


def load(url: URL, size: int, now: datetime, extra_sql: list[str]) -> dict[str, float]:
    """Fill the (migrated, empty) database with ``size`` exams; returns seconds per step."""
    params = {
        "n": size,
        "patients": max(1, size // 3),
        "now": now,
        "orgs": org_ids(),
        "parts": list(BODY_PARTS),
        "n_parts": len(BODY_PARTS),
        "general": [r.id for r in GENERAL],
        "n_general": len(GENERAL),
        "seniors": [r.id for r in SENIORS],
        "n_seniors": len(SENIORS),
        "live": LIVE_CLAIMS,
        "expired": EXPIRED_CLAIMS,
        "senior": SENIOR_CLAIMS,
    }
    steps: dict[str, float] = {}

    def step(name: str, action: Any) -> None:
        start = time.perf_counter()
        action()
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - start
        print(f"    {name:<16} {steps[name]:6.1f} s", flush=True)

    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
            conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
            conn.execute(text("SELECT setseed(:s)"), {"s": SEED})
            step("reference", lambda: insert_reference_data(conn, now))
            restore = detach_indexes(conn)
            for name, sql in (
                ("generate", GEN_SQL),
                ("patients", INSERT_PATIENTS),
                ("exams", INSERT_EXAMS),
                ("work_items", INSERT_WORK_ITEMS),
                ("reports", INSERT_REPORTS),
            ):
                sql = fit_to_schema(conn, sql)
                step(name, lambda sql=sql: conn.execute(text(sql), _used(sql, params)))
            conn.exec_driver_sql("DROP TABLE bench_gen")
            step("indexes, keys", lambda: [conn.exec_driver_sql(ddl) for ddl in restore])
            for statement in extra_sql:
                step("extra sql", lambda statement=statement: conn.exec_driver_sql(statement))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            step("vacuum analyze", lambda: conn.exec_driver_sql("VACUUM (ANALYZE)"))
    finally:
        engine.dispose()
    return steps


def fit_to_schema(conn: Any, sql: str) -> str:
    """``sql`` (an INSERT of the loader) with the OPTIONAL_COLUMNS the table has; raises
    BenchError if the table has a required column (NOT NULL, no default) it does not fill."""
    match = re.search(r"INSERT INTO (\w+)", sql)
    if match is None:
        return sql
    table = match[1]
    rows = conn.execute(
        text(
            "SELECT column_name, is_nullable = 'NO' AND column_default IS NULL"
            " FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = :t"
        ),
        {"t": table},
    ).all()
    extra = {c: v for c, v in OPTIONAL_COLUMNS.get(table, {}).items() if c in {r[0] for r in rows}}
    sql = sql.replace("/*columns*/", "".join(f", {c}" for c in extra))
    sql = sql.replace("/*values*/", "".join(f", {v}" for v in extra.values()))
    listed = re.search(rf"INSERT INTO {table}\s*\(([^)]*)\)", sql)
    filled = {c.strip() for c in listed[1].split(",")} if listed else set()
    missing = sorted(name for name, required in rows if required and name not in filled)
    if missing:
        raise BenchError(f"{table} has required columns the loader does not fill: {missing}")
    return sql


def detach_indexes(conn: Any) -> list[str]:
    """Drop the keys, foreign keys and indexes of the bulk-loaded tables (as pg_restore
    would, so the load is a plain append and every index is built once, sorted); returns
    the DDL that re-creates them exactly as the migrations made them, foreign keys last,
    which also checks every loaded row against them."""
    constraints = conn.execute(
        text(
            "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)"
            " FROM pg_constraint WHERE contype IN ('p', 'u', 'f')"
            " AND (conrelid::regclass::text = ANY(:t) OR confrelid::regclass::text = ANY(:t))"
            " ORDER BY contype = 'f' DESC, conname"
        ),
        {"t": list(BULK_TABLES)},
    ).all()
    indexes = conn.execute(
        text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename = ANY(:t) AND indexname NOT IN (SELECT conname FROM pg_constraint)"
            # partial indexes stay: small to maintain, and re-created from indexdef their
            # predicate would read back with different casts
            " AND indexdef NOT LIKE '% WHERE %'"
            " ORDER BY indexname"
        ),
        {"t": list(BULK_TABLES)},
    ).all()
    for table, name, _, _ in constraints:  # foreign keys first
        conn.exec_driver_sql(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        conn.exec_driver_sql(f'DROP INDEX "{name}"')
    keys = [
        f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {ddl}'
        for table, name, _, ddl in reversed(constraints)  # keys first, foreign keys last
    ]
    return [ddl for _, ddl in indexes] + keys


def _used(sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters ``sql`` names (text() refuses none, but keeps the call tidy)."""
    return {k: v for k, v in params.items() if re.search(rf"(?<![:\w]):{k}\b", sql)}


def describe(url: URL) -> dict[str, Any]:
    """Row counts and sizes of the loaded database, and its reference time."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            one = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM exams),"
                    " (SELECT count(*) FROM patients),"
                    " (SELECT count(*) FROM reports),"
                    " (SELECT count(*) FROM work_items WHERE state = 'OPEN'),"
                    " (SELECT count(*) FROM work_items WHERE state = 'AWAITING_VERIFICATION'),"
                    " (SELECT count(*) FROM work_items WHERE state IN"
                    "   ('OPEN', 'AWAITING_VERIFICATION') AND claimed_by IS NOT NULL"
                    "   AND lease_expires_at > o.created_at),"
                    " pg_database_size(current_database()),"
                    " o.created_at"
                    " FROM organizations o WHERE o.code = :lead"
                ),
                {"lead": LEAD_CODE},
            ).one()
    finally:
        engine.dispose()
    keys = ("exams", "patients", "reports", "open", "awaiting", "claimed", "bytes", "now")
    return dict(zip(keys, one, strict=True))


# --------------------------------------------------------------------------- measurement


def principal(reader: Reader) -> Principal:
    return Principal(
        user_id=reader.id,
        username=reader.username,
        role=reader.role,
        org_id=stable_id("org", LEAD_CODE),
        org_kind=OrgKind.LEAD,
        level=reader.level,
    )


class SqlClock:
    """Sums the time spent in cursor.execute, and can record the statements."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seconds = 0.0
        self.record: list[tuple[str, Any]] | None = None
        self._start = 0.0
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if self.record is not None:
            self.record.append((statement, parameters))
        self._start = time.perf_counter()

    def _after(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start


ListWorklist = Callable[..., WorklistPage]


def call(shape: Shape, now: datetime, function: ListWorklist) -> WorklistPage:
    """One worklist request as the API makes it: its own transaction, audit, commit."""
    with session_scope() as session:
        return function(
            session,
            principal=principal(shape.reader),
            now=now,
            filters=WorklistFilter(**shape.filters),
            limit=PAGE,
            offset=shape.offset,
        )


def same_pages(now: datetime, function: ListWorklist) -> list[str]:
    """The shapes for which ``function`` answers differently from the product's."""
    return [
        shape.name
        for shape in SHAPES
        if call(shape, now, function).model_dump(exclude={"server_time"})
        != call(shape, now, list_worklist).model_dump(exclude={"server_time"})
    ]


def load_function(spec: str) -> ListWorklist:
    """``module:function`` (the module may be a path to a .py file)."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise BenchError(f"--list-worklist wants MODULE:FUNCTION, not {spec!r}")
    if module_name.endswith(".py"):
        loaded = importlib.util.spec_from_file_location("bench_candidate", module_name)
        if loaded is None or loaded.loader is None:
            raise BenchError(f"cannot load {module_name}")
        module = importlib.util.module_from_spec(loaded)
        sys.modules[loaded.name] = module
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return cast(ListWorklist, getattr(module, name))


def measure(
    size: int, now: datetime, iterations: int, warmup: int, function: ListWorklist
) -> list[Result]:
    clock = SqlClock(get_engine())
    results = []
    try:
        for shape in SHAPES:
            for _ in range(warmup):
                call(shape, now, function)
            calls, sql = [], []
            total = rows = 0
            for _ in range(iterations):
                clock.seconds = 0.0
                start = time.perf_counter()
                page = call(shape, now, function)
                calls.append(time.perf_counter() - start)
                total, rows = page.total, len(page.items)
                sql.append(clock.seconds)
            result = Result(size, shape.name, total, rows, calls, sql)
            results.append(result)
            print(
                f"    {shape.name:<24} p50 {result.pct(50):7.2f} ms  p95 {result.pct(95):7.2f} ms"
                f"  ({total} items, {rows} on the page)",
                flush=True,
            )
    finally:
        clock.close()
    return results


def explain_default(size: int, now: datetime, function: ListWorklist) -> list[Explained]:
    """EXPLAIN (ANALYZE, BUFFERS) the worklist statements of the default shape."""
    engine = get_engine()
    clock = SqlClock(engine)
    clock.record = []
    try:
        call(SHAPES[0], now, function)
    finally:
        clock.close()
    explained = []
    for statement, parameters in clock.record:
        query = _query_name(statement)
        if query is None:
            continue
        runs: list[tuple[float, float, str]] = []
        with engine.connect() as conn:
            for _ in range(EXPLAIN_RUNS):
                lines = [
                    row[0]
                    for row in conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
                    )
                ]
                plan = "\n".join(lines)
                runs.append((_ms(plan, "Execution Time"), _ms(plan, "Planning Time"), plan))
            conn.rollback()
        execution, planning, plan = sorted(runs)[len(runs) // 2]  # the median run
        top = re.search(r"Buffers: ([^\n]*)", plan)
        explained.append(Explained(size, query, planning, execution, top[1] if top else "", plan))
    return explained


def _query_name(statement: str) -> str | None:
    head = statement.lstrip().upper()
    if "WORK_ITEMS" not in head or not head.startswith("SELECT"):
        return None
    if "FILTER (WHERE" in head:
        return "counts per state"
    if head.startswith("SELECT COUNT(*)"):
        return "total (count of the page query)"
    if "LIMIT" in head:
        return "page (ORDER BY ... LIMIT 50)"
    return "other"


def _ms(plan: str, what: str) -> float:
    found = re.search(rf"{what}: ([\d.]+) ms", plan)
    return float(found[1]) if found else float("nan")


# --------------------------------------------------------------------------- output


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A table with rich when it is installed, as aligned plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(f"\n{title}")
        for line in [headers, ["-" * w for w in widths], *rows]:
            print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        return
    table = Table(title=title)
    for k, header in enumerate(headers):
        table.add_column(header, justify="left" if k == 1 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 130).print(table)


def report(
    args: argparse.Namespace,
    datasets: list[dict[str, Any]],
    results: list[Result],
    explained: list[Explained],
) -> None:
    print_table(
        "Data sets",
        [
            "exams",
            "database",
            "patients",
            "reports",
            "OPEN",
            "AWAITING_VERIF.",
            "live claims",
            "load s",
            "size MB",
            "loadavg",
        ],
        [
            [
                f"{d['exams']:,}",
                d["database"],
                f"{d['patients']:,}",
                f"{d['reports']:,}",
                f"{d['open']:,}",
                f"{d['awaiting']:,}",
                f"{d['claimed']:,}",
                "reused" if d["load"] is None else f"{d['load']:.0f}",
                f"{d['bytes'] / 1e6:.0f}",
                f"{d['loadavg']:.2f}",
            ]
            for d in datasets
        ],
    )
    function = args.list_worklist or "worklist.claims.list_worklist"
    print_table(
        f"{function} latency, ms (session_scope + audit + commit; one client, sequential)",
        [
            "exams",
            "shape",
            "items",
            "calls",
            "mean",
            "p50",
            "p95",
            "p99",
            "max",
            "SQL p50",
            f"p95 <= {TARGET_P95_MS:.0f}",
        ],
        [
            [
                f"{r.size:,}",
                r.shape,
                f"{r.total:,}",
                str(len(r.calls)),
                f"{r.mean:.1f}",
                f"{r.pct(50):.1f}",
                f"{r.pct(95):.1f}",
                f"{r.pct(99):.1f}",
                f"{max(r.calls) * 1000:.1f}",
                f"{r.sql_p50:.1f}",
                "PASS" if r.pct(95) <= TARGET_P95_MS else "FAIL",
            ]
            for r in results
        ],
    )
    print_table(
        f"EXPLAIN (ANALYZE, BUFFERS) of the default shape (median of {EXPLAIN_RUNS})",
        ["exams", "statement", "planning ms", "execution ms", "buffers (top node)"],
        [
            [f"{e.size:,}", e.query, f"{e.planning_ms:.2f}", f"{e.execution_ms:.2f}", e.buffers]
            for e in explained
        ],
    )
    for statement in args.extra_sql:
        print(f"extra SQL: {statement}")
    if args.explain:
        for e in explained:
            print(f"\n--- {e.size:,} exams: {e.query} ---\n{e.plan}")
    at_target = [r for r in results if r.size == TARGET_SIZE]
    if at_target:
        failed = [r.shape for r in at_target if r.pct(95) > TARGET_P95_MS]
        verdict = "PASS" if not failed else "FAIL (" + ", ".join(failed) + ")"
        print(f"\ntarget p95 <= {TARGET_P95_MS:.0f} ms at {TARGET_SIZE:,} exams: {verdict}")
    else:
        print(f"\n(target p95 <= {TARGET_P95_MS:.0f} ms applies at {TARGET_SIZE:,} exams; not run)")


# --------------------------------------------------------------------------- main


def run_extra_sql(url: URL, statements: list[str]) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


def create_and_load(admin: Engine, url: URL, size: int, extra_sql: list[str]) -> float:
    """A fresh database with the product's schema and ``size`` exams; returns seconds."""
    drop_database(admin, url.database or "")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
    start = time.perf_counter()
    with product_database(url):
        upgrade_database()  # the product's Alembic migrations
    now = datetime.now(UTC).replace(microsecond=0)
    steps = load(url, size, now, extra_sql)
    loaded = time.perf_counter() - start
    print(f"    loaded in {loaded:.0f} s ({sum(steps.values()):.0f} s of SQL)", flush=True)
    return loaded


def run_size(args: argparse.Namespace, admin: Engine, size: int) -> tuple[Any, ...]:
    name = f"{args.database}_{label(size)}"
    url = args.admin_url.set(database=name)
    print(f"\n{size:,} exams: database {name}", flush=True)
    loaded: float | None = None
    created = False  # a reused database is never dropped
    try:
        if args.reuse and database_exists(admin, name):
            print("    reusing the existing database (--reuse)", flush=True)
            if args.extra_sql:
                run_extra_sql(url, args.extra_sql)
        else:
            created = True
            loaded = create_and_load(admin, url, size, args.extra_sql)
        dataset = describe(url) | {"database": name, "load": loaded}
        if dataset["exams"] != size:
            raise BenchError(f"{name} holds {dataset['exams']} exams, not {size}")
        # The clock starts at the data set's reference time, so --reuse finds the same backlog.
        now = dataset["now"] + timedelta(seconds=1)
        with product_database(url):
            if args.function is not list_worklist:
                differ = same_pages(now, args.function)
                print(
                    f"    {args.list_worklist} vs worklist.claims.list_worklist: "
                    + (f"DIFFERENT results for {', '.join(differ)}" if differ else "same results"),
                    flush=True,
                )
                if differ:
                    raise BenchError("the --list-worklist function answers differently")
            results = measure(size, now, args.iterations, args.warmup, args.function)
            dataset["loadavg"] = os.getloadavg()[0]  # other work on the machine meanwhile
            explained = explain_default(size, now, args.function)
    finally:
        if created and not args.keep:
            drop_database(admin, name)
    return dataset, results, explained


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.function = load_function(args.list_worklist) if args.list_worklist else list_worklist
    except (BenchError, ImportError, AttributeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    admin = admin_engine(args.admin_url)
    datasets, results, explained = [], [], []
    try:
        for size in args.sizes:
            dataset, size_results, size_explained = run_size(args, admin, size)
            datasets.append(dataset)
            results += size_results
            explained += size_explained
    except (BenchError, SQLAlchemyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        admin.dispose()
    report(args, datasets, results, explained)
    if args.keep:
        names = ", ".join(d["database"] for d in datasets)
        print(f"kept {names} (measure again with --reuse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
