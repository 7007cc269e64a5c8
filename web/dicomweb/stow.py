"""STOW-RS (PS3.18 10.5): clinics without DIMSE upload instances over HTTP.

The body is spooled part by part to temporary files; each part then goes through the same
ingest service as C-STORE (``dicom_gateway.ingest.ingest_dicom_file``), each in its own
transaction, so one bad part never undoes the good ones. Undecodable parts are kept in
quarantine, like undecodable C-STOREs.
"""

from __future__ import annotations

import enum
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from dicom_gateway.ingest import (
    InvalidDicomError,
    ingest_dicom_file,
    quarantine_file,
    read_header,
)
from dicom_gateway.statuses import StoreStatus
from rdc_core.db import read_session, session_scope
from rdc_core.errors import (
    DatabaseUnavailableError,
    InvalidInputError,
    PermissionDeniedError,
    RDCError,
    StorageError,
)
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore
from web.dicomweb.dicomjson import element
from web.dicomweb.multipart import ReceivedPart, receive_parts
from worklist.access import Principal, require_roles
from worklist.audit import record_access
from worklist.directory import OrgRef, get_organization, org_ref
from worklist.models import Organization, OrgKind, Role

__all__ = ["STOW_ROLES", "FailureReason", "StowOutcome", "store_instances", "stow_request"]

log = logging.getLogger(__name__)

STOW_ROLES: Final = frozenset({Role.TECHNICIAN, Role.CLINICIAN, Role.ADMIN})
CALLING_AE: Final = "STOW-RS"
_ORIGIN: Final = "stow"


class FailureReason(enum.IntEnum):
    """Failure Reason (0008,1197) values of a STOW-RS response (PS3.18 10.5.3)."""

    PROCESSING_FAILURE = StoreStatus.PROCESSING_FAILURE
    OUT_OF_RESOURCES = StoreStatus.OUT_OF_RESOURCES
    CANNOT_UNDERSTAND = StoreStatus.CANNOT_UNDERSTAND
    NOT_AUTHORIZED = StoreStatus.NOT_AUTHORIZED
    # The instance does not belong to the study the request was addressed to.
    DATA_SET_DOES_NOT_MATCH = 0xA900


@dataclass(slots=True)
class _Failed:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: FailureReason
    detail: str


@dataclass(slots=True)
class StowOutcome:
    """What happened to each part; ``status`` is the HTTP status to answer with."""

    # (SOP Class UID, SOP Instance UID, Study Instance UID, Series Instance UID)
    stored: list[tuple[str, str, str, str]] = field(default_factory=list)
    failed: list[_Failed] = field(default_factory=list)
    study_uid: str | None = None

    @property
    def status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_json(self, base_url: str) -> dict[str, Any]:
        """The response payload in the DICOM JSON model."""
        ds = Dataset()
        if self.study_uid:
            ds.add(element(0x00081190, f"{base_url}/studies/{self.study_uid}"))
        referenced = []
        for sop_class, sop_uid, study, series in self.stored:
            item = Dataset()
            item.add(element(0x00081150, sop_class))
            item.add(element(0x00081155, sop_uid))
            item.add(
                element(
                    0x00081190,
                    f"{base_url}/studies/{study}/series/{series}/instances/{sop_uid}",
                )
            )
            referenced.append(item)
        failed = []
        for failure in self.failed:
            item = Dataset()
            item.add(element(0x00081150, failure.sop_class_uid))
            item.add(element(0x00081155, failure.sop_instance_uid))
            item.add(element(0x00081197, int(failure.reason)))
            failed.append(item)
        ds.add(element(0x00081198, failed))
        ds.add(element(0x00081199, referenced))
        return ds.to_json_dict()


def _uploading_org(principal: Principal, clinic: str | None) -> OrgRef:
    require_roles(principal, STOW_ROLES)
    with read_session() as session:
        if principal.org_kind is OrgKind.CLINIC:
            org = session.get(Organization, principal.org_id)
            assert org is not None
            if clinic and clinic != org.code:
                raise PermissionDeniedError("a clinic may only store its own studies")
            return org_ref(org)
        # An administrator uploads on behalf of a named clinic.
        if not clinic:
            raise InvalidInputError("an administrator must name the clinic (?clinic=CODE)")
        org = get_organization(session, code=clinic)
        if org.kind is not OrgKind.CLINIC:
            raise InvalidInputError(f"{clinic} is not a member clinic")
        return org_ref(org)


def _uids(path: Path) -> tuple[str | None, str | None]:
    # For the failure report only: whatever UIDs a broken object still yields.
    try:
        ds = pydicom.dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID"],
        )
        return (
            str(ds.get("SOPClassUID") or "") or None,
            str(ds.get("SOPInstanceUID") or "") or None,
        )
    except Exception:
        return None, None


