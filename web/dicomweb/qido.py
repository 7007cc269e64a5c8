"""QIDO-RS (PS3.18 10.6): searching studies, series and instances on the index.

Matching runs in the database on the index tables (exams, patients, instances), always
scoped to what the caller may see. Attributes the index does not hold (Study Date as
written, Series Description, Rows, Columns, ...) are taken from the header of one stored
object per result (cached), never used for matching.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.valuerep import BYTES_VR
from sqlalchemy import ColumnElement, and_, distinct, false, func, or_, select
from sqlalchemy.orm import Session

from dicom_gateway.models import Instance
from dicom_gateway.pixels import read_instance_header
from rdc_core.db import read_session, session_scope
from rdc_core.errors import InvalidInputError, RDCError
from rdc_core.settings import get_settings
from rdc_core.storage import ObjectStore
from web.dicomweb.dicomjson import element, parse_tag
from worklist.access import Principal
from worklist.audit import record_access
from worklist.matching import match_values
from worklist.models import Exam, Patient
from worklist.person_names import person_name_matches

__all__ = ["Level", "QidoQuery", "QidoResult", "parse_qido_query", "search"]

log = logging.getLogger(__name__)

Level = Literal["study", "series", "instance"]

DEFAULT_LIMIT: Final = {"study": 100, "series": 1000, "instance": 5000}
MAX_LIMIT: Final = 5000
_UNKNOWN_PARAMS_IGNORED: Final = frozenset({"fuzzymatching", "includefield", "limit", "offset"})
_LIST_SEPARATORS: Final = (",", "\\")

# Default return attributes per level (PS3.18 Table 10.6.3-3/-4/-5), plus Study Description
# and Series Date that viewers show.
STUDY_TAGS: Final = (
    0x00080020,  # StudyDate
    0x00080030,  # StudyTime
    0x00080050,  # AccessionNumber
    0x00080056,  # InstanceAvailability
    0x00080061,  # ModalitiesInStudy
    0x00080090,  # ReferringPhysicianName
    0x00081030,  # StudyDescription
    0x00081190,  # RetrieveURL
    0x00100010,  # PatientName
    0x00100020,  # PatientID
    0x00100030,  # PatientBirthDate
    0x00100040,  # PatientSex
    0x0020000D,  # StudyInstanceUID
    0x00200010,  # StudyID
    0x00201206,  # NumberOfStudyRelatedSeries
    0x00201208,  # NumberOfStudyRelatedInstances
)
SERIES_TAGS: Final = (
    0x00080021,  # SeriesDate
    0x00080031,  # SeriesTime
    0x00080060,  # Modality
    0x0008103E,  # SeriesDescription
    0x00081190,  # RetrieveURL
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200011,  # SeriesNumber
    0x00201209,  # NumberOfSeriesRelatedInstances
    0x00400244,  # PerformedProcedureStepStartDate
    0x00400245,  # PerformedProcedureStepStartTime
    0x00400275,  # RequestAttributesSequence
)
INSTANCE_TAGS: Final = (
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080056,  # InstanceAvailability
    0x00081190,  # RetrieveURL
    0x00083002,  # AvailableTransferSyntaxUID
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200013,  # InstanceNumber
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # BitsAllocated
)
_RETRIEVE_URL = 0x00081190
_TIMEZONE_OFFSET = 0x00080201  # returned when the object has it (PS3.18 Table 10.6.3-3)
# Lists that viewers index into (OHIF's study list failed on an empty Modalities in Study):
# left out when no value is known, instead of being sent empty.
_OMITTED_WHEN_EMPTY: Final = frozenset({0x00080061, 0x00080060})
_AVAILABILITY = 0x00080056
_BULK_VRS: Final = frozenset(str(vr) for vr in BYTES_VR)

# Matching keys and the level they belong to; anything else is reported as not supported.
_STUDY_KEYS: Final = frozenset(
    {
        "PatientName",
        "PatientID",
        "StudyDate",
        "AccessionNumber",
        "ModalitiesInStudy",
        "StudyInstanceUID",
        "StudyDescription",
    }
)
_SERIES_KEYS: Final = frozenset({"SeriesInstanceUID", "Modality", "SeriesNumber"})
_INSTANCE_KEYS: Final = frozenset({"SOPInstanceUID", "SOPClassUID", "InstanceNumber"})
_KEYS_AT: Final[dict[str, frozenset[str]]] = {
    "study": _STUDY_KEYS | {"Modality"},
    "series": _STUDY_KEYS | _SERIES_KEYS,
    "instance": _STUDY_KEYS | _SERIES_KEYS | _INSTANCE_KEYS,
}


@dataclass(frozen=True, slots=True)
class QidoQuery:
    """A parsed QIDO-RS request."""

    level: Level
    study_uid: str | None = None  # from the path
    series_uid: str | None = None  # from the path
    match: dict[str, list[str]] = field(default_factory=dict)
    include: frozenset[int] = frozenset()
    include_all: bool = False
    limit: int = 100
    offset: int = 0
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QidoResult:
    """Matches in the DICOM JSON model; ``truncated`` when more matches exist."""

    items: list[dict[str, Any]]
    truncated: bool
    unsupported: tuple[str, ...]


def _split(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        for sep in _LIST_SEPARATORS[1:]:
            value = value.replace(sep, _LIST_SEPARATORS[0])
        out.extend(v.strip() for v in value.split(_LIST_SEPARATORS[0]) if v.strip())
    return out


def _int_param(name: str, values: list[str], default: int, *, low: int, high: int) -> int:
    if not values:
        return default
    try:
        number = int(values[-1])
    except ValueError as exc:
        raise InvalidInputError(f"{name} must be an integer") from exc
    if not low <= number <= high:
        raise InvalidInputError(f"{name} must be between {low} and {high}")
    return number


def parse_qido_query(
    params: Sequence[tuple[str, str]],
    *,
    level: Level,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> QidoQuery:
    """Translate QIDO-RS query parameters (keywords or tags as keys; ``includefield``,
    ``limit``, ``offset``, ``fuzzymatching``). Raises InvalidInputError."""
    grouped: dict[str, list[str]] = {}
    for name, value in params:
        grouped.setdefault(name, []).append(value)
    include: set[int] = set()
    include_all = False
    for name in _split(grouped.get("includefield", [])):
        if name.lower() == "all":
            include_all = True
        else:
            include.add(int(parse_tag(name)))
    match: dict[str, list[str]] = {}
    unsupported: list[str] = []
    for name, values in grouped.items():
        if name.lower() in _UNKNOWN_PARAMS_IGNORED:
            continue
        try:
            keyword = keyword_for_tag(parse_tag(name)) or name
        except InvalidInputError:
            unsupported.append(name)
            continue
        if keyword not in _KEYS_AT[level]:
            unsupported.append(name)
            continue
        values = [v for v in values if v != ""]  # an empty key matches everything
        if values:
            match[keyword] = values
    return QidoQuery(
        level=level,
        study_uid=study_uid,
        series_uid=series_uid,
        match=match,
        include=frozenset(include),
        include_all=include_all,
        limit=_int_param(
            "limit", grouped.get("limit", []), DEFAULT_LIMIT[level], low=1, high=MAX_LIMIT
        ),
        offset=_int_param("offset", grouped.get("offset", []), 0, low=0, high=10**9),
        unsupported=tuple(sorted(unsupported)),
    )


# ---------------------------------------------------------------------------------------
# Matching on the index


def _parse_date(text: str) -> date:
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError as exc:
        raise InvalidInputError(f"{text!r} is not a DICOM date (YYYYMMDD)") from exc


def _date_range(value: str, zone: ZoneInfo) -> Any:
    # Study dates are the clinic's local dates; performed_at is stored in UTC.
    if "-" in value:
        start_text, _, end_text = value.partition("-")
    else:
        start_text = end_text = value
    if not start_text and not end_text:
        raise InvalidInputError("a date range needs at least one end")
    # A bound whose time falls off the calendar once in UTC (the first day of year 1 east of
    # Greenwich, the day after 9999-12-31) bounds nothing: the range is open on that side.
    clauses: list[ColumnElement[bool]] = [Exam.performed_at.is_not(None)]
    if start_text:
        day = _parse_date(start_text)
        with contextlib.suppress(OverflowError):
            start = datetime.combine(day, datetime.min.time(), zone).astimezone(UTC)
            clauses.append(Exam.performed_at >= start)
    if end_text:
        day = _parse_date(end_text)
        with contextlib.suppress(OverflowError):
            end = datetime.combine(day + timedelta(days=1), datetime.min.time(), zone)
            clauses.append(Exam.performed_at < end.astimezone(UTC))
    return and_(*clauses)


def _modality_in(column: Any, modality: str) -> Any:
    # exams.modalities is a backslash-separated list.
    return or_(
        column == modality,
        column.like(f"{modality}\\%", escape="|"),
        column.like(f"%\\{modality}", escape="|"),
        column.like(f"%\\{modality}\\%", escape="|"),
    )


def _study_filters(query: QidoQuery, zone: ZoneInfo) -> list[Any]:
    m = query.match
    # DICOM studies only: exams of other intakes (lab orders, uploaded files) have no UID.
    filters: list[Any] = [Exam.study_instance_uid.is_not(None)]
    studies = _split(m.get("StudyInstanceUID", []))
    if query.study_uid:
        if studies and query.study_uid not in studies:
            return [false()]  # the path and the query name different studies
        studies = [query.study_uid]
    if studies:
        filters.append(Exam.study_instance_uid.in_(studies))
    if "PatientName" in m:
        filters.append(person_name_matches(Patient.name, m["PatientName"]))
    if "PatientID" in m:
        filters.append(match_values(Patient.patient_id, m["PatientID"]))
    if "AccessionNumber" in m:
        filters.append(match_values(Exam.accession_number, m["AccessionNumber"]))
    if "StudyDescription" in m:
        filters.append(match_values(Exam.description, m["StudyDescription"], ignore_case=True))
    if "StudyDate" in m:
        filters.append(or_(*(_date_range(v, zone) for v in m["StudyDate"])))
    modalities = _split(m.get("ModalitiesInStudy", []))
    if query.level == "study":
        modalities += _split(m.get("Modality", []))
    if modalities:
        filters.append(or_(*(_modality_in(Exam.modalities, v.upper()) for v in modalities)))
    return filters


def _int_values(name: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in _split(values)]
    except ValueError as exc:
        raise InvalidInputError(f"{name} must be an integer") from exc


def _instance_filters(query: QidoQuery) -> list[Any]:
    m = query.match
    filters: list[Any] = []
    series = _split(m.get("SeriesInstanceUID", []))
    if query.series_uid:
        if series and query.series_uid not in series:
            return [false()]
        series = [query.series_uid]
    if series:
        filters.append(Instance.series_instance_uid.in_(series))
    if query.level != "study" and "Modality" in m:
        filters.append(Instance.modality.in_([v.upper() for v in _split(m["Modality"])]))
    if "SeriesNumber" in m:
        filters.append(Instance.series_number.in_(_int_values("SeriesNumber", m["SeriesNumber"])))
    if "SOPInstanceUID" in m:
        filters.append(Instance.sop_instance_uid.in_(_split(m["SOPInstanceUID"])))
    if "SOPClassUID" in m:
        filters.append(Instance.sop_class_uid.in_(_split(m["SOPClassUID"])))
    if "InstanceNumber" in m:
        numbers = _int_values("InstanceNumber", m["InstanceNumber"])
        filters.append(Instance.instance_number.in_(numbers))
    return filters


def _scope(principal: Principal) -> list[ColumnElement[bool]]:
    # A clinic sees only its own exams; another clinic's studies simply do not match.
    if principal.is_clinic_user:
        return [Exam.org_id == principal.org_id]
    return []


@dataclass(frozen=True, slots=True)
class _Study:
    """What a result needs of an exam and its patient, copied out of the session."""

    exam_id: str
    study_instance_uid: str
    accession_number: str | None
    modalities: str
    description: str
    performed_at: datetime | None
    patient_id: str
    patient_name: str
    patient_birth_date: str | None
    patient_sex: str | None

    @classmethod
    def of(cls, exam: Exam, patient: Patient) -> _Study:
        return cls(
            exam_id=exam.id,
            study_instance_uid=exam.study_instance_uid or "",
            accession_number=exam.accession_number,
            modalities=exam.modalities,
            description=exam.description,
            performed_at=exam.performed_at,
            patient_id=patient.patient_id,
            patient_name=patient.name,
            patient_birth_date=patient.birth_date,
            patient_sex=patient.sex,
        )


@dataclass(frozen=True, slots=True)
class _Row:
    study: _Study
    storage_key: str | None
    values: dict[int, Any]


def _find_studies(session: Session, principal: Principal, query: QidoQuery) -> list[_Row]:
    zone = get_settings().zone
    stmt = select(Exam, Patient).join(Patient, Patient.id == Exam.patient_ref)
    stmt = stmt.where(*_study_filters(query, zone), *_scope(principal))
    stmt = stmt.order_by(Exam.performed_at.desc().nulls_last(), Exam.study_instance_uid)
    page = session.execute(stmt.limit(query.limit + 1).offset(query.offset)).all()
    ids = [exam.id for exam, _ in page]
    counts = {
        row.exam_id: row
        for row in session.execute(
            select(
                Instance.exam_id,
                func.count(distinct(Instance.series_instance_uid)).label("series"),
                func.count().label("instances"),
                func.min(Instance.storage_key).label("key"),
            )
            .where(Instance.exam_id.in_(ids))
            .group_by(Instance.exam_id)
        )
    }
    # Modalities in Study from the series as well: the exam's list is kept at intake, the
    # series' Modality is what the instances say.
    modalities: dict[str, list[str]] = {}
    for exam_id, modality in session.execute(
        select(Instance.exam_id, Instance.modality)
        .where(Instance.exam_id.in_(ids), Instance.modality != "")
        .distinct()
    ):
        modalities.setdefault(exam_id, []).append(modality)
    rows = []
    for exam, patient in page:
        count = counts.get(exam.id)
        listed = [m for m in exam.modalities.split("\\") if m]
        listed += sorted(set(modalities.get(exam.id, [])) - set(listed))
        rows.append(
            _Row(
                _Study.of(exam, patient),
                count.key if count else None,
                {
                    0x00080061: listed or None,
                    0x00201206: count.series if count else 0,
                    0x00201208: count.instances if count else 0,
                },
            )
        )
    return rows


def _find_series(session: Session, principal: Principal, query: QidoQuery) -> list[_Row]:
    zone = get_settings().zone
    grouped = (
        select(
            Instance.exam_id,
            Instance.series_instance_uid,
            func.count().label("instances"),
            func.min(Instance.series_number).label("number"),
            func.max(Instance.modality).label("modality"),
            func.min(Instance.storage_key).label("key"),
        )
        .join(Exam, Exam.id == Instance.exam_id)
        .join(Patient, Patient.id == Exam.patient_ref)
        .where(*_study_filters(query, zone), *_instance_filters(query), *_scope(principal))
        .group_by(Instance.exam_id, Instance.series_instance_uid)
    )
    page = session.execute(
        grouped.order_by(
            Instance.exam_id,
            func.min(Instance.series_number),
            Instance.series_instance_uid,
        )
        .limit(query.limit + 1)
        .offset(query.offset)
    ).all()
    exams = {
        exam.id: _Study.of(exam, patient)
        for exam, patient in session.execute(
            select(Exam, Patient)
            .join(Patient, Patient.id == Exam.patient_ref)
            .where(Exam.id.in_({row.exam_id for row in page}))
        )
    }
    return [
        _Row(
            exams[row.exam_id],
            row.key,
            {
                0x0020000E: row.series_instance_uid,
                0x00200011: row.number,
                0x00080060: row.modality or None,
                0x00201209: row.instances,
            },
        )
        for row in page
    ]


def _find_instances(session: Session, principal: Principal, query: QidoQuery) -> list[_Row]:
    zone = get_settings().zone
    stmt = (
        select(Instance, Exam, Patient)
        .join(Exam, Exam.id == Instance.exam_id)
        .join(Patient, Patient.id == Exam.patient_ref)
        .where(*_study_filters(query, zone), *_instance_filters(query), *_scope(principal))
        .order_by(
            Exam.study_instance_uid,
            Instance.series_number,
            Instance.series_instance_uid,
            Instance.instance_number,
            Instance.sop_instance_uid,
        )
    )
    page = session.execute(stmt.limit(query.limit + 1).offset(query.offset)).all()
    return [
        _Row(
            _Study.of(exam, patient),
            instance.storage_key,
            {
                0x0020000E: instance.series_instance_uid,
                0x00200011: instance.series_number,
                0x00080060: instance.modality or None,
                0x00080016: instance.sop_class_uid,
                0x00080018: instance.sop_instance_uid,
                0x00200013: instance.instance_number,
                0x00083002: instance.transfer_syntax_uid,
            },
        )
        for instance, exam, patient in page
    ]


# ---------------------------------------------------------------------------------------
# Building the results


def _header(store: ObjectStore, storage_key: str | None) -> Dataset | None:
    if storage_key is None:
        return None
    try:
        return read_instance_header(store, storage_key)
    except RDCError as exc:
        # A result is still useful without the header's extra attributes.
        log.warning("QIDO: header of %s not readable: %s", storage_key, exc)
        return None


def _local_date_time(value: datetime | None, zone: ZoneInfo) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    local = value.astimezone(zone)
    return local.strftime("%Y%m%d"), local.strftime("%H%M%S")


def _result(
    row: _Row, query: QidoQuery, header: Dataset | None, base_url: str, zone: ZoneInfo
) -> dict[str, Any]:
    level = query.level
    tags: list[int] = []
    if level == "study" or query.study_uid is None:
        tags += STUDY_TAGS
    if level == "series" or (level == "instance" and query.series_uid is None):
        tags += SERIES_TAGS
    if level == "instance":
        tags += INSTANCE_TAGS
    wanted = list(dict.fromkeys([*tags, _TIMEZONE_OFFSET, *sorted(query.include)]))
    ds = Dataset()
    if header is not None:
        # Descriptive attributes as written in the object (names in every script, the
        # dates as sent); identifiers come from the index below.
        names = list(header.keys()) if query.include_all else wanted
        for tag in names:
            if tag in header and tag not in (_RETRIEVE_URL,):
                elem = header[tag]
                if str(elem.VR) not in _BULK_VRS:
                    ds.add(elem)
    exam = row.study
    study_date, study_time = _local_date_time(exam.performed_at, zone)
    fallbacks: dict[int, Any] = {
        0x00080020: study_date,
        0x00080030: study_time,
        0x00081030: exam.description or None,
        0x00100010: exam.patient_name or None,
        0x00100030: exam.patient_birth_date,
        0x00100040: exam.patient_sex,
    }
    for tag, value in fallbacks.items():
        if tag in wanted and tag not in ds:
            ds.add(element(tag, value))
    study_url = f"{base_url}/studies/{exam.study_instance_uid}"
    index_values: dict[int, Any] = {
        0x0020000D: exam.study_instance_uid,
        0x00100020: exam.patient_id,
        0x00080050: exam.accession_number,
        0x00080061: [m for m in exam.modalities.split("\\") if m] or None,
        _AVAILABILITY: "ONLINE",
        **row.values,
    }
    if level == "study":
        index_values[_RETRIEVE_URL] = study_url
    elif level == "series":
        index_values[_RETRIEVE_URL] = f"{study_url}/series/{row.values[0x0020000E]}"
    else:
        index_values[_RETRIEVE_URL] = (
            f"{study_url}/series/{row.values[0x0020000E]}/instances/{row.values[0x00080018]}"
        )
    for tag, value in index_values.items():
        if tag in wanted or query.include_all:
            ds.add(element(tag, value))
    for tag in wanted:
        if tag not in ds and tag != _TIMEZONE_OFFSET:
            try:
                ds.add(element(tag))
            except KeyError:
                continue  # a private or unknown tag asked for by includefield
    for tag in _OMITTED_WHEN_EMPTY:
        if tag in ds and ds[tag].is_empty:
            del ds[tag]
    return ds.to_json_dict()


def search(
    *, principal: Principal, query: QidoQuery, store: ObjectStore, base_url: str
) -> QidoResult:
    """Run a QIDO-RS search for ``principal`` (audited); ``base_url`` is the DICOMweb root
    the RetrieveURLs point to."""
    finder = {"study": _find_studies, "series": _find_series, "instance": _find_instances}
    # Matching needs only a read transaction; the audit record is written after it in a
    # short write transaction, so the database write lock is not held while headers are
    # read from the store.
    with read_session() as session:
        rows = finder[query.level](session, principal, query)
    truncated = len(rows) > query.limit
    rows = rows[: query.limit]
    with session_scope() as session:
        record_access(
            session,
            principal,
            action="list",
            object_type="exam",
            detail={
                "via": "dicomweb",
                "level": query.level,
                "exam_ids": sorted({row.study.exam_id for row in rows}),
            },
        )
    zone = get_settings().zone
    items = [_result(row, query, _header(store, row.storage_key), base_url, zone) for row in rows]
    return QidoResult(items=items, truncated=truncated, unsupported=query.unsupported)
