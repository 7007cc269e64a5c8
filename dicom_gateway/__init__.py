"""DICOM intake: the DIMSE listener (C-ECHO, C-STORE) and the ingest service it shares with
STOW-RS and bulk import."""

from dicom_gateway.ingest import IngestResult, InvalidDicomError, ingest_dicom_file, read_header
from dicom_gateway.statuses import StoreStatus

__all__ = ["IngestResult", "InvalidDicomError", "StoreStatus", "ingest_dicom_file", "read_header"]
