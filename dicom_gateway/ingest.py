"""DICOM ingest shared by every way an object arrives (C-STORE, STOW-RS, bulk import).

Order of work, as in Orthanc: read and validate the header, write the object to the store
under a key derived from its UIDs (and content), index it in the caller's transaction; the
caller commits and only then acknowledges. If the transaction rolls back, the object this
call wrote is removed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy.orm import Session

from rdc_core.db import on_rollback, utcnow
from rdc_core.errors import InvalidInputError, PermissionDeniedError
from rdc_core.storage import ObjectStore, StoredObject
from worklist.directory import OrgRef, organization_for_ae
from worklist.intake import (
    InstanceHeader,
    RecordOutcome,
    find_instance,
    record_conflict,
    record_instance,
    record_quarantine,
)
from worklist.models import Discipline, Priority

__all__ = [
    "IngestResult",
    "InvalidDicomError",
    "PreparedInstance",
    "UnknownSenderError",
    "index_dicom_file",
    "ingest_dicom_file",
    "instance_key",
    "prepare_dicom_file",
    "quarantine_file",
    "read_header",
]

log = logging.getLogger(__name__)

_ECG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform
    "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform
    "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform
}
_PRIORITY_MAP = {"STAT": Priority.EMERGENCY, "HIGH": Priority.URGENT}
_HASH_CHUNK = 1 << 20


class InvalidDicomError(InvalidInputError):
    """The data is not a DICOM object we can index (unreadable, truncated, UIDs missing)."""

    title = "Invalid DICOM"


class UnknownSenderError(PermissionDeniedError):
    """The sender (calling AE title) does not belong to a registered clinic."""


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: RecordOutcome
    exam_id: str
    study_instance_uid: str
    sop_instance_uid: str
    storage_key: str


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _performed_at(ds: Dataset, zone: ZoneInfo) -> datetime | None:
    # Study date/time are the clinic's local time; stored in UTC.
    date = _text(ds, "StudyDate") or _text(ds, "SeriesDate") or _text(ds, "AcquisitionDate")
    if len(date) != 8 or not date.isdigit():
        return None
    time = (_text(ds, "StudyTime") or "000000").split(".")[0].ljust(6, "0")[:6]
    try:
        local = datetime.strptime(date + time, "%Y%m%d%H%M%S")
    except ValueError:
        try:
            local = datetime.strptime(date, "%Y%m%d")
        except ValueError:
            return None
    return local.replace(tzinfo=zone).astimezone(ZoneInfo("UTC"))


def _check_complete(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    # With deferred reading pydicom seeks past large values without reading them, so a
    # file cut short inside Pixel Data parses "fine"; compare where values end with the size.
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # inflated in memory; zlib already failed on a truncated stream
    size = path.stat().st_size
    for elem in ds._dict.values():
        if (
            isinstance(elem, RawDataElement)
            and elem.length != 0xFFFFFFFF
            and elem.value_tell is not None
            and elem.value_tell + elem.length > size
        ):
            raise InvalidDicomError(
                f"truncated: element {elem.tag} needs {elem.length} bytes at offset "
                f"{elem.value_tell}, file has {size}"
            )


def _uid(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if not value:
        raise InvalidDicomError(f"required {keyword} is missing")
    if not UID(value).is_valid:
        raise InvalidDicomError(f"{keyword} {value!r} is not a valid UID")
    return value


def _grouping_uid(ds: Dataset, keyword: str, sop_instance_uid: str, coerced: dict[str, str]) -> str:
    # A missing Study/Series UID must not lose the object: index it under a UID derived
    # from its SOP Instance UID (so a re-send lands in the same place) and record that.
    if _text(ds, keyword):
        return _uid(ds, keyword)
    derived = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'rdc:{keyword}:{sop_instance_uid}').int}"
    coerced[keyword] = derived
    return derived


def read_header(path: Path, *, zone: ZoneInfo) -> InstanceHeader:
    """Parse and validate the header of the Part-10 file at ``path`` without loading bulk data."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
        meta = ds.file_meta
        transfer_syntax = str(meta.get("TransferSyntaxUID") or "")
        if not transfer_syntax:
            raise InvalidDicomError("file meta has no Transfer Syntax UID")
        _check_complete(ds, path, transfer_syntax)
        sop_instance_uid = _uid(ds, "SOPInstanceUID")
        sop_class_uid = _uid(ds, "SOPClassUID")
        media_uid = str(meta.get("MediaStorageSOPInstanceUID") or sop_instance_uid)
        if media_uid != sop_instance_uid:
            raise InvalidDicomError(
                f"SOP Instance UID {sop_instance_uid} differs from the announced {media_uid}"
            )
        coerced: dict[str, str] = {}
        study_instance_uid = _grouping_uid(ds, "StudyInstanceUID", sop_instance_uid, coerced)
        series_instance_uid = _grouping_uid(ds, "SeriesInstanceUID", sop_instance_uid, coerced)
        modality = _text(ds, "Modality").upper()
        patient_id = _text(ds, "PatientID")
        name_elem = ds.get("PatientName")
        original: dict[str, Any] = {
            kw: _text(ds, kw)
            for kw in (
                "PatientID",
                "IssuerOfPatientID",
                "PatientBirthDate",
                "PatientSex",
                "SpecificCharacterSet",
                "OtherPatientIDs",
            )
            if kw in ds
        }
        if name_elem is not None:
            original["PatientName"] = str(name_elem)
            raw = getattr(name_elem, "original_string", None)
            if isinstance(raw, bytes) and raw.decode("latin-1") != str(name_elem):
                original["PatientName_bytes_hex"] = raw.hex()
        if not patient_id:
            # An empty ID must not merge all anonymous patients into one.
            patient_id = f"NOID-{study_instance_uid}"[:64]
            coerced["PatientID"] = patient_id
        header = InstanceHeader(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            coerced=coerced,
            transfer_syntax_uid=transfer_syntax,
            patient_id=patient_id[:64],
            issuer_of_patient_id=_text(ds, "IssuerOfPatientID")[:64] or None,
            patient_name=str(name_elem or "")[:200],
            patient_birth_date=_text(ds, "PatientBirthDate")[:8] or None,
            patient_sex=_text(ds, "PatientSex")[:16] or None,
            patient_original=original,
            accession_number=_text(ds, "AccessionNumber")[:64] or None,
            discipline=Discipline.ECG
            if (modality == "ECG" or sop_class_uid in _ECG_SOP_CLASSES)
            else Discipline.IMAGING,
            modality=modality[:16],
            body_part=_text(ds, "BodyPartExamined").upper()[:64],
            study_description=_text(ds, "StudyDescription")[:200],
            performed_at=_performed_at(ds, zone),
            series_number=_int(ds, "SeriesNumber"),
            instance_number=_int(ds, "InstanceNumber"),
            priority=_PRIORITY_MAP.get(_text(ds, "RequestedProcedurePriority").upper()),
        )
    except InvalidDicomError:
        raise
    except PydicomInvalidDicomError as exc:
        raise InvalidDicomError(f"not a DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds of error on corrupt input
        raise InvalidDicomError(f"cannot parse DICOM: {type(exc).__name__}: {exc}") from exc
    return header


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def instance_key(header: InstanceHeader, sha256: str) -> str:
    """Object key: the UIDs plus a content prefix, so a differing copy never overwrites."""
    return (
        f"dicom/{header.study_instance_uid}/{header.series_instance_uid}/"
        f"{header.sop_instance_uid}.{sha256[:16]}.dcm"
    )


def _store_new(
    session: Session, store: ObjectStore, source: Path, key_for: Callable[[str], str]
) -> StoredObject:
    stored, created = store.put_file_addressed(source, key_for)
    if created:
        # Content-addressed: an existing key already held these bytes and stays.
        on_rollback(session, lambda: store.delete(stored.key))
    return stored


@dataclass(frozen=True, slots=True)
class _NewObject:
    """An object written (or being written) to the store for this ingest."""

    stored: StoredObject
    pending: Future[bool] | None = None

    def wait(self) -> None:
        """Return once the object is durable; raises StorageError if it could not be."""
        if self.pending is not None:
            self.pending.result()

    def undo(self, store: ObjectStore) -> None:
        """Remove the object again if this ingest created it."""
        with contextlib.suppress(Exception):
            if self.pending is not None and self.pending.result():
                store.delete(self.stored.key)


@lru_cache(maxsize=1)
def _store_io() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="rdc-store-io")


