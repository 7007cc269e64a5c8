"""Reports: the draft (autosaved), submission, senior verification, versions (amend /
correct / append), signature verification, and the templates."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.errors import InvalidInputError
from web.security import CurrentPrincipal, confirm_signing
from worklist.report_templates import TEMPLATES, templates_for
from worklist.reports import (
    amend_report,
    get_report,
    get_report_version,
    save_draft,
    signing_preview,
    submit_report,
    verify_report,
)
from worklist.schemas import (
    ReportAmendIn,
    ReportDetailOut,
    ReportIn,
    ReportOut,
    SigningPreviewOut,
)
from worklist.signing.pdf import register_key_image_renderer
from worklist.signing.verify import check_report, verify_file

router = APIRouter(prefix="/api/v1", tags=["reports"])
_NO_REPORT: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such exam, or no report yet"}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "not holding the exam's lease, or the report is locked"}
}


@router.get("/exams/{exam_id}/report", response_model=ReportOut, responses=_NO_REPORT)
def current_report(exam_id: str, principal: CurrentPrincipal) -> ReportOut:
    """The exam's current report (clinics see submitted reports only)."""
    with session_scope() as session:
        return get_report(session, principal=principal, exam_id=exam_id)


@router.put("/exams/{exam_id}/report", response_model=ReportOut, responses=_CONFLICT)
def save(exam_id: str, body: ReportIn, principal: CurrentPrincipal) -> ReportOut:
    """Save the draft; needs my lease on the exam."""
    with session_scope() as session:
        return save_draft(session, principal=principal, exam_id=exam_id, data=body, now=utcnow())


class SigningIn(BaseModel):
    """What every signing request carries: the signer's own password (a signature is a
    deliberate act of its signer, 电子签名法 Art. 13)."""

    signing_password: str | None = Field(default=None, max_length=256)


class AmendIn(ReportAmendIn):
    signing_password: str | None = Field(default=None, max_length=256)


_SIGNING: dict[int | str, dict[str, Any]] = {
    **_CONFLICT,
    403: {"description": "signing_password missing or wrong (nothing was signed), or not allowed"},
    429: {"description": "signing locked after too many wrong passwords (Retry-After)"},
}


@router.post("/exams/{exam_id}/report/submit", response_model=ReportOut, responses=_SIGNING)
def submit(exam_id: str, principal: CurrentPrincipal, body: SigningIn | None = None) -> ReportOut:
    """Sign and submit: final for attending and chief readers, preliminary for residents.
    Needs ``{"signing_password": …}``."""
    password = body.signing_password if body else None
    confirm_signing(principal, password, action="submit", object_type="exam", object_id=exam_id)
    with session_scope() as session:
        return submit_report(session, principal=principal, exam_id=exam_id, now=utcnow())


@router.post("/reports/{report_id}/verify-by-senior", response_model=ReportOut, responses=_SIGNING)
def verify(report_id: str, principal: CurrentPrincipal, body: SigningIn | None = None) -> ReportOut:
    """A senior verifies (co-signs) a resident's preliminary report, making it final.
    Needs ``{"signing_password": …}``."""
    password = body.signing_password if body else None
    confirm_signing(principal, password, action="verify", object_type="report", object_id=report_id)
    with session_scope() as session:
        return verify_report(session, principal=principal, report_id=report_id, now=utcnow())


@router.get(
    "/reports/{report_id}/signing-preview", response_model=SigningPreviewOut, responses=_NO_REPORT
)
def preview_signing(
    report_id: str, principal: CurrentPrincipal, action: Literal["submit", "verify", "amend"]
) -> SigningPreviewOut:
    """What a signature would sign (for the signing dialog): final or preliminary, and the
    mutual-recognition decision a final report would get now."""
    with session_scope() as session:
        return signing_preview(
            session, principal=principal, report_id=report_id, action=action, now=utcnow()
        )


@router.get("/reports/{report_id}", response_model=ReportDetailOut, responses=_NO_REPORT)
def report_version(report_id: str, principal: CurrentPrincipal) -> ReportDetailOut:
    """One report version with all versions of its exam (``current`` marks the newest),
    its signature and its mutual-recognition decision. Clinics: their own, submitted only."""
    with session_scope() as session:
        return get_report_version(session, principal=principal, report_id=report_id)


