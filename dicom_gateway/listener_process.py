"""A DICOM listener process: serves the connections its parent hands it (see listener_pool).

Started by :class:`~dicom_gateway.listener_pool.ListenerPool` as
``python -m dicom_gateway.listener_process CHANNEL_FD``; it reads the same ``RDC_`` settings
as its parent, which has already brought the database up to date. The channel brings
connections and the answers to this process's requests for association slots. The process
exits when the channel closes: its parent stopped or died.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import threading

from dicom_gateway.admission import Applicant
from dicom_gateway.counters import ChannelCounters
from dicom_gateway.listener_pool import (
    ADMIT,
    ADMITTED,
    CONNECTION,
    DONE,
    INDEX,
    INDEXED,
    MAX_MESSAGE,
    READY,
    RELEASE,
    REMOTE_INDEX_ARG,
    decode_answers,
)
from dicom_gateway.server import StorageService, acceptor_config
from dicom_gateway.upper_layer import AcceptorConfig, serve_association
from rdc_core.errors import DatabaseUnavailableError
from rdc_core.logging import configure_logging
from rdc_core.settings import get_settings
from rdc_core.shutdown import exit_now
from rdc_core.storage import get_object_store

__all__ = ["main", "serve"]

log = logging.getLogger(__name__)

_ADMISSION_TIMEOUT = 10.0  # no answer from the parent by then: the association is refused
# No answer to an index request by then: the sender is told to retry (longer than SQLite's
# busy timeout, after which the writer answers itself).
_INDEX_TIMEOUT = 120.0


class _Channel:
    """This process's end of the channel: sends messages, asks for association slots."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[bool]]] = {}
        self._indexing: dict[bytes, tuple[threading.Event, list[bytes]]] = {}
        self._closed = False

    def send(self, message: bytes) -> None:
        with contextlib.suppress(OSError):  # a parent that went away needs no report
            self.sock.send(message)

    def ask_admission(self, applicant: Applicant) -> str | None:
        """Ask the parent for an association slot; the request's number if granted (to give
        the slot back with), else None."""
        number = str(next(self._numbers))
        answered, result = threading.Event(), [False]
        with self._lock:
            self._waiting[number] = (answered, result)
        ae = applicant.calling_ae.encode().hex()
        clinic = applicant.clinic.encode().hex()
        try:
            self.send(f"{ADMIT} {number} {ae} {clinic}".encode())
            if not answered.wait(_ADMISSION_TIMEOUT):
                log.error("no answer from the serving process about an association slot")
        finally:
            with self._lock:
                self._waiting.pop(number, None)
        return number if result[0] else None

    def release(self, number: str) -> None:
        """Give the slot granted to request ``number`` back."""
        self.send(f"{RELEASE} {number}".encode())

    def index(self, payload: bytes) -> bytes:
        """Send an index request to the serving process's index writer; its answer."""
        number = str(next(self._numbers)).encode()
        answered, answer = threading.Event(), list[bytes]()
        with self._lock:
            if self._closed:
                raise DatabaseUnavailableError("the serving process is gone")
            self._indexing[number] = (answered, answer)
        try:
            try:
                self.sock.send(b"%s %s %s" % (INDEX, number, payload))
            except OSError as exc:
                raise DatabaseUnavailableError(f"cannot reach the index writer: {exc}") from exc
            if not answered.wait(_INDEX_TIMEOUT) or not answer:
                raise DatabaseUnavailableError("no answer from the index writer")
            return answer[0]
        finally:
            with self._lock:
                self._indexing.pop(number, None)

    def close(self) -> None:
        """The channel closed: index requests waiting get no answer."""
        with self._lock:
            self._closed = True
            waiting = list(self._indexing.values())
        for answered, _answer in waiting:
            answered.set()

    def answer(self, message: bytes) -> None:
        """Deliver the parent's answer to an admission or index request."""
        if message.startswith(INDEXED + b" "):
            for index_number, payload in decode_answers(message):
                with self._lock:
                    indexing = self._indexing.get(index_number)
                if indexing is not None:
                    indexing[1].append(payload)
                    indexing[0].set()
            return
        verdict, _, number = message.decode(errors="replace").partition(" ")
        with self._lock:
            waiting = self._waiting.pop(number, None)
        if waiting is not None:
            waiting[1][0] = verdict == ADMITTED
            waiting[0].set()
        elif verdict == ADMITTED:  # too late: the association was refused; give the slot back
            self.release(number)


def _serve_connection(
    connection: socket.socket,
    *,
    channel: _Channel,
    config: AcceptorConfig,
    service: StorageService,
) -> None:
    admitted: str | None = None  # the number of the granted request

    def admit(applicant: Applicant) -> bool:
        nonlocal admitted
        admitted = channel.ask_admission(applicant)
        return admitted is not None

    def release() -> None:
        # At release, before the answer goes out, so a sender that reconnects at once finds
        # its slot free.
        nonlocal admitted
        if admitted is not None:
            channel.release(admitted)
            admitted = None

    try:
        serve_association(connection, config, service, admit=admit, on_release=release)
    except Exception:
        log.exception("DICOM connection failed")
    finally:
        connection.close()
        release()
        channel.send(DONE)


def serve(sock: socket.socket, *, remote_index: bool = False) -> None:
    """Serve connections received on ``sock`` until it closes; with ``remote_index``, index
    through the serving process's index writer."""
    settings = get_settings()
    store = get_object_store(settings)
    config = acceptor_config(settings, store)
    channel = _Channel(sock)
    service = StorageService(
        store=store,
        settings=settings,
        counters=ChannelCounters(channel.send),
        remote_index=channel.index if remote_index else None,
    )
    sock.send(READY)
    try:
        _receive(sock, channel, config, service)
    finally:
        channel.close()


def _receive(
    sock: socket.socket, channel: _Channel, config: AcceptorConfig, service: StorageService
) -> None:
    while True:
        message, fds, _flags, _address = socket.recv_fds(sock, MAX_MESSAGE, 1)
        if not message:
            return
        if message != CONNECTION:
            channel.answer(message)
            continue
        if not fds:  # the descriptor did not arrive (out of descriptors here)
            log.error("a connection arrived without its descriptor")
            channel.send(DONE)
            continue
        connection = socket.socket(fileno=fds[0])
        try:
            threading.Thread(
                target=_serve_connection,
                args=(connection,),
                kwargs={"channel": channel, "config": config, "service": service},
                name="rdc-dicom-association",
                daemon=True,
            ).start()
        except RuntimeError:  # cannot start a thread: drop this connection, not the process
            log.exception("cannot serve a connection")
            connection.close()
            channel.send(DONE)


def main(argv: list[str] | None = None) -> int:  # exits with 0 when its work is done
    """Entry point of a listener process: ``python -m dicom_gateway.listener_process FD``."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or not args[0].isdigit() or args[1:] not in ([], [REMOTE_INDEX_ARG]):
        print(
            f"usage: python -m dicom_gateway.listener_process CHANNEL_FD [{REMOTE_INDEX_ARG}]",
            file=sys.stderr,
        )
        return 2
    # The parent decides when this process stops (it runs in a session of its own, so this
    # is for a stray Ctrl-C sent to it directly).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    sock = socket.socket(fileno=int(args[0]))
    try:
        serve(sock, remote_index=args[1:] == [REMOTE_INDEX_ARG])
    except OSError as exc:
        log.info("DICOM listener process %d: channel closed (%s)", os.getpid(), exc)
    log.info("DICOM listener process %d: parent gone or stopping; exiting", os.getpid())
    exit_now(0)


if __name__ == "__main__":
    sys.exit(main())