@dataclass(frozen=True, slots=True)
class PreparedInstance:
    """A validated object, its header read, maybe already moving into the store."""

    header: InstanceHeader
    source: Path
    moving: _NewObject | None = None


def prepare_dicom_file(
    *,
    store: ObjectStore,
    source: Path,
    zone: ZoneInfo,
    source_sha256: str | None = None,
    adopt_source: bool = False,
) -> PreparedInstance:
    """Read and validate the header; with ``adopt_source`` and the file's ``source_sha256``
    (the DICOM listener knows both), start moving the file into the store in the
    background. No database work: this runs before the index transaction, so the disk sync
    does not happen while the database write lock is held. Raises InvalidDicomError."""
    header = read_header(source, zone=zone)
    if not (adopt_source and source_sha256):
        return PreparedInstance(header, source)
    key = instance_key(header, source_sha256)
    stored = StoredObject(key=key, size=source.stat().st_size, sha256=source_sha256)
    pending = _store_io().submit(store.adopt_file, source, key)
    return PreparedInstance(header, source, _NewObject(stored, pending))


def index_dicom_file(
    session: Session,
    *,
    store: ObjectStore,
    prepared: PreparedInstance,
    organization: OrgRef,
    calling_ae: str,
    received_at: datetime | None = None,
) -> IngestResult:
    """Index a prepared object in the caller's transaction (storing it first if it was not
    adopted). The caller commits; a rollback removes an object this ingest created.

    Raises PermissionDeniedError (study or instance of another clinic), StorageError and
    DatabaseUnavailableError (answer "retry").
    """
    header, source, new, org = prepared.header, prepared.source, prepared.moving, organization
    if prepared.moving is not None:
        on_rollback(session, partial(prepared.moving.undo, store))
    now = received_at or utcnow()
    existing = find_instance(session, sop_instance_uid=header.sop_instance_uid)
    if existing is None:
        if new is None:
            new = _NewObject(
                _store_new(session, store, source, lambda sha: instance_key(header, sha))
            )
        outcome, exam_id = record_instance(
            session,
            header=header,
            org_id=org.id,
            org_code=org.code,
            storage_key=new.stored.key,
            size_bytes=new.stored.size,
            sha256=new.stored.sha256,
            calling_ae=calling_ae,
            now=now,
        )
        new.wait()  # the object must be durable before the caller commits
        if outcome is RecordOutcome.STORED:
            return IngestResult(
                outcome, exam_id, header.study_instance_uid, header.sop_instance_uid, new.stored.key
            )
        # Another association indexed the same SOP instance meanwhile: judge against it.
        existing = find_instance(session, sop_instance_uid=header.sop_instance_uid)
        assert existing is not None
    if new is not None:
        new.wait()
    sha256 = new.stored.sha256 if new else _sha256(source)
    if existing.org_id != org.id:
        raise PermissionDeniedError("this SOP instance belongs to another organisation")
    if existing.sha256 == sha256:
        return IngestResult(
            RecordOutcome.DUPLICATE,
            existing.exam_id,
            header.study_instance_uid,
            header.sop_instance_uid,
            existing.storage_key,
        )
    kept = (
        new.stored
        if new
        else _store_new(
            session, store, source, lambda sha: f"conflicts/{header.sop_instance_uid}/{sha}.dcm"
        )
    )
    record_conflict(
        session,
        header=header,
        existing=existing,
        storage_key=kept.key,
        size_bytes=kept.size,
        sha256=kept.sha256,
        calling_ae=calling_ae,
        now=now,
    )
    log.warning(
        "SOP instance %s re-sent with different content; kept as %s",
        header.sop_instance_uid,
        kept.key,
    )
    return IngestResult(
        RecordOutcome.CONFLICT,
        existing.exam_id,
        header.study_instance_uid,
        header.sop_instance_uid,
        kept.key,
    )


