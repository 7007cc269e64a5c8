"""DICOM ingest shared by every way an object arrives (C-STORE, STOW-RS, bulk import).

Order of work, as in Orthanc: read and validate the header, write the object to the store
under a key derived from its UIDs (and content), index it in the caller's transaction; the
caller commits and only then acknowledges. If the transaction rolls back, the object this
call wrote is removed again. The steps every intake shares (store first, index, remove on
rollback, quarantine) are the hub's intake contract (``worklist.intake``); this module reads
DICOM and keeps its own policies (duplicates, conflicting copies).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, BinaryIO, cast
from zoneinfo import ZoneInfo

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import RE_VALID_UID, UID, DeflatedExplicitVRLittleEndian
from pydicom.values import convert_PN
from sqlalchemy.orm import Session

from dicom_gateway.element_scan import file_meta_elements, scan_top_level
from dicom_gateway.records import (
    ECG_WAVEFORM_SOP_CLASSES,
    INSTANCE_KIND,
    InstanceHeader,
    conflict_references,
    find_instance,
    record_conflict,
    register_instance,
)
from rdc_core.db import utcnow
from rdc_core.errors import InvalidInputError, PermissionDeniedError
from rdc_core.storage import ObjectStore
from worklist.directory import OrgRef, organization_for_ae
from worklist.intake import (
    PendingObject,
    RecordOutcome,
    artifact_id_for,
    quarantine_object,
    remove_unreferenced,
    store_object,
)
from worklist.models import Discipline, Priority
from worklist.patients import OtherIdentifier

__all__ = [
    "IngestResult",
    "InvalidDicomError",
    "PreparedInstance",
    "UnknownSenderError",
    "index_dicom_file",
    "ingest_dicom_file",
    "instance_key",
    "object_digest",
    "prepare_dicom_file",
    "quarantine_file",
    "read_header",
]

log = logging.getLogger(__name__)

_ECG_SOP_CLASSES = ECG_WAVEFORM_SOP_CLASSES
_PRIORITY_MAP = {"STAT": Priority.EMERGENCY, "HIGH": Priority.URGENT}
_HASH_CHUNK = 1 << 20
_READ_WHOLE_BYTES = 2 << 20  # objects up to this size are read whole, larger ones mapped


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


# Value representations that are plain ASCII whatever the character set, and the text ones
# decoded with the data set's character set. Values are decoded straight from the raw bytes:
# pydicom's per-element conversion was most of the CPU time of reading a header, and the
# index needs some 25 values of every object received.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_TEXT_VRS = frozenset({"LO", "SH"})
_BACKSLASH = {0x5C}
_PATIENT_NAME = BaseTag(0x00100010)
_REFERRING_PHYSICIAN_NAME = BaseTag(0x00080090)
_OTHER_PATIENT_IDS_SEQUENCE = BaseTag(0x00101002)
_MAX_OTHER_PATIENT_IDS = 64


# Every element _read_header reads: the only ones the fast walk keeps.
_INDEXED_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "StudyDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "BodyPartExamined",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "NumberOfFrames",
    "RequestedProcedurePriority",
    "ReferringPhysicianName",
)


@cache
def _indexed_tags() -> dict[int, str]:
    return {int(tag): vr for tag, vr in map(_tag_and_vr, _INDEXED_KEYWORDS)}


@cache
def _tag_and_vr(keyword: str) -> tuple[BaseTag, str]:
    # The fast walk keeps only _INDEXED_KEYWORDS: reading any other would quietly give "".
    if keyword not in _INDEXED_KEYWORDS:
        raise KeyError(f"{keyword} is read from headers but missing in _INDEXED_KEYWORDS")
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return BaseTag(tag), dictionary_VR(tag)


class _Fields:
    """The values of one data set (read with deferred bulk data) that the index needs."""

    __slots__ = ("_encodings", "ds")

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self._encodings: list[str] | None = None

    def has(self, keyword: str) -> bool:
        return _tag_and_vr(keyword)[0] in self.ds._dict

    def text(self, keyword: str) -> str:
        tag, vr = _tag_and_vr(keyword)
        elem = self.ds._dict.get(tag)
        if elem is None:
            return ""
        if isinstance(elem, RawDataElement) and elem.VR in (None, vr):
            if not elem.value:
                return ""
            if vr in _ASCII_VRS:
                parts = elem.value.decode("ascii", "replace").split("\\")
                return "\\".join(part.strip(" \x00") for part in parts).strip()
            if vr in _TEXT_VRS:
                decoded = decode_bytes(elem.value, self._charsets(), _BACKSLASH)
                return "\\".join(part.rstrip(" \x00") for part in decoded.split("\\")).strip()
        value = self.ds.get(keyword)
        if value is None:
            return ""
        if isinstance(value, pydicom.multival.MultiValue):
            return "\\".join(str(v) for v in value)
        return str(value).strip()

    def int(self, keyword: str) -> int | None:
        try:
            value = self.text(keyword)
            return int(value) if value else None
        except (TypeError, ValueError):
            return None

    def person_name(self, tag: BaseTag = _PATIENT_NAME) -> Any:
        """A person name (Patient's Name unless ``tag`` says) as pydicom reads it (None when
        absent), decoded straight from the raw value where it is at hand."""
        elem = self.ds._dict.get(tag)
        if isinstance(elem, RawDataElement) and elem.VR in (None, "PN") and elem.value is not None:
            return convert_PN(elem.value, self._charsets()) if elem.value else ""
        return self.ds.get(tag).value if tag in self.ds else None

    def _charsets(self) -> list[str]:
        if self._encodings is None:
            declared = self.text("SpecificCharacterSet").split("\\")
            self._encodings = convert_encodings(declared if any(declared) else None)
        return self._encodings

    def uid(self, keyword: str) -> str:
        value = self.text(keyword)
        if not value:
            raise InvalidDicomError(f"required {keyword} is missing")
        if len(value) > 64 or not RE_VALID_UID.match(value):
            raise InvalidDicomError(f"{keyword} {value!r} is not a valid UID")
        return value

    def grouping_uid(self, keyword: str, sop_instance_uid: str, coerced: dict[str, str]) -> str:
        # A missing Study/Series UID must not lose the object: index it under a UID derived
        # from its SOP Instance UID (so a re-send lands in the same place) and record that.
        if self.text(keyword):
            return self.uid(keyword)
        name = f"rdc:{keyword}:{sop_instance_uid}"
        derived = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"
        coerced[keyword] = derived
        return derived

    def performed_at(self, zone: ZoneInfo) -> datetime | None:
        # Study date/time are the clinic's local time; stored in UTC.
        date = self.text("StudyDate") or self.text("SeriesDate") or self.text("AcquisitionDate")
        if len(date) != 8 or not date.isdigit():
            return None
        time = (self.text("StudyTime") or "000000").split(".")[0].ljust(6, "0")[:6]
        try:
            local = datetime(
                int(date[:4]),
                int(date[4:6]),
                int(date[6:]),
                int(time[:2]),
                int(time[2:4]),
                int(time[4:]),
            )
        except ValueError:
            try:
                local = datetime(int(date[:4]), int(date[4:6]), int(date[6:]))
            except ValueError:
                return None
        return local.replace(tzinfo=zone).astimezone(UTC)


def _other_patient_ids(ds: Dataset, path: Path) -> tuple[OtherIdentifier, ...]:
    """The items of the Other Patient IDs Sequence (where a national ID arrives), or none
    when the sequence is absent or unreadable: it never stops an object being stored."""
    elem = ds._dict.get(_OTHER_PATIENT_IDS_SEQUENCE)
    if elem is None:
        return ()
    try:
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            # Over 1 KiB, the value was left unread (deferred): read that element alone.
            ds = pydicom.dcmread(path, specific_tags=[_OTHER_PATIENT_IDS_SEQUENCE])
        items = ds.get("OtherPatientIDsSequence") or []
    except Exception:
        return ()
    found = []
    for item in list(items)[:_MAX_OTHER_PATIENT_IDS]:
        try:
            value = str(item.get("PatientID") or "").strip()
            issuer = str(item.get("IssuerOfPatientID") or "").strip()
            type_code = str(item.get("TypeOfPatientID") or "").strip()
        except Exception:
            continue
        if value:
            found.append(OtherIdentifier(issuer=issuer[:64], value=value[:64], type_code=type_code))
    return tuple(found)


def _check_complete(ds: Dataset, size: int, transfer_syntax: str) -> None:
    # With deferred reading pydicom seeks past large values without reading them, so a
    # file cut short inside Pixel Data parses "fine"; compare where values end with the size.
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return  # inflated in memory; zlib already failed on a truncated stream
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


@dataclass(frozen=True, slots=True)
class _Part10:
    """A Part-10 file opened for indexing: the data set (bulk data deferred), the file meta."""

    ds: Dataset
    file_meta: bytes  # preamble, prefix and File Meta Information as stored
    transfer_syntax: str
    media_sop_instance_uid: str
    size: int
    complete: bool  # every value is known to lie within the file


def _meta_text(values: dict[int, bytes], element: int) -> str:
    return values.get(element, b"").decode("ascii", "replace").strip(" \x00")


class _MappedFile:
    """A read-only memory map (or bytes) read like a file: seeking past the end is allowed,
    reading there returns nothing (a map's own seek refuses, and pydicom seeks past
    deferred values of a truncated file)."""

    __slots__ = ("_position", "_view")

    def __init__(self, view: bytes | mmap.mmap) -> None:
        self._view = view
        self._position = 0

    def read(self, size: int | None = -1) -> bytes:
        start = self._position
        end = len(self._view) if size is None or size < 0 else start + size
        data = self._view[start:end]
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = (0, self._position, len(self._view))[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def _open_part10(path: Path) -> _Part10:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise InvalidDicomError("not a DICOM file: it is empty")
        if size <= _READ_WHOLE_BYTES:
            # One read: cheaper than mapping a small file (mapping and unmapping it cost
            # more than copying it, in a VM most of all).
            data = os.read(fd, size)
            if len(data) == size:
                return _parse_part10(path, data)
        # Large objects are parsed through a memory map: only the pages of the element
        # headers are read. Not the file object: pydicom asks for the position after
        # nearly every element, and a file's tell() is an lseek that gives up the GIL.
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            return _parse_part10(path, view)
    finally:
        os.close(fd)


def _parse_part10(path: Path, view: bytes | mmap.mmap) -> _Part10:
    offset, meta = _read_file_meta(view)
    transfer_syntax = _meta_text(meta, 0x0010)
    if not transfer_syntax:
        raise InvalidDicomError("file meta has no Transfer Syntax UID")
    file_meta = view[:offset]
    ts = UID(transfer_syntax)
    known = ts.is_transfer_syntax and not ts.is_deflated
    found = None
    if known and ts.is_little_endian:
        found = scan_top_level(view, offset, implicit_vr=ts.is_implicit_VR, wanted=_indexed_tags())
    if found is not None:
        elements: dict[BaseTag, DataElement | RawDataElement] = dict(found)
        ds = Dataset(elements)
    elif known:
        source = _MappedFile(view)
        source.seek(offset)
        ds = read_dataset(
            cast(BinaryIO, source),  # read, seek and tell are all that is used
            ts.is_implicit_VR,
            ts.is_little_endian,
            defer_size=1024,
        )
    else:
        # Deflated or unknown (private) syntaxes: pydicom inflates or guesses the VRs.
        ds = pydicom.dcmread(path, defer_size=1024)
    media_uid = _meta_text(meta, 0x0003)
    return _Part10(ds, file_meta, transfer_syntax, media_uid, len(view), found is not None)


def read_header(path: Path, *, zone: ZoneInfo) -> InstanceHeader:
    """Parse and validate the header of the Part-10 file at ``path`` without loading bulk data."""
    return _read_header(path, zone=zone)[0]


def _read_header(path: Path, *, zone: ZoneInfo) -> tuple[InstanceHeader, _Part10]:
    try:
        part10 = _open_part10(path)
        ds, values = part10.ds, _Fields(part10.ds)
        if not part10.complete:
            _check_complete(ds, part10.size, part10.transfer_syntax)
        sop_instance_uid = values.uid("SOPInstanceUID")
        sop_class_uid = values.uid("SOPClassUID")
        media_uid = part10.media_sop_instance_uid or sop_instance_uid
        if media_uid != sop_instance_uid:
            raise InvalidDicomError(
                f"SOP Instance UID {sop_instance_uid} differs from the announced {media_uid}"
            )
        coerced: dict[str, str] = {}
        study_instance_uid = values.grouping_uid("StudyInstanceUID", sop_instance_uid, coerced)
        series_instance_uid = values.grouping_uid("SeriesInstanceUID", sop_instance_uid, coerced)
        modality = values.text("Modality").upper()
        patient_id = values.text("PatientID")
        name_elem = values.person_name()
        original: dict[str, Any] = {
            kw: values.text(kw)
            for kw in (
                "PatientID",
                "IssuerOfPatientID",
                "PatientBirthDate",
                "PatientSex",
                "SpecificCharacterSet",
                "OtherPatientIDs",
            )
            if values.has(kw)
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
            transfer_syntax_uid=part10.transfer_syntax,
            patient_id=patient_id[:64],
            issuer_of_patient_id=values.text("IssuerOfPatientID")[:64] or None,
            patient_name=str(name_elem or "")[:200],
            patient_birth_date=values.text("PatientBirthDate")[:8] or None,
            patient_sex=values.text("PatientSex")[:16] or None,
            patient_original=original,
            other_patient_ids=_other_patient_ids(ds, path),
            accession_number=values.text("AccessionNumber")[:64] or None,
            discipline=Discipline.ECG
            if (modality == "ECG" or sop_class_uid in _ECG_SOP_CLASSES)
            else Discipline.IMAGING,
            modality=modality[:16],
            body_part=values.text("BodyPartExamined").upper()[:64],
            study_description=values.text("StudyDescription")[:200],
            referring_physician=str(values.person_name(_REFERRING_PHYSICIAN_NAME) or "")[:200]
            or None,
            performed_at=values.performed_at(zone),
            series_number=values.int("SeriesNumber"),
            instance_number=values.int("InstanceNumber"),
            frame_count=max(1, values.int("NumberOfFrames") or 1),
            priority=_PRIORITY_MAP.get(values.text("RequestedProcedurePriority").upper()),
        )
    except InvalidDicomError:
        raise
    except PydicomInvalidDicomError as exc:
        raise InvalidDicomError(f"not a DICOM file: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds of error on corrupt input
        raise InvalidDicomError(f"cannot parse DICOM: {type(exc).__name__}: {exc}") from exc
    return header, part10


def _sha256(path: Path, offset: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_file_meta(view: bytes | mmap.mmap) -> tuple[int, dict[int, bytes]]:
    """Where the data set starts and the raw values of the File Meta Information elements
    (see :func:`dicom_gateway.element_scan.file_meta_elements`)."""
    if view[128:132] != b"DICM":
        raise InvalidDicomError("not a DICOM file: no 'DICM' prefix after the preamble")
    return file_meta_elements(view, 132)


def object_digest(file_meta: bytes, dataset_sha256: str) -> str:
    """Identity of a Part-10 file's bytes: its file meta as written plus its data set's hash.

    The data set's hash (file meta excluded) is an instance's content identity: the same
    data set received over DICOM and imported from a file matches. Copies of one data set
    that differ only in file meta (another sender's AE title, another writer) get different
    digests, so storing one never replaces another's bytes.
    """
    return hashlib.sha256(file_meta + dataset_sha256.encode("ascii")).hexdigest()


def instance_key(header: InstanceHeader, digest: str) -> str:
    """Object key: the UIDs plus a prefix of :func:`object_digest`, so the bytes under a key
    never change: a differing copy gets a key of its own."""
    return (
        f"dicom/{header.study_instance_uid}/{header.series_instance_uid}/"
        f"{header.sop_instance_uid}.{digest[:16]}.dcm"
    )


@dataclass(frozen=True, slots=True)
class PreparedInstance:
    """A validated object with its header read, on its way into the store."""

    header: InstanceHeader
    pending: PendingObject

    def wait(self) -> None:
        """Return once the object is durable in the store; raises StorageError otherwise."""
        self.pending.wait()


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
    # One background task per object, started once the key is known. Syncing the spooled
    # bytes in a task of their own while the header is read cost 12 more context switches
    # per instance and about 0.3 ms of CPU, and sent objects no faster (bench/README).
    header, part10 = _read_header(source, zone=zone)
    sha256 = source_sha256 or _sha256(source, len(part10.file_meta))
    key = instance_key(header, object_digest(part10.file_meta, sha256))
    pending = store_object(
        store=store, key=key, source=source, size=part10.size, sha256=sha256, move=move_source
    )
    return PreparedInstance(header, pending)


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
    header, stored, org = prepared.header, prepared.pending.stored, organization
    now = received_at or utcnow()
    # Recorded first, looked up only when it was indexed already: a new instance (nearly
    # every one) costs no extra statement. Returns once the object is durable; a rollback
    # removes an object this ingest created.
    registration = register_instance(
        session,
        header=header,
        org=org,
        pending=prepared.pending,
        calling_ae=calling_ae,
        now=now,
    )
    outcome, exam_id = registration.outcome, registration.exam_id
    if outcome is RecordOutcome.STORED:
        return IngestResult(
            outcome,
            exam_id,
            header.study_instance_uid,
            header.sop_instance_uid,
            stored.key,
            stored.size,
        )
    # Indexed before, or by another association meanwhile: judge this copy against it.
    existing = find_instance(session, sop_instance_uid=header.sop_instance_uid)
    assert existing is not None
    if existing.org_id != org.id:
        raise PermissionDeniedError("this SOP instance belongs to another organisation")
    if existing.sha256 == stored.sha256:
        if existing.storage_key != stored.key:
            # The same data set in another file meta: the copy of record stays, this goes.
            remove_unreferenced(
                session,
                store,
                stored.key,
                artifact_id=artifact_id_for(INSTANCE_KIND, header.sop_instance_uid),
                also=conflict_references(stored.key, header.sop_instance_uid),
            )
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
    """Keep rejected input byte for byte under ``quarantine/`` with the reason (the hub's
    :func:`worklist.intake.quarantine_object`). Returns the quarantine record's ID."""
    return quarantine_object(
        session,
        store=store,
        source=source,
        reason=reason,
        origin=origin,
        sender=calling_ae,
        org_id=organization.id if organization else None,
        artifact_ref=sop_instance_uid,
    )
