"""Push of signed reports back to a clinic's own AE by C-STORE (encapsulated PDF).

The instance is an Encapsulated PDF Storage object (PS3.3 A.45.1) holding the signed PDF
byte for byte, filed in the exam's own study. Its Series and SOP Instance UIDs are derived
from the report version's ID, so a retry re-sends the same instance (the clinic's PACS
sees a duplicate, never a second document) and every version is its own instance.
Success (0x0000) and the warnings (0x0001, 0xB000, 0xB006, 0xB007: the object was stored,
perhaps with attributes coerced or discarded) count as delivered, the warning kept in the
attempt's detail; failures are retried. The patient's name is sent as received, every
component group (``Wang^Fang=王^芳``), in UTF-8 (Specific Character Set ``ISO_IR 192``).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt

from dicom_gateway.statuses import StoreStatus
from rdc_core.settings import get_settings
from rdc_core.tls import client_context
from worklist.delivery.senders import (
    DeliveryFailedError,
    EndpointSpec,
    ReportPush,
    register_sender,
)

__all__ = [
    "STORED_WITH_WARNING",
    "encapsulated_pdf",
    "report_instance_uids",
    "send_encapsulated_pdf",
]

_UID_NAMESPACE = uuid.UUID("0b8e4f6a-3c2d-5e1f-8a9b-7c6d5e4f3a2b")
# C-STORE warnings (PS3.7 C.4.1, PS3.4 B.2.3): the instance was stored all the same.
STORED_WITH_WARNING = {
    0x0001: "requested optional attributes are not supported",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
_CONCEPT = {
    "imaging": ("18748-4", "Diagnostic imaging study"),
    "ecg": ("11524-6", "EKG study"),
    "lab": ("11502-2", "Laboratory report"),
}


_VALID_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _uid(*parts: str) -> str:
    # 2.25 + the decimal of a name-based UUID (PS3.5 B.2): no registered root needed, and
    # the same report always gives the same UID.
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def report_instance_uids(report_id: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of a report version's encapsulated PDF."""
    return _uid("series", report_id), _uid("sop", report_id)


def _da_tm(value: datetime | None, zone: ZoneInfo) -> tuple[str, str]:
    if value is None:
        return "", ""
    local = value.astimezone(zone)
    return local.strftime("%Y%m%d"), local.strftime("%H%M%S")


def encapsulated_pdf(push: ReportPush) -> Dataset:
    """The Encapsulated PDF instance of a report version (with its file meta)."""
    zone = get_settings().zone
    series_uid, sop_uid = report_instance_uids(push.report_id)
    study_date, study_time = _da_tm(push.performed_at, zone)
    content_date, content_time = _da_tm(push.signed_at, zone)
    code, meaning = _CONCEPT.get(push.discipline, _CONCEPT["imaging"])

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = content_date, content_time
    # Patient (the clinic's own identifiers, as received)
    # Every component group (alphabetic=ideographic=phonetic): Chinese names are often
    # only ideographic ("=张三"), and a clinic's PACS matches on what it sent us.
    ds.PatientName = push.patient_name or ""
    ds.PatientID = push.patient_id
    ds.IssuerOfPatientID = push.issuer
    ds.PatientBirthDate = push.birth_date or ""
    ds.PatientSex = push.sex if push.sex in ("M", "F", "O") else ""
    # General Study: the exam's own study. An exam of another intake (an uploaded WFDB or
    # aECG file) has no Study Instance UID; its natural key stands in, made a UID here.
    study_uid = push.study_instance_uid
    if len(study_uid or "") > 64 or not _VALID_UID.match(study_uid or ""):
        study_uid = _uid("study", study_uid or push.exam_id)
    ds.StudyInstanceUID = study_uid
    ds.StudyDate, ds.StudyTime = study_date, study_time
    ds.ReferringPhysicianName = push.referring_physician
    ds.StudyID = ""
    ds.AccessionNumber = push.accession_number or ""
    ds.StudyDescription = push.description[:64]
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 9000 + push.version
    ds.SeriesDescription = f"Report v{push.version}"
    # General Equipment / SC Equipment
    ds.Manufacturer = "RDC"
    ds.InstitutionName = push.sender_name[:64]
    ds.ConversionType = "WSD"
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = content_date, content_time
    ds.AcquisitionDateTime = f"{content_date}{content_time}"
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = push.title[:64]
    concept = Dataset()
    concept.CodeValue = code
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = meaning
    ds.ConceptNameCodeSequence = [concept]
    ds.VerificationFlag = "VERIFIED" if push.status == "final" else "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(push.pdf)
    # OB values have even length; the PDF's own length is in EncapsulatedDocumentLength.
    ds.EncapsulatedDocument = push.pdf + (b"\x00" if len(push.pdf) % 2 else b"")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _no_delay(event: evt.Event) -> None:
    # Small PDUs (association, C-STORE response) otherwise wait for Nagle's delayed ACK.
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        import socket

        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_encapsulated_pdf(
    push: ReportPush, endpoint: EndpointSpec, timeout: float
) -> dict[str, Any]:
    """C-STORE the report's encapsulated PDF to ``endpoint``; returns the peer's answer.
    Raises DeliveryFailedError unless the peer answered Success or a warning (stored)."""
    if not endpoint.ae_title:
        raise DeliveryFailedError(f"endpoint {endpoint.name} has no AE title")
    ds = encapsulated_pdf(push)
    ae = AE(ae_title=get_settings().dicom_ae_title)
    ae.add_requested_context(
        EncapsulatedPDFStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    peer = f"{endpoint.ae_title}@{endpoint.host}:{endpoint.port}"
    tls_args = (client_context(get_settings()), endpoint.host) if endpoint.tls else None
    assoc = ae.associate(
        endpoint.host,
        endpoint.port,
        ae_title=endpoint.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)],
    )
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise DeliveryFailedError(f"association with {peer} {why}", {"peer": peer})
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    if "Status" not in status:
        raise DeliveryFailedError(f"no C-STORE response from {peer} (timeout or abort)")
    code = int(status.Status)
    detail = {
        "peer": peer,
        "status": code,
        "sop_instance_uid": ds.SOPInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
    }
    comment = str(status.get("ErrorComment", "") or "")
    if code in STORED_WITH_WARNING:
        detail["warning"] = f"0x{code:04X} {STORED_WITH_WARNING[code]}" + (
            f": {comment}" if comment else ""
        )
    elif code != StoreStatus.SUCCESS:
        raise DeliveryFailedError(
            f"C-STORE to {peer} answered 0x{code:04X}" + (f": {comment}" if comment else ""),
            detail,
        )
    return detail


register_sender("dicom", send_encapsulated_pdf)
