"""QC benchmark: the indicator query set and a quarter's XLSX case list, facts and roll-up.

Loads the data set of ``bench/worklist.py`` (same loader, same database layout: exams with
their stage times, work items, first reports spread over two years) into
``rdc_bench_qc_<size>``, then times, for the last full quarter of the data set:

- ``indicators``: ``worklist.qc.compute_indicators`` for every indicator with
  ``group_by=clinic`` and the previous-period change (what ``GET /api/v1/qc/indicators?
  group_by=clinic`` runs), in a read session as the API does; mean / p50 / p95 in ms against
  the issue's target (p95 <= 500 ms);
- per indicator, one call each, to show where the time goes;
- ``export``: the XLSX of the quarter's TAT-07 case list (every exam that arrived), streamed
  from a server-side cursor into the row-by-row XLSX writer (worklist.qc.export), as
  ``GET /api/v1/qc/export.xlsx?cases=TAT-07`` does: seconds (target <= 30 s) and the
  process's resident memory sampled during the export (flat means streamed).

    python3 bench/qc.py                         # 100k exams
    python3 bench/qc.py --size 1M --keep        # 1M exams, keep rdc_bench_qc_1m
    python3 bench/qc.py --size 1M --reuse       # measure the kept database again
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import date, timedelta  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

from rdc_core.db import get_engine, read_session, stable_id  # noqa: E402
from rdc_core.migrate import upgrade_database  # noqa: E402
from worklist.access import Principal  # noqa: E402
from worklist.models import OrgKind, Role  # noqa: E402
from worklist.qc import INDICATORS, compute_indicators, iter_cases, period_filters  # noqa: E402
from worklist.qc.export import case_table, write_xlsx  # noqa: E402
from worklist.qc.tasks import check_reports_task, refresh_facts_task  # noqa: E402

TARGET_P95_MS = 500.0
TARGET_EXPORT_S = 30.0
TZ = "Asia/Shanghai"


def _loader() -> ModuleType:
    """bench/worklist.py (its name would shadow the product's package: load it by path)."""
    spec = importlib.util.spec_from_file_location("bench_worklist", _HERE / "worklist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_worklist"] = module
    spec.loader.exec_module(module)
    return module


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _quarter_before(day: date) -> tuple[date, date]:
    """The last full calendar quarter ending before ``day``."""
    q_start_month = 3 * ((day.month - 1) // 3) + 1
    end = date(day.year, q_start_month, 1) - timedelta(days=1)
    start_month = 3 * ((end.month - 1) // 3) + 1
    return date(end.year, start_month, 1), end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="100000", help="exams, e.g. 100000 or 1M")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument(
        "--reference-iterations",
        type=int,
        default=5,
        help="calls of the facts path (exact, without the roll-up: slow on 1M exams)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "RDC_BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument(
        "--sqlite",
        metavar="EXAMS",
        help="also measure on SQLite: a copy of every k-th exam of the PostgreSQL data set"
        " (about EXAMS exams, e.g. 100000) in a file under /var/tmp",
    )
    parser.add_argument(
        "--sqlite-only", action="store_true", help="with --sqlite: measure only the SQLite copy"
    )
    args = parser.parse_args(argv)
    bw = _loader()
    size = bw.parse_size(args.size)
    admin = bw.admin_engine(bw.make_url(args.database_url))
    name = f"rdc_bench_qc_{bw.label(size)}"
    url = bw.make_url(args.database_url).set(database=name)
    created = False
    runs: list[tuple[str, dict[str, Any]]] = []
    try:
        if args.reuse and bw.database_exists(admin, name):
            print(f"reusing {name}", flush=True)
            with bw.product_database(url):
                upgrade_database()  # a database kept by an older version: its new tables
        else:
            print(f"loading {size:,} exams into {name}", flush=True)
            created = True
            bw.create_and_load(admin, url, size, [])
        dataset = bw.describe(url)
        now = dataset["now"] + timedelta(seconds=1)
        start, end = _quarter_before((now - timedelta(days=3)).date())
        filters = period_filters(start=start, end=end, tz=TZ)
        if not (args.sqlite and args.sqlite_only):
            with bw.product_database(url):
                title = f"PostgreSQL, {dataset['exams']:,} exams"
                runs.append((title, _run(filters, now, args)))
        if args.sqlite:
            target = bw.parse_size(args.sqlite)
            path = Path(f"/var/tmp/rdc_bench_qc_{bw.label(target)}.sqlite")
            sqlite_url = bw.make_url(f"sqlite:///{path}")
            exams = _copy_to_sqlite(url, sqlite_url, path, step=max(1, size // target))
            with bw.product_database(sqlite_url):
                runs.append((f"SQLite, {exams:,} exams", _run(filters, now, args)))
            if not args.keep:
                path.unlink(missing_ok=True)
    finally:
        if created and not args.keep:
            bw.drop_database(admin, name)
        admin.dispose()
    print(f"\nquarter {start} .. {end}; the machine is shared: figures are noisy")
    for title, result in runs:
        _print(title, result)
    return 0


def _principal() -> Principal:
    return Principal(
        user_id=stable_id("user", "bench.qc"),
        username="bench.qc",
        role=Role.QC,
        org_id=stable_id("org", "LEAD"),
        org_kind=OrgKind.LEAD,
    )


def _run(filters: Any, now: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Build the facts and the roll-up (what the task keeps up to date in production), then
    measure the per-exam facts path (exact, the previous version's) and the roll-up path
    (the default) on the same data."""
    out: dict[str, Any] = {}
    # What the periodic tasks worklist.qc.check_reports / refresh_facts keep up to date.
    t0 = time.perf_counter()
    out["checked"] = check_reports_task()
    out["check_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["refreshed"] = refresh_facts_task()
    out["refresh_s"] = time.perf_counter() - t0
    # What autovacuum does in production (the queue's settings make it prompt): statistics of
    # the new facts, the emptied queue's dead rows gone.
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "VACUUM (ANALYZE) qc_fact_queue, qc_exam_facts, qc_daily, qc_monthly, qc_tat_hist,"
                " qc_report_facts"
            )
        else:
            conn.exec_driver_sql("ANALYZE")
    print(
        f"checked {out['checked']:,} reports in {out['check_s']:.1f} s;"
        f" facts of {out['refreshed']:,} queued changes in {out['refresh_s']:.1f} s",
        flush=True,
    )
    qc = _principal()
    for rollup, iterations in ((False, args.reference_iterations), (True, args.iterations)):
        label = "facts" if rollup else "reference"
        print(f"measuring the {'roll-up' if rollup else 'facts'} path", flush=True)
        out[label] = _measure(qc, filters, now, iterations, args.warmup, rollup=rollup)
    out["same"], out["worst"] = _compare(out["reference"]["figures"], out["facts"]["figures"])
    return out


def _copy_to_sqlite(source: Any, target: Any, path: Path, *, step: int) -> int:
    """A migrated SQLite file holding every ``step``-th exam of ``source`` (by ID) with
    its work item and reports, every organisation, user and referenced patient."""
    from sqlalchemy import create_engine, func, insert, select

    from rdc_core.db import Base

    path.unlink(missing_ok=True)
    with _loader().product_database(target):
        upgrade_database()
    tables = Base.metadata.tables
    exams, patients = tables["exams"], tables["patients"]
    picked = select(exams.c.id).where(func.abs(func.hashtext(exams.c.id)) % step == 0)
    work_items, reports = tables["work_items"], tables["reports"]
    queries = [
        (tables["organizations"], select(tables["organizations"])),
        (tables["users"], select(tables["users"])),
        (
            patients,
            select(patients).where(
                patients.c.id.in_(select(exams.c.patient_ref).where(exams.c.id.in_(picked)))
            ),
        ),
        (exams, select(exams).where(exams.c.id.in_(picked))),
        (work_items, select(work_items).where(work_items.c.exam_id.in_(picked))),
        (
            reports,
            select(reports).where(reports.c.exam_id.in_(picked)).order_by(reports.c.version),
        ),
    ]
    t0 = time.perf_counter()
    reader, writer = create_engine(source), create_engine(target)
    try:
        with reader.connect() as src, writer.begin() as dst:
            for table, query in queries:
                rows = src.execution_options(stream_results=True, yield_per=5000).execute(query)
                for chunk in rows.mappings().partitions(5000):
                    dst.execute(insert(table), [dict(r) for r in chunk])
            count = int(dst.execute(select(func.count()).select_from(exams)).scalar_one())
    finally:
        reader.dispose()
        writer.dispose()
    print(f"copied {count:,} exams to {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return count


def _measure(
    qc: Principal, filters: Any, now: Any, iterations: int, warmup: int, *, rollup: bool
) -> dict[str, Any]:
    result: dict[str, Any] = {}

    def call(codes: list[str] | None = None) -> list[Any]:
        with read_session() as session:
            return compute_indicators(
                session,
                principal=qc,
                filters=filters,
                now=now,
                group_by="clinic",
                codes=codes,
                rollup=rollup,
            )

    for _ in range(warmup):
        call()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        out = call()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    result["figures"] = [i.model_dump() for i in out]
    result["p50"] = statistics.median(times)
    result["p95"] = times[max(0, round(0.95 * len(times)) - 1)]
    result["per"] = {}
    for ind in INDICATORS:
        t0 = time.perf_counter()
        call([ind.code])
        result["per"][ind.code] = (time.perf_counter() - t0) * 1000

    if not rollup:  # the export reads the facts either way: measured once
        result["export_s"], result["rss"], result["rows"] = float("nan"), (0.0,) * 3, 0
        return result
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_mib())
            time.sleep(0.1)

    before = _rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    path = Path(tempfile.mkstemp(suffix=".xlsx")[1])
    t0 = time.perf_counter()
    try:
        with read_session() as session:
            rows = iter_cases(session, principal=qc, code="TAT-07", filters=filters, now=now)
            header, table = case_table(rows, TZ)
            result["rows"] = write_xlsx(path, "TAT-07", header, table)
        result["export_s"] = time.perf_counter() - t0
    finally:
        done.set()
        sampler.join()
        path.unlink(missing_ok=True)
    result["rss"] = (before, max(samples or [before]), samples[-1] if samples else before)
    return result


def _compare(exact: list[dict[str, Any]], rolled: list[dict[str, Any]]) -> tuple[bool, float]:
    """Everything equal except P50/P90 (and a duration's value, its P90), which may differ
    by one bucket (worklist.qc.service.BUCKET_RATIO, minutes rounded to 0.1); the largest
    relative difference of those."""
    from worklist.qc.service import BUCKET_RATIO

    same, worst = len(exact) == len(rolled), 0.0
    loose = {"p50", "p90", "value", "previous_value", "change", "status"}

    def close(a: Any, b: Any) -> bool:
        nonlocal worst
        if a is None or b is None:
            return a is b
        worst = max(worst, abs(a - b) / max(abs(a), 1e-9))
        return abs(a - b) <= (BUCKET_RATIO - 1) * abs(a) + 0.1

    for x, y in zip(exact, rolled, strict=False):
        for k in x:
            if k == "groups":
                for gx, gy in zip(x[k] or [], y[k] or [], strict=False):
                    same &= {a: b for a, b in gx.items() if a not in loose} == {
                        a: b for a, b in gy.items() if a not in loose
                    }
                    same &= close(gx["p50"], gy["p50"]) and close(gx["p90"], gy["p90"])
                same &= len(x[k] or []) == len(y[k] or [])
            elif k in ("p50", "p90"):
                same &= close(x[k], y[k])
            elif k not in loose or x["kind"] != "duration":
                same &= x[k] == y[k]
    return bool(same), worst


def _print(title: str, r: dict[str, Any]) -> None:
    ref, fac = r["reference"], r["facts"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:8.1f}x" if b else "       -"

    print(
        f"\n{title}: facts built from {r['refreshed']:,} queued changes in {r['refresh_s']:.1f} s"
    )
    print(
        "  counts and rates of both paths identical, P50/P90 within one bucket:"
        f" {'yes' if r['same'] else 'NO'} (largest P50/P90 difference"
        f" {r['worst'] * 100:.2f} % of the exact value)"
    )
    print(f"  {'':<34}{'facts':>11}{'roll-up':>11}{'ratio':>10}")
    for key, what in (("p50", "p50"), ("p95", "p95")):
        print(
            f"  {'indicators, all 28, by clinic ' + what:<34}{ref[key]:9.0f}ms{fac[key]:9.0f}ms"
            f"{ratio(ref[key], fac[key])}"
        )
    for code, ms in ref["per"].items():
        print(f"    {code:<32}{ms:9.0f}ms{fac['per'][code]:9.0f}ms{ratio(ms, fac['per'][code])}")
    print(
        f"  {'export.xlsx TAT-07 cases':<34}{ref['export_s']:10.1f}s{fac['export_s']:10.1f}s"
        f"{ratio(ref['export_s'], fac['export_s'])}  ({fac['rows']:,} rows)"
    )
    print(
        f"  targets (roll-up path): indicators p95 <= {TARGET_P95_MS:.0f} ms:"
        f" {'met' if fac['p95'] <= TARGET_P95_MS else 'NOT met'};"
        f" export <= {TARGET_EXPORT_S:.0f} s:"
        f" {'met' if fac['export_s'] <= TARGET_EXPORT_S else 'NOT met'};"
        f" export RSS before / peak / end {fac['rss'][0]:.0f} / {fac['rss'][1]:.0f} /"
        f" {fac['rss'][2]:.0f} MiB"
    )


if __name__ == "__main__":
    sys.exit(main())
