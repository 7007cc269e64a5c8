"""The DICOM DIMSE service: C-ECHO and C-STORE for every storage SOP class.

Handlers are bound with their dependencies (store, settings) when the server starts. Each
C-STORE is received into a temporary file (never held whole in memory), then stored and
indexed in one transaction; Success is answered only after the commit.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.transport import ThreadedAssociationServer

from dicom_gateway.ingest import (
    InvalidDicomError,
    UnknownSenderError,
    ingest_dicom_file,
    quarantine_file,
)
from dicom_gateway.statuses import StoreStatus
from rdc_core.db import read_session, session_scope
from rdc_core.errors import DatabaseUnavailableError, PermissionDeniedError, StorageError
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore
from worklist.directory import OrgRef, known_calling_ae_titles, organization_for_ae
from worklist.intake import RecordOutcome

__all__ = ["DicomGateway", "GatewayStats"]

log = logging.getLogger(__name__)


@dataclass
class GatewayStats:
    """Counters for monitoring (exposed as metrics by the web layer later)."""

    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0
    failures: int = 0
    bytes_received: int = 0


class _RegisteredCallersAE(AE):
    """An AE that accepts associations only from AE titles registered to a clinic.

    pynetdicom checks ``require_calling_aet`` at association time but treats an empty list
    as "accept everyone"; this reads the registry from the database for every association
    and, when no clinic is registered, returns a title no sender can use so all are refused.
    """

    @property
    def require_calling_aet(self) -> list[str]:
        try:
            with read_session() as session:
                titles = known_calling_ae_titles(session)
        except DatabaseUnavailableError:
            log.error("cannot read AE titles; refusing association")
            titles = []
        return titles or ["\\"]  # backslash is not allowed in an AE title

    @require_calling_aet.setter
    def require_calling_aet(self, value: list[str]) -> None:
        pass


class _NoDelayServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on accepted sockets: without it loopback DICOM is several times slower."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def shutdown(self) -> None:
        # pynetdicom's shutdown also unregisters the server from the AE's list of servers
        # it started itself; this one was made with make_server and is not in that list.
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _SenderCache:
    """The clinic behind each association, looked up once per association, not per object."""

    def __init__(self) -> None:
        self._by_assoc: weakref.WeakKeyDictionary[Any, OrgRef | None] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, session: Any, assoc: Any, calling_ae: str) -> OrgRef | None:
        with self._lock:
            if assoc in self._by_assoc:
                return self._by_assoc[assoc]
        org = organization_for_ae(session, ae_title=calling_ae)
        with self._lock:
            self._by_assoc[assoc] = org
        return org


def _handle_store(
    event: Event, store: ObjectStore, settings: Settings, stats: GatewayStats, senders: _SenderCache
) -> int:
    calling_ae = event.assoc.requestor.ae_title.strip()
    path = Path(event.dataset_path)
    try:
        with session_scope() as session:
            org = senders.get(session, event.assoc, calling_ae)
            result = ingest_dicom_file(
                session,
                store=store,
                source=path,
                calling_ae=calling_ae,
                zone=settings.zone,
                organization=org,
            )
    except InvalidDicomError as exc:
        stats.failures += 1
        log.warning("C-STORE from %s: %s; quarantined", calling_ae, exc)
        _quarantine(path, str(exc), calling_ae, store)
        return StoreStatus.CANNOT_UNDERSTAND
    except (UnknownSenderError, PermissionDeniedError) as exc:
        stats.failures += 1
        log.warning("C-STORE from %s refused: %s", calling_ae, exc)
        return StoreStatus.NOT_AUTHORIZED
    except StorageError as exc:
        stats.failures += 1
        log.error("C-STORE from %s: store failed: %s", calling_ae, exc)
        return StoreStatus.OUT_OF_RESOURCES
    except DatabaseUnavailableError as exc:
        stats.failures += 1
        log.error("C-STORE from %s: index failed: %s", calling_ae, exc)
        return StoreStatus.PROCESSING_FAILURE
    except Exception:
        stats.failures += 1
        log.exception("C-STORE from %s: unexpected failure", calling_ae)
        return StoreStatus.PROCESSING_FAILURE
    size = path.stat().st_size
    stats.bytes_received += size
    if result.outcome is RecordOutcome.STORED:
        stats.stored += 1
    elif result.outcome is RecordOutcome.DUPLICATE:
        stats.duplicates += 1
    else:
        stats.conflicts += 1
    return StoreStatus.SUCCESS


def _quarantine(path: Path, reason: str, calling_ae: str, store: ObjectStore) -> None:
    try:
        with session_scope() as session:
            org = organization_for_ae(session, ae_title=calling_ae)
            quarantine_file(
                session,
                store=store,
                source=path,
                reason=reason,
                origin="c-store",
                calling_ae=calling_ae,
                organization=org,
            )
    except Exception:
        log.exception("could not quarantine input from %s", calling_ae)


def _handle_echo(event: Event) -> int:
    return 0x0000


class DicomGateway:
    """The DICOM listener of one process: start it, read its port, stop it."""

    def __init__(self, *, settings: Settings, store: ObjectStore) -> None:
        self.settings = settings
        self.store = store
        self.stats = GatewayStats()
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    def _make_ae(self) -> AE:
        ae = _RegisteredCallersAE(ae_title=self.settings.dicom_ae_title)
        ae.maximum_associations = self.settings.dicom_max_associations
        ae.maximum_pdu_size = self.settings.dicom_max_pdu
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        """Listen on the configured host and port (port 0: pick a free one)."""
        # Receive datasets into temporary files rather than memory (see module docstring).
        _config.STORE_RECV_CHUNKED_DATASET = True
        # An archive accepts every storage SOP class, retired and private ones included
        # (old ultrasound carts still send the retired US Image Storage), in whatever
        # transfer syntax the sender proposes: objects are stored as received.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        ae = self._make_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, _handle_echo),
            (
                evt.EVT_C_STORE,
                _handle_store,
                [self.store, self.settings, self.stats, _SenderCache()],
            ),
        ]
        server = ae.make_server(
            (self.settings.dicom_host, self.settings.dicom_port),
            evt_handlers=handlers,
            server_class=_NoDelayServer,
        )
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="rdc-dicom", daemon=True)
        self._thread.start()
        log.info("DICOM listener %s on %s:%d", self.settings.dicom_ae_title, *self.address)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting associations and close the listener."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wait_forever(self) -> None:
        while self._server is not None:
            time.sleep(1)