@router.post("/reports/{report_id}/amend", response_model=ReportOut, responses=_SIGNING)
def amend(report_id: str, body: AmendIn, principal: CurrentPrincipal) -> ReportOut:
    """A new signed version (amended / corrected / appended) of the current final report;
    409 when it is not the current version or another amendment won. Needs
    ``signing_password``."""
    confirm_signing(
        principal, body.signing_password, action="amend", object_type="report", object_id=report_id
    )
    data = ReportAmendIn.model_validate(
        body.model_dump(exclude_unset=True, exclude={"signing_password"})
    )
    with session_scope() as session:
        return amend_report(
            session, principal=principal, report_id=report_id, data=data, now=utcnow()
        )


@router.get("/reports/{report_id}/verify", responses=_NO_REPORT)
def verify_signatures(report_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    """Verify the stored signed document and PDF of a report version:
    ``{"valid": …, "document": …, "pdf": …, "signer": …, "reasons": […]}``."""
    with session_scope() as session:
        return check_report(session, principal=principal, report_id=report_id)


MAX_VERIFY_BYTES = 32 * 1024 * 1024
# Room for the multipart boundaries and part headers around an upload of the full size.
_MULTIPART_SLACK = 64 * 1024


def _too_large() -> HTTPException:
    return HTTPException(
        413,
        f"files larger than {MAX_VERIFY_BYTES} bytes are not verified "
        f"/ 超过 {MAX_VERIFY_BYTES // (1024 * 1024)} MB 的文件不予验证",
    )


async def _capped(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    # A running count as the body streams in: a chunked upload has no content-length
    # to refuse it by, and must not be read to the end first.
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large()
        yield chunk


async def _upload_bytes(request: Request) -> bytes:
    multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
    limit = MAX_VERIFY_BYTES + (_MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large()
    if not multipart:
        body = bytearray()
        async for chunk in _capped(request, limit):
            body.extend(chunk)
        return bytes(body)
    parser = MultiPartParser(
        request.headers,
        _capped(request, limit),
        max_files=1,
        max_fields=8,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidInputError(f"unreadable multipart upload: {exc.message}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInputError("send the file as the multipart field 'file'")
        return await upload.read(MAX_VERIFY_BYTES + 1)
    finally:
        await form.close()


def _verify_bytes(data: bytes) -> dict[str, Any]:
    with read_session() as session:
        return verify_file(data, session=session).as_dict()


@router.post(
    "/verify",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/pdf": {},
                "application/json": {},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
            }
        }
    },
    responses={413: {"description": "the file is larger than 32 MiB"}},
)
async def verify_upload(request: Request) -> dict[str, Any]:
    """Anyone (no sign-in) can check a signed report PDF or JSON document against the
    alliance CA: upload it as ``file`` (multipart) or send it as the raw body (32 MiB at
    most, else 413). The answer holds only what the file itself says (signer, time, report
    version) and whether revocation was checked."""
    data = await _upload_bytes(request)
    if not data:
        raise InvalidInputError("no file to verify")
    if len(data) > MAX_VERIFY_BYTES:
        raise _too_large()
    return await run_in_threadpool(_verify_bytes, data)


@router.get("/report-templates")
def report_templates(
    principal: CurrentPrincipal, modality: str = "", body_part: str = ""
) -> list[dict[str, Any]]:
    """Templates for an exam's modality and body part, the most specific first."""
    chosen = templates_for(modality=modality, body_part=body_part) if modality else TEMPLATES
    return [t.as_dict() for t in chosen]


def _render_key_image(storage_key: str, frame: int) -> bytes:
    from dicom_gateway.pixels import RenderOptions, render_frame
    from rdc_core.storage import get_object_store

    options = RenderOptions(frame=frame, viewport=(480, 480), media_type="image/jpeg", quality=85)
    return render_frame(store=get_object_store(), storage_key=storage_key, options=options).data


# The signed PDF shows the reader's key images; worklist may not import the gateway's
# renderer, so the web application (which serves every signing request) lends it.
register_key_image_renderer(_render_key_image)
