#!/usr/bin/env python3
"""The capacity of the DICOM index's serial section: instances/s one index writer commits.

``bench/ingest.py`` measures ingest end to end, where on a small machine the senders, the
listener processes and the writer share the cores, so the writer's serial section (the
SQLite writer lock, held from BEGIN to COMMIT) cannot be seen as the bound it is on a
machine with cores to spare. This benchmark feeds the writer alone: every instance is
received and its object made durable before the clock starts; then the serving process's
``dicom_gateway.server.IndexWriter`` gets the requests a listener process would send it
(the same pickled payloads), ``--in-flight K`` at a time, closed loop (each answer sends
the next request, as K associations each waiting for their C-STORE answer would). So
batches form as they do under K associations whose senders are never the bottleneck.

Printed per K: instances/s, group-commit batches (mean, largest), and the writer lock held
per instance (wall, and the holder's CPU) with the rate it bounds (1000 / ms). On the
embedded default (SQLite, local files) with the stage timers of ``bench/stage_timers.py``.
Issue 23's target: no serial section caps ingest below 2,000 instances/s (held <= 0.5 ms
per instance, amortised).

    python3 bench/index_writer.py                      # 3,000 instances per run, K = 1,4,16,64
    python3 bench/index_writer.py --base-tree /tmp/before --repeat 3

``--base-tree DIR`` also runs another source tree (e.g. ``git archive`` of the commit
before a change), interleaved run by run; the medians of ``--repeat`` runs are printed with
the ratio. Each run is a fresh process on a fresh data directory below ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stage_timers  # noqa: E402  (bench/stage_timers.py, beside this file)

CALLING_AE = "BENCHSCU"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="instances per run")
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="rows = columns of each image")
    parser.add_argument("--in-flight", default="1,4,16,64", help="requests in flight (K)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--base-tree", type=Path, help="another rdc source tree to compare")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--json", type=Path, help="also write every run here")

    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- one run, in a process of its own (the tree under test first on sys.path) -------------


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(args.tree))
    from dicom_gateway.bulk_index import BulkItem
    from dicom_gateway.ingest import prepare_dicom_file
    from dicom_gateway.records import lock_order
    from dicom_gateway.server import IndexWriter
    from rdc_core.db import read_session
    from rdc_core.settings import get_settings
    from rdc_core.storage import get_object_store
    from worklist.directory import organization_for_ae

    stage_timers.install()
    settings = get_settings()
    store = get_object_store(settings)
    with read_session() as session:
        org = organization_for_ae(session, ae_title=CALLING_AE)
    assert org is not None
    files = sorted(args.files.glob("part*/*.dcm"))
    payloads: list[bytes] = []
    first: dict[str, bytes] = {}  # the first instance of each study: it creates the exam
    for path in files:
        copy = path.with_name(path.name + ".spool")
        shutil.copyfile(path, copy)
        prepared = prepare_dicom_file(
            store=store, source=copy, zone=settings.zone, move_source=True
        )
        prepared.wait()
        item = BulkItem.of(prepared, org, CALLING_AE, store)
        payload = IndexWriter.request(item, lock_order(prepared.header, org, exam_id=item.exam_id))
        if item.exam_id in first:
            payloads.append(payload)
        else:
            first[item.exam_id] = payload

    class Counters:
        def stored(self, outcome: str, size: int) -> None:
            pass

    writer = IndexWriter(store=store, counters=Counters())  # type: ignore[arg-type]
    done = threading.Event()
    failures: list[str] = []
    for payload in first.values():  # before the clock
        answered: list[bytes] = []
        writer.submit(payload, answered.append)
        while not answered:
            time.sleep(0.001)
        IndexWriter.outcome(answered[0])
    stage_timers.reset()
    queue = iter(payloads)
    lock = threading.Lock()
    remaining = [len(payloads)]

    def reply(answer: bytes) -> None:
        try:
            IndexWriter.outcome(answer)
        except Exception as exc:
            failures.append(repr(exc))
        with lock:
            remaining[0] -= 1
            following = next(queue, None)
            if remaining[0] == 0:
                done.set()
        if following is not None:
            writer.submit(following, reply)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    with lock:
        starting = [p for _, p in zip(range(args.in_flight_one), queue, strict=False)]
    for payload in starting:
        writer.submit(payload, reply)
    done.wait()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(
        json.dumps(
            {
                "instances": len(payloads),
                "seconds": wall,
                "cpu_seconds": cpu,
                "failures": failures[:5],
                "failed": len(failures),
                "stages": stage_timers.snapshot(),
            }
        )
    )


# -- the driver ------------------------------------------------------------------------------


def write_files(dest: Path, args: argparse.Namespace) -> None:
    import ingest  # bench/ingest.py: the same generated CT instances

    ns = argparse.Namespace(studies=args.studies, size=args.size)
    ingest.write_instances(dest, ns, ingest.phantom_pixels(args.size), args.count)


def run_once(
    tree: Path, files: Path, in_flight: int, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="data-", dir=workdir))
    env = os.environ | {
        "PYTHONPATH": str(tree),
        "RDC_DATA_DIR": str(data),
        stage_timers.ENV: str(data / "stages"),
    }
    env.pop("RDC_DATABASE_URL", None)
    add = ["rdc", "clinic", "add", "--code", "BENCH", "--name", "Bench", "--ae", CALLING_AE]
    subprocess.run(add, env=env, check=True, capture_output=True, timeout=120)
    command = [sys.executable, __file__, "--child", "--tree", str(tree), "--files", str(files)]
    command += ["--in-flight", str(in_flight)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    shutil.rmtree(data, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(run: dict[str, Any]) -> dict[str, float]:
    stages = run["stages"]
    n = run["instances"]
    _, held, _ = stages["held"]["writer lock"]
    _, held_cpu, _ = stages["held_cpu"]["writer lock"]
    batches = {int(k): v for k, v in stages.get("batches", {}).items()}
    count, mean, _median, largest = stage_timers.batch_summary(batches)
    return {
        "rate": n / run["seconds"],
        "cpu_ms": 1000 * run["cpu_seconds"] / n,
        "held_ms": 1000 * held / n,
        "held_cpu_ms": 1000 * held_cpu / n,
        "batches": count,
        "mean_batch": mean,
        "largest": largest,
        "failed": run["failed"],
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        args.in_flight_one = int(args.in_flight)
        child(args)
        return 0
    ks = [int(k) for k in args.in_flight.split(",")]
    targets = {"rdc-local": HERE.parent}
    if args.base_tree is not None:
        targets["rdc-base"] = args.base_tree.resolve()
    work = Path(tempfile.mkdtemp(prefix="index-writer-", dir=args.workdir))
    try:
        files = work / "files"
        write_files(files, args)
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.repeat):
            for k in ks:
                for name, tree in targets.items():
                    s = summary(run_once(tree, files, k, work, args))
                    runs.setdefault((name, k), []).append(s)
                    print(
                        f"  {name} K={k}: {s['rate']:.0f} inst/s, held {s['held_ms']:.3f} ms"
                        f" (CPU {s['held_cpu_ms']:.3f}), batches mean {s['mean_batch']:.1f}",
                        flush=True,
                    )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        "| in flight | target | inst/s | writer lock ms/inst wall (bound/s) | its CPU (bound/s)"
        " | batches mean / largest | process CPU ms/inst |"
    )
    print("|---:|---|---:|---|---|---|---:|")
    medians: dict[tuple[str, int], dict[str, float]] = {}
    for (name, k), values in runs.items():
        m = {key: statistics.median(v[key] for v in values) for key in values[0]}
        medians[(name, k)] = m
        print(
            f"| {k} | {name} | {m['rate']:,.0f} | {m['held_ms']:.3f} ({1000 / m['held_ms']:,.0f})"
            f" | {m['held_cpu_ms']:.3f} ({1000 / m['held_cpu_ms']:,.0f})"
            f" | {m['mean_batch']:.1f} / {m['largest']:.0f} | {m['cpu_ms']:.3f} |"
        )
    if "rdc-base" in targets:
        print()
        for k in ks:
            local, base = medians[("rdc-local", k)], medians[("rdc-base", k)]
            print(
                f"K={k}: local / base inst/s {local['rate'] / base['rate']:.2f}x,"
                f" held {local['held_ms'] / base['held_ms']:.2f}x"
            )
    if args.json is not None:
        args.json.write_text(json.dumps({f"{n}:{k}": v for (n, k), v in runs.items()}, indent=1))
    failed = sum(v["failed"] for values in runs.values() for v in values)
    if failed:
        print(f"MISMATCH: {failed} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
