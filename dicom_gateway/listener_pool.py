"""DICOM listener processes: one Python interpreter lock is one core, so ingest runs in several.

With ``RDC_DICOM_PROCESSES`` = N > 1 the serving process keeps the listening socket, accepts
each connection and passes it (``SCM_RIGHTS`` on a Unix socket pair) to the listener
process serving the fewest connections; that process receives, stores and indexes, and
answers the sender. Why the parent hands connections out rather than letting every process
accept on a shared socket: whichever process wakes first would take the connection, so four
modalities connecting at once often landed three on one process and one on the other.

The association limits (``RDC_DICOM_MAX_ASSOCIATIONS``, and per calling AE title and per
clinic, :mod:`dicom_gateway.admission`) hold for the gateway as a whole, as in one process:
when a peer requests an association, its listener process asks the parent for a slot (``admit
N AE CLINIC``, both hex-encoded) and waits for the answer (``admitted N`` or ``refused N``),
and gives the slot back at release (``release N``). A connection that never requests an
association takes no slot.

On SQLite (one writer per database) the listener processes do not write the index
themselves: each sends its prepared instances (``index N PAYLOAD``) to the serving process's
one index writer (:class:`dicom_gateway.server.IndexWriter`), which batches the instances of
every process into one transaction. Once it committed, the answers waiting for a process go
to it in one message (``indexed PAYLOAD``, a list of request numbers and answers), sent by a
thread of the pool: the writer does no system call per answer, and a process is woken once
per batch rather than once per instance. On PostgreSQL each process writes, and the
database takes the writers side by side.

A listener process also reports ``ready`` once it can serve, ``done`` when a connection
ends, and its ingest counts (:class:`~dicom_gateway.counters.ChannelCounters`), which the
parent adds to its own Prometheus counters (the objects the index writer indexed are counted
by the writer: no message per object). A process that dies is started again (after a
pause growing to 30 s if it keeps dying young), its partial receptions are deleted, and its
connections and slots are no longer counted; senders whose objects were not answered send
them again. Connections go only to processes that have reported ready. Each process runs in
a session of its own, so a signal to the serving process's group (Ctrl-C) reaches only the
serving process, which stops them; they also exit when their channel closes because the
serving process died.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicom_gateway.admission import Applicant, AssociationLimits, SlotBook
from dicom_gateway.counters import IngestCounters, apply_report
from dicom_gateway.spool import remove_abandoned_spools
from rdc_core.metrics import DICOM_CONNECTIONS

__all__ = ["ListenerPool", "ListenerStartError"]

log = logging.getLogger(__name__)

# What the parent sends: a connection (with its descriptor), and answers to admission requests.
CONNECTION = b"connection"
ADMITTED, REFUSED = "admitted", "refused"
# What a listener process sends besides its counts.
READY, DONE = b"ready", b"done"
ADMIT, RELEASE = "admit", "release"
# Index requests of listener processes to the serving process's one index writer, and its
# answers: ``index N PAYLOAD`` and ``indexed ANSWERS`` (see dicom_gateway.server.IndexWriter
# and encode_answers).
INDEX, INDEXED = b"index", b"indexed"
REMOTE_INDEX_ARG = "remote-index"  # the listener process's argument: index through the parent
# The largest message on a channel (an index request carries one object's header).
MAX_MESSAGE = 256 * 1024
# Answers an index request (the payload) by calling ``reply`` with the answer's payload.
IndexHandler = Callable[[bytes, Callable[[bytes], None]], None]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
_YOUNG_DEATH = 10.0  # a process that dies sooner than this is restarted after a pause
_MAX_RESTART_PAUSE = 30.0


def encode_answers(answers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """``indexed`` messages carrying ``answers`` (request number, answer), as few as fit."""
    messages, chunk, size = [], list[tuple[bytes, bytes]](), 0
    for number, answer in answers:
        if chunk and size + len(number) + len(answer) > MAX_MESSAGE // 2:
            messages.append(INDEXED + b" " + pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
            chunk, size = [], 0
        chunk.append((number, answer))
        size += len(number) + len(answer) + 16
    if chunk:
        messages.append(INDEXED + b" " + pickle.dumps(chunk, pickle.HIGHEST_PROTOCOL))
    return messages


def decode_answers(message: bytes) -> list[tuple[bytes, bytes]]:
    """The (request number, answer) pairs of an ``indexed`` message."""
    answers: list[tuple[bytes, bytes]] = pickle.loads(message[len(INDEXED) + 1 :])
    return answers


class ListenerStartError(RuntimeError):
    """A listener process did not start (it exited, or did not report ready in time)."""


@dataclass(eq=False)
class _Listener:
    index: int
    process: subprocess.Popen[bytes]
    channel: socket.socket
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)
    alive: bool = True
    connections: int = 0  # handed to it and not yet done
    # Admitted and not yet released, by the process's request number.
    associations: dict[str, Applicant] = field(default_factory=dict)
    # Answers of the index writer not yet sent: (request number, answer).
    outbox: list[tuple[bytes, bytes]] = field(default_factory=list)


class _Acceptor(socketserver.TCPServer):
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], pool: ListenerPool) -> None:
        super().__init__(address, socketserver.BaseRequestHandler)
        self.pool = pool

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        # Only close: shutting the connection down would end it for the listener process too.
        try:
            self.pool.hand_over(request)
        finally:
            self.close_request(request)


class ListenerPool:
    """Accepts DICOM connections and hands them to ``processes`` listener processes."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        processes: int,
        limits: AssociationLimits,
        spool_dir: Path,
        counters: IngestCounters,
        on_index: IndexHandler | None = None,
    ) -> None:
        self.processes = processes
        # The serving process's index writer: the listener processes send it their index
        # work (one writer batching every process's instances) instead of writing themselves.
        self.on_index = on_index
        self.slots = SlotBook(limits)
        self.spool_dir = spool_dir
        self.counters = counters
        self._lock = threading.Lock()
        self._listeners: list[_Listener] = []
        self._next = 0  # where the search for the least busy process starts (round robin)
        self._stopping = threading.Event()
        self._serving = False  # set once every process has started; then the dead are replaced
        self._young_deaths: dict[int, int] = {}  # by index: deaths in a row soon after start
        self._threads: list[threading.Thread] = []
        self._answers_waiting = threading.Event()  # some listener's outbox has answers
        self._answerer: threading.Thread | None = None
        self._acceptor = _Acceptor(address, self)
        self._accept_thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The host and port connections are accepted on."""
        host, port = self._acceptor.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Start the listener processes, wait until each can serve, then accept connections."""
        try:
            for index in range(self.processes):
                self._spawn(index)
            deadline = time.monotonic() + _START_TIMEOUT
            for listener in list(self._listeners):
                while not listener.ready.wait(0.1):
                    status = listener.process.poll()
                    if status is not None or time.monotonic() > deadline:
                        raise ListenerStartError(
                            f"DICOM listener process {listener.index} did not start "
                            f"(exit status {status}); see its log above"
                        )
            with self._lock:
                self._serving = True
                dead = [item.index for item in self._listeners if not item.alive]
            if dead:  # ready, then gone before the pool was up: _ended did not replace it
                raise ListenerStartError(f"DICOM listener process {dead[0]} exited at start")
        except BaseException:
            self.stop()
            raise
        if self.on_index is not None:
            self._answerer = threading.Thread(
                target=self._send_answers, name="rdc-dicom-answers", daemon=True
            )
            self._answerer.start()
        self._accept_thread = threading.Thread(  # short poll: stop() waits for it to notice
            target=self._acceptor.serve_forever, args=(0.05,), name="rdc-dicom-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self) -> None:
        """Stop accepting, end every listener process, and close the listening socket."""
        with self._lock:
            self._stopping.set()
            listeners = list(self._listeners)
        if self._accept_thread is not None:
            self._acceptor.shutdown()
            self._accept_thread.join(timeout=_STOP_TIMEOUT)
            self._accept_thread = None
        self._acceptor.server_close()
        self._answers_waiting.set()  # the answer thread sees the pool stopping and ends
        if self._answerer is not None:
            self._answerer.join(timeout=_STOP_TIMEOUT)
            self._answerer = None
        for listener in listeners:
            # Wakes this side's reader and tells the process to exit.
            with contextlib.suppress(OSError):
                listener.channel.shutdown(socket.SHUT_RDWR)
        for listener in listeners:
            try:
                listener.process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pid = listener.process.pid
                log.warning("DICOM listener process %d did not exit; killing it", pid)
                listener.process.kill()
                listener.process.wait()
        for thread in list(self._threads):
            thread.join(timeout=_STOP_TIMEOUT)

    def listener_pids(self) -> list[int]:
        """Process IDs of the listener processes alive now (for operators and tests)."""
        with self._lock:
            return [item.process.pid for item in self._listeners if item.alive]

    # -- handing connections out ------------------------------------------------------------

    def hand_over(self, connection: socket.socket) -> None:
        """Pass ``connection`` to the least busy listener process (the caller closes its copy)."""
        tried: set[int] = set()
        while True:
            with self._lock:
                candidates = [
                    item
                    for item in self._listeners
                    if item.alive and item.ready.is_set() and item.index not in tried
                ]
                if not candidates:
                    break
                fewest = min(item.connections for item in candidates)
                listener = min(
                    (item for item in candidates if item.connections == fewest),
                    key=lambda item: (item.index - self._next) % self.processes,
                )
                self._next = listener.index + 1
                listener.connections += 1
            try:
                socket.send_fds(listener.channel, [CONNECTION], [connection.fileno()])
                DICOM_CONNECTIONS.labels(process=str(listener.index)).inc()
                return
            except OSError as exc:
                log.warning("DICOM listener process %d unreachable: %s", listener.process.pid, exc)
                tried.add(listener.index)
                with self._lock:
                    listener.connections -= 1
        log.error("no DICOM listener process can take a connection; closing it unanswered")

    def _admit(self, listener: _Listener, request: str) -> None:
        number, ae_hex, clinic_hex = request.split(" ")
        applicant = Applicant(
            bytes.fromhex(ae_hex).decode("utf-8", "replace"),
            bytes.fromhex(clinic_hex).decode("utf-8", "replace"),
        )
        with self._lock:
            granted = listener.alive and self.slots.take(applicant)
            if granted:
                listener.associations[number] = applicant
        answer = ADMITTED if granted else REFUSED
        try:
            listener.channel.send(f"{answer} {number}".encode())
        except OSError:  # not told, so it will not give the slot back
            if granted:
                self._release(listener, number)

    def _release(self, listener: _Listener, number: str) -> None:
        with self._lock:
            applicant = listener.associations.pop(number, None)
            if applicant is not None:
                self.slots.give_back(applicant)

    # -- the processes ----------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A process too busy to take a connection within this is passed over (sends only).
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
        for end in (ours, theirs):  # room for index requests and answers
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_MESSAGE)
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicom_gateway.listener_process",
                    str(theirs.fileno()),
                    *([REMOTE_INDEX_ARG] if self.on_index is not None else []),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        listener = _Listener(index=index, process=process, channel=ours)
        with self._lock:
            stopping = self._stopping.is_set()
            if not stopping:
                self._listeners = [item for item in self._listeners if item.index != index]
                self._listeners.append(listener)
        if stopping:  # stop() has already ended the others; this one exits as its channel closes
            ours.close()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return
        thread = threading.Thread(
            target=self._read, args=(listener,), name=f"rdc-dicom-listener-{index}", daemon=True
        )
        self._threads = [item for item in self._threads if item.is_alive()]
        self._threads.append(thread)
        thread.start()
        log.info("DICOM listener process %d started (pid %d)", index, process.pid)

    def _read(self, listener: _Listener) -> None:
        try:
            deadline = listener.started + _START_TIMEOUT
            listener.channel.settimeout(_START_TIMEOUT)
            while True:
                try:
                    message = listener.channel.recv(MAX_MESSAGE)
                except TimeoutError:
                    if listener.ready.is_set():
                        continue
                    if time.monotonic() < deadline:
                        continue
                    log.error("DICOM listener process %d did not start; killing it", listener.index)
                    listener.process.kill()
                    continue
                except OSError:
                    return
                if not message:
                    return
                try:
                    self._handle(listener, message)
                except Exception:
                    log.exception("DICOM listener process %d sent %r", listener.index, message[:64])
        finally:
            self._ended(listener)

    def _handle(self, listener: _Listener, message: bytes) -> None:
        if message.startswith(INDEX + b" ") and self.on_index is not None:
            number, _, payload = message[len(INDEX) + 1 :].partition(b" ")

            def reply(answer: bytes) -> None:
                # Sent by the answer thread, with the other answers waiting for this process.
                with self._lock:
                    listener.outbox.append((number, answer))
                self._answers_waiting.set()

            self.on_index(payload, reply)
        elif message == DONE:
            with self._lock:
                listener.connections -= 1
        elif message.startswith(RELEASE.encode() + b" "):
            self._release(listener, message.decode().split(" ", 1)[1])
        elif message.startswith(ADMIT.encode() + b" "):
            self._admit(listener, message.decode().split(" ", 1)[1])
        elif message == READY:
            listener.channel.settimeout(None)
            listener.ready.set()
            log.info(
                "DICOM listener process %d ready (pid %d)", listener.index, listener.process.pid
            )
        elif not apply_report(self.counters, message):
            log.warning("DICOM listener process %d sent %r", listener.index, message[:64])

    def _send_answers(self) -> None:
        """The answer thread: sends each listener process the index answers waiting for it."""
        while True:
            self._answers_waiting.wait()
            self._answers_waiting.clear()
            with self._lock:
                if self._stopping.is_set():
                    return
                waiting = [(item, item.outbox) for item in self._listeners if item.outbox]
                for item, _answers in waiting:
                    item.outbox = []
            for listener, answers in waiting:
                try:
                    for message in encode_answers(answers):
                        listener.channel.send(message)
                except OSError:  # gone: its senders were never answered
                    continue

    def _ended(self, listener: _Listener) -> None:
        with self._lock:
            listener.alive = False
            listener.connections = 0
            for applicant in listener.associations.values():
                self.slots.give_back(applicant)
            listener.associations.clear()
        status = listener.process.wait()
        listener.channel.close()
        self._remove_partial_files(listener.process.pid)
        with self._lock:
            if self._stopping.is_set() or not self._serving:
                return  # stopping, or start() reports the failure
        lived = time.monotonic() - listener.started
        log.error(
            "DICOM listener process %d (pid %d) exited with status %s after %.0f s; restarting it",
            listener.index,
            listener.process.pid,
            status,
            lived,
        )
        died_young = lived < _YOUNG_DEATH or not listener.ready.is_set()
        young = self._young_deaths.get(listener.index, 0) + 1 if died_young else 0
        self._young_deaths[listener.index] = young
        pause = min(_MAX_RESTART_PAUSE, 2.0 ** (young - 1)) if young else 0.0
        while not self._stopping.wait(pause):
            try:
                self._spawn(listener.index)
                return
            except Exception:
                log.exception("could not restart DICOM listener process %d", listener.index)
                pause = min(_MAX_RESTART_PAUSE, max(1.0, pause * 2))

    def _remove_partial_files(self, pid: int) -> None:
        remove_abandoned_spools(self.spool_dir, pid=pid)
