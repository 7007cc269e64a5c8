"""Discipline report sections: the seam through which a discipline package (ECG, lab) adds
its own typed content to a signed report without the hub importing it.

The hub (``worklist``) knows reports, exams and signing; it must not import ``ecg_service``
or ``lab_results``. A discipline package registers one :data:`SectionProvider` per
discipline at application start-up (``web.app`` imports the registering module)::

    from worklist.signing.sections import register_section_provider

    def ecg_sections(session, *, exam, report):
        return [ReportSection(key="ecg", title="心电图 ECG", table=..., figure=...)]

    register_section_provider("ecg", ecg_sections)

When a report version is signed (:func:`worklist.signing.service.sign_report`) the
provider of the exam's discipline is called with the session, the exam and the report
version being signed; what it returns is

- put into the **signed JSON document** under ``"sections"`` (each section's
  :meth:`ReportSection.as_document`: title, table, paragraphs, observations, ``data``
  and the SHA-256 of the figure), so the signature covers it;
- printed in the **PDF**: the title, the figure (PNG, at its physical size when it fits,
  else scaled down), the table and the paragraphs; a ``landscape`` section gets its own
  A4 landscape page after the report page(s), the others follow the examination data on
  the portrait page;
- exported as **FHIR** Observations (contained in the DiagnosticReport and referenced
  from ``result``) for each :class:`SectionObservation`, read back from the signed
  document, so the FHIR resource says what was signed; the HL7 push-back carries them as
  OBX NM lines (LOINC ``LN`` or local ``L`` code, UCUM units in OBX-6).

A provider must be deterministic for a given database state (it runs inside the signing
transaction, which may retry) and must not commit. It may raise: the signature fails and
the transaction rolls back (a report is never signed without its discipline's content).
Returning ``[]`` means "nothing to add". Figures are not stored by the hub: the PDF is;
the document keeps their hash.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from worklist.models import Exam, Report

__all__ = [
    "JsonValue",
    "ReportSection",
    "SectionFigure",
    "SectionObservation",
    "SectionProvider",
    "SectionTable",
    "register_section_provider",
    "report_sections",
    "section_provider",
]

JsonValue = str | int | float | bool | None | Sequence["JsonValue"] | Mapping[str, "JsonValue"]
"""A plain JSON value (what RFC 8785 canonicalisation can sign: finite numbers only)."""


@dataclass(frozen=True, slots=True)
class SectionTable:
    """A titled grid of text cells: ``columns`` are the header row, each of ``rows`` has one
    cell per column (already formatted for print: units, "—" for missing)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError("every table row needs one cell per column")


@dataclass(frozen=True, slots=True)
class SectionFigure:
    """A PNG image printed in the section. ``width_mm``/``height_mm``: the physical size to
    print it at (e.g. an ECG trace at true 25 mm/s), scaled down only when it does not fit."""

    png: bytes
    width_mm: float
    height_mm: float
    caption: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()


