"""The ECG centre's services: intake of uploaded ECG files through the hub's intake contract,
the analysis of DICOM ECG waveforms received by C-STORE / STOW, and reading what was
measured.

Services are keyword-only, take the session and never commit; the edges (HTTP route,
``rdc import``, the analysis task) commit.

Intake of an upload (:func:`prepare_ecg` then :func:`ingest_ecg`):

1. parse and measure the files first (no database, no store): what cannot be read is
   refused with :class:`EcgInputError` (422) naming the problem, and nothing is stored;
2. store the files (content-addressed keys: ``ecg/<record hash>/<file name>``; a WFDB
   record keeps its header and signal files side by side, under their own names);
3. register the artifact (kind ``ecg_file``) through :func:`worklist.intake.register_artifact`
   under the exam's natural key (the SOP Instance UID of a DICOM file, else the record's
   SHA-256), writing the ``ecg_studies`` detail row in the same transaction; an upload of
   the same record again is the same exam (idempotent);
4. make the exam READY at once (one file is the whole exam) and, when a critical pre-screen
   rule matched, put it first in the reading queue with the reason
   (:func:`worklist.readiness.triage_exam`). Nothing is ever signed or released here.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, exists, select
from sqlalchemy.orm import Session

from ecg_service.analysis import MEASUREMENT_KEYS, UNRELIABLE, EcgAnalysis, analyse
from ecg_service.models import EcgStudy
from ecg_service.parsers import parse_ecg
from ecg_service.prescreen import PrescreenMatch, RuleTable, load_rules, prescreen
from ecg_service.record import EcgFormatError, EcgRecord
from ecg_service.schemas import (
    DeviceMeasurementOut,
    EcgMeasurements,
    EcgOut,
    LeadQualityOut,
    PrescreenOut,
    RhythmOut,
)
from rdc_core.db import on_rollback, upsert, utcnow
from rdc_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from rdc_core.settings import get_settings
from rdc_core.storage import ObjectStore
from worklist.access import Principal
from worklist.artifact_details import format_clause
from worklist.audit import record_access
from worklist.directory import OrgRef, get_organization, org_ref
from worklist.intake import (
    ArtifactIn,
    ExamIn,
    ExamKeyKind,
    PatientIn,
    PendingObject,
    RecordOutcome,
    artifact_id_for,
    find_artifact,
    register_artifact,
    remove_unreferenced,
    store_object,
)
from worklist.models import (
    Artifact,
    Discipline,
    Exam,
    ExamState,
    Organization,
    OrgKind,
    Role,
)
from worklist.queries import visible_exam
from worklist.readiness import mark_exam_ready, triage_exam

__all__ = [
    "ANALYSIS_VERSION",
    "ECG_FILE_KIND",
    "ECG_SOP_CLASSES",
    "EcgForm",
    "EcgIngestResult",
    "EcgInputError",
    "PendingWaveform",
    "PreparedEcg",
    "analysis_values",
    "exams_awaiting_analysis",
    "get_ecg",
    "ingest_ecg",
    "load_record",
    "pending_dicom_waveform",
    "prepare_ecg",
    "prescreen_rules",
    "record_analysis",
    "triage_reason",
    "upload_org",
]

log = logging.getLogger(__name__)

ANALYSIS_VERSION = "rdc-ecg-1"
ECG_FILE_KIND = "ecg_file"  # the artifact kind of an uploaded ECG record
ECG_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
        "1.2.840.10008.5.1.4.1.1.9.1.3",  # Ambulatory ECG Waveform Storage
    }
)
_CLINIC_UPLOADERS = frozenset({Role.TECHNICIAN, Role.CLINICIAN})
_LEAD_UPLOADERS = frozenset({Role.ADMIN, Role.READER, Role.SENIOR_READER})
_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_MAX_FILES = 16


class EcgInputError(InvalidInputError):
    """The upload is not an ECG RDC can read (or lacks what the exam needs); nothing was
    stored."""

    title = "Invalid ECG"


# --- who uploads, for which clinic --------------------------------------------------------


def upload_org(session: Session, *, principal: Principal, clinic: str | None) -> OrgRef:
    """The clinic an upload belongs to: a clinic user's own clinic (naming another is
    refused), or the clinic lead-hospital staff name."""
    if principal.is_clinic_user:
        if principal.role not in _CLINIC_UPLOADERS:
            raise PermissionDeniedError(f"role {principal.role.value} may not upload ECGs")
        own = _org_by_id(session, principal.org_id)
        if clinic and clinic != own.code:
            raise PermissionDeniedError("a clinic uploads ECGs for its own clinic only")
        return own
    if principal.role not in _LEAD_UPLOADERS:
        raise PermissionDeniedError(f"role {principal.role.value} may not upload ECGs")
    if not clinic:
        raise EcgInputError("name the clinic the ECG comes from (form field 'clinic')")
    try:
        found = org_ref(get_organization(session, code=clinic))
    except NotFoundError as exc:
        raise EcgInputError(f"no clinic with code {clinic!r}") from exc
    if found.kind is not OrgKind.CLINIC:
        raise EcgInputError(f"{clinic} is not a clinic")
    return found


def _org_by_id(session: Session, org_id: str) -> OrgRef:
    org = session.get(Organization, org_id)
    if org is None:
        raise PermissionDeniedError("the caller's organisation no longer exists")
    return org_ref(org)


# --- parsing and measuring (no database) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class EcgForm:
    """The upload's form fields: the clinic (lead staff) and the patient, used where the
    file does not identify them."""

    clinic: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    sex: str | None = None
    birth_date: str | None = None  # YYYY-MM-DD or YYYYMMDD


@dataclass(frozen=True, slots=True)
class PreparedEcg:
    """An upload parsed and measured, ready to store and register."""

    files: tuple[tuple[str, bytes], ...]  # (safe file name, bytes), the header first
    record: EcgRecord
    analysis: EcgAnalysis
    matches: tuple[PrescreenMatch, ...]
    record_sha256: str  # over the files' names and contents
    natural_key: str  # the exam's: SOP Instance UID (DICOM), else "sha256:<record hash>"


@dataclass(frozen=True, slots=True)
class EcgIngestResult:
    exam_id: str
    duplicate: bool
    triaged: bool = False


@lru_cache(maxsize=4)
def _rules_from(path: str | None) -> RuleTable:
    return load_rules(Path(path) if path else None)


def prescreen_rules() -> RuleTable:
    """The pre-screen rule table in force: ``RDC_ECG_PRESCREEN_RULES`` or the shipped one."""
    path = get_settings().ecg_prescreen_rules
    return _rules_from(str(path) if path else None)


def _safe_name(name: str, index: int) -> str:
    base = Path(name.replace("\\", "/")).name if name else ""
    cleaned = _FILE_NAME.sub("_", base).strip("._")[:100]
    return cleaned or f"file{index}"


def prepare_ecg(
    files: Sequence[tuple[str, bytes]], *, rules: RuleTable | None = None
) -> PreparedEcg:
    """Parse and measure an upload: one ECG file, or a WFDB header with its signal files.
    Raises :class:`EcgInputError` naming what is wrong (nothing is stored)."""
    if not files:
        raise EcgInputError("no ECG file uploaded (multipart field 'file')")
    if len(files) > _MAX_FILES:
        raise EcgInputError(f"at most {_MAX_FILES} files make one ECG record")
    named: list[tuple[str, bytes]] = []
    for index, (name, data) in enumerate(files):
        # WFDB headers name their signal files: keep names the header can find.
        safe = _safe_name(name, index)
        if any(safe == n for n, _ in named):
            raise EcgInputError(f"file {safe} uploaded twice")
        named.append((safe, data))
    try:
        record = parse_ecg(named)
    except EcgFormatError as exc:
        raise EcgInputError(str(exc)) from exc
    except Exception as exc:  # a parser library's own error on hostile input
        raise EcgInputError(f"unreadable ECG file: {type(exc).__name__}: {exc}") from exc
    try:
        analysis = analyse(record)
    except Exception as exc:  # the analysis never raises for a readable record
        log.exception("ECG analysis failed on a readable %s record", record.source_format)
        raise EcgInputError(f"the ECG cannot be measured: {type(exc).__name__}") from exc
    matches = tuple(prescreen(analysis, rules or prescreen_rules()))
    digest = hashlib.sha256()
    for name, data in sorted(named):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    record_sha256 = digest.hexdigest()
    if record.source_format == "dicom" and record.natural_key:
        natural_key = record.natural_key[:128]
    else:
        natural_key = f"sha256:{record_sha256}"
    # The header (or the one file) first: it is the artifact's object of record.
    header = next((n for n, d in named if _is_wfdb_header(d)), named[0][0])
    ordered = sorted(named, key=lambda f: (f[0] != header, f[0]))
    return PreparedEcg(
        files=tuple(ordered),
        record=record,
        analysis=analysis,
        matches=matches,
        record_sha256=record_sha256,
        natural_key=natural_key,
    )


def _is_wfdb_header(data: bytes) -> bool:
    from ecg_service.parsers import _wfdb_header_line

    return bool(data) and _wfdb_header_line(data) is not None


# --- the detail row ------------------------------------------------------------------------


def _prescreen_json(matches: Sequence[PrescreenMatch]) -> list[dict[str, Any]]:
    return [
        {
            "rule": m.code,
            "reason": f"{m.label_en}: {'; '.join(m.reasons)}" if m.reasons else m.label_en,
            "critical": m.tier == "critical",
            "tier": m.tier,
            "label_zh": m.label_zh,
            "label_en": m.label_en,
        }
        for m in matches
    ]


def triage_reason(matches: Sequence[PrescreenMatch]) -> str | None:
    """The worklist's reason for a suspected critical ECG (critical-tier matches only)."""
    critical = [m for m in matches if m.tier == "critical"]
    if not critical:
        return None
    return "; ".join(
        f"疑似危急值 suspected critical: {m.label_zh} / {m.label_en}"
        + (f" ({', '.join(m.reasons)})" if m.reasons else "")
        for m in critical
    )


