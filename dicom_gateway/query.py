"""Query/Retrieve on the index: the matches of a C-FIND and the instances of a C-GET/C-MOVE.

Answered from the index tables (patients, exams, instances), always scoped to the calling
clinic's own data, as DICOMweb is. Matching (PS3.4 C.2.2.2): single values, wildcards
(``*``, ``?``), date ranges, UID lists and person names matched per component group
(alphabetic, ideographic, phonetic). Attributes the index does not hold are returned empty.

Signed reports are findable and retrievable too: each final report version is the
encapsulated-PDF series (modality DOC, one instance) that the push-back sends to the clinic,
with the same UIDs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import and_, distinct, func, or_, select
from sqlalchemy.orm import Session

from dicom_gateway.models import Instance
from dicom_gateway.report_push import report_instance_uids
from worklist.matching import match_values
from worklist.models import Exam, Patient, Report, ReportStatus

__all__ = [
    "GET_CLASSES",
    "MOVE_CLASSES",
    "QR_CLASSES",
    "QueryError",
    "RetrieveItem",
    "find",
    "instances_to_retrieve",
]

PATIENT_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE: Final = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET: Final = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE: Final = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET: Final = "1.2.840.10008.5.1.4.1.2.2.3"
FIND_CLASSES: Final = frozenset({PATIENT_ROOT_FIND, STUDY_ROOT_FIND})
MOVE_CLASSES: Final = frozenset({PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE})
GET_CLASSES: Final = frozenset({PATIENT_ROOT_GET, STUDY_ROOT_GET})
QR_CLASSES: Final = FIND_CLASSES | MOVE_CLASSES | GET_CLASSES
_PATIENT_ROOT: Final = frozenset({PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET})

MAX_MATCHES: Final = 5000
_LEVELS: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")
ENCAPSULATED_PDF: Final = "1.2.840.10008.5.1.4.1.1.104.1"
EXPLICIT_VR_LE: Final = "1.2.840.10008.1.2.1"


class QueryError(Exception):
    """A query that cannot be answered: its DIMSE status and the error comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True, slots=True)