@dataclass(frozen=True, slots=True)
class SectionObservation:
    """One coded result exported as a FHIR Observation (and printed nowhere by itself: put
    it in the table too). ``code`` is in ``system`` (LOINC by default); ``unit`` is the UCUM
    code of ``value``."""

    key: str
    code: str
    display: str
    value: float | None  # None: a text or coded result (``value_string``/``value_coding``)
    unit: str
    system: str = "http://loinc.org"
    source: str = ""  # e.g. "reader" / "machine": who produced the value
    # Optional (lab results): the reference range as numbers and as sent, and the
    # interpretation codes (HL7 v2 table 0078 / v3 ObservationInterpretation: L, H, LL, HH,
    # A, AA, N). In the document only when given, so sections without them sign as before.
    reference_low: float | None = None
    reference_high: float | None = None
    reference_text: str = ""
    interpretation: tuple[str, ...] = ()
    # Text and coded results (HL7 v2 value types ST, TX, FT, CWE/CE/CNE): the value type as
    # sent, the text (FHIR valueString) or the coding (system, code, display: FHIR
    # valueCodeableConcept). In the document only when given.
    value_type: str = ""
    value_string: str = ""
    value_coding: tuple[str, str, str] | None = None

    def as_document(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {
            "key": self.key,
            "system": self.system,
            "code": self.code,
            "display": self.display,
            "value": self.value,
            "unit": self.unit,
            "source": self.source,
        }
        if self.reference_low is not None or self.reference_high is not None:
            out["reference_low"] = self.reference_low
            out["reference_high"] = self.reference_high
        if self.reference_text:
            out["reference_text"] = self.reference_text
        if self.interpretation:
            out["interpretation"] = list(self.interpretation)
        if self.value_type:
            out["value_type"] = self.value_type
        if self.value_string:
            out["value_string"] = self.value_string
        if self.value_coding is not None:
            system, code, display = self.value_coding
            out["value_coding"] = {"system": system, "code": code, "display": display}
        return out


@dataclass(frozen=True, slots=True)
class ReportSection:
    """One block of discipline content in a signed report.

    ``key`` names the section in the document (unique within a report); ``title`` is the
    bilingual heading (``心电图 Electrocardiogram``); ``paragraphs`` are printed as lines
    under the table (e.g. the chosen diagnostic statements); ``data`` is any further plain
    JSON the signature should cover (machine values, statement codes, versions)."""

    key: str
    title: str
    table: SectionTable | None = None
    table_title: str = ""
    paragraphs: tuple[str, ...] = ()
    figure: SectionFigure | None = None
    landscape: bool = False
    observations: tuple[SectionObservation, ...] = ()
    data: Mapping[str, JsonValue] = field(default_factory=dict)

    def as_document(self) -> dict[str, Any]:
        """The section as it goes into the signed JSON document."""
        return {
            "key": self.key,
            "title": self.title,
            "landscape": self.landscape,
            "table_title": self.table_title,
            "table": (
                {"columns": list(self.table.columns), "rows": [list(r) for r in self.table.rows]}
                if self.table is not None
                else None
            ),
            "paragraphs": list(self.paragraphs),
            "figure": (
                {
                    "sha256": self.figure.sha256,
                    "media_type": "image/png",
                    "width_mm": self.figure.width_mm,
                    "height_mm": self.figure.height_mm,
                    "caption": self.figure.caption,
                }
                if self.figure is not None
                else None
            ),
            "observations": [o.as_document() for o in self.observations],
            "data": dict(self.data),
        }


class SectionProvider(Protocol):
    """What a discipline registers: ``(session, *, exam, report) -> sections``."""

    def __call__(
        self, session: Session, /, *, exam: Exam, report: Report
    ) -> Sequence[ReportSection]: ...


_providers: dict[str, SectionProvider] = {}
_lock = threading.Lock()


def register_section_provider(discipline: str, provider: SectionProvider | None) -> None:
    """Install the section provider of ``discipline`` (``"ecg"``, ``"lab"``...); ``None``
    removes it. Registering again replaces the earlier one (idempotent start-up)."""
    with _lock:
        if provider is None:
            _providers.pop(discipline, None)
        else:
            _providers[discipline] = provider


def section_provider(discipline: str) -> SectionProvider | None:
    """The provider registered for ``discipline``, if any."""
    return _providers.get(discipline)


def report_sections(session: Session, *, exam: Exam, report: Report) -> list[ReportSection]:
    """The sections of the exam's discipline for ``report`` (``[]`` without a provider).
    Raises ValueError if two sections share a key."""
    provider = section_provider(exam.discipline.value)
    if provider is None:
        return []
    sections = list(provider(session, exam=exam, report=report))
    keys = [s.key for s in sections]
    if len(keys) != len(set(keys)):
        raise ValueError(f"report sections of {exam.discipline.value} repeat a key: {keys}")
    return sections
