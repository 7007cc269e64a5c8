"""MLLP intake benchmark: ``rdc serve --role mllp`` side by side with a minimal baseline.

The baseline is the least a receiver that keeps its promise must do: a thread per
connection reads each MLLP frame, appends the message to one journal file, fsyncs it, and
answers AA with MSA-2 = MSH-10 (no index, no checks, no file per message). rdc does what
it always does: one thread serves every connection; each round it checks the envelopes of
the messages that arrived on all of them, commits their index rows with the bytes in them
(SQLite, WAL: one transaction for the round), syncs the WAL once, then answers; processing
(object store, parse, map, auto-verify) runs after the commit, in the same process,
deferred while messages stream in.
``--floor`` adds a third receiver, the least one with an index: rdc's loop without rdc (a
selector over the connections, the MSH split for the key, a row per message with its bytes
in one SQLite transaction per round, one WAL fdatasync, AA). What it reaches bounds what
any Python receiver that indexes before it answers can, on this machine.
All run on the same file system (``--workdir``).

Every measurement starts its target on a fresh data directory; senders are threads of this
process, one connection each, sending an ORU^R01 (the python-hl7 glucose sample, a new
MSH-10 and order number each time: each message a new order, as a LIS sends them; the
same order again would be a correction, a new version of it each time) and waiting for
the answer before the next, for ``--warmup`` seconds (not measured: caches, and the work
a freshly started server does once) and then for ``--seconds``. The runs alternate
(baseline 1, rdc 1, baseline 4, rdc 4, ... ``--repeat`` times) so that a change in the
machine's load hits all; the median of the repeats is reported: messages/s, ACK
latency p50/p99 and the ratio rdc / baseline. Afterwards rdc's index is checked to hold
every message it acknowledged. The CPU column is the target process's CPU time (user +
system) per message; ``--compare-tree`` adds rdc from another source tree (e.g. the main
branch) to the same interleaved runs.

    python3 bench/mllp.py --seconds 10 --repeat 3
    python3 bench/mllp.py --compare-tree ../main  # this tree's rdc beside main's
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACILITY = "BENCHLAB"
PROFILE: list[str] = []  # --profile PREFIX: rdc runs under py-spy, stacks to PREFIX.*.txt
TEMPLATE = (
    "MSH|^~\\&|GHH LAB|{facility}|GHH OE|BLDG4|200202150930||ORU^R01|{control_id}|P|2.4\r"
    "PID|||555-44-4444||EVERYWOMAN^EVE^E^^^^L|JONES|19620320|F|||153 FERNWOOD DR.^"
    "^STATESVILLE^OH^35292||(206)3345232|(206)752-121||||AC555444444||67-A4335^OH^20030520\r"
    "OBR|1|{control_id}^GHH OE|F{control_id}^GHH LAB|15545^GLUCOSE|||200202150730|||||||||"
    "555-55-5555^PRIMARY^PATRICIA P^^^^MD^^|||||||||F||||||444-44-4444^HIPPOCRATES^HOWARD H^^^^MD\r"
    "OBX|1|SN|1554-5^GLUCOSE^POST 12H CFST:MCNC:PT:SER/PLAS:QN||^182|mg/dl|70_105|H|||F\r"
)


def message(control_id: str) -> bytes:
    return TEMPLATE.format(facility=FACILITY, control_id=control_id).encode()


# --------------------------------------------------------------------------------------
# The baseline receiver (run as: bench/mllp.py --baseline-server PORT DIRECTORY)


def plain_ack(msh: list[bytes]) -> bytes:
    """AA to the message whose MSH fields are ``msh``, MSA-2 = MSH-10 (no checks)."""
    ack = b"MSH|^~\\&|RDC|RDC|" + msh[2] + b"|" + msh[3] + b"|||ACK|" + msh[9]
    return ack + b"|P|2.4\rMSA|AA|" + msh[9] + b"\r"


def baseline_server(port: int, directory: Path) -> None:
    """Thread per connection; each message appended to one journal file and fsynced, then AA.

    One file, not a file per message: a new file is durable only once its directory is
    fsynced too, which would be a second sync; appending and fsyncing is the least a
    receiver that keeps what it acknowledged can do. Concurrent fsyncs share the
    file system's journal commits.
    """
    directory.mkdir(parents=True, exist_ok=True)
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    journal = os.open(directory / "journal.hl7", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)  # the journal file's directory entry, once
    os.close(fd)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        with conn:
            while True:
                end = buffer.find(b"\x1c\x0d")
                if end < 0:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                frame, buffer = buffer[1:end], buffer[end + 2 :]
                os.write(journal, frame + b"\x1c\x0d")  # O_APPEND: one write, not interleaved
                os.fsync(journal)
                msh = frame.split(b"\r", 1)[0].split(b"|")
                conn.sendall(b"\x0b" + plain_ack(msh) + b"\x1c\x0d")

    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def floor_server(port: int, directory: Path) -> None:
    """One thread, a selector over the connections; each round: every whole frame read,
    its key from the MSH split, one row per message (key, bytes, ACK) in one transaction,
    one fdatasync of the WAL, then the answers. No envelope checks, no sender, no metrics."""
    import selectors

    directory.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(directory / "floor.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE m (app TEXT, facility TEXT, control_id TEXT, raw BLOB, ack BLOB,"
        " UNIQUE (app, facility, control_id))"
    )
    wal = os.open(directory / "floor.sqlite3-wal", os.O_RDONLY)
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}
    print("ready", flush=True)
    while True:
        ready: list[tuple[socket.socket, bytes]] = []
        for key, _ in selector.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                continue
            conn = key.fileobj  # type: ignore[assignment]
            chunk = conn.recv(65536)
            if not chunk:
                selector.unregister(conn)
                conn.close()
                continue
            buffer = buffers[conn] + chunk
            while (end := buffer.find(b"\x1c\x0d")) >= 0:
                ready.append((conn, buffer[1:end]))
                buffer = buffer[end + 2 :]
            buffers[conn] = buffer
        if not ready:
            continue
        rows, answers = [], []
        for conn, frame in ready:
            msh = frame.split(b"\r", 1)[0].split(b"|")
            ack = plain_ack(msh)
            rows.append((msh[2], msh[3], msh[9], frame, ack))
            answers.append((conn, b"\x0b" + ack + b"\x1c\x0d"))
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO m VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
        db.execute("COMMIT")
        os.fdatasync(wal)
        for conn, answer in answers:
            conn.sendall(answer)


# --------------------------------------------------------------------------------------
# The disk's sync latency, back to back and with work between (--probe-sync)


def probe_sync(directory: Path, seconds: float = 2.0) -> None:
    """How long one durable write takes on ``directory``'s file system: a 1 KB append and
    fsync (the baseline's), and a commit of one row to a SQLite table with three indexes
    (what rdc's intake writes per message: table, ID, key, waiting index) and an fdatasync
    of its WAL; each back to back, and with 50 or 150 us of CPU work between syncs (what
    a receiver that checks and indexes each message spends between them). On some
    virtual disks a sync issued right after the last one returns takes a fraction of one
    issued after a pause."""
    directory.mkdir(parents=True, exist_ok=True)
    journal = os.open(directory / "probe.journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    db = sqlite3.connect(directory / "probe.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS m (id TEXT PRIMARY KEY, k TEXT UNIQUE, t TEXT, b BLOB)")
    db.execute("CREATE INDEX IF NOT EXISTS m_t ON m (t)")
    db.execute("INSERT INTO m VALUES ('0', '0', '0', x'00')")
    wal = os.open(directory / "probe.sqlite3-wal", os.O_RDONLY)
    record = message("PROBE") + b"\x1c\x0d"

    def append() -> None:
        os.write(journal, record)
        os.fsync(journal)

    numbers = itertools.count()

    def commit() -> None:
        key = f"{time.time_ns():020d}-{next(numbers)}"
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO m VALUES (?, ?, ?, ?)", (key, key, key, record))
        db.execute("COMMIT")
        os.fdatasync(wal)

    print("| durable write | work between syncs | p50 us | p90 us | mean us |")
    print("|---|---:|---:|---:|---:|")
    for name, write in (("1 KB append + fsync", append), ("SQLite row + WAL fdatasync", commit)):
        for gap in (0.0, 50e-6, 150e-6):
            took: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                spin = time.perf_counter() + gap
                while time.perf_counter() < spin:
                    pass
                began = time.perf_counter()
                write()
                took.append(time.perf_counter() - began)
            took.sort()
            p50, p90 = took[len(took) // 2], took[int(len(took) * 0.9)]
            mean = sum(took) / len(took)
            print(
                f"| {name} | {gap * 1e6:.0f} us | {p50 * 1e6:.0f} | {p90 * 1e6:.0f} "
                f"| {mean * 1e6:.0f} |"
            )
    db.close()
    os.close(wal)
    os.close(journal)


# --------------------------------------------------------------------------------------
# Targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"target exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise RuntimeError("target did not listen in time")


class Target:
    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if PROFILE and isinstance(self, Rdc):
                # py-spy writes its stacks on SIGINT; the server stops on it too.
                os.killpg(self.proc.pid, signal.SIGINT)
            elif isinstance(self, Rdc):
                # Its index was checked already. A graceful stop would first process the
                # messages still waiting (processing is deferred while messages stream in):
                # tens of seconds per run, of no interest here.
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def check(self, acknowledged: set[str]) -> None:
        """Raise unless every acknowledged control ID was kept."""

    def server_pid(self) -> int | None:
        """The serving process: the one started, or under py-spy the one py-spy started."""
        if self.proc is None:
            return None
        if not (PROFILE and isinstance(self, Rdc)):
            return self.proc.pid
        pid = self.proc.pid
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
        return None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the target's process has used so far (0 when unknown,
        e.g. under py-spy)."""
        if PROFILE:
            return 0.0
        return process_cpu_seconds(self.server_pid())

    def wait_quiet(
        self, *, interval: float = 0.5, busy: float = 0.1, timeout: float = 120.0
    ) -> None:
        """Wait until the serving process has used less than ``busy`` of a core for
        ``interval``: a freshly started rdc runs its periodic tasks once (the monthly QC
        report's PDF alone is seconds of CPU on a slow machine), which would otherwise fall
        into the measurement."""
        pid = self.server_pid()
        deadline = time.monotonic() + timeout
        last = process_cpu_seconds(pid)
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = process_cpu_seconds(pid)
            if now - last < busy * interval:
                return
            last = now
        print(f"  ({self.name} still busy after {timeout:.0f} s; measuring anyway)", flush=True)


def process_cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) of process ``pid`` so far (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Baseline(Target):
    name = "baseline (fsync, AA)"

    def start(self) -> None:
        self.data = self.workdir / "baseline"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--baseline-server", str(self.port), str(self.data)],
            stdout=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.proc)

    def check(self, acknowledged: set[str]) -> None:
        stored = (self.data / "journal.hl7").read_bytes().count(b"\x1c\x0d")
        if stored < len(acknowledged):
            raise RuntimeError(f"baseline kept {stored} of {len(acknowledged)} messages")


class Floor(Target):
    name = "floor (Python + SQLite row)"

    def start(self) -> None:
        self.data = self.workdir / "floor"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--floor-server", str(self.port), str(self.data)],
            stdout=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.proc)

    def check(self, acknowledged: set[str]) -> None:
        with sqlite3.connect(self.data / "floor.sqlite3") as db:
            ids = {row[0].decode() for row in db.execute("SELECT control_id FROM m")}
        if acknowledged - ids:
            raise RuntimeError(f"floor acknowledged {len(acknowledged - ids)} it did not index")


