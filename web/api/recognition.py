"""Mutual recognition (互认): catalogue and accreditations (administration), a patient's
still-valid recognised results (lookup), declines, and a report version's decision."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.errors import InvalidInputError, NotFoundError
from rdc_core.settings import get_settings
from web.params import MAX_VERSION, Offset
from web.security import CurrentPrincipal
from worklist.access import Principal, require_roles
from worklist.models import Role
from worklist.recognition.catalog import (
    catalog_items,
    catalog_versions,
    current_catalog,
    item_out,
    list_accreditations,
    load_accreditations,
    load_catalog,
)
from worklist.recognition.models import DeclineReason
from worklist.recognition.service import (
    DECLINE_REASON_LABELS,
    decline_result,
    list_declines,
    recognized_results,
    visible_recognition,
)

router = APIRouter(prefix="/api/v1", tags=["recognition"])

_MAX_UPLOAD = 4 * 1024 * 1024
_YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            "application/yaml": {"schema": {"type": "string"}},
        },
    }
}


class DeclineIn(BaseModel):
    """A clinician declines a recognised result."""

    reason: str = Field(description=", ".join(r.value for r in DeclineReason))
    note: str = Field(default="", max_length=2000, description="required for reason 'other'")
    patient_informed: bool = Field(default=False, description="must be true: the patient is told")
    request_id: str | None = Field(
        default=None, max_length=100, description="retrying with the same id records once"
    )


async def _upload(request: Request, fmt: str | None) -> tuple[str, str]:
    if fmt is None:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "text/csv":
            fmt = "csv"
        elif content_type in _YAML_TYPES:
            fmt = "yaml"
        else:
            raise InvalidInputError("send text/csv or application/yaml, or say ?format=csv|yaml")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > _MAX_UPLOAD:
            raise InvalidInputError(f"the file is larger than {_MAX_UPLOAD // 1024} KiB")
    try:
        return body.decode("utf-8"), fmt
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the file is not UTF-8: {exc}") from exc


@router.get("/recognition/catalog")
def get_catalog(
    principal: CurrentPrincipal,
    version: Annotated[
        int | None, Query(ge=1, le=MAX_VERSION, description="default: the current one")
    ] = None,
) -> dict[str, Any]:
    """The current (or a given) catalogue version's recognised items and the version list."""
    with read_session() as session:
        current = current_catalog(session)
        shown = version or (current.version if current else None)
        items = [item_out(i) for i in catalog_items(session, version=shown)] if shown else []
        if version is not None and not items:
            raise NotFoundError(f"no catalogue version {version}")
        return {
            "version": shown,
            "current_version": current.version if current else None,
            "items": items,
            "versions": catalog_versions(session),
        }


def _load_catalog(principal: Principal, text: str, fmt: str) -> dict[str, Any]:
    with session_scope() as session:
        result = load_catalog(
            session, text=text, fmt=fmt, source="api", principal=principal, now=utcnow()
        )
    return {"version": result.version, "created": result.created, "item_count": result.item_count}


@router.post(
    "/recognition/catalog",
    openapi_extra=_UPLOAD_DOC,
    responses={403: {"description": "administrators only"}, 422: {"description": "bad row"}},
)
async def post_catalog(
    request: Request,
    principal: CurrentPrincipal,
    format: Annotated[str | None, Query(description="csv or yaml")] = None,
) -> dict[str, Any]:
    """Load a whole catalogue (CSV or YAML body; admin). Identical content changes nothing;
    a bad row answers 422 naming it and changes nothing."""
    require_roles(principal, {Role.ADMIN}, lead_only=True)
    text, fmt = await _upload(request, format)
    return await run_in_threadpool(_load_catalog, principal, text, fmt)


@router.get("/recognition/accreditations", responses={403: {}})
def get_accreditations(
    principal: CurrentPrincipal,
    org: Annotated[str | None, Query(description="organisation code")] = None,
) -> list[dict[str, Any]]:
    """Every institution's QC accreditations (administrators and QC staff)."""
    with read_session() as session:
        return list_accreditations(session, principal=principal, org=org)


def _load_accreditations(principal: Principal, text: str, fmt: str) -> dict[str, Any]:
    with session_scope() as session:
        result = load_accreditations(session, text=text, fmt=fmt, principal=principal, now=utcnow())
    return {"inserted": result.inserted, "updated": result.updated, "unchanged": result.unchanged}


@router.post(
    "/recognition/accreditations",
    openapi_extra=_UPLOAD_DOC,
    responses={403: {"description": "administrators only"}, 422: {"description": "bad row"}},
)
async def post_accreditations(
    request: Request,
    principal: CurrentPrincipal,
    format: Annotated[str | None, Query(description="csv or yaml")] = None,
) -> dict[str, Any]:
    """Upsert accreditations from a CSV or YAML body (admin); all or nothing."""
    require_roles(principal, {Role.ADMIN}, lead_only=True)
    text, fmt = await _upload(request, format)
    return await run_in_threadpool(_load_accreditations, principal, text, fmt)


@router.get("/recognized-results")
def get_recognized_results(
    principal: CurrentPrincipal,
    patient_id: Annotated[str, Query(min_length=1, max_length=64)],
    issuer: Annotated[
        str | None,
        Query(max_length=64, description="issuer of the patient ID (default: my clinic's code)"),
    ] = None,
    item: Annotated[str | None, Query(max_length=64, description="item code")] = None,
) -> dict[str, Any]:
    """The patient's recognised results still valid today (in the clinics' time zone), from
    every institution of the alliance; the patient is matched by (issuer, patient ID)."""
    today = datetime.now(get_settings().zone).date()
    with session_scope() as session:
        return recognized_results(
            session,
            principal=principal,
            patient_id=patient_id,
            issuer=issuer,
            item=item,
            today=today,
        )


@router.post(
    "/recognized-results/{decision_id}/decline",
    responses={403: {"description": "clinic clinicians only"}, 404: {}, 422: {}},
)
def post_decline(decision_id: str, body: DeclineIn, principal: CurrentPrincipal) -> dict[str, Any]:
    """Record that a clinician declined a recognised result, why, and that the patient was
    told."""
    with session_scope() as session:
        return decline_result(
            session,
            principal=principal,
            decision_id=decision_id,
            reason=body.reason,
            note=body.note,
            patient_informed=body.patient_informed,
            request_id=body.request_id,
            now=utcnow(),
        )


@router.get("/recognition/declines", responses={403: {}})
def get_declines(
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> list[dict[str, Any]]:
    """Recorded declines: QC and administrators see all, clinics their own."""
    with session_scope() as session:
        return list_declines(session, principal=principal, limit=limit, offset=offset)


@router.get("/recognition/decline-reasons")
def get_decline_reasons(principal: CurrentPrincipal) -> list[dict[str, str]]:
    """The standard reasons for declining a recognised result, with their labels."""
    return [
        {"code": reason.value, "label_zh": zh, "label_en": en, "label": f"{zh} / {en}"}
        for reason, (zh, en) in DECLINE_REASON_LABELS.items()
    ]


@router.get("/reports/{report_id}/recognition", responses={404: {}})
def get_report_recognition(report_id: str, principal: CurrentPrincipal) -> dict[str, Any]:
    """The recognition decision of a final report version, with its reasons."""
    with session_scope() as session:
        return visible_recognition(session, principal=principal, report_id=report_id)
