"""The one typed record every ECG parser produces, and the errors they raise."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum

import numpy as np
import numpy.typing as npt

__all__ = [
    "STANDARD_LEADS",
    "DeviceMeasurement",
    "EcgFormat",
    "EcgFormatError",
    "EcgRecord",
    "PatientIdentity",
    "RecordedBeat",
    "UnsupportedEcgFormat",
    "normalise_lead_name",
]

FloatArray = npt.NDArray[np.float64]

STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)  # fmt: skip


class EcgFormat(StrEnum):
    DICOM = "dicom"
    WFDB = "wfdb"
    HL7_AECG = "hl7_aecg"
    SCP_ECG = "scp_ecg"


class EcgFormatError(ValueError):
    """The input is not a readable ECG: the message names the format and the problem,
    e.g. ``aECG: no <digits> for lead V1``."""

    def __init__(self, message: str, *, fmt: EcgFormat | None = None) -> None:
        super().__init__(message)
        self.fmt = fmt


class UnsupportedEcgFormat(EcgFormatError):
    """The format was recognised (or not at all) but RDC does not read it."""


@dataclass(frozen=True, slots=True)
class PatientIdentity:
    """The patient as the file identifies them (every field optional)."""

    patient_id: str | None = None
    name: str | None = None
    sex: str | None = None  # "M" | "F" | "O"
    birth_date: date | None = None
    age_years: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceMeasurement:
    """A measurement the acquiring device put in the file, kept beside ours.

    ``key`` is one of the analysis measurement keys (``pr_ms``, ``qtc_ms``...) when the
    label maps to one, else ``None``; ``source`` says where it came from."""

    label: str
    value: float
    unit: str
    source: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class RecordedBeat:
    """A representative (median) beat the device computed, in µV."""

    sampling_rate_hz: float
    leads: tuple[str, ...]
    signals_uv: FloatArray


@dataclass(frozen=True, slots=True)
class EcgRecord:
    """An ECG as read from one file (or one WFDB header + signal files).

    ``signals_uv`` has one row per lead in ``leads`` (normalised names: I, II, III, aVR, aVL,
    aVF, V1-V6; other channels keep their name), values in microvolts."""

    source_format: EcgFormat
    sampling_rate_hz: float
    leads: tuple[str, ...]
    signals_uv: FloatArray
    patient: PatientIdentity = field(default_factory=PatientIdentity)
    acquired_at: datetime | None = None
    device: str | None = None
    device_measurements: tuple[DeviceMeasurement, ...] = ()
    device_statements: tuple[str, ...] = ()
    median_beat: RecordedBeat | None = None
    natural_key: str | None = None

    def __post_init__(self) -> None:
        if self.signals_uv.ndim != 2 or self.signals_uv.shape[0] != len(self.leads):
            raise ValueError("signals_uv must be (n_leads, n_samples)")

    @property
    def n_samples(self) -> int:
        return int(self.signals_uv.shape[1])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.sampling_rate_hz

    @property
    def standard_leads(self) -> tuple[str, ...]:
        return tuple(lead for lead in STANDARD_LEADS if lead in self.leads)

    def lead(self, name: str) -> FloatArray:
        return self.signals_uv[self.leads.index(name)]

    def has(self, name: str) -> bool:
        return name in self.leads


_LEAD_ALIASES = {
    "I": "I",
    "II": "II",
    "III": "III",
    "AVR": "aVR",
    "AVL": "aVL",
    "AVF": "aVF",
    "MLII": "II",
    "MLI": "I",
    "MLIII": "III",
}
_LEAD_RE = re.compile(r"^V([1-6])$")


def normalise_lead_name(raw: str) -> str:
    """``'lead II'``, ``'MDC_ECG_LEAD_AVR'``, ``'avf'``, ``'Lead I (Einthoven)'``, ``'MLII'``
    -> the standard name; a channel that is not a standard lead keeps its (stripped) name."""
    text = raw.strip()
    key = text.upper()
    key = key.removeprefix("MDC_ECG_LEAD_")
    key = re.sub(r"\(.*?\)", "", key)
    key = re.sub(r"[\s_\-]", "", key).removeprefix("LEAD")
    if key in _LEAD_ALIASES:
        return _LEAD_ALIASES[key]
    match = _LEAD_RE.match(key)
    if match:
        return f"V{match.group(1)}"
    return text