def _quarantine(
    *,
    store: ObjectStore,
    part: ReceivedPart,
    reason: str,
    org: OrgRef,
    uids: tuple[str | None, str | None],
) -> None:
    with session_scope() as session:
        quarantine_file(
            session,
            store=store,
            source=part.path,
            reason=reason,
            origin=_ORIGIN,
            calling_ae=CALLING_AE,
            organization=org,
            sop_instance_uid=uids[1],
        )


def _store_part(
    *,
    part: ReceivedPart,
    outcome: StowOutcome,
    org: OrgRef,
    study_uid: str | None,
    settings: Settings,
    store: ObjectStore,
) -> None:
    if part.content_type != "application/dicom":
        outcome.failed.append(
            _Failed(None, None, FailureReason.CANNOT_UNDERSTAND, f"part is {part.content_type}")
        )
        return
    try:
        header = read_header(part.path, zone=settings.zone)
        if study_uid and header.study_instance_uid != study_uid:
            outcome.failed.append(
                _Failed(
                    header.sop_class_uid,
                    header.sop_instance_uid,
                    FailureReason.DATA_SET_DOES_NOT_MATCH,
                    f"instance of study {header.study_instance_uid}, not {study_uid}",
                )
            )
            return
        with session_scope() as session:
            result = ingest_dicom_file(
                session,
                store=store,
                source=part.path,
                calling_ae=CALLING_AE,
                zone=settings.zone,
                organization=org,
            )
        outcome.stored.append(
            (
                header.sop_class_uid,
                result.sop_instance_uid,
                result.study_instance_uid,
                header.series_instance_uid,
            )
        )
    except InvalidDicomError as exc:
        uids = _uids(part.path)
        _quarantine(store=store, part=part, reason=str(exc), org=org, uids=uids)
        outcome.failed.append(_Failed(*uids, FailureReason.CANNOT_UNDERSTAND, str(exc)))
    except PermissionDeniedError as exc:
        outcome.failed.append(_Failed(*_uids(part.path), FailureReason.NOT_AUTHORIZED, str(exc)))
    except StorageError as exc:
        outcome.failed.append(_Failed(*_uids(part.path), FailureReason.OUT_OF_RESOURCES, str(exc)))
    except (DatabaseUnavailableError, RDCError) as exc:
        # Any other refusal of the ingest service fails this part, not the request.
        outcome.failed.append(
            _Failed(*_uids(part.path), FailureReason.PROCESSING_FAILURE, str(exc))
        )


def store_instances(
    *,
    principal: Principal,
    parts: list[ReceivedPart],
    study_uid: str | None,
    clinic: str | None,
    settings: Settings,
    store: ObjectStore,
) -> StowOutcome:
    """Ingest each spooled part for the uploading clinic (audited). Only clinic staff and
    administrators (naming the clinic) may store; raises PermissionDeniedError otherwise."""
    org = _uploading_org(principal, clinic)
    if not parts:
        raise InvalidInputError("the request holds no instances")
    outcome = StowOutcome(study_uid=study_uid)
    for part in parts:
        _store_part(
            part=part, outcome=outcome, org=org, study_uid=study_uid, settings=settings, store=store
        )
    for failure in outcome.failed:
        log.info("STOW part rejected (%s): %s", failure.reason.name, failure.detail)
    with session_scope() as session:
        record_access(
            session,
            principal,
            action="store",
            object_type="instance",
            detail={
                "via": "dicomweb",
                "clinic": org.code,
                "stored": [stored[1] for stored in outcome.stored],
                "failed": [
                    {"sop_instance": f.sop_instance_uid, "reason": f.reason.name}
                    for f in outcome.failed
                ],
            },
        )
    return outcome


async def stow_request(
    *,
    principal: Principal,
    content_type: str,
    body: AsyncIterator[bytes],
    study_uid: str | None,
    clinic: str | None,
    settings: Settings,
    store: ObjectStore,
) -> StowOutcome:
    """Spool the request body to temporary files, then store every part (in a worker
    thread, the ingest blocks on disk and database). The files are removed afterwards."""
    # Permission first: do not make an unauthorised caller's upload cost disk space.
    require_roles(principal, STOW_ROLES)
    spool_root = settings.data_dir / "tmp"
    spool_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="stow-", dir=spool_root))
    try:
        parts = await receive_parts(content_type=content_type, body=body, directory=directory)
        return await run_in_threadpool(
            store_instances,
            principal=principal,
            parts=parts,
            study_uid=study_uid,
            clinic=clinic,
            settings=settings,
            store=store,
        )
    finally:
        await run_in_threadpool(shutil.rmtree, directory, True)
