"""Named C-STORE / C-ECHO statuses we answer with (DICOM PS3.4 Annex B, PS3.7 Annex C)."""

from __future__ import annotations

import enum

__all__ = ["StoreStatus"]


class StoreStatus(enum.IntEnum):
    SUCCESS = 0x0000
    # Failure: the SCP could not store the object right now; the modality should retry.
    OUT_OF_RESOURCES = 0xA700
    # Failure: the data could not be parsed, or required UIDs are missing or invalid.
    CANNOT_UNDERSTAND = 0xC000
    # Failure: the index (database) could not record the object.
    PROCESSING_FAILURE = 0x0110
    # Failure: the study belongs to another organisation.
    NOT_AUTHORIZED = 0x0124
