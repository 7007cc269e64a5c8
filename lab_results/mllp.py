"""The MLLP listener: HL7 v2 lab messages over TCP (``RDC_MLLP_HOST``:``RDC_MLLP_PORT``).

Framing (MLLP release 1): ``0x0B`` message ``0x1C 0x0D``; the answer is framed the same way.
Each connection is served by a thread that blocks on its socket, as the DICOM listener's
associations are: the work per message (a share of the objects' sync and of an index
commit) blocks anyway, and the intake batches the writes of the connections' threads.
python-hl7's ``hl7.mllp`` offers asyncio streams only; with them each message would still
go to a thread for its blocking store and commit, so the framing (a few lines) is read here.

A bad message gets AE/AR and the connection stays open; a framing error (bytes outside a
frame, a start block inside a frame, a frame over ``RDC_MLLP_MAX_MESSAGE_BYTES``) closes
that connection only, as does ``RDC_MLLP_NETWORK_TIMEOUT_SECONDS`` without data. Blank
lines between frames are tolerated.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

from lab_results.intake import LabIntake
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore

__all__ = ["MllpListener"]

log = logging.getLogger(__name__)

START_BLOCK = 0x0B
END_BLOCK = b"\x1c\x0d"
_BETWEEN_FRAMES = b" \t\r\n\x00"
_RECV = 1 << 16


class FramingError(Exception):
    """The byte stream is not MLLP; the connection is closed."""


class MllpListener:
    """Accepts MLLP connections and answers each framed message with its acknowledgement."""

    def __init__(self, *, settings: Settings, store: ObjectStore) -> None:
        self.settings = settings
        self.intake = LabIntake(store=store, zone=settings.zone)
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()

    def start(self) -> None:
        """Listen on the configured host and port (port 0: pick a free one)."""
        address = (self.settings.mllp_host, self.settings.mllp_port)
        listener = socket.create_server(address, reuse_port=False, backlog=64)
        self._listener = listener
        thread = threading.Thread(target=self._accept, name="mllp-accept", daemon=True)
        thread.start()
        log.info("MLLP listener on %s:%d", *self.address)

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return host, port

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed by stop()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.settings.mllp_network_timeout_seconds)
            thread = threading.Thread(
                target=self._serve, args=(conn, peer), name=f"mllp-{peer[1]}", daemon=True
            )
            with self._lock:
                self._connections.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            for frame in self._frames(conn):
                answer, _ = self.intake.receive_body(frame, channel="mllp")
                conn.sendall(b"\x0b" + answer + END_BLOCK)
        except FramingError as exc:
            log.warning("MLLP connection from %s:%d closed: %s", peer[0], peer[1], exc)
        except TimeoutError:
            log.info("MLLP connection from %s:%d idle; closed", peer[0], peer[1])
        except OSError as exc:
            if not self._stopping.is_set():
                log.info("MLLP connection from %s:%d ended: %s", peer[0], peer[1], exc)
        except Exception:
            log.exception("MLLP connection from %s:%d failed", peer[0], peer[1])
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())

    def _frames(self, conn: socket.socket) -> Iterator[bytes]:
        """Yield each framed message received on ``conn`` until the peer closes it."""
        limit = self.settings.mllp_max_message_bytes
        buffer = bytearray()
        while True:
            if not buffer:
                # The usual case: one read brings exactly one whole frame (the sender waits
                # for each answer), taken as it is without going through the buffer.
                chunk = conn.recv(_RECV)
                if not chunk:
                    return  # orderly close between frames
                end = len(chunk) - 2
                if (
                    end >= 1
                    and chunk[0] == START_BLOCK
                    and chunk.find(END_BLOCK, 1) == end
                    and chunk.find(b"\x0b", 1) < 0
                    and end - 1 <= limit
                ):
                    yield chunk[1:end]
                    continue
                buffer += chunk
            # Between frames: skip blank bytes, expect a start block.
            while True:
                stripped = buffer.lstrip(_BETWEEN_FRAMES)
                if stripped:
                    if stripped[0] != START_BLOCK:
                        raise FramingError(
                            f"expected a start block (0x0B), got {bytes(stripped[:16])!r}"
                        )
                    buffer = stripped
                    break
                buffer.clear()
                chunk = conn.recv(_RECV)
                if not chunk:
                    return  # orderly close between frames
                buffer += chunk
            # Inside a frame: read up to the end block.
            searched = 1
            while True:
                end = buffer.find(END_BLOCK, max(searched - 1, 1))
                if end >= 0:
                    break
                if buffer.find(b"\x0b", max(searched, 1)) >= 0:
                    raise FramingError("a start block inside a frame (no end block before it)")
                if len(buffer) > limit + 2:
                    raise FramingError(f"a frame longer than {limit} bytes")
                searched = len(buffer)
                chunk = conn.recv(_RECV)
                if not chunk:
                    raise FramingError("connection closed inside a frame")
                buffer += chunk
            frame = bytes(buffer[1:end])
            del buffer[: end + len(END_BLOCK)]
            if len(frame) > limit:
                raise FramingError(f"a frame longer than {limit} bytes")
            yield frame

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for their threads."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=10)
