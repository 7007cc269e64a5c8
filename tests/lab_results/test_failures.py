"""Lab intake failures: a database outage answers AE (CE in enhanced mode), never AA, and
leaves nothing behind; an object store outage does not stop the intake (a message's bytes
are committed in its index row); kill -9 at any moment never loses an acknowledged
message."""

from __future__ import annotations

import random
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    RdcServer,
    Stack,
    StoreFault,
    ack_fields,
    lab_message_bytes,
    mllp_exchange,
)
from tests.helpers import seed_alliance as seed
from tests.lab_results.conftest import lab_env, postgres_database, register_facilities

GLUCOSE = "pythonhl7_oru_r01_glucose.hl7"
LRI = "msfhirconv_LRI_2.0-NG_CBC_Typ_Message.hl7"  # enhanced mode (MSH-15 AL)


@pytest.fixture(scope="module")
def lab_env_module(
    tmp_path_factory: pytest.TempPathFactory, stack: Stack
) -> Iterator[tuple[dict[str, str], Path]]:
    """A deployment's settings (clinics and facilities registered), not yet started."""
    workdir = tmp_path_factory.mktemp("lab-failures")
    database = postgres_database()
    try:
        env = lab_env(workdir, next(database))
        with stack.deployment() as backends:
            env.update(backends)
            seed(env)
            register_facilities(env)
            yield env, workdir
    finally:
        for _ in database:
            pass


def send(port: int, message: bytes) -> dict[str, list[str]]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        return ack_fields(mllp_exchange(sock, message))


def count_rows(server: RdcServer) -> int:
    with server.db() as db:
        row = db.execute("SELECT count(*) FROM lab_messages").fetchone()
    assert row is not None
    return int(row[0])


def test_a_database_outage_answers_ae_and_a_store_outage_does_not(
    lab_env_module: tuple[dict[str, str], Path], testdata: Path
) -> None:
    env, workdir = lab_env_module
    glucose = (testdata / "hl7" / GLUCOSE).read_bytes()
    lri = (testdata / "hl7" / LRI).read_bytes()
    fault = StoreFault(env, folder="hl7")
    # MLLP intake (the answers, lab_messages, the bytes kept), nothing a background task
    # does: no rdc worker and rdc beat on the production pass.
    server = RdcServer(fault.env, workdir / "outage.log", workers=False)
    server.start()
    try:
        with fault.failing():
            # The bytes go into the index row, in the transaction that takes the key: the
            # object store is not on the intake's path (processing writes it later).
            answer = send(server.mllp_port, glucose)
            assert answer["MSA"][1:3] == ["AA", "CNTRL-3456"]
            assert count_rows(server) == 1
            assert lab_message_bytes(server.env, "CNTRL-3456") == glucose

        with server.db() as db:
            db.fail_inserts("lab_messages")
        try:
            answer = send(server.mllp_port, lri)
            assert answer["MSA"][1] == "CE" and "index unavailable" in answer["ERR"][8]
            answer = send(server.mllp_port, glucose.replace(b"CNTRL-3456", b"MLLP-9"))
            assert answer["MSA"][1:3] == ["AE", "MLLP-9"]
            assert "index unavailable" in answer["MSA"][3]
            assert answer["ERR"][1].endswith("207&Application internal error&HL70357")
            over_http = server.client("tech_a", "pw-tech_a-123").post(
                "/api/v1/lab/messages",
                content=glucose.replace(b"CNTRL-3456", b"HTTP-9"),
                headers={"Content-Type": "text/plain"},
            )
            assert over_http.status_code == 503 and over_http.headers["retry-after"]
            assert ack_fields(over_http.content)["MSA"][1] == "AE"
            assert count_rows(server) == 1
        finally:
            with server.db() as db:
                db.restore_inserts("lab_messages")
        assert send(server.mllp_port, lri)["MSA"][1] == "CA"  # the sender's retry
        assert count_rows(server) == 2
    finally:
        server.stop()
        fault.close()


def test_kill_9_never_loses_an_acknowledged_message(
    lab_env_module: tuple[dict[str, str], Path], testdata: Path
) -> None:
    """Send on two connections; kill -9 the server at a random moment; restart; every
    message answered AA is indexed and its bytes are readable (from its row, or from the
    object store once processed). Two rounds."""
    env, workdir = lab_env_module
    template = (testdata / "hl7" / GLUCOSE).read_bytes()
    # MLLP intake (the answers, lab_messages, the stored bytes), nothing a background task
    # does: no rdc worker and rdc beat on the production pass.
    server = RdcServer(env, workdir / "kill.log", workers=False)
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    rng = random.Random(19)

    def sender(prefix: str, stop: threading.Event) -> None:
        try:
            with socket.create_connection(("127.0.0.1", server.mllp_port), timeout=30) as sock:
                n = 0
                while not stop.is_set():
                    n += 1
                    control_id = f"{prefix}-{n}"
                    message = template.replace(b"CNTRL-3456", control_id.encode())
                    answer = ack_fields(mllp_exchange(sock, message))
                    if answer["MSA"][1] == "AA":
                        assert answer["MSA"][2] == control_id
                        with lock:
                            acknowledged[control_id] = message
        except (OSError, ConnectionError):
            return  # the server died under us

    for round_ in range(2):
        server.start()
        stop = threading.Event()
        threads = [threading.Thread(target=sender, args=(f"K{round_}{c}", stop)) for c in "ab"]
        for thread in threads:
            thread.start()
        threading.Event().wait(rng.uniform(0.5, 2.0))
        server.stop(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    server.start()
    try:
        assert len(acknowledged) > 10, "too few messages were acknowledged to test anything"
        with server.db() as db:
            rows = {row[0] for row in db.execute("SELECT control_id FROM lab_messages")}
        missing = sorted(set(acknowledged) - rows)
        assert not missing, f"acknowledged but not indexed: {missing}"
        for control_id, message in acknowledged.items():
            assert lab_message_bytes(env, control_id) == message
    finally:
        server.stop()
