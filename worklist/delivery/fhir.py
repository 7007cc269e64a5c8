"""A report version as a FHIR R4 DiagnosticReport (JSON), built by hand: the structure is
small and fixed, and a FHIR model library would be a large dependency for one resource.

Mapping: status final / amended / corrected / appended / preliminary from the version;
category RAD / EC / LAB (HL7 v2 table 0074) by discipline; code a LOINC report code;
subject the patient's identifier within its issuer and a contained Patient whose names are
the DICOM name's component groups (alphabetic and ideographic, told apart by the
iso21090-EN-representation extension; the display shows both, ``王芳 (Wang Fang)``);
presentedForm the signed PDF (URL,
SHA-1 base64 hash, size). Our own extensions carry the HR mark, the version number and
the version it replaces (R4's DiagnosticReport has no ``relatesTo``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any
from urllib.parse import quote

from worklist.delivery.senders import NameGroup, display_name, person_name_groups
from worklist.models import Discipline, Exam, ExamKeyKind, Report, ReportStatus

__all__ = ["FHIR_EXTENSION_BASE", "diagnostic_report", "fhir_status"]

FHIR_EXTENSION_BASE = "http://rdc.local/fhir/StructureDefinition"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_LOINC = "http://loinc.org"
_CATEGORY = {
    Discipline.IMAGING: ("RAD", "Radiology"),
    Discipline.ECG: ("EC", "Electrocardiac (e.g., EKG, EEC, Holter)"),
    Discipline.LAB: ("LAB", "Laboratory"),
}
_CODE = {
    Discipline.IMAGING: ("18748-4", "Diagnostic imaging study"),
    Discipline.ECG: ("11524-6", "EKG study"),
    Discipline.LAB: ("11502-2", "Laboratory report"),
}
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_EN_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
_REPRESENTATION = {"alphabetic": "ABC", "ideographic": "IDE", "phonetic": "SYL"}
_GENDER = {"M": "male", "F": "female", "O": "other"}


def fhir_status(report: Report) -> str:
    """DiagnosticReport.status of a submitted version."""
    if report.status is ReportStatus.PRELIMINARY:
        return "preliminary"
    if report.version > 1:
        return report.amendment_kind.value if report.amendment_kind else "amended"
    return "final"


def issuer_system(issuer: str) -> str:
    """The identifier system URI of a patient-ID issuer (an OID when it is one)."""
    if _OID.match(issuer):
        return f"urn:oid:{issuer}"
    return f"urn:rdc:patient-id-issuer:{quote(issuer, safe='')}"


def _when(value: datetime | date | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _human_name(group: NameGroup) -> dict[str, Any]:
    name: dict[str, Any] = {
        "extension": [
            {"url": _EN_REPRESENTATION, "valueCode": _REPRESENTATION[group.representation]}
        ],
        "use": "official",
        "text": group.display,
        "family": group.family,
    }
    for key, values in (
        ("given", [group.given, group.middle]),
        ("prefix", [group.prefix]),
        ("suffix", [group.suffix]),
    ):
        if any(values):
            name[key] = [v for v in values if v]
    if not group.family:
        del name["family"]
    return name


def _patient(exam: Exam) -> dict[str, Any]:
    patient = exam.patient
    resource: dict[str, Any] = {
        "resourceType": "Patient",
        "id": "patient",
        "identifier": [{"system": issuer_system(patient.issuer), "value": patient.patient_id}],
    }
    names = [_human_name(g) for g in person_name_groups(patient.name or "")]
    if names:
        resource["name"] = names
    if patient.sex in _GENDER:
        resource["gender"] = _GENDER[patient.sex]
    try:
        born = datetime.strptime(patient.birth_date or "", "%Y%m%d").date()
    except ValueError:
        pass  # absent or not a full DICOM DA date
    else:
        resource["birthDate"] = born.isoformat()
    return resource


def _person(user: Any) -> dict[str, Any]:
    return {
        "identifier": {"system": "urn:rdc:user", "value": user.username},
        "display": user.display_name or user.username,
    }


def _recognition_extension(recognition: dict[str, Any]) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"url": "granted", "valueBoolean": bool(recognition.get("granted"))}
    ]
    if recognition.get("mark"):
        parts.append({"url": "mark", "valueString": str(recognition["mark"])})
    if recognition.get("scope_note"):
        parts.append({"url": "scope", "valueString": str(recognition["scope_note"])})
    until = recognition.get("recognizable_until")
    if until:
        text = _when(until) or ""
        parts.append({"url": "recognizableUntil", "valueDate": text[:10]})
    if recognition.get("item_code"):
        coding = {"system": "urn:rdc:recognised-item", "code": str(recognition["item_code"])}
        if recognition.get("item_name"):
            coding["display"] = str(recognition["item_name"])
        parts.append({"url": "item", "valueCoding": coding})
    return {"url": f"{FHIR_EXTENSION_BASE}/mutual-recognition", "extension": parts}


_UCUM = "http://unitsofmeasure.org"


def _value(item: Mapping[str, Any]) -> dict[str, Any]:
    """The Observation's value[x]: a coded result as valueCodeableConcept, a text result as
    valueString, a number as valueQuantity (UCUM)."""
    coding = item.get("value_coding")
    if isinstance(coding, Mapping):
        concept: dict[str, Any] = {
            "coding": [
                {
                    k: str(v)
                    for k, v in (
                        ("system", coding.get("system")),
                        ("code", coding.get("code")),
                        ("display", coding.get("display")),
                    )
                    if v
                }
            ]
        }
        if coding.get("display"):
            concept["text"] = str(coding["display"])
        return {"valueCodeableConcept": concept}
    if item.get("value") is None:
        return {"valueString": str(item.get("value_string") or "")}
    return {
        "valueQuantity": {
            "value": item["value"],
            "unit": str(item["unit"]),
            "system": _UCUM,
            "code": str(item["unit"]),
        }
    }


def _observations(
    sections: Sequence[Mapping[str, Any]],
    *,
    report: Report,
    exam: Exam,
    contained: dict[str, Any],
) -> list[dict[str, Any]]:
    """Contained Observations of the sections' coded results (``obs-<section>-<key>``)."""
    status = "preliminary" if report.status is ReportStatus.PRELIMINARY else "final"
    if report.version > 1 and status == "final":
        status = "amended"
    category_code, category_display = _CATEGORY[exam.discipline]
    out: list[dict[str, Any]] = []
    for section in sections:
        for item in section.get("observations") or []:
            obs_id = re.sub(r"[^A-Za-z0-9\-.]", "-", f"obs-{section.get('key')}-{item['key']}")
            display = str(item.get("display") or item["code"])
            out.append(
                {
                    "resourceType": "Observation",
                    "id": obs_id[:64],
                    "status": status,
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": _V2_0074,
                                    "code": category_code,
                                    "display": category_display,
                                }
                            ]
                        }
                    ],
                    "code": {
                        "coding": [
                            {
                                "system": str(item["system"]),
                                "code": str(item["code"]),
                                "display": display,
                            }
                        ],
                        "text": display,
                    },
                    "subject": {"reference": f"#{contained['id']}"},
                    "effectiveDateTime": _when(exam.performed_at or exam.first_received_at),
                    **_value(item),
                    **({"method": {"text": str(item["source"])}} if item.get("source") else {}),
                    **_range_and_interpretation(item),
                }
            )
    return out