def ingest_dicom_file(
    session: Session,
    *,
    store: ObjectStore,
    source: Path,
    calling_ae: str,
    zone: ZoneInfo,
    organization: OrgRef | None = None,
    received_at: datetime | None = None,
) -> IngestResult:
    """Store and index the Part-10 file at ``source`` sent by ``calling_ae`` (import, STOW).

    Raises InvalidDicomError (quarantine it), UnknownSenderError, PermissionDeniedError (study
    of another clinic), StorageError and DatabaseUnavailableError (answer "retry").
    """
    org = organization or organization_for_ae(session, ae_title=calling_ae)
    if org is None:
        raise UnknownSenderError(f"calling AE title {calling_ae!r} is not registered to a clinic")
    prepared = prepare_dicom_file(store=store, source=source, zone=zone)
    return index_dicom_file(
        session,
        store=store,
        prepared=prepared,
        organization=org,
        calling_ae=calling_ae,
        received_at=received_at,
    )


def quarantine_file(
    session: Session,
    *,
    store: ObjectStore,
    source: Path,
    reason: str,
    origin: str,
    calling_ae: str = "",
    organization: OrgRef | None = None,
    sop_instance_uid: str | None = None,
) -> str:
    """Keep rejected input byte for byte under ``quarantine/`` with the reason.

    Returns the quarantine record's ID.
    """
    stored = _store_new(session, store, source, lambda sha: f"quarantine/{sha[:2]}/{sha}.bin")
    return record_quarantine(
        session,
        storage_key=stored.key,
        reason=reason,
        source=origin,
        size_bytes=stored.size,
        sha256=stored.sha256,
        calling_ae=calling_ae,
        org_id=organization.id if organization else None,
        sop_instance_uid=sop_instance_uid,
        now=utcnow(),
    )
