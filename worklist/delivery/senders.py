"""The registry of push senders by channel name, and what a sender is given.

The worklist never imports the protocol packages: ``dicom_gateway.report_push`` registers
the ``dicom`` sender and ``lab_results.report_push`` the ``hl7`` sender when they are
imported (the task runner's start-up imports both). A sender sends one report version to
one endpoint and returns the peer's acknowledgement as a dict; any exception is a failed
attempt (its message is recorded and the delivery is retried).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from rdc_core.errors import ConfigurationError

__all__ = [
    "DeliveryFailedError",
    "EndpointSpec",
    "NameGroup",
    "ReportPush",
    "Sender",
    "display_name",
    "get_sender",
    "person_name_groups",
    "register_sender",
    "registered_channels",
]


@dataclass(frozen=True, slots=True)
class NameGroup:
    """One component group of a DICOM person name (PS3.5 6.2.1): its representation
    (``alphabetic``, ``ideographic`` or ``phonetic``) and its five components."""

    representation: str
    family: str
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""

    @property
    def display(self) -> str:
        """Prefix, family, given, middle, suffix; ideographic names (Chinese) without
        spaces, as they are written."""
        parts = [self.prefix, self.family, self.given, self.middle, self.suffix]
        glue = "" if self.representation == "ideographic" else " "
        return glue.join(p for p in parts if p)


_REPRESENTATIONS = ("alphabetic", "ideographic", "phonetic")


def person_name_groups(value: str) -> list[NameGroup]:
    """The non-empty component groups of a DICOM PN value such as ``Wang^Fang=王^芳``
    (alphabetic, ideographic, phonetic), in that order."""
    groups = []
    for representation, group in zip(_REPRESENTATIONS, (value or "").split("="), strict=False):
        parts = [p.strip() for p in group.split("^")][:5]
        if not any(parts):
            continue
        family, given, middle, prefix, suffix = parts + [""] * (5 - len(parts))
        groups.append(NameGroup(representation, family, given, middle, prefix, suffix))
    return groups


def display_name(value: str) -> str:
    """A person name for people to read: the ideographic name with the alphabetic one in
    parentheses (``王芳 (Wang Fang)``), or whichever the PN value has."""
    by_kind = {g.representation: g.display for g in person_name_groups(value)}
    ideographic, alphabetic = by_kind.get("ideographic"), by_kind.get("alphabetic")
    if ideographic and alphabetic:
        return f"{ideographic} ({alphabetic})"
    return ideographic or alphabetic or by_kind.get("phonetic", "")


class DeliveryFailedError(Exception):
    """The peer refused the report or answered with an error; ``detail`` holds its answer."""

    def __init__(self, message: str, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail = detail or {}


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """Where to send: a DICOM AE (``ae_title``) or an HL7 receiver (application, facility)."""

    id: str
    name: str
    channel: str
    host: str
    port: int
    ae_title: str | None = None
    receiving_application: str | None = None
    receiving_facility: str | None = None
    tls: bool = False  # connect with TLS (client context: rdc_core.tls.client_context)
    pdf_mode: str = "embed"  # HL7: "embed" the PDF, or "link" to it


@dataclass(frozen=True, slots=True)
class ReportPush:
    """One signed report version with everything a sender puts into its message."""

    delivery_id: str
    attempt: int
    report_id: str
    version: int
    status: str  # "final" or "preliminary"
    amendment_kind: str | None
    previous_report_id: str | None
    exam_id: str
    study_instance_uid: str
    accession_number: str | None
    discipline: str
    modality: str
    body_part: str
    description: str
    performed_at: datetime | None
    patient_id: str
    issuer: str
    patient_name: str  # the DICOM PN value, every component group
    birth_date: str | None
    sex: str | None
    clinic_code: str
    clinic_name: str
    sender_code: str
    sender_name: str
    findings: str
    impression: str
    recommendation: str
    signer: str
    signed_at: datetime
    pdf: bytes
    recognition: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    referring_physician: str = ""  # the DICOM PN value as received ("" unknown)

    @property
    def result_status(self) -> str:
        """HL7 result status: P preliminary, C a later version replacing a final one, F."""
        if self.status == "preliminary":
            return "P"
        return "C" if self.version > 1 else "F"

    @property
    def title(self) -> str:
        """A bilingual document title."""
        kind = {"imaging": "影像诊断报告", "ecg": "心电诊断报告", "lab": "检验报告"}.get(
            self.discipline, "诊断报告"
        )
        english = {"imaging": "Imaging report", "ecg": "ECG report", "lab": "Laboratory report"}
        return f"{kind} {english.get(self.discipline, 'Report')} v{self.version}"


Sender = Callable[[ReportPush, EndpointSpec, float], dict[str, Any]]

_senders: dict[str, Sender] = {}
_lock = threading.Lock()


def register_sender(channel: str, sender: Sender) -> None:
    """Register ``sender`` for ``channel`` (``dicom``, ``hl7``); registering again replaces it."""
    with _lock:
        _senders[channel] = sender


def get_sender(channel: str) -> Sender:
    """The sender of ``channel``; raises ConfigurationError when none is registered."""
    with _lock:
        sender = _senders.get(channel)
    if sender is None:
        raise ConfigurationError(f"no sender registered for channel {channel!r}")
    return sender


def registered_channels() -> list[str]:
    """The channels that have a sender in this process."""
    with _lock:
        return sorted(_senders)
