"""The MLLP listener's framing and connection handling, in-process over real sockets: answers
in order to frames sent together or in pieces, framing errors that close only their
connection (after answering the frames before them), idle connections closed, and a peer
that does not read its answers holding up nobody. The messages are refused before any
database work (an unsupported type), so no database is needed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lab_results.intake import (
    AcceptedRound,
    Acknowledgement,
    LabIntake,
    intake_idle_seconds,
)
from lab_results.mllp import MllpListener
from rdc_core.settings import Settings
from rdc_core.storage import LocalObjectStore
from tests.helpers import ack_fields, mllp_exchange, mllp_read_answers

LIMIT = 4096
IDLE = 1.5


def adt(control_id: str) -> bytes:
    """A message the intake refuses at once (AR, unsupported type) with its MSH-10."""
    return (
        f"MSH|^~\\&|HIS|CLINIC|RDC|LEAD|20261205090000||ADT^A01|{control_id}|P|2.5.1\r"
        "PID|1||P-1^^^CLINIC^MR||WANG^WU\r"
    ).encode()


def frame(message: bytes) -> bytes:
    return b"\x0b" + message + b"\x1c\x0d"


def read_answers(sock: socket.socket, count: int) -> list[str]:
    """MSA-2 of the next ``count`` answers on ``sock``."""
    return [ack_fields(answer)["MSA"][2] for answer in mllp_read_answers(sock, count)]


def closed(sock: socket.socket) -> bool:
    sock.settimeout(30)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


@contextmanager
def running_listener(tmp_path: Path, *, idle: float) -> Iterator[tuple[str, int]]:
    settings = Settings(
        data_dir=tmp_path,
        mllp_host="127.0.0.1",
        mllp_port=0,
        mllp_network_timeout_seconds=idle,
        mllp_max_message_bytes=LIMIT,
    )
    mllp = MllpListener(settings=settings, store=LocalObjectStore(tmp_path / "objects"))
    mllp.start()
    try:
        yield mllp.address
    finally:
        mllp.stop()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, int]]:
    with running_listener(tmp_path, idle=IDLE) as address:
        yield address


def test_frames_sent_together_or_in_pieces_are_answered_in_order(
    listener: tuple[str, int],
) -> None:
    with socket.create_connection(listener, timeout=30) as sock:
        # Five frames in one write, blank bytes between two of them.
        ids = [f"P-{n}" for n in range(5)]
        sock.sendall(
            b"".join(frame(adt(i)) + (b"\r\n" if n == 2 else b"") for n, i in enumerate(ids))
        )
        assert read_answers(sock, 5) == ids
        # One frame a few bytes at a time.
        data = frame(adt("PIECES-1"))
        for start in range(0, len(data), 7):
            sock.sendall(data[start : start + 7])
            time.sleep(0.01)
        assert read_answers(sock, 1) == ["PIECES-1"]
        answer = ack_fields(mllp_exchange(sock, adt("AFTER-1")))
        assert answer["MSA"][1:3] == ["AR", "AFTER-1"]
        assert "unsupported message type" in answer["MSA"][3]


def test_a_framing_error_closes_its_connection_after_the_frames_before_it(
    listener: tuple[str, int],
) -> None:
    with (
        socket.create_connection(listener, timeout=30) as other,
        socket.create_connection(listener, timeout=30) as bad,
    ):
        bad.sendall(frame(adt("BEFORE-1")) + b"MSH|not framed\r")
        assert read_answers(bad, 1) == ["BEFORE-1"]
        assert closed(bad)
        assert ack_fields(mllp_exchange(other, adt("OTHER-1")))["MSA"][2] == "OTHER-1"
    for error in (
        b"\x0b" + b"A" * (LIMIT + 10),  # longer than the limit, no end block yet
        b"\x0bMSH|first\r\x0bMSH|second\r\x1c\x0d",  # a start block inside a frame
    ):
        with socket.create_connection(listener, timeout=30) as sock:
            sock.sendall(error)
            assert closed(sock)


def test_an_idle_connection_is_closed(listener: tuple[str, int]) -> None:
    with (
        socket.create_connection(listener, timeout=30) as idle,
        socket.create_connection(listener, timeout=30) as busy,
    ):
        began = time.monotonic()
        while time.monotonic() - began < 2 * IDLE:
            assert ack_fields(mllp_exchange(busy, adt("BUSY")))["MSA"][2] == "BUSY"
            time.sleep(IDLE / 4)
        assert closed(idle)
        assert ack_fields(mllp_exchange(busy, adt("STILL-1")))["MSA"][2] == "STILL-1"


def test_a_peer_that_does_not_read_holds_up_nobody(tmp_path: Path) -> None:
    """A peer sends many messages without reading the answers (its receive buffer small):
    more answers than the sockets' buffers hold. The listener keeps what the socket does not
    take, stops reading that peer meanwhile, and serves the others; the peer gets every
    answer, in order, once it reads. (A listener of its own: the silent peer must not be
    closed as idle while the others are served on a slow machine.)"""
    with running_listener(tmp_path, idle=300) as listener:
        _peer_that_does_not_read(listener)


def _peer_that_does_not_read(listener: tuple[str, int]) -> None:
    count = 20000
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(listener)
    ids = [f"S-{n}" for n in range(count)]
    # From a thread: the listener stops reading this peer while its answers wait, so the
    # sending blocks until the test reads them.
    sender = threading.Thread(target=slow.sendall, args=(b"".join(frame(adt(i)) for i in ids),))
    with slow, socket.create_connection(listener, timeout=30) as other:
        sender.start()
        for n in range(5):
            answer = ack_fields(mllp_exchange(other, adt(f"OTHER-{n}")))
            assert answer["MSA"][2] == f"OTHER-{n}"
            time.sleep(0.2)
        slow.settimeout(60)
        assert read_answers(slow, count) == ids
        sender.join(30)
        assert not sender.is_alive()


def test_a_sender_that_closes_its_side_still_gets_its_answers(
    listener: tuple[str, int],
) -> None:
    """A sender that writes its messages and then shuts down its sending side
    (``SHUT_WR``) gets every answer before the listener closes the connection; so does one
    whose frames end in a framing error. The answers are given by the syncer while the loop
    already sees the end of the stream."""
    for n in range(30):
        with socket.create_connection(listener, timeout=30) as sock:
            ids = [f"H-{n}-{k}" for k in range(2)]
            sock.sendall(b"".join(frame(adt(i)) for i in ids))
            sock.shutdown(socket.SHUT_WR)
            assert read_answers(sock, 2) == ids
            assert closed(sock)
    for n in range(10):
        with socket.create_connection(listener, timeout=30) as sock:
            sock.sendall(frame(adt(f"A-{n}")))
            sock.sendall(frame(adt(f"B-{n}")) + b"garbage\r")
            assert read_answers(sock, 2) == [f"A-{n}", f"B-{n}"]
            assert closed(sock)


def test_a_round_that_fails_closes_only_its_connections_and_leaves_the_intake_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect while answering one round (here: finishing it raises) closes the connection
    whose frame it held, unanswered; the rounds synced with it are answered, and every round
    is finished, so the intake does not count as busy forever (processing would wait on it).
    The first round's sync is slowed down so that the next two are taken together."""
    original_finish = LabIntake._finish
    original_accept = LabIntake.accept_many

    def finish(intake: LabIntake, round_: AcceptedRound, durable: OSError | None) -> Any:
        if any(isinstance(s, Acknowledgement) and s.control_id == "FAIL-1" for s in round_.slots):
            raise RuntimeError("a defect")
        return original_finish(intake, round_, durable)

    def accept_many(intake: LabIntake, raws: Sequence[bytes], **kwargs: Any) -> AcceptedRound:
        round_ = original_accept(intake, raws, **kwargs)
        if any(b"|SLOW-1|" in raw for raw in raws):
            round_.sync = lambda: time.sleep(0.5)  # a slow disk
        return round_

    monkeypatch.setattr(LabIntake, "_finish", finish)
    monkeypatch.setattr(LabIntake, "accept_many", accept_many)
    with (
        running_listener(tmp_path, idle=300) as listener,
        socket.create_connection(listener, timeout=30) as slow,
        socket.create_connection(listener, timeout=30) as bad,
        socket.create_connection(listener, timeout=30) as good,
    ):
        slow.sendall(frame(adt("SLOW-1")))
        time.sleep(0.1)  # its round is being synced
        bad.sendall(frame(adt("FAIL-1")))
        time.sleep(0.05)
        good.sendall(frame(adt("GOOD-1")))
        assert read_answers(slow, 1) == ["SLOW-1"]
        assert read_answers(good, 1) == ["GOOD-1"]
        assert closed(bad)
        deadline = time.monotonic() + 30
        while intake_idle_seconds() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert intake_idle_seconds() > 0
