"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class, from known clinics.

Each C-STORE is received into a temporary Part-10 file (never held whole in memory), then
stored and indexed in one transaction; Success is answered only after the commit. The
association machinery is in :mod:`dicom_gateway.upper_layer`; this module binds it to the
clinic directory and the ingest service.

With ``RDC_DICOM_PROCESSES`` = 1 the associations are served by threads of the serving
process. With more, the serving process accepts the connections and hands each to the
least busy of that many listener processes (:mod:`dicom_gateway.listener_pool`), so that
ingest is not bound to one core by the interpreter lock.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import fields
from io import BytesIO
from typing import BinaryIO
from zoneinfo import ZoneInfo

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from sqlalchemy.orm import Session

from dicom_gateway.admission import AssociationLimits
from dicom_gateway.bulk_index import BulkItem, index_many
from dicom_gateway.counters import IngestCounters, PrometheusCounters
from dicom_gateway.ingest import (
    IngestResult,
    InvalidDicomError,
    PreparedInstance,
    index_dicom_file,
    prepare_dicom_file,
    quarantine_file,
)
from dicom_gateway.listener_pool import MAX_MESSAGE, ListenerPool
from dicom_gateway.query import RetrieveItem, find, instances_to_retrieve
from dicom_gateway.records import InstanceHeader, lock_order
from dicom_gateway.report_push import encapsulated_pdf
from dicom_gateway.retrieve import MoveDestination
from dicom_gateway.spool import claim_spool_dir, remove_abandoned_spools
from dicom_gateway.statuses import StoreStatus
from dicom_gateway.tls import client_context, server_context
from dicom_gateway.upper_layer import AcceptorConfig, StoreRequest, UpperLayerServer
from rdc_core.db import read_session, session_scope
from rdc_core.errors import DatabaseUnavailableError, PermissionDeniedError, StorageError
from rdc_core.group_commit import GroupCommitter
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore, StoredObject
from worklist.audit import record_event
from worklist.delivery.service import report_push
from worklist.directory import OrgRef, organization_for_ae
from worklist.intake import PendingObject, RecordOutcome
from worklist.models import Exam, Report
from worklist.move_destinations import move_destination_for

__all__ = ["DicomGateway", "IndexWriter", "StorageService", "acceptor_config"]

log = logging.getLogger(__name__)

# The fields of an object's header in the order InstanceHeader takes them (see IndexWriter).
_HEADER_FIELDS = tuple(f.name for f in fields(InstanceHeader))


def acceptor_config(settings: Settings, store: ObjectStore) -> AcceptorConfig:
    """The association settings of this process's listener, from the service settings.

    Each listening process receives into a spool directory of its own, made and locked here
    (:mod:`dicom_gateway.spool`): processes do not queue on one directory's lock to create
    their files, and the files a dead process left behind are found by its lock.
    """
    spool_dir = claim_spool_dir(store.spool_dir)
    return AcceptorConfig(
        ae_title=settings.dicom_ae_title,
        max_pdu=settings.dicom_max_pdu,
        max_associations=settings.dicom_max_associations,
        max_associations_per_ae=settings.dicom_max_associations_per_ae,
        max_associations_per_clinic=settings.dicom_max_associations_per_clinic,
        acse_timeout=settings.dicom_acse_timeout_seconds,
        network_timeout=settings.dicom_network_timeout_seconds,
        spool_dir=spool_dir,
    )


def association_limits(settings: Settings) -> AssociationLimits:
    """How many associations the gateway serves at once: in all, per AE title, per clinic."""
    return AssociationLimits(
        total=settings.dicom_max_associations,
        per_ae=settings.dicom_max_associations_per_ae,
        per_clinic=settings.dicom_max_associations_per_clinic,
    )