def _aware(value: datetime | None) -> datetime | None:
    """A time the file wrote without a zone is the centre's local time (RDC_TIMEZONE)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=get_settings().zone)


def _unreliable(analysis: EcgAnalysis) -> str | None:
    if analysis.reliable:
        return None
    flags = [f for f in analysis.flags if f.startswith(UNRELIABLE)]
    return "; ".join(flags) or UNRELIABLE


def analysis_values(
    *,
    exam_id: str,
    artifact_id: str,
    object_keys: Sequence[str],
    record: EcgRecord,
    analysis: EcgAnalysis,
    matches: Sequence[PrescreenMatch],
    now: datetime,
) -> dict[str, Any]:
    """The ``ecg_studies`` row of a measured record."""
    summary = analysis.as_dict()
    measurements = {key: analysis.measurements.get(key) for key in MEASUREMENT_KEYS}
    return {
        "exam_id": exam_id,
        "artifact_id": artifact_id,
        "object_keys": list(object_keys),
        "source_format": str(record.source_format),
        "sampling_rate_hz": float(record.sampling_rate_hz),
        "lead_names": list(record.leads),
        "duration_s": float(record.duration_s),
        "quality": summary["quality"],
        "measurements": measurements,
        "missing_reasons": {k: v for k, v in analysis.missing.items() if k in MEASUREMENT_KEYS},
        "device_measurements": summary["device_measurements"],
        "prescreen": _prescreen_json(matches),
        "unreliable": not analysis.reliable,
        "unreliable_reason": _unreliable(analysis),
        "rhythm": summary["rhythm"],
        "fiducials": summary["fiducials_ms"],
        "device": (record.device or None) and str(record.device)[:200],
        "device_statements": list(record.device_statements),
        "acquired_at": _aware(record.acquired_at),
        "analysis_error": None,
        "analysis_version": ANALYSIS_VERSION,
        "analysed_at": now,
    }


def _failure_values(
    *,
    exam_id: str,
    artifact_id: str,
    object_keys: Sequence[str],
    source_format: str,
    error: str,
    now: datetime,
) -> dict[str, Any]:
    reason = f"measurement not possible: the waveform cannot be read ({error})"
    return {
        "exam_id": exam_id,
        "artifact_id": artifact_id,
        "object_keys": list(object_keys),
        "source_format": source_format,
        "sampling_rate_hz": None,
        "lead_names": [],
        "duration_s": None,
        "quality": [],
        "measurements": dict.fromkeys(MEASUREMENT_KEYS),
        "missing_reasons": dict.fromkeys(MEASUREMENT_KEYS, reason),
        "device_measurements": [],
        "prescreen": [],
        "unreliable": True,
        "unreliable_reason": reason[:4000],
        "rhythm": {},
        "fiducials": {},
        "device": None,
        "device_statements": [],
        "acquired_at": None,
        "analysis_error": error[:4000],
        "analysis_version": ANALYSIS_VERSION,
        "analysed_at": now,
    }


_STUDY_UPDATE = (
    "artifact_id",
    "object_keys",
    "source_format",
    "sampling_rate_hz",
    "lead_names",
    "duration_s",
    "quality",
    "measurements",
    "missing_reasons",
    "device_measurements",
    "prescreen",
    "unreliable",
    "unreliable_reason",
    "rhythm",
    "fiducials",
    "device",
    "device_statements",
    "acquired_at",
    "analysis_error",
    "analysis_version",
    "analysed_at",
)


def _write_study(session: Session, values: dict[str, Any]) -> None:
    # The reader's edits (reader_measurements) are never overwritten by a new analysis.
    upsert(session, EcgStudy.__table__, values, conflict=["exam_id"], update=_STUDY_UPDATE)


def _triage(
    session: Session, *, exam_id: str, matches: Sequence[PrescreenMatch], now: datetime
) -> bool:
    reason = triage_reason(matches)
    if reason is None:
        return False
    return triage_exam(session, exam_id=exam_id, reason=reason, now=now)


# --- intake of an upload -------------------------------------------------------------------


def _birth_date(value: str | None) -> str | None:
    if not value or not value.strip():
        return None
    text = value.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date().strftime("%Y%m%d")
        except ValueError:
            continue
    raise EcgInputError(f"birth_date {value!r} is not a date (YYYY-MM-DD)")


def _form_sex(value: str | None) -> str | None:
    if not value or not value.strip():
        return None
    v = value.strip().upper()
    mapped = {"M": "M", "MALE": "M", "男": "M", "F": "F", "FEMALE": "F", "女": "F", "O": "O"}
    if v not in mapped:
        raise EcgInputError(f"sex {value!r} must be M, F or O")
    return mapped[v]


def _patient(record: EcgRecord, form: EcgForm, *, anonymous_id: str | None) -> PatientIn:
    p = record.patient
    patient_id = (p.patient_id or "").strip() or (form.patient_id or "").strip()
    coerced = False
    if not patient_id:
        if anonymous_id is None:
            raise EcgInputError(
                "the ECG file names no patient ID: give the form field 'patient_id'"
            )
        # As for DICOM: an empty ID must not merge every anonymous patient into one.
        patient_id, coerced = anonymous_id, True
    form_birth = _birth_date(form.birth_date)
    form_sex = _form_sex(form.sex)
    file_birth = p.birth_date.strftime("%Y%m%d") if isinstance(p.birth_date, date) else None
    original: dict[str, Any] = {
        "from_file": {
            "patient_id": p.patient_id,
            "name": p.name,
            "sex": p.sex,
            "birth_date": file_birth,
            "age_years": p.age_years,
        },
        "from_form": {
            k: v
            for k, v in {
                "patient_id": form.patient_id,
                "patient_name": form.patient_name,
                "sex": form.sex,
                "birth_date": form.birth_date,
            }.items()
            if v
        },
        **({"_coerced": {"patient_id": patient_id}} if coerced else {}),
    }
    return PatientIn(
        patient_id=patient_id[:64],
        name=((p.name or "").strip() or (form.patient_name or "").strip())[:200],
        birth_date=file_birth or form_birth,
        sex=p.sex or form_sex,
        original=original,
    )


def _description(record: EcgRecord) -> str:
    standard = len(record.standard_leads)
    what = "12-lead ECG" if standard == 12 else f"ECG, {len(record.leads)} leads"
    return f"{what} ({record.source_format}, {record.sampling_rate_hz:g} Hz)"[:200]


def _spool(store: ObjectStore, data: bytes) -> Path:
    folder = store.spool_dir
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"ecg-{uuid.uuid4().hex}.part"
    path.write_bytes(data)
    return path


def _store_files(
    store: ObjectStore, prepared: PreparedEcg
) -> tuple[list[PendingObject], list[Path]]:
    pending: list[PendingObject] = []
    spooled: list[Path] = []
    folder = f"ecg/{prepared.record_sha256[:2]}/{prepared.record_sha256}"
    for name, data in prepared.files:
        path = _spool(store, data)
        spooled.append(path)
        pending.append(
            store_object(
                store=store,
                key=f"{folder}/{name}",
                source=path,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                move=True,
            )
        )
    return pending, spooled


def _undo_extra(
    session: Session, store: ObjectStore, extra: Sequence[PendingObject], artifact_id: str
) -> None:
    # After a rollback: the record's other files go too, unless its artifact is indexed.
    artifacts = cast(Table, Artifact.__table__)
    for item in extra:
        if item.created():
            remove_unreferenced(
                session,
                store,
                item.stored.key,
                artifact_id=None,
                also=[exists().where(artifacts.c.id == artifact_id)],
            )


def ingest_ecg(
    session: Session,
    *,
    store: ObjectStore,
    prepared: PreparedEcg,
    org: OrgRef,
    form: EcgForm,
    source: str,
    principal: Principal | None = None,
    allow_anonymous: bool = False,
    now: datetime | None = None,
) -> EcgIngestResult:
    """Store and register a prepared upload for clinic ``org`` (see the module's
    docstring); returns once its objects are durable: the caller commits.

    ``allow_anonymous`` (bulk import): a record naming no patient gets the ID
    ``NOID-<record hash>`` instead of being refused.

    Raises EcgInputError (no patient ID...), PermissionDeniedError (the record belongs to
    another clinic), StorageError and DatabaseUnavailableError.
    """
    now = now or utcnow()
    record = prepared.record
    anonymous = f"NOID-{prepared.record_sha256[:32]}" if allow_anonymous else None
    patient = _patient(record, form, anonymous_id=anonymous)
    artifact_id = artifact_id_for(ECG_FILE_KIND, prepared.natural_key)
    known = find_artifact(session, artifact_id=artifact_id)
    if known is not None:
        if known.org_id != org.id:
            raise PermissionDeniedError("this ECG record belongs to another organisation")
        _ensure_study(session, exam_id=known.exam_id, artifact_id=artifact_id, prepared=prepared)
        return EcgIngestResult(exam_id=known.exam_id, duplicate=True)
    pending, spooled = _store_files(store, prepared)
    try:
        primary, extra = pending[0], pending[1:]
        if extra:
            on_rollback(session, partial(_undo_extra, session, store, extra, artifact_id))
        keys = [p.stored.key for p in pending]

        def detail(session: Session, exam_id: str, artifact_id: str) -> None:
            _write_study(
                session,
                analysis_values(
                    exam_id=exam_id,
                    artifact_id=artifact_id,
                    object_keys=keys,
                    record=record,
                    analysis=prepared.analysis,
                    matches=prepared.matches,
                    now=now,
                ),
            )

        registration = register_artifact(
            session,
            org=org,
            patient=patient,
            exam=ExamIn(
                discipline=Discipline.ECG,
                natural_key=prepared.natural_key,
                key_kind=ExamKeyKind.FILE,
                modality="ECG",
                description=_description(record),
                performed_at=_aware(record.acquired_at),
            ),
            artifact=ArtifactIn(
                kind=ECG_FILE_KIND, ref=prepared.natural_key, object=primary, source=source[:64]
            ),
            detail=detail,
            now=now,
        )
        for item in extra:
            item.wait()
    finally:
        for path in spooled:
            path.unlink(missing_ok=True)
    exam_id = registration.exam_id
    if registration.outcome is RecordOutcome.DUPLICATE:
        _ensure_study(session, exam_id=exam_id, artifact_id=artifact_id, prepared=prepared)
        return EcgIngestResult(exam_id=exam_id, duplicate=True)
    triaged = _triage(session, exam_id=exam_id, matches=prepared.matches, now=now)
    mark_exam_ready(session, exam_id=exam_id, now=now)
    if principal is not None:
        record_access(
            session,
            principal,
            action="ecg_upload",
            object_type="exam",
            object_id=exam_id,
            detail={
                "format": str(record.source_format),
                "files": [n for n, _ in prepared.files],
                "triage": [m.code for m in prepared.matches if m.tier == "critical"],
            },
        )
    return EcgIngestResult(exam_id=exam_id, duplicate=False, triaged=triaged)


def _ensure_study(
    session: Session, *, exam_id: str, artifact_id: str, prepared: PreparedEcg
) -> None:
    # A re-sent record whose detail row is missing or from an older analysis gets it now.
    row = session.get(EcgStudy, exam_id)
    if row is not None and row.analysis_version == ANALYSIS_VERSION:
        return
    folder = f"ecg/{prepared.record_sha256[:2]}/{prepared.record_sha256}"
    keys = row.object_keys if row is not None else [f"{folder}/{n}" for n, _ in prepared.files]
    _write_study(
        session,
        analysis_values(
            exam_id=exam_id,
            artifact_id=artifact_id,
            object_keys=keys,
            record=prepared.record,
            analysis=prepared.analysis,
            matches=prepared.matches,
            now=utcnow(),
        ),
    )


# --- DICOM ECG waveforms received by C-STORE / STOW ---------------------------------------


@dataclass(frozen=True, slots=True)
class PendingWaveform:
    """A DICOM ECG instance of an exam whose measurements are missing or out of date."""

    exam_id: str
    artifact_id: str
    storage_key: str


def pending_dicom_waveform(session: Session, *, exam_id: str) -> PendingWaveform | None:
    """The exam's newest DICOM ECG waveform instance, if it has not been measured with the
    current analysis (else None: nothing to do)."""
    row = session.execute(
        select(Artifact.id, Artifact.storage_key)
        .where(Artifact.exam_id == exam_id, format_clause(Artifact.id, ECG_SOP_CLASSES))
        .order_by(Artifact.received_at.desc(), Artifact.id)
        .limit(1)
    ).one_or_none()
    if row is None:
        return None
    study = session.get(EcgStudy, exam_id)
    if (
        study is not None
        and study.artifact_id == row.id
        and study.analysis_version == ANALYSIS_VERSION
    ):
        return None
    return PendingWaveform(exam_id=exam_id, artifact_id=row.id, storage_key=row.storage_key)


def exams_awaiting_analysis(session: Session, *, limit: int = 50) -> list[str]:
    """ECG exams still to read that hold a DICOM ECG waveform and no measurements yet."""
    studies = cast(Table, EcgStudy.__table__)
    rows = session.execute(
        select(Exam.id)
        .where(
            Exam.discipline == Discipline.ECG,
            Exam.state.in_((ExamState.RECEIVING, ExamState.READY)),
            ~exists().where(studies.c.exam_id == Exam.id),
            exists().where(
                Artifact.exam_id == Exam.id, format_clause(Artifact.id, ECG_SOP_CLASSES)
            ),
        )
        .order_by(Exam.last_received_at)
        .limit(limit)
    )
    return list(rows.scalars())


def record_analysis(
    session: Session,
    *,
    waveform: PendingWaveform,
    record: EcgRecord | None,
    error: str | None = None,
    rules: RuleTable | None = None,
    now: datetime | None = None,
) -> bool:
    """Write the measurements of a DICOM ECG waveform (``record``, or the ``error`` that
    kept it from being read) and triage the exam. Returns whether it was put first in the
    reading queue."""
    now = now or utcnow()
    keys = [waveform.storage_key]
    if record is None:
        _write_study(
            session,
            _failure_values(
                exam_id=waveform.exam_id,
                artifact_id=waveform.artifact_id,
                object_keys=keys,
                source_format="dicom",
                error=error or "unreadable",
                now=now,
            ),
        )
        return False
    analysis = analyse(record)
    matches = prescreen(analysis, rules or prescreen_rules())
    _write_study(
        session,
        analysis_values(
            exam_id=waveform.exam_id,
            artifact_id=waveform.artifact_id,
            object_keys=keys,
            record=record,
            analysis=analysis,
            matches=matches,
            now=now,
        ),
    )
    return _triage(session, exam_id=waveform.exam_id, matches=matches, now=now)


# --- reading -------------------------------------------------------------------------------


def _study_for(session: Session, exam: Exam) -> EcgStudy:
    study = session.get(EcgStudy, exam.id)
    if study is None:
        if exam.discipline is not Discipline.ECG:
            raise NotFoundError(f"exam {exam.id} is not an ECG")
        raise NotFoundError(f"ECG exam {exam.id} has not been measured yet")
    return study


def get_ecg(session: Session, *, principal: Principal, exam_id: str) -> EcgOut:
    """What was measured on an ECG exam the principal may see (a clinic: its own; another
    clinic's exam is not found). Audited."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    study = _study_for(session, exam)
    record_access(session, principal, action="view", object_type="ecg", object_id=exam.id)
    return _ecg_out(exam, study)


def _ecg_out(exam: Exam, study: EcgStudy) -> EcgOut:
    measurements = {k: (study.measurements or {}).get(k) for k in MEASUREMENT_KEYS}
    rhythm = study.rhythm or {}
    return EcgOut(
        exam_id=exam.id,
        artifact_id=study.artifact_id,
        clinic_code=exam.organization.code,
        exam_state=exam.state,
        priority=exam.priority,
        triage_reason=exam.triage_reason,
        source_format=study.source_format,
        sampling_rate_hz=study.sampling_rate_hz,
        leads=list(study.lead_names or []),
        duration_s=study.duration_s,
        quality=[LeadQualityOut.model_validate(q) for q in study.quality or []],
        measurements=EcgMeasurements.model_validate(measurements),
        missing_reasons=dict(study.missing_reasons or {}),
        device_measurements=[
            DeviceMeasurementOut.model_validate(m) for m in study.device_measurements or []
        ],
        reader_measurements=study.reader_measurements,
        unreliable=study.unreliable,
        unreliable_reason=study.unreliable_reason,
        prescreen=[PrescreenOut.model_validate(p) for p in study.prescreen or []],
        rhythm=RhythmOut.model_validate({k: rhythm.get(k) for k in RhythmOut.model_fields}),
        fiducials_ms=dict(study.fiducials or {}),
        device=study.device,
        device_statements=list(study.device_statements or []),
        acquired_at=study.acquired_at,
        analysis_error=study.analysis_error,
        analysis_version=study.analysis_version,
        analysed_at=study.analysed_at,
    )


def load_record(session: Session, *, store: ObjectStore, exam_id: str) -> EcgRecord:
    """The exam's ECG record, parsed again from the stored objects (no access check: the
    caller has checked the principal with :func:`get_ecg` or
    :func:`worklist.queries.visible_exam`). Raises NotFoundError, EcgFormatError,
    StorageError."""
    study = session.get(EcgStudy, exam_id)
    if study is None:
        raise NotFoundError(f"ECG exam {exam_id} has not been measured yet")
    files: list[tuple[str, bytes]] = []
    for key in study.object_keys or []:
        with store.open(key) as stored:
            files.append((key.rsplit("/", 1)[-1], stored.read()))
    if not files:
        raise NotFoundError(f"ECG exam {exam_id} has no stored waveform")
    return parse_ecg(files)
