"""The MLLP listener: HL7 v2 lab messages over TCP (``RDC_MLLP_HOST``:``RDC_MLLP_PORT``).

Framing (MLLP release 1): ``0x0B`` message ``0x1C 0x0D``; the answer is framed the same way.

One thread serves every connection (a ``selectors`` loop over non-blocking sockets). Each
round it reads what the ready connections sent and hands all the messages that are complete
to the intake at once (:meth:`LabIntake.accept_many`: checked, and their index rows
committed in one transaction), then goes on to the next round. A second thread, the
syncer, makes the rounds committed meanwhile durable with one sync of the database's WAL
and only then sends their answers, in order: the disk's sync of one round overlaps the
checks and the commit of the next (a pipelined group commit; bench/README.md, MLLP, has
the figures). A thread per connection was measured slower: its threads contend for the
interpreter lock and SQLite's writer gate once per message. An answer a peer does not read
is kept for it, and that connection is not read again until its answer went out.
python-hl7's ``hl7.mllp`` offers asyncio streams, whose per-message coroutines and tasks
would cost more than the framing (a few lines) read here.

A bad message gets AE/AR and the connection stays open; a framing error (bytes outside a
frame, a start block inside a frame, a frame over ``RDC_MLLP_MAX_MESSAGE_BYTES``) closes
that connection only, as does ``RDC_MLLP_NETWORK_TIMEOUT_SECONDS`` without data. Blank
lines between frames are tolerated.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import selectors
import socket
import threading
import time

from lab_results.intake import AcceptedRound, LabIntake
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore

__all__ = ["FramingError", "MllpListener", "read_frames"]

log = logging.getLogger(__name__)

START_BLOCK = 0x0B
END_BLOCK = b"\x1c\x0d"
_BETWEEN_FRAMES = b" \t\r\n\x00"
_RECV = 1 << 16
_TICK = 1.0  # seconds between the loop's checks for idle connections
_CLOSE_GRACE = 5.0  # seconds a closing connection is given to read its last answers


class FramingError(Exception):
    """The byte stream is not MLLP; the connection is closed."""


def read_frames(buffer: bytearray, *, limit: int) -> tuple[list[bytes], FramingError | None]:
    """Take the complete frames off the front of ``buffer`` (what a connection sent and
    was not read yet), leaving a partial frame in it; blank bytes between frames are
    dropped. Returns the frames, and the error that ended the reading when the bytes after
    them are not MLLP (the connection is then closed once they are answered)."""
    frames: list[bytes] = []
    try:
        _take_frames(buffer, limit, frames)
    except FramingError as exc:
        return frames, exc
    return frames, None


def _take_frames(buffer: bytearray, limit: int, frames: list[bytes]) -> None:
    while buffer:
        if buffer[0] != START_BLOCK:
            stripped = buffer.lstrip(_BETWEEN_FRAMES)
            if not stripped:
                buffer.clear()
                break
            if stripped[0] != START_BLOCK:
                raise FramingError(f"expected a start block (0x0B), got {bytes(stripped[:16])!r}")
            buffer[:] = stripped
        end = buffer.find(END_BLOCK, 1)
        inner_start = buffer.find(b"\x0b", 1, end if end >= 0 else len(buffer))
        if inner_start >= 0:
            raise FramingError("a start block inside a frame (no end block before it)")
        if end < 0:
            if len(buffer) > limit + 2:
                raise FramingError(f"a frame longer than {limit} bytes")
            break
        if end - 1 > limit:
            raise FramingError(f"a frame longer than {limit} bytes")
        frames.append(bytes(buffer[1:end]))
        del buffer[: end + len(END_BLOCK)]


class _Connection:
    """One peer's socket, what it sent that is not a whole frame yet, and the answers it
    has not read yet."""

    __slots__ = (
        "answered",
        "buffer",
        "close_by",
        "close_level",
        "closing",
        "failed",
        "last_heard",
        "outbox",
        "peer",
        "received",
        "sock",
    )

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer
        self.buffer = bytearray()
        self.outbox = bytearray()
        self.last_heard = time.monotonic()
        # Frames read (written by the loop only) and answered (by the syncer only): while
        # they differ, answers are on their way and the connection is not closed yet.
        self.received = 0
        self.answered = 0
        self.closing = ""  # why it is closed once its answers went out
        self.close_level = logging.WARNING
        self.close_by = 0.0  # when a closing peer that does not read its answers is dropped
        self.failed = False  # a round of its frames failed: later answers are not sent


_Round = AcceptedRound | list[bytes] | None
_Queued = tuple[_Round, list[tuple[_Connection, bytes]]]


class MllpListener:
    """Accepts MLLP connections and answers each framed message with its acknowledgement."""

    def __init__(self, *, settings: Settings, store: ObjectStore) -> None:
        self.settings = settings
        self.intake = LabIntake(store=store, zone=settings.zone)
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._connections: dict[socket.socket, _Connection] = {}
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Rounds committed, for the syncer: the round (or, for a round of HL7 batches, the
        # answers already durable; None: a round that failed) and its (connection, frame)
        # pairs, oldest first.
        self._rounds: collections.deque[_Queued] = collections.deque()
        self._rounds_ready = threading.Condition()
        self._syncer: threading.Thread | None = None
        self._syncer_stop = False
        # Held by whoever touches a connection's outbox or socket while both threads run.
        self._send_lock = threading.Lock()
        self._to_close: list[_Connection] = []  # answered, then to close (by the loop)
        self._want_write: list[_Connection] = []  # answers left over: wait to send them

    def start(self) -> None:
        """Listen on the configured host and port (port 0: pick a free one)."""
        address = (self.settings.mllp_host, self.settings.mllp_port)
        listener = socket.create_server(address, reuse_port=False, backlog=64)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)
        self._wake_read.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._syncer = threading.Thread(target=self._sync_rounds, name="mllp-sync", daemon=True)
        self._syncer.start()
        self._thread = threading.Thread(target=self._loop, name="mllp", daemon=True)
        self._thread.start()
        log.info("MLLP listener on %s:%d", *self.address)

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return host, port

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for the listener's thread (a
        round in progress answers its messages first)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        next_check = time.monotonic() + _TICK
        try:
            while not self._stopping.is_set():
                ready: list[tuple[_Connection, bytes]] = []
                for key, events in self._selector.select(timeout=_TICK):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_read:
                        with contextlib.suppress(OSError):
                            self._wake_read.recv(4096)
                        self._after_sends()
                    else:
                        conn = self._connections.get(key.fileobj)  # type: ignore[call-overload]
                        if conn is not None:
                            self._service(conn, events, ready)
                if ready:
                    try:
                        self._answer(ready)
                    except Exception:  # the intake answers failures itself: a defect
                        log.exception("MLLP: a round of %d messages failed", len(ready))
                        # Unanswered (their senders send again): the syncer closes their
                        # connections once the answers before them went out.
                        self._queue(None, ready)
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + _TICK
                    self._close_idle(now)
        except Exception:
            log.exception("MLLP listener failed; it no longer accepts connections")
        finally:
            self._stop_syncer()  # the rounds committed are answered first
            self._after_sends()
            self._close_all()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of descriptors: try again next round
                log.warning("MLLP accept failed: %s", exc)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = _Connection(sock, peer)
            self._connections[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ)

    def _service(
        self, conn: _Connection, events: int, ready: list[tuple[_Connection, bytes]]
    ) -> None:
        """Write what ``conn`` has waiting, read what it sent; its whole frames go to
        ``ready``."""
        if events & selectors.EVENT_WRITE and not self._flush(conn):
            return
        if not events & selectors.EVENT_READ:
            return
        try:
            chunk = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(conn, f"ended: {exc}", level=logging.INFO)
            return
        if not chunk:
            if conn.buffer.strip(_BETWEEN_FRAMES):
                self._end(conn, "closed: connection closed inside a frame")
            else:
                self._end(conn, "", level=logging.DEBUG)  # orderly close between frames
            return
        conn.last_heard = time.monotonic()
        buffer = conn.buffer
        limit = self.settings.mllp_max_message_bytes
        end = len(chunk) - 2
        if (
            not buffer
            and end >= 1
            and chunk[0] == START_BLOCK
            and chunk.find(END_BLOCK, 1) == end
            and chunk.find(b"\x0b", 1) < 0
            and end - 1 <= limit
        ):
            # The usual case: one read brings exactly one whole frame (the sender waits for
            # each answer), taken as it is without going through the buffer.
            ready.append((conn, chunk[1:end]))
            conn.received += 1
            return
        buffer += chunk
        frames, error = read_frames(buffer, limit=limit)
        ready.extend((conn, frame) for frame in frames)
        conn.received += len(frames)
        if error is not None:
            # Closed once the frames before the error are answered; not read again.
            self._end(conn, f"closed: {error}")

    def _answer(self, ready: list[tuple[_Connection, bytes]]) -> None:
        """Commit the round's messages (one transaction for all of them) and pass the round
        to the syncer, which answers them once the commit is durable."""
        frames = [frame for _, frame in ready]
        round_: AcceptedRound | list[bytes]
        if any(b"BHS" in frame or b"FHS" in frame for frame in frames):
            # Perhaps an HL7 batch (FHS/BHS): each message of the round on its own, durable
            # on return; through the syncer all the same, so that answers keep their order.
            round_ = [self.intake.receive_body(f, channel="mllp")[0] for f in frames]
        else:
            round_ = self.intake.accept_many(frames, channel="mllp")
        self._queue(round_, ready)

    def _queue(self, round_: _Round, ready: list[tuple[_Connection, bytes]]) -> None:
        """Pass a round to the syncer (None: it failed, its messages are not answered)."""
        with self._rounds_ready:
            self._rounds.append((round_, ready))
            self._rounds_ready.notify()

    def _end(self, conn: _Connection, why: str, *, level: int = logging.WARNING) -> None:
        """Close ``conn`` once the answers to every frame read from it went out (the syncer
        hands it back when the last arrives); it is not read again."""
        with self._send_lock:
            if not conn.closing:
                conn.closing, conn.close_level = why, level
            waiting = conn.received != conn.answered
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        if not waiting:
            self._close_when_sent(conn)

    def _close_when_sent(self, conn: _Connection) -> None:
        """Close a closing connection now if its answers went out; else wait (without
        holding anyone up) for the peer to read them, up to ``_CLOSE_GRACE``."""
        with self._send_lock:
            left = not self._send_some(conn)
        if not left:
            self._close(conn, conn.closing, level=conn.close_level)
            return
        conn.close_by = time.monotonic() + _CLOSE_GRACE
        self._watch(conn, selectors.EVENT_WRITE)

    def _watch(self, conn: _Connection, events: int) -> None:
        try:
            if self._selector.get_key(conn.sock).events != events:
                self._selector.modify(conn.sock, events)
        except KeyError:
            self._selector.register(conn.sock, events)

    # --- the syncer -------------------------------------------------------------------

    def _sync_rounds(self) -> None:
        """The syncer's thread: take every round committed so far, sync once, answer."""
        while True:
            with self._rounds_ready:
                while not self._rounds and not self._syncer_stop:
                    self._rounds_ready.wait()
                if not self._rounds:
                    return  # stopping, and every round is answered
                taken = list(self._rounds)
                self._rounds.clear()
            try:
                self._answer_rounds(taken)
            except Exception:  # the intake answers failures itself: a defect
                log.exception("MLLP: answering %d rounds failed", len(taken))

    def _answer_rounds(self, taken: list[_Queued]) -> None:
        # Every round taken committed before it was queued, so one sync of the WAL after
        # the last of them makes them all durable (each round's sync does the same thing).
        sync = next(
            (r.sync for r, _ in taken if isinstance(r, AcceptedRound) and r.sync is not None),
            None,
        )
        durable: OSError | None = None
        if sync is not None:
            try:
                sync()
            except OSError as exc:
                durable = exc
        answered: list[tuple[list[tuple[_Connection, bytes]], list[bytes] | None]] = []
        for round_, ready in taken:
            answers: list[bytes] | None = None
            if isinstance(round_, AcceptedRound):
                try:  # each round finished, whatever another did (the intake is busy till then)
                    answers = [a.ack for a in round_.finish(durable)]
                except Exception:  # a defect: those messages go unanswered
                    log.exception("MLLP: a round of %d messages failed", len(ready))
            elif round_ is not None:
                answers = round_
            answered.append((ready, answers))
        woken = False
        with self._send_lock:
            touched: dict[int, _Connection] = {}
            for ready, answers in answered:
                for index, (conn, _) in enumerate(ready):
                    conn.answered += 1
                    touched[id(conn)] = conn
                    if answers is None:
                        # Its later answers would not match its frames: close it once the
                        # answers before this round went out.
                        conn.failed = True
                        if not conn.closing:
                            conn.closing = "closed: internal error"
                            conn.close_level = logging.WARNING
                    elif not conn.failed:
                        conn.outbox += b"\x0b" + answers[index] + END_BLOCK
            for conn in touched.values():
                sent = self._send_some(conn)
                if conn.closing:
                    if conn.received == conn.answered:
                        self._to_close.append(conn)
                        woken = True
                elif not sent:
                    self._want_write.append(conn)
                    woken = True
        if woken:
            self._wake()

    def _send_some(self, conn: _Connection) -> bool:
        """Send what ``conn`` has waiting, as far as its socket takes it (the send lock held).
        True when nothing is left (or the connection is gone)."""
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # gone, or closed by the loop: nothing more to send
            conn.outbox.clear()
            return True
        del conn.outbox[:sent]
        return not conn.outbox

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def _stop_syncer(self) -> None:
        with self._rounds_ready:
            self._syncer_stop = True
            self._rounds_ready.notify()
        if self._syncer is not None:
            self._syncer.join(timeout=30)

    def _after_sends(self) -> None:
        """The loop's part of what the syncer sent: close the connections whose last answers
        were given, and wait to send the answers a peer did not take yet."""
        with self._send_lock:
            to_close, self._to_close = self._to_close, []
            want_write, self._want_write = self._want_write, []
        for conn in to_close:
            if conn.sock in self._connections:
                self._end(conn, conn.closing, level=conn.close_level)
        for conn in want_write:
            if conn.sock in self._connections and conn.outbox and not conn.closing:
                self._watch(conn, selectors.EVENT_WRITE)

    def _flush(self, conn: _Connection) -> bool:
        """Send what ``conn`` has waiting; while some remains, wait for the socket to take
        more before reading again. False when the connection was closed."""
        try:
            with self._send_lock:
                sent = conn.sock.send(conn.outbox)
                del conn.outbox[:sent]
                left = bool(conn.outbox)
        except (BlockingIOError, InterruptedError):
            left = True
        except OSError as exc:
            self._close(conn, f"ended: {exc}", level=logging.INFO)
            return False
        if conn.closing:  # registered only to take its last answers
            if not left:
                self._close(conn, conn.closing, level=conn.close_level)
            return False
        self._watch(conn, selectors.EVENT_WRITE if left else selectors.EVENT_READ)
        return True

    def _close_idle(self, now: float) -> None:
        timeout = self.settings.mllp_network_timeout_seconds
        for conn in list(self._connections.values()):
            if conn.closing:
                if conn.close_by and now > conn.close_by:
                    self._close(conn, f"{conn.closing or 'closed'} (its last answers not read)")
            elif conn.received != conn.answered:
                continue  # its answers are on their way
            elif now - conn.last_heard > timeout:
                self._close(conn, "idle; closed", level=logging.INFO)

    def _close(self, conn: _Connection, why: str, *, level: int = logging.WARNING) -> None:
        if why:
            log.log(level, "MLLP connection from %s:%d %s", conn.peer[0], conn.peer[1], why)
        self._connections.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        with self._send_lock, contextlib.suppress(OSError):  # not while the syncer sends
            conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._connections.values()):
            with self._send_lock:
                self._send_some(conn)  # answers still waiting, as far as the socket takes them
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            self._close(conn, "", level=logging.DEBUG)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()