class Rdc(Target):
    name = "rdc serve --role mllp"
    tree: Path | None = None  # another source tree (--compare-tree): its code is run

    @property
    def source(self) -> Path:
        """The source tree whose rdc is run (this one unless ``tree`` is set)."""
        return self.tree or REPO

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RDC_")}
        # The tree on the module path, and the working directory (``python -m`` puts that
        # first on the path: run from another tree, it would import that tree's code).
        env["PYTHONPATH"] = str(self.source)
        env.update(
            RDC_DATA_DIR=str(self.data),
            RDC_MLLP_HOST="127.0.0.1",
            RDC_MLLP_PORT=str(self.port),
            RDC_HTTP_HOST="127.0.0.1",
            RDC_HTTP_PORT=str(free_port()),
            RDC_LOG_LEVEL="WARNING",
        )
        return env

    def start(self) -> None:
        self.data = self.workdir / "rdc"
        env = self.environment()
        found = subprocess.run(
            [
                sys.executable,
                "-c",
                "import importlib.util as u; print(u.find_spec('rdc_core').origin)",
            ],
            env=env,
            cwd=self.source,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not Path(found).resolve().is_relative_to(self.source.resolve()):
            raise RuntimeError(f"{self.name}: rdc_core is imported from {found}, not {self.source}")
        subprocess.run(
            [
                *(sys.executable, "-m", "web.cli", "clinic", "add", "--code", "BENCH"),
                *("--name", "Bench", "--hl7-facility", FACILITY),
            ],
            env=env,
            cwd=self.source,
            check=True,
            capture_output=True,
        )
        log = open(self.workdir / "rdc.log", "ab")  # noqa: SIM115 (kept open while it runs)
        command = [sys.executable, "-m", "web.cli", "serve", "--role", "mllp"]
        if PROFILE:
            # py-spy samples the server (all threads, idle ones left out): collapsed stacks.
            out = f"{PROFILE[0]}.{self.workdir.name}.txt"
            spy = shutil.which("py-spy") or str(Path.home() / ".local/bin/py-spy")
            command = [spy, "record", "-r", "250", "--gil", "-f", "raw", "-o", out, "--", *command]
        self.proc = subprocess.Popen(
            command,
            env=env,
            cwd=self.source,
            start_new_session=bool(PROFILE),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(self.port, self.proc)

    def check(self, acknowledged: set[str]) -> None:
        with sqlite3.connect(self.data / "rdc.sqlite3") as db:
            ids = {row[0] for row in db.execute("SELECT control_id FROM lab_messages")}
        missing = acknowledged - ids
        if missing:
            raise RuntimeError(f"rdc acknowledged {len(missing)} messages it did not index")


# --------------------------------------------------------------------------------------
# Senders


@dataclass
class Result:
    target: str
    connections: int
    messages: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float  # the target process's CPU time per message (user + system)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(b"\x0b" + data + b"\x1c\x0d")
    answer = b""
    while not answer.endswith(b"\x1c\x0d"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        answer += chunk
    return answer


def measure(
    target: Target, connections: int, seconds: float, tag: str, warmup: float = 0.0
) -> Result:
    acknowledged: set[str] = set()
    latencies: list[float] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(connections + 1)
    stop_at = [0.0]

    def sender(index: int) -> None:
        own: list[float] = []
        ids: list[str] = []
        with socket.create_connection(("127.0.0.1", target.port), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Warm-up (not measured): the connection, caches, and whatever the target does
            # once when it starts (the rdc server's first runs of its periodic tasks).
            warm_until = time.perf_counter() + warmup
            w = 0
            while True:
                w += 1
                exchange(sock, message(f"W{tag}{index}-{w}"))
                ids.append(f"W{tag}{index}-{w}")
                if time.perf_counter() >= warm_until:
                    break
            start_gate.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:
                n += 1
                control_id = f"{tag}{index}-{n}"
                began = time.perf_counter()
                answer = exchange(sock, message(control_id))
                own.append(time.perf_counter() - began)
                if b"MSA|AA|" + control_id.encode() + b"\r" not in answer:
                    raise RuntimeError(f"not AA: {answer!r}")
                ids.append(control_id)
        with lock:
            latencies.extend(own)
            acknowledged.update(ids)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + 3600
    start_gate.wait()
    began = time.perf_counter()
    cpu_began = target.cpu_seconds()
    stop_at[0] = began + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    cpu = target.cpu_seconds() - cpu_began
    target.check(acknowledged)
    latencies.sort()
    return Result(
        target=target.name,
        connections=connections,
        messages=len(latencies),
        seconds=elapsed,
        p50_ms=1000 * latencies[len(latencies) // 2],
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        cpu_ms=1000 * cpu / max(1, len(latencies)),
    )


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="rdc-bench-mllp-", dir=args.workdir))
    results: dict[tuple[str, int], list[Result]] = {}
    kinds: list[type[Target]] = [Baseline, Rdc]
    if args.floor:
        kinds.append(Floor)
    if args.compare_tree:
        # The same server from another source tree (e.g. the main branch), interleaved
        # with the others, so that both see the same machine.
        tree = args.compare_tree.resolve()
        kinds.append(type("RdcCompared", (Rdc,), {"name": f"rdc ({tree.name})", "tree": tree}))
    try:
        for repeat in range(args.repeat):
            for connections in args.connections:
                for n, cls in enumerate(kinds):
                    workdir = root / f"{n}-{cls.__name__.lower()}-{connections}-{repeat}"
                    workdir.mkdir()
                    target = cls(workdir)
                    target.start()
                    try:
                        target.wait_quiet()
                        result = measure(
                            target, connections, args.seconds, f"R{repeat}C", args.warmup
                        )
                    finally:
                        target.stop()
                    subprocess.run(["sync"], check=False)
                    results.setdefault((cls.name, connections), []).append(result)
                    print(
                        f"  {result.target:32} {connections} conn: {result.rate:7.1f} msg/s "
                        f"p50 {result.p50_ms:6.2f} ms p99 {result.p99_ms:6.2f} ms "
                        f"cpu {result.cpu_ms:5.3f} ms/msg",
                        flush=True,
                    )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(
        "| connections | target | messages/s | ACK p50 ms | ACK p99 ms | CPU ms/msg "
        "| rdc / baseline |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    summary = []
    for connections in args.connections:
        base = statistics.median(r.rate for r in results[(Baseline.name, connections)])
        for cls in kinds:
            runs = results[(cls.name, connections)]
            rate = statistics.median(r.rate for r in runs)
            p50 = statistics.median(r.p50_ms for r in runs)
            p99 = statistics.median(r.p99_ms for r in runs)
            cpu = statistics.median(r.cpu_ms for r in runs)
            ratio = rate / base
            print(
                f"| {connections} | {cls.name} | {rate:.0f} | {p50:.2f} | {p99:.2f} "
                f"| {cpu:.3f} | {ratio:.2f} |"
            )
            summary.append(
                {
                    "connections": connections,
                    "target": cls.name,
                    "messages_per_second": rate,
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "cpu_ms_per_message": cpu,
                    "ratio_to_baseline": ratio,
                }
            )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    four = [s for s in summary if s["connections"] == 4 and s["target"] == Rdc.name]
    if four:
        ok = four[0]["ratio_to_baseline"] >= 0.8 and four[0]["messages_per_second"] >= 500
        verdict = "met" if ok else "NOT met"
        print(f"\ntarget (4 connections: >= 0.8x baseline and >= 500 msg/s): {verdict}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of sending before each measurement"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; median")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[1, 4], help="connection counts"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/var/tmp"), help="where the targets write"
    )
    parser.add_argument("--json", type=Path, help="also write the summary as JSON")
    parser.add_argument(
        "--compare-tree",
        type=Path,
        help="also run rdc from this source tree (PYTHONPATH), interleaved with the others",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    parser.add_argument(
        "--profile", help="run rdc under py-spy; collapsed stacks to PROFILE.<run>.txt"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run the least Python receiver that indexes before it answers",
    )
    parser.add_argument(
        "--probe-sync",
        action="store_true",
        help="only measure the disk's sync latency (back to back, and with work between)",
    )
    parser.add_argument("--baseline-server", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile:
        PROFILE.append(args.profile)
    if args.baseline_server:
        baseline_server(int(args.baseline_server[0]), Path(args.baseline_server[1]))
        return 0
    if args.floor_server:
        floor_server(int(args.floor_server[0]), Path(args.floor_server[1]))
        return 0
    if args.probe_sync:
        directory = Path(tempfile.mkdtemp(prefix="rdc-bench-sync-", dir=args.workdir))
        try:
            probe_sync(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
