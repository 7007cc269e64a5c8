"""RDC_DICOM_PROCESSES > 1: ``rdc serve`` hands connections to listener processes.

The processes must store and index exactly as one process does, share one association
limit, report their counts to the serving process's ``/metrics``, be replaced when one dies,
and never outlive the server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicom_gateway.listener_pool import MAX_MESSAGE, decode_answers, encode_answers
from tests.dicom_gateway.test_cstore import all_ok, stored_copies, valid_files
from tests.helpers import (
    RdcServer,
    c_store,
    echo_rejection,
    free_port,
    object_store,
    same_dataset,
    storescu,
    wait_for,
)
from tests.rdc_core.test_metrics import Samples, scrape, value

# The tests here check the DICOM protocol and what is stored, nothing a background task does.
pytestmark = pytest.mark.task_free

PROCESSES = 2


def _listener_pids(server: RdcServer) -> set[int]:
    assert server.proc is not None
    found = subprocess.run(
        ["pgrep", "-P", str(server.proc.pid), "-f", "dicom_gateway.listener_process"],
        capture_output=True,
        text=True,
    )
    return {int(pid) for pid in found.stdout.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def processes_env(rdc_env: dict[str, str], alliance: dict[str, str]) -> dict[str, str]:
    return {**rdc_env, "RDC_DICOM_PROCESSES": str(PROCESSES)}


@pytest.fixture
def pooled_server(processes_env: dict[str, str], tmp_path: Path) -> Iterator[RdcServer]:
    with RdcServer(processes_env, tmp_path / "serve.log", workers=False) as server:
        wait_for(lambda: len(_listener_pids(server)) == PROCESSES, what="the listener processes")
        yield server


def test_every_sample_file_is_stored_through_both_processes_and_counted(
    pooled_server: RdcServer, dcmtk: Path, testdata: Path
) -> None:
    # On SQLite the listener processes index through the serving process's one writer.
    sqlite = "RDC_DATABASE_URL" not in pooled_server.env
    for pid in _listener_pids(pooled_server):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert cmdline.read().split(b"\0")[-2].endswith(b"remote-index") == sqlite
    files = valid_files(testdata)
    # Two senders at once, each with one association per transfer syntax.
    halves = [files[0::2], files[1::2]]
    results: list[list[subprocess.CompletedProcess[str]]] = [[], []]

    def send(k: int) -> None:
        results[k] = storescu(
            dcmtk, halves[k], port=pooled_server.dicom_port, calling_ae="CLINIC_A_CT"
        )

    senders = [threading.Thread(target=send, args=(k,)) for k in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    all_ok(results[0] + results[1])

    for path in files:
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        copies = stored_copies(pooled_server, sop_uid)
        assert any(same_dataset(path, copy) for copy in copies), f"{path.name} not stored as sent"

    def answered() -> Samples | None:
        # The processes' counts reach the serving process a moment after their answers.
        samples = scrape(pooled_server.http)
        total = sum(
            value(samples, "rdc_dicom_instances_total", outcome=outcome) or 0.0
            for outcome in ("stored", "duplicate", "conflict")
        )
        return samples if total == len(files) else None

    samples = wait_for(answered, timeout=10, what="every C-STORE counted in /metrics")
    assert (value(samples, "rdc_dicom_received_bytes_total") or 0) > 0
    handed = [
        value(samples, "rdc_dicom_connections_total", process=str(k)) or 0.0
        for k in range(PROCESSES)
    ]
    assert all(count > 0 for count in handed), handed
    spool = object_store(pooled_server.env).spool_dir
    assert list(spool.rglob(".rx-*")) == []  # every received file became an object
    with pooled_server.db() as db:
        assert db.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0
        studies = {row[0] for row in db.execute("SELECT study_instance_uid FROM exams")}

    # C-FIND is answered by the listener processes too.
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", pooled_server.dicom_port, ae_title="RDC")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    found = {
        str(identifier.StudyInstanceUID)
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        )
        if int(status.Status) == 0xFF00
    }
    assoc.release()
    assert found == studies


def _associate(port: int) -> object:
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="RDC")


def test_the_association_limit_holds_for_all_processes_together(
    processes_env: dict[str, str], tmp_path: Path, dcmtk: Path
) -> None:
    env = {**processes_env, "RDC_DICOM_MAX_ASSOCIATIONS": "2"}
    with (
        RdcServer(env, tmp_path / "serve.log", workers=False) as server,
        # A connection that never asks for an association (a probe) takes no slot.
        socket.create_connection(("127.0.0.1", server.dicom_port), timeout=10),
    ):
        held = [_associate(server.dicom_port) for _ in range(2)]
        assert all(assoc.is_established for assoc in held)  # type: ignore[attr-defined]
        assert echo_rejection(dcmtk, server.dicom_port, "CLINIC_A_CT") == [
            "Result: Rejected Transient, Source: Service Provider (Presentation Related)",
            "Reason: Local Limit Exceeded",
        ]
        held[0].release()  # type: ignore[attr-defined]

        # The slot is given back to the serving process as the release goes out; a request
        # arriving through the other process in that instant may still be refused, and a
        # modality tries again, as after any transient rejection.
        def admitted() -> object | None:
            assoc = _associate(server.dicom_port)
            return assoc if assoc.is_established else None  # type: ignore[attr-defined]

        again = wait_for(admitted, timeout=10, what="an association in the freed slot")
        assert again.send_c_echo().Status == 0x0000  # type: ignore[attr-defined]
        again.release()  # type: ignore[attr-defined]
        held[1].release()  # type: ignore[attr-defined]


def test_a_killed_listener_process_is_replaced_and_its_partial_files_removed(
    pooled_server: RdcServer, testdata: Path
) -> None:
    victim, survivor = sorted(_listener_pids(pooled_server))
    spool = object_store(pooled_server.env).spool_dir
    # What a transfer cut off by the death leaves behind, and one still in progress elsewhere.
    cut_off = spool / f"listener-{victim}" / ".rx-cutoff.dcm"
    in_progress = spool / f"listener-{survivor}" / ".rx-receiving.dcm"
    cut_off.write_bytes(b"partial")
    in_progress.write_bytes(b"partial")

    def handed(samples: Samples) -> list[float]:
        return [
            value(samples, "rdc_dicom_connections_total", process=str(k)) or 0.0
            for k in range(PROCESSES)
        ]

    before = handed(scrape(pooled_server.http))
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(
        lambda: (
            len(pids := _listener_pids(pooled_server)) == PROCESSES and victim not in pids and pids
        ),
        timeout=30,
        what="a new listener process in place of the killed one",
    )
    (new,) = replaced - {survivor}
    wait_for(
        lambda: f"ready (pid {new})" in pooled_server.log_path.read_text(),
        what="the new listener process to be ready",
    )
    assert survivor in _listener_pids(pooled_server)
    assert not cut_off.exists()
    assert in_progress.exists()

    # Both processes serve, the new one included: associations one after another alternate.
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    for _ in range(4):
        assert c_store(pooled_server.dicom_port, ds, calling_ae="CLINIC_A_CT") == 0x0000
    after = handed(scrape(pooled_server.http))
    assert [b - a for a, b in zip(before, after, strict=True)] == [2.0, 2.0]
    with pooled_server.db() as db:
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 1


def test_listener_processes_end_with_the_server(
    processes_env: dict[str, str], tmp_path: Path
) -> None:
    server = RdcServer(processes_env, tmp_path / "serve.log", workers=False)
    server.start()
    try:
        wait_for(lambda: len(_listener_pids(server)) == PROCESSES, what="the listener processes")
        stopped = _listener_pids(server)
        server.stop()  # SIGTERM: the server stops them, and waits for them, before it exits
        assert not any(map(_alive, stopped))

        server.start()
        wait_for(lambda: len(_listener_pids(server)) == PROCESSES, what="the listener processes")
        orphaned = _listener_pids(server)
        server.stop(signal.SIGKILL)  # no chance to stop them: they notice and exit
        wait_for(lambda: not any(map(_alive, orphaned)), timeout=30, what="orphans to exit")
    finally:
        server.stop(signal.SIGKILL)


def test_a_listener_process_that_cannot_start_fails_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_gateway.admission import AssociationLimits
    from dicom_gateway.counters import PrometheusCounters
    from dicom_gateway.listener_pool import ListenerPool, ListenerStartError

    for key in [k for k in os.environ if k.startswith("RDC_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RDC_DATA_DIR", str(tmp_path / "data"))
    # The processes read these settings; with no S3 server named they cannot open the store.
    monkeypatch.setenv("RDC_STORAGE_BACKEND", "s3")
    pool = ListenerPool(
        ("127.0.0.1", 0),
        processes=PROCESSES,
        limits=AssociationLimits(total=4, per_ae=2, per_clinic=3),
        spool_dir=tmp_path / "spool",
        counters=PrometheusCounters(),
    )
    address = pool.address
    with pytest.raises(ListenerStartError, match="did not start"):
        pool.start()
    assert pool.listener_pids() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


def test_a_second_gateway_on_the_same_data_directory_keeps_the_first_ones_spools(
    pooled_server: RdcServer, processes_env: dict[str, str], tmp_path: Path
) -> None:
    """Spool directories belong to the processes that made them: a gateway starting on a
    data directory another gateway serves from removes only what dead processes left."""
    spool = object_store(pooled_server.env).spool_dir
    owners = _listener_pids(pooled_server)
    in_flight = [spool / f"listener-{pid}" / ".rx-receiving.dcm" for pid in owners]
    for path in in_flight:
        path.write_bytes(b"partial")
    # What a killed gateway left: a directory whose owner lock nobody holds, and one of an
    # older version (no owner file) whose process is gone.
    orphan = spool / "listener-999999999"
    orphan.mkdir()
    (orphan / ".owner").touch()
    (orphan / ".rx-cutoff.dcm").write_bytes(b"partial")

    second_env = {
        **processes_env,
        "RDC_HTTP_PORT": str(free_port()),
        "RDC_DICOM_PORT": str(free_port()),
        "RDC_MLLP_PORT": str(free_port()),
    }

    def _echo(port: int) -> int:
        assoc = _associate(port)
        assert assoc.is_established  # type: ignore[attr-defined]
        status = assoc.send_c_echo().Status  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        return int(status)

    with RdcServer(second_env, tmp_path / "second.log", "--role", "dicom") as second:
        assert _echo(second.dicom_port) == 0x0000
        assert all(path.exists() for path in in_flight)
        assert not orphan.exists()
        # The first gateway still receives into its own directories.
        assert _echo(pooled_server.dicom_port) == 0x0000
    assert all(path.exists() for path in in_flight)  # nor at the second one's stop


def test_index_answers_go_to_a_process_in_as_few_messages_as_fit() -> None:
    """The index writer's answers for one listener process travel together (one message per
    batch), split only where a message would pass the channel's size."""
    few = [(b"1", b"a" * 100), (b"2", b"b" * 100)]
    assert [decode_answers(m) for m in encode_answers(few)] == [few]
    many = [(str(n).encode(), bytes([n % 256]) * 4096) for n in range(200)]
    messages = encode_answers(many)
    assert len(messages) > 1
    assert all(len(m) <= MAX_MESSAGE for m in messages)
    assert [a for m in messages for a in decode_answers(m)] == many
