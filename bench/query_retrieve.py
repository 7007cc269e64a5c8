"""Query/retrieve latency: ``rdc serve --role dicom`` side by side with Orthanc.

Both targets receive the same synthetic CT studies (``bench/ingest.py``'s generator, sent
with dcmtk's storescu), then the same client (pynetdicom, in this process) times, per
operation and target, a fresh association, the request with every response, and the
release:

- ``echo``: C-ECHO (the association's own cost, for reference);
- ``find-study``: C-FIND, Study Root, STUDY level, every study;
- ``find-image``: C-FIND, Study Root, IMAGE level, every instance of one study;
- ``move-study``: C-MOVE of one study to a pynetdicom Storage SCP registered at both
  (rdc: ``rdc clinic add --dicom-destination``; Orthanc: ``DicomModalities``);
- ``get-study``: C-GET of one study on the same association.

It prints the median and the 90th percentile (ms) per operation and target and the ratio of
the medians (rdc / Orthanc: below 1 is faster).

Then Orthanc is used as a clinic PACS would use it against rdc (``--interop``, on by
default): ``POST /modalities/rdc/query`` at study and instance level and
``POST /modalities/rdc/move`` of one study to Orthanc itself (registered at rdc as the
clinic's AE title and move destination); it checks the answers and the instances Orthanc
stored, and prints the times. Orthanc listens on every interface, so the
script re-runs itself inside a private network namespace (``unshare -n``) with only
loopback; needs root, dcmtk, Orthanc from Debian and ``rdc`` on PATH.

    python3 bench/query_retrieve.py --studies 4 --per-study 50 --repeat 7 --json /tmp/qr.json
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
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingest import (  # bench/ is first on sys.path when this file is run
    CALLING_AE,
    BenchError,
    OrthancReceiver,
    RdcReceiver,
    Receiver,
    check_private_netns,
    free_ports,
    phantom_pixels,
    send,
    wait_stored,
    write_instances,
)
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

DESTINATION_AE = "BENCHDST"
OPERATIONS = ("echo", "find-study", "find-image", "move-study", "get-study")


class RdcQR(RdcReceiver):
    """rdc with the benchmark's destination registered to the sending clinic."""

    def __init__(self, workdir: Path, destination_port: int) -> None:
        super().__init__(workdir)
        self.destination_port = destination_port

    def prepare(self) -> None:
        spec = f"{DESTINATION_AE}@127.0.0.1:{self.destination_port}"
        options = ["--code", "BENCH", "--name", "Bench", "--ae", CALLING_AE]
        done = subprocess.run(
            [self.rdc(), "clinic", "add", *options, "--dicom-destination", spec],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise BenchError(f"rdc clinic add failed:\n{done.stderr.strip()}")


class OrthancQR(OrthancReceiver):
    """Orthanc with the client and the destination as known modalities."""

    def __init__(self, workdir: Path, destination_port: int) -> None:
        super().__init__(workdir)
        self.destination_port = destination_port

    def prepare(self) -> None:
        super().prepare()
        config = json.loads(self.config_path().read_text())
        config["DicomModalities"] = {
            "client": [CALLING_AE, "127.0.0.1", 104],
            "destination": [DESTINATION_AE, "127.0.0.1", self.destination_port],
        }
        self.config_path().write_text(json.dumps(config, indent=2))


INTEROP_AE = "ORTHANC_C"


class RdcForOrthanc(RdcReceiver):
    """rdc with Orthanc's AE title as one of the clinic's, and Orthanc as its destination."""

    def __init__(self, workdir: Path, orthanc_port: int) -> None:
        super().__init__(workdir)
        self.orthanc_port = orthanc_port

    def prepare(self) -> None:
        spec = f"{INTEROP_AE}@127.0.0.1:{self.orthanc_port}"
        options = ["--code", "BENCH", "--name", "Bench", "--ae", CALLING_AE, "--ae", INTEROP_AE]
        done = subprocess.run(
            [self.rdc(), "clinic", "add", *options, "--dicom-destination", spec],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise BenchError(f"rdc clinic add failed:\n{done.stderr.strip()}")


class OrthancClient(OrthancReceiver):
    """Orthanc as a clinic's PACS, with rdc as its remote modality ``rdc``."""

    called_ae = INTEROP_AE

    def __init__(self, workdir: Path, dicom_port: int, rdc_port: int) -> None:
        super().__init__(workdir)
        self.dicom_port = dicom_port
        self.rdc_port = rdc_port

    def prepare(self) -> None:
        super().prepare()
        config = json.loads(self.config_path().read_text())
        config["DicomModalities"] = {"rdc": ["RDC", "127.0.0.1", self.rdc_port]}
        self.config_path().write_text(json.dumps(config, indent=2))

    def rest(self, method: str, path: str, body: object | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)


def interop(args: argparse.Namespace, parts: list[Path], workdir: Path) -> dict[str, Any]:
    """Orthanc querying and moving from rdc through its REST API; checks and times it."""
    (orthanc_dicom,) = free_ports(1)
    count = args.studies * args.per_study
    rdc_dir, orthanc_dir = workdir / "interop-rdc", workdir / "interop-orthanc"
    rdc_dir.mkdir()
    orthanc_dir.mkdir()
    with RdcForOrthanc(rdc_dir, orthanc_dicom) as rdc:
        send(rdc, parts, 1, timeout=600)
        if wait_stored(rdc, count) != count:
            raise BenchError(f"rdc stored {rdc.stored()} of {count}")
        with OrthancClient(orthanc_dir, orthanc_dicom, rdc.dicom_port) as orthanc:
            start = time.perf_counter()
            query = orthanc.rest(
                "POST", "/modalities/rdc/query", {"Level": "Study", "Query": {"PatientID": "*"}}
            )
            answers = orthanc.rest("GET", f"/queries/{query['ID']}/answers")
            study_ms = (time.perf_counter() - start) * 1000
            if len(answers) != args.studies:
                raise BenchError(f"Orthanc found {len(answers)} studies at rdc")
            first = orthanc.rest("GET", f"/queries/{query['ID']}/answers/0/content?simplify")
            study = first["StudyInstanceUID"]
            start = time.perf_counter()
            query = orthanc.rest(
                "POST",
                "/modalities/rdc/query",
                {"Level": "Instance", "Query": {"StudyInstanceUID": study, "SOPInstanceUID": ""}},
            )
            instances = orthanc.rest("GET", f"/queries/{query['ID']}/answers")
            instance_ms = (time.perf_counter() - start) * 1000
            if len(instances) != args.per_study:
                raise BenchError(f"Orthanc found {len(instances)} instances of a study")
            start = time.perf_counter()
            orthanc.rest(
                "POST",
                "/modalities/rdc/move",
                {
                    "Level": "Study",
                    "Resources": [{"StudyInstanceUID": study}],
                    "TargetAet": INTEROP_AE,
                },
            )
            move_ms = (time.perf_counter() - start) * 1000
            stored = wait_stored(orthanc, args.per_study)
            if stored != args.per_study:
                raise BenchError(f"Orthanc stored {stored} of the {args.per_study} moved")
    return {
        "query_study_ms": study_ms,
        "query_instance_ms": instance_ms,
        "move_study_ms": move_ms,
        "studies_found": len(answers),
        "instances_found": len(instances),
        "instances_moved": stored,
    }


class Destination:
    """A Storage SCP that accepts every CT instance and counts them."""

    def __init__(self, port: int) -> None:
        self.received = 0
        self.lock = threading.Lock()
        ae = AE(ae_title=DESTINATION_AE)
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.received += 1
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _associate(receiver: Receiver, model: str, *, get: bool = False) -> Any:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(model)
    roles = []
    handlers = []
    if get:
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        roles.append(build_role(CTImageStorage, scp_role=True))
        handlers.append((evt.EVT_C_STORE, lambda event: 0x0000))
    assoc = ae.associate(
        "127.0.0.1",
        receiver.dicom_port,
        ae_title=receiver.called_ae,
        ext_neg=roles,
        evt_handlers=handlers,
    )
    if not assoc.is_established:
        raise BenchError(f"{receiver.name} refused the association")
    return assoc


def _statuses(responses: Any) -> list[tuple[int, Dataset | None]]:
    return [(int(status.Status), ds) for status, ds in responses if "Status" in status]


def study_uids(receiver: Receiver) -> list[str]:
    """Every study's UID, by C-FIND."""
    assoc = _associate(receiver, StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found = _statuses(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    return sorted(str(ds.StudyInstanceUID) for status, ds in found if status == 0xFF00 and ds)


def operation(receiver: Receiver, name: str, study: str, expect: int) -> Callable[[], None]:
    """One timed operation against ``receiver``: checks its answer, raises BenchError."""

    def run() -> None:
        if name == "echo":
            assoc = _associate(receiver, "1.2.840.10008.1.1")
            status = assoc.send_c_echo()
            assoc.release()
            if int(status.Status) != 0:
                raise BenchError(f"{receiver.name} echo: {status}")
            return
        query = Dataset()
        query.StudyInstanceUID = study if name != "find-study" else ""
        if name.startswith("find"):
            query.QueryRetrieveLevel = "STUDY" if name == "find-study" else "IMAGE"
            if name == "find-image":
                query.SOPInstanceUID = ""
            model = StudyRootQueryRetrieveInformationModelFind
            assoc = _associate(receiver, model)
            found = _statuses(assoc.send_c_find(query, model))
        elif name == "move-study":
            query.QueryRetrieveLevel = "STUDY"
            model = StudyRootQueryRetrieveInformationModelMove
            assoc = _associate(receiver, model)
            found = _statuses(assoc.send_c_move(query, DESTINATION_AE, model))
        else:
            query.QueryRetrieveLevel = "STUDY"
            model = StudyRootQueryRetrieveInformationModelGet
            assoc = _associate(receiver, model, get=True)
            found = _statuses(assoc.send_c_get(query, model))
        assoc.release()
        pending = sum(1 for status, _ in found if status in (0xFF00, 0xFF01))
        if not found or found[-1][0] != 0x0000:
            raise BenchError(f"{receiver.name} {name}: final status {found[-1:]}")
        if name.startswith("find") and pending != expect:
            raise BenchError(f"{receiver.name} {name}: {pending} matches, expected {expect}")

    return run


def measure(receiver: Receiver, args: argparse.Namespace, parts: list[Path]) -> dict[str, Any]:
    """Store the studies in ``receiver`` and time each operation ``--repeat`` times."""
    count = args.studies * args.per_study
    send(receiver, parts, 1, timeout=600)
    if wait_stored(receiver, count) != count:
        raise BenchError(f"{receiver.name} stored {receiver.stored()} of {count}")
    studies = study_uids(receiver)
    if len(studies) != args.studies:
        raise BenchError(f"{receiver.name} found {len(studies)} studies")
    expected = {"find-study": args.studies, "find-image": args.per_study}
    result: dict[str, Any] = {}
    for name in OPERATIONS:
        run = operation(receiver, name, studies[0], expected.get(name, args.per_study))
        run()  # warm-up: caches, first connection
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        result[name] = {
            "median_ms": statistics.median(times),
            "p90_ms": times[min(len(times) - 1, int(len(times) * 0.9))],
            "runs_ms": times,
        }
    return result


def run_benchmark(args: argparse.Namespace) -> int:
    check_private_netns()
    workdir = Path(tempfile.mkdtemp(prefix="rdc-qr-bench-", dir=args.workdir))
    (destination_port,) = free_ports(1)
    destination = Destination(destination_port)
    try:
        ns = argparse.Namespace(studies=args.studies, size=args.size)
        count = args.studies * args.per_study
        parts, total = write_instances(workdir / "data", ns, phantom_pixels(args.size), count)
        print(f"{count} instances, {total / 1e6:.1f} MB, {args.studies} studies")
        results: dict[str, dict[str, Any]] = {}
        for factory in (RdcQR, OrthancQR):
            target_dir = workdir / factory.__name__
            target_dir.mkdir()
            with factory(target_dir, destination_port) as receiver:
                results[receiver.name] = measure(receiver, args, parts)
        moved = destination.received
        checked = interop(args, parts, workdir) if args.interop else None
    finally:
        destination.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    rdc, orthanc = results["rdc-local"], results["Orthanc"]
    print(f"\n{'operation':<12} {'rdc ms (p50/p90)':>18} {'Orthanc ms (p50/p90)':>22} {'ratio':>7}")
    for name in OPERATIONS:
        a, b = rdc[name], orthanc[name]
        ratio = a["median_ms"] / b["median_ms"]
        print(
            f"{name:<12} {a['median_ms']:>9.1f} / {a['p90_ms']:<7.1f}"
            f" {b['median_ms']:>11.1f} / {b['p90_ms']:<8.1f} {ratio:>7.2f}"
        )
    print(f"(instances received by the move destination: {moved}; ratio = rdc / Orthanc)")
    if checked is not None:
        print(
            f"\nOrthanc as a client of rdc: study query {checked['studies_found']} answers in "
            f"{checked['query_study_ms']:.0f} ms, instance query {checked['instances_found']} "
            f"in {checked['query_instance_ms']:.0f} ms, move of a study "
            f"({checked['instances_moved']} instances stored by Orthanc) in "
            f"{checked['move_study_ms']:.0f} ms"
        )
    if args.json:
        everything = {"args": vars(args), "results": results, "interop": checked}
        Path(args.json).write_text(json.dumps(everything, indent=2))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--per-study", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each image")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--no-interop", dest="interop", action="store_false", help="skip Orthanc as a client"
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.inside:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise BenchError("needs root and unshare(1): Orthanc must listen on loopback only")
        command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
        command += [sys.executable, str(Path(__file__).resolve()), "--inside", *argv]
        return subprocess.run(command, check=False).returncode
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