_V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_INTERPRETATION = {
    "L": "Low",
    "H": "High",
    "LL": "Critical low",
    "HH": "Critical high",
    "A": "Abnormal",
    "AA": "Critical abnormal",
    "N": "Normal",
}


def _range_and_interpretation(item: Mapping[str, Any]) -> dict[str, Any]:
    """Observation.referenceRange and .interpretation of a section observation that has them
    (lab results: the range as sent, the OBX-8 flags)."""
    out: dict[str, Any] = {}
    ref: dict[str, Any] = {}
    unit = str(item.get("unit") or "")
    for bound in ("low", "high"):
        value = item.get(f"reference_{bound}")
        if value is not None:
            ref[bound] = {"value": value, "unit": unit, "system": _UCUM, "code": unit}
    if item.get("reference_text"):
        ref["text"] = str(item["reference_text"])
    if ref:
        out["referenceRange"] = [ref]
    codes = [str(c) for c in item.get("interpretation") or [] if str(c) in _INTERPRETATION]
    if codes:
        out["interpretation"] = [
            {"coding": [{"system": _V3_INTERPRETATION, "code": c, "display": _INTERPRETATION[c]}]}
            for c in codes
        ]
    return out


def diagnostic_report(
    *,
    report: Report,
    exam: Exam,
    previous: Report | None,
    pdf: bytes | None,
    pdf_url: str,
    pdf_title: str,
    recognition: dict[str, Any] | None,
    sections: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The FHIR R4 DiagnosticReport resource of a submitted report version. ``sections``:
    the signed document's discipline sections (:mod:`worklist.signing.sections`); their
    observations become contained Observations referenced from ``result``."""
    patient = exam.patient
    category_code, category_display = _CATEGORY[exam.discipline]
    code, code_display = _CODE[exam.discipline]
    signer = report.verifier or report.author
    issued = report.final_at or report.submitted_at or report.updated_at
    extensions: list[dict[str, Any]] = [
        {"url": f"{FHIR_EXTENSION_BASE}/report-version", "valueInteger": report.version}
    ]
    if previous is not None:
        extensions.append(
            {
                "url": f"{FHIR_EXTENSION_BASE}/replaces",
                "valueReference": {
                    "reference": f"DiagnosticReport/{previous.id}",
                    "display": f"version {previous.version}",
                },
            }
        )
    if report.amendment_reason:
        extensions.append(
            {
                "url": f"{FHIR_EXTENSION_BASE}/amendment-reason",
                "valueString": report.amendment_reason,
            }
        )
    if recognition:
        extensions.append(_recognition_extension(recognition))
    identifiers: list[dict[str, Any]] = [
        {"use": "official", "system": "urn:rdc:report", "value": report.id}
    ]
    if exam.accession_number:
        identifiers.append(
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "ACSN",
                            "display": "Accession ID",
                        }
                    ]
                },
                "system": f"urn:rdc:accession:{quote(exam.organization.code, safe='')}",
                "value": exam.accession_number,
            }
        )
    name = display_name(patient.name or "")
    contained = _patient(exam)
    subject: dict[str, Any] = {
        "reference": f"#{contained['id']}",
        "identifier": {"system": issuer_system(patient.issuer), "value": patient.patient_id},
    }
    if name:
        subject["display"] = name
    conclusion = report.impression.strip() or report.findings.strip()
    narrative = (
        f'<div xmlns="http://www.w3.org/1999/xhtml"><p><b>{html.escape(code_display)}</b> '
        f"{html.escape(exam.description or exam.modality)} (v{report.version}, "
        f"{fhir_status(report)})</p><p>{html.escape(conclusion)}</p></div>"
    )
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": report.id,
        "text": {"status": "generated", "div": narrative},
        "contained": [contained],
        "extension": extensions,
        "identifier": identifiers,
        "status": fhir_status(report),
        "category": [
            {"coding": [{"system": _V2_0074, "code": category_code, "display": category_display}]}
        ],
        "code": {
            "coding": [{"system": _LOINC, "code": code, "display": code_display}],
            "text": exam.description or code_display,
        },
        "subject": subject,
        "effectiveDateTime": _when(exam.performed_at or exam.first_received_at),
        "issued": _when(issued),
        "performer": [_person(report.author)],
        "resultsInterpreter": [_person(signer)],
    }
    if exam.discipline is Discipline.IMAGING and exam.key_kind is ExamKeyKind.STUDY_UID:
        # The exam's natural key is then the study's UID.
        resource["imagingStudy"] = [
            {
                "identifier": {
                    "system": "urn:dicom:uid",
                    "value": f"urn:oid:{exam.natural_key}",
                },
                "display": exam.description or exam.modality,
            }
        ]
    observations = _observations(sections, report=report, exam=exam, contained=contained)
    if observations:
        resource["contained"] += observations
        resource["result"] = [
            {"reference": f"#{o['id']}", "display": o["code"]["text"]} for o in observations
        ]
    if conclusion:
        resource["conclusion"] = conclusion
    if pdf is not None:
        resource["presentedForm"] = [
            {
                "contentType": "application/pdf",
                "language": "zh-CN",
                "url": pdf_url,
                "size": len(pdf),
                "hash": base64.b64encode(hashlib.sha1(pdf).digest()).decode("ascii"),
                "title": pdf_title,
                "creation": _when(issued),
            }
        ]
    return resource
