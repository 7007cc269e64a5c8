"""A DICOM listener process: serves the connections its parent hands it (see listener_pool).

Started by :class:`~dicom_gateway.listener_pool.ListenerPool` as
``python -m dicom_gateway.listener_process CHANNEL_FD``; it reads the same ``RDC_`` settings
as its parent, which has already brought the database up to date. Each message on the
channel carries one connection and the parent's order to admit or reject its association.
The process exits when the channel closes: its parent stopped or died.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading

from dicom_gateway.counters import ChannelCounters
from dicom_gateway.listener_pool import ADMIT, DONE, READY
from dicom_gateway.server import StorageService, acceptor_config
from dicom_gateway.upper_layer import AcceptorConfig, serve_association
from rdc_core.logging import configure_logging
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store

__all__ = ["main"]

log = logging.getLogger(__name__)


def _serve_connection(
    connection: socket.socket,
    admit: bool,
    *,
    channel: socket.socket,
    config: AcceptorConfig,
    service: StorageService,
) -> None:
    reported = False

    def report_done() -> None:
        # Sent at release, before the answer goes out, so a sender that reconnects at once
        # is not refused for its own finished association.
        nonlocal reported
        if not reported:
            reported = True
            with contextlib.suppress(OSError):
                channel.send(DONE)

    try:
        serve_association(connection, config, service, admit=lambda: admit, on_release=report_done)
    except Exception:
        log.exception("DICOM connection failed")
    finally:
        connection.close()
        report_done()


def serve(channel: socket.socket) -> None:
    """Serve connections received on ``channel`` until it closes."""
    settings = get_settings()
    store = get_object_store(settings)
    config = acceptor_config(settings, store)
    service = StorageService(store=store, settings=settings, counters=ChannelCounters(channel))
    channel.send(READY)
    while True:
        message, fds, _flags, _address = socket.recv_fds(channel, 16, 1)
        if not message:
            return
        for fd in fds:
            connection = socket.socket(fileno=fd)
            threading.Thread(
                target=_serve_connection,
                args=(connection, message == ADMIT),
                kwargs={"channel": channel, "config": config, "service": service},
                name="rdc-dicom-association",
                daemon=True,
            ).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a listener process: ``python -m dicom_gateway.listener_process FD``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m dicom_gateway.listener_process CHANNEL_FD", file=sys.stderr)
        return 2
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    channel = socket.socket(fileno=int(args[0]))
    try:
        serve(channel)
    except OSError as exc:
        log.info("DICOM listener process %d: channel closed (%s)", os.getpid(), exc)
    log.info("DICOM listener process %d: parent gone or stopping; exiting", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