class StorageService:
    """Binds the acceptor to the directory (who may send) and the ingest service."""

    def __init__(
        self,
        *,
        store: ObjectStore,
        settings: Settings,
        counters: IngestCounters,
        committer: GroupCommitter | None = None,
        remote_index: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.objects = store
        self.settings = settings
        self.counters = counters
        # Index writes of all associations share transactions (see rdc_core.group_commit).
        self.committer = committer or GroupCommitter()
        # In a listener process on SQLite: the serving process's IndexWriter, which batches
        # the instances of every listener process into one transaction.
        self.remote_index = remote_index

    def open_association(self, calling_ae: str) -> OrgRef | None:
        try:
            with read_session() as session:
                return organization_for_ae(session, ae_title=calling_ae)
        except DatabaseUnavailableError:
            log.error("cannot read the AE title registry; refusing %s", calling_ae)
            return None

    def clinic_of(self, sender: OrgRef) -> str:
        return sender.id

    def clinic_code(self, sender: OrgRef) -> str:
        return sender.code

    def store(self, request: StoreRequest) -> tuple[int, str]:
        status, comment = self._store(request)
        if status != StoreStatus.SUCCESS:
            self.counters.failed(StoreStatus(status).name)
        return status, comment

    def _store(self, request: StoreRequest) -> tuple[int, str]:
        calling_ae = request.calling_ae
        try:
            prepared = prepare_dicom_file(
                store=self.objects,
                source=request.path,
                zone=self.settings.zone,
                source_sha256=request.sha256,
                move_source=True,
            )
            # Durable before it queues for the index transaction: the object's disk sync
            # (or upload) is not waited for inside the serial section of the write lock.
            prepared.wait()
            result, counted = self._index(prepared, request)
        except InvalidDicomError as exc:
            log.warning("C-STORE from %s: %s; quarantined", calling_ae, exc)
            self._quarantine(request, str(exc))
            return StoreStatus.CANNOT_UNDERSTAND, str(exc)
        except PermissionDeniedError as exc:
            log.warning("C-STORE from %s refused: %s", calling_ae, exc)
            return StoreStatus.NOT_AUTHORIZED, str(exc)
        except StorageError as exc:
            log.error("C-STORE from %s: store failed: %s", calling_ae, exc)
            return StoreStatus.OUT_OF_RESOURCES, "object store unavailable"
        except DatabaseUnavailableError as exc:
            log.error("C-STORE from %s: index failed: %s", calling_ae, exc)
            return StoreStatus.PROCESSING_FAILURE, "index unavailable"
        except Exception:
            log.exception("C-STORE from %s: unexpected failure", calling_ae)
            return StoreStatus.PROCESSING_FAILURE, "internal error"
        if not counted:
            self.counters.stored(result.outcome.value, result.size_bytes)
        return StoreStatus.SUCCESS, ""

    def _index(
        self, prepared: PreparedInstance, request: StoreRequest
    ) -> tuple[IngestResult, bool]:
        """Index the instance; its result, and whether it was counted already (by the
        serving process's index writer, which spares this process a message per object)."""
        # What the index writer needs is derived here, in the association's thread: its
        # serial section only runs the statements.
        item = BulkItem.of(prepared, request.sender, request.calling_ae, self.objects)
        order = lock_order(prepared.header, request.sender, exam_id=item.exam_id)
        if self.remote_index is not None:
            payload = IndexWriter.request(item, order)
            if len(payload) < MAX_MESSAGE - 64:  # else (a huge header) written here
                return IndexWriter.outcome(self.remote_index(payload)), True
        result = self.committer.run(
            lambda session: index_dicom_file(
                session,
                store=self.objects,
                prepared=prepared,
                organization=request.sender,
                calling_ae=request.calling_ae,
            ),
            bulk=(index_many, item),
            order=order,
        )
        return result, False

    # -- query/retrieve: always within the calling clinic's own data ---------------------

    def find(self, sender: OrgRef, sop_class: str, identifier: Dataset) -> list[Dataset]:
        zone = ZoneInfo(self.settings.timezone)
        with session_scope() as session:
            matches = find(
                session, org_id=sender.id, sop_class=sop_class, identifier=identifier, zone=zone
            )
            self._audit(session, sender, "dicom.c_find", identifier, len(matches))
        return matches

    def retrieve(self, sender: OrgRef, sop_class: str, identifier: Dataset) -> list[RetrieveItem]:
        zone = ZoneInfo(self.settings.timezone)
        with session_scope() as session:
            items = instances_to_retrieve(
                session, org_id=sender.id, sop_class=sop_class, identifier=identifier, zone=zone
            )
            self._audit(session, sender, "dicom.retrieve", identifier, len(items))
        return items

    def _audit(
        self, session: Session, sender: OrgRef, action: str, identifier: Dataset, count: int
    ) -> None:
        keys = {
            e.keyword: str(e.value)[:64]
            for e in identifier
            if e.keyword and e.VR != "SQ" and e.value not in (None, "")
        }
        record_event(
            session,
            actor=f"dicom:{sender.code}",
            action=action,
            object_type="organization",
            object_id=sender.id,
            org_id=sender.id,
            detail={"keys": keys, "matches": count},
        )

    def open_item(self, item: RetrieveItem) -> BinaryIO:
        if not item.report_id:
            return self.objects.open(item.storage_key)
        # A signed report: the encapsulated-PDF instance the DICOM push-back sends, made
        # from the signed PDF as it is stored (one report in memory, as a push holds it).
        with read_session() as session:
            report = session.get(Report, item.report_id)
            exam = session.get(Exam, report.exam_id) if report is not None else None
            if report is None or exam is None:
                raise LookupError(f"report {item.report_id} is gone")
            push = report_push(session, report=report, exam=exam)
        out = BytesIO()
        dcmwrite(out, encapsulated_pdf(push), enforce_file_format=True)
        out.seek(0)
        return out

    def move_destination(self, sender: OrgRef, ae_title: str) -> MoveDestination | None:
        with read_session() as session:
            found = move_destination_for(session, org_id=sender.id, ae_title=ae_title)
        if found is None:
            return None
        # Reached over DICOM TLS with the push-backs' client context when flagged so.
        tls = client_context(self.settings) if found.tls else None
        return MoveDestination(found.ae_title, found.host, found.port, tls)

    def _quarantine(self, request: StoreRequest, reason: str) -> None:
        try:
            with session_scope() as session:
                quarantine_file(
                    session,
                    store=self.objects,
                    source=request.path,
                    reason=reason,
                    origin="c-store",
                    calling_ae=request.calling_ae,
                    organization=request.sender,
                    sop_instance_uid=request.sop_instance_uid or None,
                )
        except Exception:
            log.exception("could not quarantine input from %s", request.calling_ae)


class IndexWriter:
    """The one writer of the DICOM index for every listener process, in the serving process.

    On SQLite (one writer per database) the listener processes do not write the index
    themselves, each taking the database's writer lock in turn for its own few instances:
    each sends its prepared instances here (header and stored object, once durable), and
    this writer runs every request waiting into one transaction (group commit in a thread of
    its own), so a batch takes whatever all processes received meanwhile and the commit's
    disk sync is shared by all of them. The answer goes back once the transaction committed.
    """

    def __init__(
        self,
        *,
        store: ObjectStore,
        counters: IngestCounters,
        committer: GroupCommitter | None = None,
    ) -> None:
        self.store = store
        # Instances indexed are counted here, as they are answered (see StorageService).
        self.counters = counters
        self.committer = committer or GroupCommitter()

    @staticmethod
    def request(item: BulkItem, order: tuple[str, ...]) -> bytes:
        """The request for an instance whose object is durable: plain values (an object's
        header as a tuple), which unpickle several times faster than the dataclasses."""
        header, pending = item.prepared.header, item.prepared.pending
        stored, organization = pending.stored, item.organization
        return pickle.dumps(
            (
                tuple(getattr(header, name) for name in _HEADER_FIELDS),
                (stored.key, stored.size, stored.sha256),
                pending.created(),
                (organization.id, organization.code, organization.kind),
                item.calling_ae,
                item.exam_id,
                item.artifact_id,
                order,
            ),
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    @staticmethod
    def outcome(answer: bytes) -> IngestResult:
        """The result in an answer, or its error raised."""
        result, error = pickle.loads(answer)
        if error is not None:
            raise error
        outcome, *rest = result
        return IngestResult(RecordOutcome(outcome), *rest)

    def submit(self, payload: bytes, reply: Callable[[bytes], None]) -> None:
        """Queue one request; ``reply`` gets the answer once it is decided."""
        try:
            values, stored, created, org, calling_ae, exam_id, artifact_id, order = pickle.loads(
                payload
            )
            header = InstanceHeader(*values)
            organization = OrgRef(*org)
        except Exception as exc:
            reply(self._answer(None, exc))
            return
        written: Future[bool] = Future()
        written.set_result(created)  # durable: the listener process waited for it
        prepared = PreparedInstance(
            header, PendingObject(StoredObject(*stored), written, self.store)
        )
        self.committer.submit(
            lambda session: index_dicom_file(
                session,
                store=self.store,
                prepared=prepared,
                organization=organization,
                calling_ae=calling_ae,
            ),
            lambda result, error: self._done(reply, result, error),
            bulk=(
                index_many,
                BulkItem(prepared, organization, calling_ae, self.store, exam_id, artifact_id),
            ),
            order=order,
        )

    def _done(
        self,
        reply: Callable[[bytes], None],
        result: IngestResult | None,
        error: BaseException | None,
    ) -> None:
        if result is not None and error is None:
            self.counters.stored(result.outcome.value, result.size_bytes)
        reply(self._answer(result, error))

    @staticmethod
    def _answer(result: IngestResult | None, error: BaseException | None) -> bytes:
        values = None
        if result is not None:
            values = (
                result.outcome.value,
                result.exam_id,
                result.study_instance_uid,
                result.sop_instance_uid,
                result.storage_key,
                result.size_bytes,
            )
        try:
            return pickle.dumps((values, error), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an error that does not pickle: its message does
            return pickle.dumps((None, RuntimeError(f"{type(error).__name__}: {error}")))


class DicomGateway:
    """The DICOM listener of the service: start it, read its address, stop it."""

    def __init__(self, *, settings: Settings, store: ObjectStore) -> None:
        self.settings = settings
        self.store = store
        self._server: UpperLayerServer | ListenerPool | None = None
        self._tls_server: UpperLayerServer | None = None

    def start(self) -> None:
        """Listen on the configured host and port (port 0: pick a free one)."""
        self._clear_spool()
        address = (self.settings.dicom_host, self.settings.dicom_port)
        server: UpperLayerServer | ListenerPool
        service: StorageService | None = None
        writer: IndexWriter | None = None
        if self.settings.dicom_processes > 1:
            if self.settings.resolved_database_url.startswith("sqlite"):
                # One writer (PostgreSQL: many).
                writer = IndexWriter(store=self.store, counters=PrometheusCounters())
            server = ListenerPool(
                address,
                processes=self.settings.dicom_processes,
                limits=association_limits(self.settings),
                spool_dir=self.store.spool_dir,
                counters=PrometheusCounters(),
                on_index=writer.submit if writer is not None else None,
            )
        else:
            service = StorageService(
                store=self.store, settings=self.settings, counters=PrometheusCounters()
            )
            server = UpperLayerServer(address, acceptor_config(self.settings, self.store), service)
        server.start()
        self._server = server
        log.info("DICOM listener %s on %s:%d", self.settings.dicom_ae_title, *self.address)
        if self.settings.dicom_tls_port is not None:
            # TLS connections are served in threads of this process (a TLS session cannot be
            # handed to another process). They take their slots from the same book as the
            # plain listener's associations: the threads' own with one process, the pool's
            # (counted here for all listener processes) with more.
            if service is None:
                service = StorageService(
                    store=self.store,
                    settings=self.settings,
                    counters=PrometheusCounters(),
                    committer=writer.committer if writer is not None else None,
                )
            tls_server = UpperLayerServer(
                (self.settings.dicom_host, self.settings.dicom_tls_port),
                acceptor_config(self.settings, self.store),
                service,
                tls=server_context(self.settings),
                slots=server.slots,
            )
            tls_server.start()
            self._tls_server = tls_server
            log.info("DICOM TLS listener on %s:%d", *tls_server.address)

    def _clear_spool(self) -> None:
        # Transfers cut off by a crash leave partial files; their senders were never
        # answered and will send again. Only those of dead processes: another gateway on
        # the same data directory may be receiving into its own spool directory now.
        spool = self.store.spool_dir
        if spool.is_dir():
            for leftover in spool.glob(".rx-*"):  # received before per-process directories
                leftover.unlink(missing_ok=True)
            remove_abandoned_spools(spool)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.address

    def stop(self) -> None:
        """Stop accepting associations and close the listener."""
        if self._tls_server is not None:
            self._tls_server.stop()
            self._tls_server = None
        if self._server is not None:
            self._server.stop()
            self._server = None
