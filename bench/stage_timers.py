"""Per-stage timers for ``bench/ingest.py``: how long each serial section is held per instance.

Not part of the product and not on its hot path: the benchmark starts rdc with a generated
``sitecustomize.py`` (see :func:`write_sitecustomize`) that calls :func:`install` in every
Python process of the target (the serving process and its DICOM listener processes, which
inherit the environment) when ``RDC_BENCH_STAGES_DIR`` is set. :func:`install` wraps, by
monkeypatching, the functions that bound a serial section:

- ``writer lock``: ``rdc_core.db._WriterGate`` from ``acquire`` returning to ``release``
  (the SQLite writer gate: its thread lock and the file lock shared by every process that
  opens the database); the time spent in ``acquire`` is the wait;
- ``object wait under lock``: ``worklist.intake.PendingObject.wait`` while this thread holds
  the writer lock (the object's disk sync paid inside the serial section);
- ``group commit``: ``GroupCommitter._run_batch``, one process's leader running a batch,
  less any writer-lock wait inside it; its batch sizes; ``StorageService._index`` (or,
  where there is none, ``GroupCommitter.run``) from submit to result is each instance's
  commit wait;
- ``group commit, no core``: of the group commit's wall time, how long its thread was
  runnable but had no core (``/proc/thread-self/schedstat``, Linux);
- ``commit statement``: the SQLite driver connection's ``commit`` of a write transaction
  (COMMIT with the WAL's disk sync, a checkpoint when the WAL passed its threshold, and the
  writer gate's release);
- ``connection hand-over``: ``ListenerPool.hand_over`` in the serving process;
- ``accept loop``: ``socketserver.BaseServer._handle_request_noblock`` (accept and hand
  the connection on), the serving process's listening thread.

Each process writes its totals to ``RDC_BENCH_STAGES_DIR/<pid>.json`` every 0.2 s (listener
processes end with ``os._exit``, so nothing waits for exit); :func:`collect` adds them up.
Timing costs about 1 us per call, far below the sections measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

ENV = "RDC_BENCH_STAGES_DIR"

# Stage name -> scope: "global" sections are one for the whole gateway (the writer lock is
# shared by every process on one SQLite file; one thread accepts), "process" ones are one
# per listener process.
STAGES: dict[str, str] = {
    "writer lock": "global",
    "object wait under lock": "global",
    "group commit": "process",
    # Of the group commit's wall time, how long its thread was runnable but had no core
    # (Linux schedstat): the rest of wall minus CPU is waiting off a core (I/O, the
    # interpreter lock).
    "group commit, no core": "process",
    # The driver's COMMIT of a write transaction (on SQLite: the WAL's disk sync, and a
    # checkpoint when the WAL passed its threshold).
    "commit statement": "global",
    "connection hand-over": "global",
    "accept loop": "global",
}


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[str, list[float]] = {name: [0, 0.0, 0.0] for name in STAGES}
        # CPU time of the holding thread while held (time.thread_time): what the section
        # costs where the holder never waits for a core or for the interpreter lock.
        self.held_cpu: dict[str, list[float]] = {name: [0, 0.0, 0.0] for name in STAGES}
        self.gate_wait = [0, 0.0, 0.0]  # count, total s, max s
        self.commit_wait = [0, 0.0, 0.0]
        self.batches: dict[int, int] = {}
        # Group-commit batches by size: count, wall seconds held, holder CPU seconds.
        self.batch_held: dict[int, list[float]] = {}
        self.changed = False

    def add(self, entry: list[float], seconds: float) -> None:
        with self.lock:
            entry[0] += 1
            entry[1] += seconds
            entry[2] = max(entry[2], seconds)
            self.changed = True

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches[size] = self.batches.get(size, 0) + 1

    def batch_time(self, size: int, wall: float, cpu: float) -> None:
        with self.lock:
            entry = self.batch_held.setdefault(size, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += wall
            entry[2] += cpu
            self.changed = True

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.changed = False
            return {
                "pid": os.getpid(),
                "held": {k: list(v) for k, v in self.held.items()},
                "held_cpu": {k: list(v) for k, v in self.held_cpu.items()},
                "gate_wait": list(self.gate_wait),
                "commit_wait": list(self.commit_wait),
                "batches": {str(k): v for k, v in self.batches.items()},
                "batch_held": {str(k): list(v) for k, v in self.batch_held.items()},
            }


_stats = _Stats()
_local = threading.local()


def _dump_forever(directory: Path) -> None:
    path = directory / f"{os.getpid()}.json"
    while True:
        time.sleep(0.2)
        if not _stats.changed:
            continue
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(_stats.snapshot()))
            os.replace(tmp, path)


def install() -> None:
    """Wrap the stage functions of this process (idempotent; no-op without the variable)."""
    directory = os.environ.get(ENV)
    if not directory or getattr(install, "done", False):
        return
    install.done = True  # type: ignore[attr-defined]
    _patch()
    threading.Thread(target=_dump_forever, args=(Path(directory),), daemon=True).start()
    # A forked child (none on the ingest path) would dump under its own pid.
    os.register_at_fork(after_in_child=lambda: None)


def reset() -> None:
    """Forget what was timed so far (e.g. a benchmark's warm-up)."""
    with _stats.lock:
        fresh = _Stats()
        for name, value in vars(fresh).items():
            if name != "lock":
                setattr(_stats, name, value)


def snapshot() -> dict[str, Any]:
    """This process's totals so far (the format :func:`collect` reads from each process)."""
    return _stats.snapshot()


def _patch() -> None:
    import socketserver

    from rdc_core import db, group_commit

    gate_cls = db._WriterGate
    connection_class = db._gated_sqlite_connection

    def timed_connection_class(*args: Any, **kwargs: Any) -> Any:
        base = connection_class(*args, **kwargs)

        class TimedCommit(base):  # type: ignore[misc, valid-type]
            def commit(self) -> None:
                if not self.holds_gate:
                    return super().commit()
                start = time.perf_counter()
                try:
                    return super().commit()
                finally:
                    _stats.add(_stats.held["commit statement"], time.perf_counter() - start)

        return TimedCommit

    db._gated_sqlite_connection = timed_connection_class  # type: ignore[assignment]
    acquire, release = gate_cls.acquire, gate_cls.release

    def timed_acquire(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = acquire(self, *args, **kwargs)
        now = time.perf_counter()
        _stats.add(_stats.gate_wait, now - start)
        _local.gate_wait = getattr(_local, "gate_wait", 0.0) + (now - start)
        self._bench_acquired = now
        self._bench_cpu = time.thread_time()
        _local.holding = True
        return result

    def timed_release(self: Any, *args: Any, **kwargs: Any) -> Any:
        acquired = getattr(self, "_bench_acquired", None)
        cpu = getattr(self, "_bench_cpu", 0.0)
        self._bench_acquired = None
        _local.holding = False
        try:
            return release(self, *args, **kwargs)
        finally:
            if acquired is not None:
                _stats.add(_stats.held["writer lock"], time.perf_counter() - acquired)
                _stats.add(_stats.held_cpu["writer lock"], time.thread_time() - cpu)

    gate_cls.acquire = timed_acquire  # type: ignore[method-assign]
    gate_cls.release = timed_release  # type: ignore[method-assign]

    committer = group_commit.GroupCommitter
    run_batch, run = committer._run_batch, committer.run

    def timed_run_batch(*args: Any, **kwargs: Any) -> Any:
        batch = next(a for a in args if isinstance(a, list))
        _stats.batch(len(batch))
        _local.gate_wait = 0.0
        queued = _run_queue_seconds()
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return run_batch(*args, **kwargs)
        finally:
            held = time.perf_counter() - start - getattr(_local, "gate_wait", 0.0)
            used = time.thread_time() - cpu
            if queued is not None:
                after = _run_queue_seconds()
                if after is not None:
                    _stats.add(_stats.held["group commit, no core"], after - queued)
            _stats.add(_stats.held["group commit"], held)
            _stats.add(_stats.held_cpu["group commit"], used)
            _stats.batch_time(len(batch), held, used)

    def timed_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(self, *args, **kwargs)
        finally:
            _stats.add(_stats.commit_wait, time.perf_counter() - start)

    committer._run_batch = timed_run_batch  # type: ignore[assignment]
    try:  # submit to result of one instance's index work, wherever it is written
        from dicom_gateway import server

        index = server.StorageService._index

        def timed_index(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return index(self, *args, **kwargs)
            finally:
                _stats.add(_stats.commit_wait, time.perf_counter() - start)

        server.StorageService._index = timed_index  # type: ignore[method-assign]
    except (ImportError, AttributeError):  # before StorageService._index
        committer.run = timed_run  # type: ignore[method-assign]

    with contextlib.suppress(ImportError, AttributeError):
        from worklist import intake

        wait = intake.PendingObject.wait

        def timed_wait(self: Any) -> None:
            if not getattr(_local, "holding", False):
                return wait(self)
            start = time.perf_counter()
            try:
                return wait(self)
            finally:
                _stats.add(_stats.held["object wait under lock"], time.perf_counter() - start)

        intake.PendingObject.wait = timed_wait  # type: ignore[method-assign]

    with contextlib.suppress(ImportError, AttributeError):
        from dicom_gateway import listener_pool

        hand_over = listener_pool.ListenerPool.hand_over

        def timed_hand_over(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return hand_over(self, *args, **kwargs)
            finally:
                _stats.add(_stats.held["connection hand-over"], time.perf_counter() - start)

        listener_pool.ListenerPool.hand_over = timed_hand_over  # type: ignore[method-assign]

    handle = socketserver.BaseServer._handle_request_noblock

    def timed_handle(self: Any) -> Any:
        start = time.perf_counter()
        try:
            return handle(self)
        finally:
            _stats.add(_stats.held["accept loop"], time.perf_counter() - start)

    socketserver.BaseServer._handle_request_noblock = timed_handle  # type: ignore[method-assign]


def _run_queue_seconds() -> float | None:
    """Seconds this thread has spent runnable without a core (/proc schedstat), or None.

    The file is opened once per thread and read with ``pread``: about 1 us a read, where
    opening it each time cost about 45 us, twice per batch, inside the writer lock (which
    inflated the lock's held time in the figures of bench/README.md before 2026-12-05's
    thirteenth session by up to ~0.1 ms per batch)."""
    fd = getattr(_local, "schedstat", None)
    try:
        if fd is None:
            fd = _local.schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        return int(os.pread(fd, 64, 0).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def write_sitecustomize(directory: Path) -> Path:
    """Write a ``sitecustomize.py`` into ``directory`` (put it first on PYTHONPATH) that
    installs the timers from this file; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    bench = Path(__file__).resolve().parent
    (directory / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"if os.environ.get({ENV!r}):\n"
        f"    sys.path.insert(0, {str(bench)!r})\n"
        "    import stage_timers\n"
        "    del sys.path[0]\n"
        "    stage_timers.install()\n"
    )
    return directory


def collect(directory: Path) -> dict[str, Any]:
    """The totals of every process that wrote to ``directory``."""
    held = {name: [0, 0.0, 0.0] for name in STAGES}
    held_cpu = {name: [0, 0.0, 0.0] for name in STAGES}
    gate_wait, commit_wait = [0, 0.0, 0.0], [0, 0.0, 0.0]
    batches: dict[int, int] = {}
    batch_held: dict[int, list[float]] = {}
    processes = writers = 0
    for path in directory.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        processes += 1
        writers += 1 if data["batches"] else 0
        for mine_by_name, key in ((held, "held"), (held_cpu, "held_cpu")):
            for name, (count, total, peak) in data.get(key, {}).items():
                entry = mine_by_name.setdefault(name, [0, 0.0, 0.0])
                entry[0] += count
                entry[1] += total
                entry[2] = max(entry[2], peak)
        for mine, theirs in ((gate_wait, data["gate_wait"]), (commit_wait, data["commit_wait"])):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
            mine[2] = max(mine[2], theirs[2])
        for size, count in data["batches"].items():
            batches[int(size)] = batches.get(int(size), 0) + count
        merge_batch_held(batch_held, data.get("batch_held", {}))
    return {
        "processes": processes,
        # Processes that ran group commits: with an index writer only the serving process.
        "writers": writers,
        "held": held,
        "held_cpu": held_cpu,
        "gate_wait": gate_wait,
        "commit_wait": commit_wait,
        "batches": batches,
        "batch_held": batch_held,
    }


def merge_batch_held(mine: dict[int, list[float]], theirs: dict[Any, list[float]]) -> None:
    """Add the per-batch-size times ``theirs`` to ``mine``."""
    for size, (count, wall, cpu) in theirs.items():
        entry = mine.setdefault(int(size), [0, 0.0, 0.0])
        entry[0] += count
        entry[1] += wall
        entry[2] += cpu


def batch_cost(batch_held: dict[int, list[float]], index: int) -> tuple[float, float] | None:
    """Least-squares fit of the time a batch is held (``index`` 1: wall, 2: CPU) against its
    size: (ms per batch, ms per instance). The second is what the section costs per instance
    once batches grow with the load: the bound on the rate is 1000 over it. None without at
    least two batch sizes."""
    points = [(size, e[index] / e[0], e[0]) for size, e in batch_held.items() if e[0]]
    if len({size for size, _, _ in points}) < 2:
        return None
    weight = sum(n for _, _, n in points)
    mean_x = sum(x * n for x, _, n in points) / weight
    mean_y = sum(y * n for _, y, n in points) / weight
    sxx = sum(n * (x - mean_x) ** 2 for x, _, n in points)
    sxy = sum(n * (x - mean_x) * (y - mean_y) for x, y, n in points)
    slope = sxy / sxx
    return 1000.0 * (mean_y - slope * mean_x), 1000.0 * slope


def batch_summary(batches: dict[int, int]) -> tuple[int, float, int, int]:
    """Number of batches, mean size, median size and largest size."""
    count = sum(batches.values())
    if not count:
        return 0, 0.0, 0, 0
    units = sum(size * n for size, n in batches.items())
    seen, median = 0, 0
    for size in sorted(batches):
        seen += batches[size]
        if seen * 2 >= count:
            median = size
            break
    return count, units / count, median, max(batches)