class RetrieveItem:
    """One instance a C-GET or C-MOVE sends: a stored object (``storage_key``), or a signed
    report version's encapsulated PDF (``report_id``), made as the push-back makes it."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    storage_key: str
    report_id: str = ""


def _values(ds: Dataset, keyword: str) -> list[str]:
    """The non-empty matching values of ``keyword`` (a UID list gives several)."""
    if keyword not in ds:
        return []
    value = ds[keyword].value
    if value is None or value == "":
        return []
    items: Iterable[Any] = value if isinstance(value, MultiValue | list) else [value]
    return [str(v).strip() for v in items if str(v).strip() and str(v).strip() != "*"]


def _parse_date(text: str) -> date:
    try:
        return datetime.strptime(text.replace(".", ""), "%Y%m%d").date()
    except ValueError as exc:
        raise QueryError(0xA900, f"{text!r} is not a DICOM date") from exc


def _study_date(value: str, zone: ZoneInfo) -> Any:
    # Study dates are the clinic's local dates; performed_at is stored in UTC.
    start_text, dash, end_text = value.partition("-")
    if not dash:
        end_text = start_text
    clauses = []
    utc = ZoneInfo("UTC")
    if start_text:
        start = datetime.combine(_parse_date(start_text), datetime.min.time(), zone)
        clauses.append(Exam.performed_at >= start.astimezone(utc))
    if end_text:
        end = datetime.combine(_parse_date(end_text) + timedelta(days=1), datetime.min.time(), zone)
        clauses.append(Exam.performed_at < end.astimezone(utc))
    return and_(*clauses)


def _string_range(column: Any, value: str) -> Any:
    start, dash, end = value.partition("-")
    if not dash:
        return column == value
    clauses = []
    if start:
        clauses.append(column >= start)
    if end:
        clauses.append(column <= end)
    return and_(*clauses)


def _modality_in(column: Any, modality: str) -> Any:
    return or_(
        column == modality,
        column.like(f"{modality}\\%", escape="|"),
        column.like(f"%\\{modality}", escape="|"),
        column.like(f"%\\{modality}\\%", escape="|"),
    )


def _ints(keyword: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError as exc:
        raise QueryError(0xA900, f"{keyword} must be an integer") from exc


def _pn_group(name: str, index: int) -> str:
    groups = name.split("=")
    return groups[index].rstrip("^ ") if index < len(groups) else ""


def pn_matches(query: str, stored: str) -> bool:
    """Person name matching per component group (PS3.4 C.2.2.2.1): each group of the query
    that is given must match the same group of the stored name; ``*`` and ``?`` are wildcards;
    letters match regardless of case."""
    for index, wanted in enumerate(query.split("=")):
        wanted = wanted.rstrip("^ ")
        if not wanted or wanted == "*":
            continue
        have = _pn_group(stored, index)
        if "*" in wanted or "?" in wanted:
            if not fnmatch.fnmatchcase(have.lower(), wanted.lower()):
                return False
        elif have.lower() != wanted.lower():
            return False
    return True


def _level(identifier: Dataset, sop_class: str) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in _LEVELS:
        raise QueryError(0xA900, f"Query/Retrieve Level {level!r} is not valid")
    if level == "PATIENT" and sop_class not in _PATIENT_ROOT:
        raise QueryError(0xA900, "the Study Root model has no PATIENT level")
    return level


def _filters(identifier: Dataset, level: str, zone: ZoneInfo) -> tuple[list[Any], list[str]]:
    """SQL filters for the matching keys of ``identifier`` up to ``level``, and the person
    name queries (matched afterwards per component group)."""
    filters: list[Any] = []
    ids = _values(identifier, "PatientID")
    if ids:
        filters.append(match_values(Patient.patient_id, ids))
    birth = _values(identifier, "PatientBirthDate")
    if birth:
        filters.append(or_(*(_string_range(Patient.birth_date, v) for v in birth)))
    sex = _values(identifier, "PatientSex")
    if sex:
        filters.append(Patient.sex.in_(sex))
    names = _values(identifier, "PatientName")
    if level == "PATIENT":
        return filters, names
    studies = _values(identifier, "StudyInstanceUID")
    if studies:
        filters.append(Exam.study_instance_uid.in_(studies))
    accession = _values(identifier, "AccessionNumber")
    if accession:
        filters.append(match_values(Exam.accession_number, accession))
    description = _values(identifier, "StudyDescription")
    if description:
        filters.append(match_values(Exam.description, description, ignore_case=True))
    dates = _values(identifier, "StudyDate")
    if dates:
        filters.append(or_(*(_study_date(v, zone) for v in dates)))
    modalities = _values(identifier, "ModalitiesInStudy")
    if level == "STUDY":
        modalities += _values(identifier, "Modality")
    if modalities:
        filters.append(or_(*(_modality_in(Exam.modalities, m.upper()) for m in modalities)))
    if level == "STUDY":
        return filters, names
    series = _values(identifier, "SeriesInstanceUID")
    if series:
        filters.append(Instance.series_instance_uid.in_(series))
    modality = _values(identifier, "Modality")
    if modality:
        filters.append(match_values(Instance.modality, [m.upper() for m in modality]))
    numbers = _values(identifier, "SeriesNumber")
    if numbers:
        filters.append(Instance.series_number.in_(_ints("SeriesNumber", numbers)))
    if level == "SERIES":
        return filters, names
    sops = _values(identifier, "SOPInstanceUID")
    if sops:
        filters.append(Instance.sop_instance_uid.in_(sops))
    classes = _values(identifier, "SOPClassUID")
    if classes:
        filters.append(Instance.sop_class_uid.in_(classes))
    instance_numbers = _values(identifier, "InstanceNumber")
    if instance_numbers:
        filters.append(Instance.instance_number.in_(_ints("InstanceNumber", instance_numbers)))
    return filters, names


def _local(moment: datetime | None, zone: ZoneInfo) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo("UTC"))
    return moment.astimezone(zone)


def _answer(identifier: Dataset, level: str, known: dict[str, Any]) -> Dataset:
    """A response identifier: every key the request asked for, with the value we hold (or
    empty), plus the level and the character set (UTF-8)."""
    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword == "SpecificCharacterSet" or element.VR == "SQ":
            continue
        value = known.get(keyword)
        setattr(out, keyword, "" if value is None else value)
    out.QueryRetrieveLevel = level
    return out


def _patient_values(patient: Patient) -> dict[str, Any]:
    return {
        "PatientName": patient.name,
        "PatientID": patient.patient_id,
        "PatientBirthDate": patient.birth_date or "",
        "PatientSex": patient.sex or "",
    }


def _study_values(exam: Exam, zone: ZoneInfo) -> dict[str, Any]:
    performed = _local(exam.performed_at, zone)
    return {
        "StudyInstanceUID": exam.study_instance_uid,
        "StudyDate": performed.strftime("%Y%m%d") if performed else "",
        "StudyTime": performed.strftime("%H%M%S") if performed else "",
        "AccessionNumber": exam.accession_number or "",
        "StudyDescription": exam.description,
        "ModalitiesInStudy": exam.modalities.split("\\") if exam.modalities else "",
        "NumberOfStudyRelatedInstances": exam.instance_count,
    }


def find(
    session: Session, *, org_id: str, sop_class: str, identifier: Dataset, zone: ZoneInfo
) -> list[Dataset]:
    """The C-FIND matches of ``identifier`` among ``org_id``'s data (at most MAX_MATCHES).
    Raises QueryError for an identifier that cannot be matched."""
    level = _level(identifier, sop_class)
    filters, names = _filters(identifier, level, zone)
    out: list[Dataset] = []

    def named(patient: Patient) -> bool:
        return all(pn_matches(n, patient.name) for n in names)

    if level == "PATIENT":
        counts = (
            select(Exam.patient_ref, func.count(Exam.id).label("studies"))
            .where(Exam.org_id == org_id)
            .group_by(Exam.patient_ref)
            .subquery()
        )
        rows = session.execute(
            select(Patient, counts.c.studies)
            .join(counts, counts.c.patient_ref == Patient.id)
            .where(Patient.org_id == org_id, *filters)
            .order_by(Patient.patient_id)
            .limit(MAX_MATCHES)
        )
        for patient, studies in rows:
            if named(patient):
                known = _patient_values(patient) | {"NumberOfPatientRelatedStudies": studies}
                out.append(_answer(identifier, level, known))
        return out
    if level == "STUDY":
        series_counts = (
            select(Instance.exam_id, func.count(distinct(Instance.series_instance_uid)).label("n"))
            .group_by(Instance.exam_id)
            .subquery()
        )
        study_rows = session.execute(
            select(Exam, Patient, series_counts.c.n)
            .join(Patient, Patient.id == Exam.patient_ref)
            .outerjoin(series_counts, series_counts.c.exam_id == Exam.id)
            .where(Exam.org_id == org_id, *filters)
            .order_by(Exam.performed_at, Exam.study_instance_uid)
            .limit(MAX_MATCHES)
        )
        for exam, patient, series_count in study_rows:
            if named(patient):
                known = _patient_values(patient) | _study_values(exam, zone)
                known["NumberOfStudyRelatedSeries"] = series_count or 0
                out.append(_answer(identifier, level, known))
        return out
    base = (
        select(Instance, Exam, Patient)
        .join(Exam, Exam.id == Instance.exam_id)
        .join(Patient, Patient.id == Exam.patient_ref)
        .where(Exam.org_id == org_id, *filters)
        .order_by(Instance.series_number, Instance.series_instance_uid, Instance.instance_number)
    )
    seen: dict[str, Dataset] = {}
    for instance, exam, patient in session.execute(base):
        if not named(patient):
            continue
        known = _patient_values(patient) | _study_values(exam, zone)
        known |= {
            "SeriesInstanceUID": instance.series_instance_uid,
            "SeriesNumber": instance.series_number,
            "Modality": instance.modality,
            "BodyPartExamined": instance.body_part,
        }
        if level == "SERIES":
            answer = seen.get(instance.series_instance_uid)
            if answer is None:
                if len(out) >= MAX_MATCHES:
                    break
                known["NumberOfSeriesRelatedInstances"] = 0
                answer = _answer(identifier, level, known)
                seen[instance.series_instance_uid] = answer
                out.append(answer)
            if "NumberOfSeriesRelatedInstances" in answer:
                answer.NumberOfSeriesRelatedInstances = (
                    int(answer.NumberOfSeriesRelatedInstances) + 1
                )
            continue
        known |= {
            "SOPInstanceUID": instance.sop_instance_uid,
            "SOPClassUID": instance.sop_class_uid,
            "InstanceNumber": instance.instance_number,
            "NumberOfFrames": instance.frame_count,
        }
        out.append(_answer(identifier, level, known))
        if len(out) >= MAX_MATCHES:
            break
    for known in _report_matches(
        session, org_id=org_id, identifier=identifier, level=level, zone=zone
    ):
        if len(out) >= MAX_MATCHES:
            break
        out.append(_answer(identifier, level, known))
    return out


def _wanted(identifier: Dataset, keyword: str, value: str) -> bool:
    values = _values(identifier, keyword)
    return not values or any(fnmatch.fnmatchcase(value, v) for v in values)


def _final_reports(
    session: Session, *, org_id: str, identifier: Dataset, level: str, zone: ZoneInfo
) -> list[tuple[Report, Exam, Patient, str, str]]:
    """The final report versions matching ``identifier`` at SERIES or IMAGE level (the study
    keys, then the PDF series' own): (report, exam, patient, series UID, SOP instance UID)."""
    if any(_values(identifier, k) for k in ("SeriesNumber", "InstanceNumber")):
        return []
    study_keys = Dataset()
    for element in identifier:
        if element.keyword not in ("Modality", "SeriesInstanceUID", "SOPInstanceUID"):
            study_keys.add(element)
    filters, names = _filters(study_keys, "STUDY", zone)
    rows = session.execute(
        select(Report, Exam, Patient)
        .join(Exam, Exam.id == Report.exam_id)
        .join(Patient, Patient.id == Exam.patient_ref)
        .where(
            Exam.org_id == org_id,
            Report.status == ReportStatus.FINAL,
            # Exams of other intakes (lab orders) have no study to file a PDF series in.
            Exam.study_instance_uid.is_not(None),
            *filters,
        )
        .order_by(Exam.study_instance_uid, Report.version)
    )
    out: list[tuple[Report, Exam, Patient, str, str]] = []
    for report, exam, patient in rows:
        series_uid, sop_uid = report_instance_uids(report.id)
        if not all(pn_matches(n, patient.name) for n in names):
            continue
        if not (
            _wanted(identifier, "Modality", "DOC")
            and _wanted(identifier, "SeriesInstanceUID", series_uid)
        ):
            continue
        if level == "IMAGE" and not (
            _wanted(identifier, "SOPInstanceUID", sop_uid)
            and _wanted(identifier, "SOPClassUID", ENCAPSULATED_PDF)
        ):
            continue
        out.append((report, exam, patient, series_uid, sop_uid))
    return out


def _report_matches(
    session: Session, *, org_id: str, identifier: Dataset, level: str, zone: ZoneInfo
) -> list[dict[str, Any]]:
    """The final report versions matching a SERIES or IMAGE query, as their PDF series."""
    out: list[dict[str, Any]] = []
    for report, exam, patient, series_uid, sop_uid in _final_reports(
        session, org_id=org_id, identifier=identifier, level=level, zone=zone
    ):
        known = _patient_values(patient) | _study_values(exam, zone)
        known |= {
            "SeriesInstanceUID": series_uid,
            "Modality": "DOC",
            "SeriesDescription": f"Report v{report.version}",
            "NumberOfSeriesRelatedInstances": 1,
            "SOPInstanceUID": sop_uid,
            "SOPClassUID": ENCAPSULATED_PDF,
            "InstanceNumber": 1,
            "NumberOfFrames": None,
        }
        out.append(known)
    return out


def instances_to_retrieve(
    session: Session, *, org_id: str, sop_class: str, identifier: Dataset, zone: ZoneInfo
) -> list[RetrieveItem]:
    """The stored instances a C-GET/C-MOVE of ``identifier`` sends, among ``org_id``'s data.
    A retrieve names at least one unique key (patient, study, series or SOP instance)."""
    level = _level(identifier, sop_class)
    unique = {
        "PATIENT": "PatientID",
        "STUDY": "StudyInstanceUID",
        "SERIES": "SeriesInstanceUID",
        "IMAGE": "SOPInstanceUID",
    }[level]
    if not _values(identifier, unique):
        raise QueryError(0xA900, f"a {level} retrieve needs {unique}")
    filters, names = _filters(identifier, "IMAGE", zone)
    rows = session.execute(
        select(Instance, Patient.name)
        .join(Exam, Exam.id == Instance.exam_id)
        .join(Patient, Patient.id == Exam.patient_ref)
        .where(Exam.org_id == org_id, *filters)
        .order_by(Instance.series_instance_uid, Instance.instance_number)
    )
    items = [
        RetrieveItem(
            instance.sop_class_uid,
            instance.sop_instance_uid,
            instance.transfer_syntax_uid,
            instance.storage_key,
        )
        for instance, name in rows
        if all(pn_matches(n, name) for n in names)
    ]
    # The signed reports of the matched studies (or the report series/instance named).
    reports = _final_reports(
        session, org_id=org_id, identifier=identifier, level="IMAGE", zone=zone
    )
    for report, _exam, _patient, _series_uid, sop_uid in reports:
        items.append(RetrieveItem(ENCAPSULATED_PDF, sop_uid, EXPLICIT_VR_LE, "", report.id))
    return items
