"""The ECG centre's API: upload an ECG record, read what was measured, the trace image."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import replace
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ecg_service import EcgRecord, PatientIdentity, analyse, render_trace
from ecg_service.record import EcgFormatError
from ecg_service.schemas import EcgIngested, EcgOut
from ecg_service.service import (
    EcgForm,
    EcgInputError,
    get_ecg,
    ingest_ecg,
    load_record,
    prepare_ecg,
    upload_org,
)
from rdc_core.db import read_session, session_scope
from rdc_core.errors import InvalidInputError
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from web.security import CurrentPrincipal
from worklist.access import Principal
from worklist.audit import audited_read, record_access
from worklist.patients.national_id import shown_patient_id
from worklist.queries import visible_exam

router = APIRouter(prefix="/api/v1/ecg", tags=["ecg"])

_FIELDS = ("clinic", "patient_id", "patient_name", "sex", "birth_date")
_MULTIPART_SLACK = 64 * 1024  # boundaries and form fields around the files
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such ECG exam, another clinic's, or not measured yet"}
}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "the ECG file (DICOM waveform, HL7 aECG XML, "
                            "SCP-ECG), or a WFDB header (.hea) with its signal files",
                        },
                        **{name: {"type": "string"} for name in _FIELDS},
                    },
                }
            }
        },
    }
}


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"an ECG upload may hold at most {limit} bytes")


async def _capped(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


async def _read_upload(request: Request) -> tuple[list[tuple[str, bytes]], EcgForm]:
    limit = get_settings().ecg_max_upload_bytes
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInputError("send the ECG as multipart/form-data, field 'file'")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
        raise _too_large(limit)
    parser = MultiPartParser(
        request.headers, _capped(request, limit + _MULTIPART_SLACK), max_files=16, max_fields=16
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidInputError(f"unreadable multipart upload: {exc.message}") from exc
    try:
        files: list[tuple[str, bytes]] = []
        for upload in form.getlist("file"):
            if not isinstance(upload, UploadFile):
                raise InvalidInputError("the field 'file' must be a file, not text")
            files.append((upload.filename or "", await upload.read()))
        fields: dict[str, str | None] = {}
        for name in _FIELDS:
            value = form.get(name)
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"the field {name!r} must be text")
            fields[name] = value.strip()[:200] if value else None
    finally:
        await form.close()
    if sum(len(data) for _, data in files) > limit:
        raise _too_large(limit)
    return files, EcgForm(**fields)


def _ingest(principal: Principal, files: list[tuple[str, bytes]], form: EcgForm) -> Any:
    with read_session() as session:
        org = upload_org(session, principal=principal, clinic=form.clinic)
    prepared = prepare_ecg(files)  # 422 naming the problem; nothing stored
    store = get_object_store()
    with session_scope() as session:
        return ingest_ecg(
            session,
            store=store,
            prepared=prepared,
            org=org,
            form=form,
            source=f"upload:{principal.username}",
            principal=principal,
        )


@router.post(
    "",
    status_code=201,
    response_model=EcgIngested,
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": EcgIngested, "description": "this record was received before"},
        403: {"description": "role may not upload, or another clinic's record"},
        413: {"description": "the upload is too large"},
        422: {"description": "not an ECG RDC can read (the problem is named), or no patient ID"},
    },
)
async def upload_ecg(request: Request, principal: CurrentPrincipal) -> JSONResponse:
    """Upload one ECG: a DICOM ECG waveform, an HL7 aECG XML file, or a WFDB record (the
    header ``.hea`` and its signal files, each as a ``file`` field). A clinic user's upload
    belongs to their clinic; lead-hospital staff name ``clinic``. The patient is who the
    file names, else ``patient_id``, ``patient_name``, ``sex`` (M/F/O) and ``birth_date``
    (YYYY-MM-DD). The ECG is measured and goes on the reading worklist at once (first, with
    the reason, when a critical pre-screen rule matches). Unreadable input is refused with
    422 naming the problem, and nothing is stored. Sending the same record again answers
    200 with the same exam."""
    files, form = await _read_upload(request)
    if not files:
        raise EcgInputError("no ECG file uploaded (multipart field 'file')")
    result = await run_in_threadpool(_ingest, principal, files, form)
    body = EcgIngested(exam_id=result.exam_id, duplicate=result.duplicate)
    return JSONResponse(body.model_dump(), status_code=200 if result.duplicate else 201)


@router.get("/{exam_id}", response_model=EcgOut, responses=_NOT_FOUND)
def ecg(exam_id: str, principal: CurrentPrincipal) -> EcgOut:
    """What RDC measured on the ECG: sampling rate, leads, duration, signal quality per
    lead, the ten global ``measurements`` (null with the reason in ``missing_reasons``),
    the device's own measurements labelled by source, the "measurement unreliable" flag
    (e.g. below 500 Hz) and the pre-screen rules it matched. A clinic sees only its own."""
    with audited_read() as session:
        return get_ecg(session, principal=principal, exam_id=exam_id)


Layout = Literal["3x4", "6x2", "12x1"]


def _trace(
    exam_id: str, principal: Principal, fmt: Literal["png", "svg"], options: dict[str, Any]
) -> bytes:
    store = get_object_store()
    with audited_read() as session:
        exam = visible_exam(session, principal=principal, exam_id=exam_id)
        record = _record(session, store, exam_id)
        # The header names the patient as the index knows them (a WFDB file names nobody),
        # a national ID (居民身份证号) masked.
        patient = exam.patient
        record = replace(
            record,
            patient=PatientIdentity(
                patient_id=shown_patient_id(patient.issuer, patient.patient_id),
                name=patient.name or record.patient.name,
                sex=patient.sex or record.patient.sex,
                birth_date=_date(patient.birth_date) or record.patient.birth_date,
                age_years=record.patient.age_years,
            ),
        )
        record_access(
            session,
            principal,
            action="view_trace",
            object_type="ecg",
            object_id=exam_id,
            detail={"format": fmt, **options},
        )
    return render_trace(record, analyse(record), fmt=fmt, **options)


def _date(value: str | None) -> date | None:
    try:
        return datetime.strptime(value or "", "%Y%m%d").date()
    except ValueError:
        return None


def _record(session: Any, store: Any, exam_id: str) -> EcgRecord:
    try:
        return load_record(session, store=store, exam_id=exam_id)
    except EcgFormatError as exc:
        raise HTTPException(409, f"the stored waveform cannot be drawn: {exc}") from exc


_TRACE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    409: {"description": "the stored waveform cannot be read"},
}
_SPEED = Annotated[int, Query(description="paper speed, mm/s: 25 or 50")]
_GAIN = Annotated[int, Query(description="gain, mm/mV: 5, 10 or 20")]


def _options(layout: str, speed: int, gain: int) -> dict[str, Any]:
    if speed not in (25, 50):
        raise InvalidInputError("speed must be 25 or 50 (mm/s)")
    if gain not in (5, 10, 20):
        raise InvalidInputError("gain must be 5, 10 or 20 (mm/mV)")
    return {"layout": layout, "speed": float(speed), "gain": float(gain)}


_LAYOUT = Annotated[Layout, Query(description="3x4 (+ lead II rhythm strip), 6x2 or 12x1")]


@router.get(
    "/{exam_id}/trace.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_TRACE_RESPONSES},
)
def trace_png(
    exam_id: str,
    principal: CurrentPrincipal,
    layout: _LAYOUT = "3x4",
    speed: _SPEED = 25,
    gain: _GAIN = 10,
) -> Response:
    """The 12 leads on standard ECG paper (1 mm / 5 mm grid, calibration pulse), as PNG."""
    options = _options(layout, speed, gain)
    data = _trace(exam_id, principal, "png", options)
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-cache"})


@router.get(
    "/{exam_id}/trace.svg",
    response_class=Response,
    responses={200: {"content": {"image/svg+xml": {}}}, **_TRACE_RESPONSES},
)
def trace_svg(
    exam_id: str,
    principal: CurrentPrincipal,
    layout: _LAYOUT = "3x4",
    speed: _SPEED = 25,
    gain: _GAIN = 10,
) -> Response:
    """The trace as SVG (vector, for reports and printing)."""
    options = _options(layout, speed, gain)
    data = _trace(exam_id, principal, "svg", options)
    return Response(
        data, media_type="image/svg+xml", headers={"Cache-Control": "private, no-cache"}
    )
