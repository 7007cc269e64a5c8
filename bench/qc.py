"""QC benchmark: the indicator query set and a quarter's XLSX case list on PostgreSQL.

Loads the data set of ``bench/worklist.py`` (same loader, same database layout: exams with
their stage times, work items, first reports spread over two years) into
``rdc_bench_qc_<size>``, then times, for the last full quarter of the data set:

- ``indicators``: ``worklist.qc.compute_indicators`` for every indicator with
  ``group_by=clinic`` and the previous-period change (what ``GET /api/v1/qc/indicators?
  group_by=clinic`` runs), in a read session as the API does; mean / p50 / p95 in ms against
  the issue's target (p95 <= 500 ms);
- per indicator, one call each, to show where the time goes;
- ``export``: the XLSX of the quarter's TAT-07 case list (every exam that arrived), streamed
  from a server-side cursor into xlsxwriter's constant-memory writer, as
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

from rdc_core.db import read_session, stable_id  # noqa: E402
from worklist.access import Principal  # noqa: E402
from worklist.models import OrgKind, Role  # noqa: E402
from worklist.qc import INDICATORS, compute_indicators, iter_cases, period_filters  # noqa: E402
from worklist.qc.export import case_table, write_xlsx  # noqa: E402
from worklist.qc.tasks import check_reports_task  # noqa: E402

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
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "RDC_BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(argv)
    bw = _loader()
    size = bw.parse_size(args.size)
    admin = bw.admin_engine(bw.make_url(args.database_url))
    name = f"rdc_bench_qc_{bw.label(size)}"
    url = bw.make_url(args.database_url).set(database=name)
    created = False
    try:
        if args.reuse and bw.database_exists(admin, name):
            print(f"reusing {name}", flush=True)
        else:
            print(f"loading {size:,} exams into {name}", flush=True)
            created = True
            bw.create_and_load(admin, url, size, [])
        dataset = bw.describe(url)
        now = dataset["now"] + timedelta(seconds=1)
        start, end = _quarter_before((now - timedelta(days=3)).date())
        filters = period_filters(start=start, end=end, tz=TZ)
        qc = Principal(
            user_id=stable_id("user", "bench.qc"),
            username="bench.qc",
            role=Role.QC,
            org_id=stable_id("org", bw.LEAD_CODE),
            org_kind=OrgKind.LEAD,
        )
        with bw.product_database(url):
            # What the periodic task worklist.qc.check_reports keeps up to date in production.
            t0 = time.perf_counter()
            checked = check_reports_task()
            print(f"checked {checked:,} reports in {time.perf_counter() - t0:.1f} s", flush=True)
            results = _measure(qc, filters, now, args.iterations, args.warmup)
    finally:
        if created and not args.keep:
            bw.drop_database(admin, name)
        admin.dispose()
    print(f"\n{dataset['exams']:,} exams, {dataset['reports']:,} reports; quarter {start} .. {end}")
    for line in results:
        print(line)
    return 0


def _measure(qc: Principal, filters: Any, now: Any, iterations: int, warmup: int) -> list[str]:
    lines: list[str] = []

    def call() -> list[Any]:
        with read_session() as session:
            return compute_indicators(
                session, principal=qc, filters=filters, now=now, group_by="clinic"
            )

    for _ in range(warmup):
        call()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        out = call()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p95 = times[max(0, round(0.95 * len(times)) - 1)]
    lines.append(
        f"indicators (all {len(out)}, group_by=clinic, with change):"
        f" mean {statistics.mean(times):.0f} ms,"
        f" p50 {statistics.median(times):.0f} ms, p95 {p95:.0f} ms"
        f" (target <= {TARGET_P95_MS:.0f} ms: {'met' if p95 <= TARGET_P95_MS else 'NOT met'})"
    )
    for ind in INDICATORS:
        t0 = time.perf_counter()
        with read_session() as session:
            one = compute_indicators(
                session, principal=qc, filters=filters, now=now, group_by="clinic", codes=[ind.code]
            )[0]
        lines.append(
            f"  {ind.code:<7} {(time.perf_counter() - t0) * 1000:7.0f} ms"
            f"  numerator {one.numerator} denominator {one.denominator} value {one.value}"
        )

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
            n = write_xlsx(path, "TAT-07", header, table)
        seconds = time.perf_counter() - t0
        size = path.stat().st_size
    finally:
        done.set()
        sampler.join()
        path.unlink(missing_ok=True)
    quarter = samples[len(samples) // 4] if samples else before
    lines.append(
        f"export.xlsx TAT-07 cases: {n:,} rows, {size / 2**20:.1f} MiB in {seconds:.1f} s"
        f" (target <= {TARGET_EXPORT_S:.0f} s:"
        f" {'met' if seconds <= TARGET_EXPORT_S else 'NOT met'});"
        f" RSS before {before:.0f} MiB, at 1/4 {quarter:.0f} MiB,"
        f" peak {max(samples or [before]):.0f} MiB,"
        f" end {samples[-1] if samples else before:.0f} MiB"
    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
