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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import cache, lru_cache, partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.tag import BaseTag
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
    size_bytes: int  # of the object as received


# Value representations that are plain ASCII whatever the character set. Their values are
# read straight from the raw bytes: pydicom's per-element conversion was 40 % of the CPU
# time of indexing a small object, and the header needs some 25 values.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})


@cache
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(tag)


def _text(ds: Dataset, keyword: str) -> str:
    tag, vr = _tag_and_vr(keyword)
    elem = ds._dict.get(BaseTag(tag))
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement) and vr in _ASCII_VRS and elem.VR in (None, vr):
        if not elem.value:
            return ""
        parts = elem.value.decode("ascii", "replace").split("\\")
        return "\\".join(part.strip(" \x00") for part in parts).strip()
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = _text(ds, keyword)
        return int(value) if value else None
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
        transfer_syntax = _text(meta, "TransferSyntaxUID")
        if not transfer_syntax:
            raise InvalidDicomError("file meta has no Transfer Syntax UID")
        _check_complete(ds, path, transfer_syntax)
        sop_instance_uid = _uid(ds, "SOPInstanceUID")
        sop_class_uid = _uid(ds, "SOPClassUID")
        media_uid = _text(meta, "MediaStorageSOPInstanceUID") or sop_instance_uid
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
            frame_count=max(1, _int(ds, "NumberOfFrames") or 1),
            priority=_PRIORITY_MAP.get(_text(ds, "RequestedProcedurePriority").upper()),
        )
    except InvalidDicomError:
        raise
    except PydicomInvalidDicomError as exc:
        raise InvalidDicomError(f"not a DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds of error on corrupt input
        raise InvalidDicomError(f"cannot parse DICOM: {type(exc).__name__}: {exc}") from exc
    return header


def _sha256(path: Path, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_LONG_LENGTH_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


def _data_set_offset(path: Path) -> int:
    # File meta (PS3.10 7.1) is group 0002, always Explicit VR Little Endian, right after
    # the 128-byte preamble and "DICM"; the data set starts at the first other group.
    with open(path, "rb") as f:
        f.seek(132)
        offset = 132
        while True:
            head = f.read(8)
            if len(head) < 8 or int.from_bytes(head[0:2], "little") != 0x0002:
                return offset
            vr = head[4:6]
            if vr in _LONG_LENGTH_VRS:
                length = int.from_bytes(f.read(4), "little")
                offset += 12 + length
            else:
                length = int.from_bytes(head[6:8], "little")
                offset += 8 + length
            f.seek(offset)


def dataset_sha256(path: Path) -> str:
    """SHA-256 of the encoded data set of a Part-10 file, file meta excluded.

    This is an instance's content identity: the same data set received over DICOM (where
    we write the file meta) and imported from a file (with the modality's meta) matches.
    """
    return _sha256(path, _data_set_offset(path))


def instance_key(header: InstanceHeader, sha256: str) -> str:
    """Object key: the UIDs plus a content prefix, so a differing copy never overwrites."""
    return (
        f"dicom/{header.study_instance_uid}/{header.series_instance_uid}/"
        f"{header.sop_instance_uid}.{sha256[:16]}.dcm"
    )


@lru_cache(maxsize=1)
def _store_io() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="rdc-store-io")


@dataclass(frozen=True, slots=True)
class PreparedInstance:
    """A validated object with its header read, on its way into the store."""

    header: InstanceHeader
    stored: StoredObject
    writing: Future[bool]

    def wait(self) -> None:
        """Return once the object is durable in the store; raises StorageError otherwise."""
        self.writing.result()

    def undo(self, store: ObjectStore) -> None:
        """Remove the object again if this ingest created it (after a rollback)."""
        with contextlib.suppress(Exception):
            if self.writing.result():
                store.delete(self.stored.key)


def prepare_dicom_file(
    *,
    store: ObjectStore,
    source: Path,
    zone: ZoneInfo,
    source_sha256: str | None = None,
    move_source: bool = False,
) -> PreparedInstance:
    """Read and validate the header, then start writing the object to the store in the
    background (moving ``source`` with ``move_source``: the DICOM listener spools into the
    store). No database work: this runs before the index transaction, so the disk syncs do
    not happen while the database write lock is held. Raises InvalidDicomError."""
    header = read_header(source, zone=zone)
    sha256 = source_sha256 or dataset_sha256(source)
    key = instance_key(header, sha256)
    stored = StoredObject(key=key, size=source.stat().st_size, sha256=sha256)
    writing = _store_io().submit(store.put_once, key, source, move=move_source)
    return PreparedInstance(header, stored, writing)


def index_dicom_file(
    session: Session,
    *,
    store: ObjectStore,
    prepared: PreparedInstance,
    organization: OrgRef,
    calling_ae: str,
    received_at: datetime | None = None,
) -> IngestResult:
    """Index a prepared object in the caller's transaction; returns once the object is
    durable, so the caller may commit and acknowledge. A rollback removes an object this
    ingest created.

    Policy for a SOP Instance UID already indexed: the same data set is a duplicate
    (nothing changes); a different one is kept under its own key as a conflict and the exam
    is flagged, while the first copy stays the instance of record.

    Raises PermissionDeniedError (study or instance of another clinic), StorageError and
    DatabaseUnavailableError (answer "retry").
    """
    header, stored, org = prepared.header, prepared.stored, organization
    on_rollback(session, partial(prepared.undo, store))
    now = received_at or utcnow()
    existing = find_instance(session, sop_instance_uid=header.sop_instance_uid)
    if existing is None:
        outcome, exam_id = record_instance(
            session,
            header=header,
            org_id=org.id,
            org_code=org.code,
            storage_key=stored.key,
            size_bytes=stored.size,
            sha256=stored.sha256,
            calling_ae=calling_ae,
            now=now,
        )
        prepared.wait()
        if outcome is RecordOutcome.STORED:
            return IngestResult(
                outcome,
                exam_id,
                header.study_instance_uid,
                header.sop_instance_uid,
                stored.key,
                stored.size,
            )
        # Another association indexed the same SOP instance meanwhile: judge against it.
        existing = find_instance(session, sop_instance_uid=header.sop_instance_uid)
        assert existing is not None
    prepared.wait()
    if existing.org_id != org.id:
        raise PermissionDeniedError("this SOP instance belongs to another organisation")
    if existing.sha256 == stored.sha256:
        return IngestResult(
            RecordOutcome.DUPLICATE,
            existing.exam_id,
            header.study_instance_uid,
            header.sop_instance_uid,
            existing.storage_key,
            stored.size,
        )
    record_conflict(
        session,
        header=header,
        existing=existing,
        storage_key=stored.key,
        size_bytes=stored.size,
        sha256=stored.sha256,
        calling_ae=calling_ae,
        now=now,
    )
    log.warning(
        "SOP instance %s re-sent with a different data set; kept as %s",
        header.sop_instance_uid,
        stored.key,
    )
    return IngestResult(
        RecordOutcome.CONFLICT,
        existing.exam_id,
        header.study_instance_uid,
        header.sop_instance_uid,
        stored.key,
        stored.size,
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
    """Store and index the Part-10 file at ``source`` (bulk import, STOW): prepare, then
    index in the caller's transaction. ``source`` is copied, never moved.

    Raises InvalidDicomError, UnknownSenderError, PermissionDeniedError, StorageError and
    DatabaseUnavailableError.
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
    sha256 = _sha256(source)
    key = f"quarantine/{sha256[:2]}/{sha256}.bin"
    if store.put_once(key, source):
        on_rollback(session, lambda: store.delete(key))
    return record_quarantine(
        session,
        storage_key=key,
        reason=reason,
        source=origin,
        size_bytes=source.stat().st_size,
        sha256=sha256,
        calling_ae=calling_ae,
        org_id=organization.id if organization else None,
        sop_instance_uid=sop_instance_uid,
        now=utcnow(),
    )
