"""Report delivery: clinics list and download their reports (PDF, signed JSON document,
FHIR R4 DiagnosticReport) and acknowledge them; administrators configure the clinics'
push-back endpoints and watch the delivery queue."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from rdc_core.db import session_scope, utcnow
from web.params import Offset, UtcDateTime
from web.security import CurrentPrincipal
from worklist.delivery.models import DeliveryChannel, DeliveryState
from worklist.delivery.portal import (
    acknowledge_report,
    fetch_report_artifact,
    fetch_report_fhir,
    list_reports,
)
from worklist.delivery.schemas import (
    AcknowledgementOut,
    DeliveryOut,
    EndpointIn,
    EndpointOut,
    ReportVersionOut,
)
from worklist.delivery.service import (
    add_endpoint,
    delivery_history,
    list_deliveries,
    list_endpoints,
    set_endpoint_enabled,
)
from worklist.models import ReportStatus
from worklist.schemas import Page

router = APIRouter(prefix="/api/v1", tags=["deliveries"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such report version, or it belongs to another clinic"}
}
_NO_STORE = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}


@router.get(
    "/reports",
    response_model=Page[ReportVersionOut],
    responses={422: {"description": "invalid parameter, e.g. a since without time zone"}},
)
def reports(
    principal: CurrentPrincipal,
    exam_id: str | None = None,
    clinic: Annotated[str | None, Query(description="clinic code")] = None,
    status: Annotated[ReportStatus | None, Query(description="final or preliminary")] = None,
    since: Annotated[UtcDateTime | None, Query(description="issued at or after, with zone")] = None,
    current_only: Annotated[bool, Query(description="only each exam's newest version")] = True,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[ReportVersionOut]:
    """Submitted report versions the caller may see (a clinic: its own), newest first."""
    with session_scope() as session:
        items, total = list_reports(
            session,
            principal=principal,
            exam_id=exam_id,
            clinic=clinic,
            status=status,
            since=since,
            current_only=current_only,
            limit=limit,
            offset=offset,
        )
    return Page[ReportVersionOut](items=items, total=total, limit=limit, offset=offset)


def _download(principal: Any, report_id: str, kind: Any) -> Response:
    with session_scope() as session:
        artifact = fetch_report_artifact(
            session, principal=principal, report_id=report_id, kind=kind, now=utcnow()
        )
    return Response(
        artifact.content,
        media_type=artifact.media_type,
        headers={
            **_NO_STORE,
            "Content-Disposition": f'attachment; filename="{artifact.filename}"',
        },
    )


@router.get(
    "/reports/{report_id}/pdf",
    response_class=Response,
    responses={**_NOT_FOUND, 200: {"content": {"application/pdf": {}}}},
)
def report_pdf(report_id: str, principal: CurrentPrincipal) -> Response:
    """The signed (PAdES) PDF of a report version. A clinic's first fetch of a final
    version records its delivery."""
    return _download(principal, report_id, "pdf")


@router.get(
    "/reports/{report_id}/document",
    response_class=Response,
    responses={**_NOT_FOUND, 200: {"content": {"application/json": {}}}},
)
def report_document(report_id: str, principal: CurrentPrincipal) -> Response:
    """The signed canonical JSON document of a report version, byte for byte."""
    return _download(principal, report_id, "document")


@router.get(
    "/reports/{report_id}/fhir",
    responses={**_NOT_FOUND, 200: {"content": {"application/fhir+json": {}}}},
)
def report_fhir(report_id: str, request: Request, principal: CurrentPrincipal) -> JSONResponse:
    """The report version as a FHIR R4 DiagnosticReport."""
    with session_scope() as session:
        resource = fetch_report_fhir(
            session,
            principal=principal,
            report_id=report_id,
            base_url=str(request.base_url),
            now=utcnow(),
        )
    return JSONResponse(resource, media_type="application/fhir+json", headers=_NO_STORE)


@router.post(
    "/reports/{report_id}/acknowledge", response_model=AcknowledgementOut, responses=_NOT_FOUND
)
def acknowledge(report_id: str, principal: CurrentPrincipal) -> AcknowledgementOut:
    """The clinic confirms receipt of a final report (the exam's "acknowledged" stage,
    set once)."""
    with session_scope() as session:
        return acknowledge_report(session, principal=principal, report_id=report_id, now=utcnow())


@router.get(
    "/reports/{report_id}/deliveries", response_model=list[DeliveryOut], responses=_NOT_FOUND
)
def report_deliveries(report_id: str, principal: CurrentPrincipal) -> list[DeliveryOut]:
    """How a report version reached its clinic: portal fetch and pushes with every attempt."""
    with session_scope() as session:
        return delivery_history(session, principal=principal, report_id=report_id)


@router.get("/deliveries", response_model=Page[DeliveryOut])
def deliveries(
    principal: CurrentPrincipal,
    state: DeliveryState | None = None,
    clinic: Annotated[str | None, Query(description="clinic code")] = None,
    channel: DeliveryChannel | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[DeliveryOut]:
    """The delivery queue (administrators and QC), e.g. ``state=failing``."""
    with session_scope() as session:
        items, total = list_deliveries(
            session,
            principal=principal,
            state=state,
            clinic=clinic,
            channel=channel,
            limit=limit,
            offset=offset,
        )
    return Page[DeliveryOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/delivery-endpoints", response_model=list[EndpointOut])
def endpoints(
    principal: CurrentPrincipal,
    clinic: Annotated[str | None, Query(description="clinic code")] = None,
) -> list[EndpointOut]:
    """The clinics' push-back endpoints (administrators and QC)."""
    with session_scope() as session:
        return list_endpoints(session, principal=principal, clinic=clinic)


@router.post("/delivery-endpoints", response_model=EndpointOut)
def create_endpoint(body: EndpointIn, principal: CurrentPrincipal) -> EndpointOut:
    """Create or update a clinic's push-back endpoint (administrators)."""
    with session_scope() as session:
        return add_endpoint(session, principal=principal, data=body, now=utcnow())


@router.post(
    "/delivery-endpoints/{endpoint_id}/disable",
    response_model=EndpointOut,
    responses={404: {"description": "no such endpoint"}},
)
def disable_endpoint(endpoint_id: str, principal: CurrentPrincipal) -> EndpointOut:
    """Stop pushing to an endpoint; its pending deliveries wait until it is enabled."""
    with session_scope() as session:
        return set_endpoint_enabled(
            session, principal=principal, endpoint=endpoint_id, enabled=False, now=utcnow()
        )


@router.post(
    "/delivery-endpoints/{endpoint_id}/enable",
    response_model=EndpointOut,
    responses={404: {"description": "no such endpoint"}},
)
def enable_endpoint(endpoint_id: str, principal: CurrentPrincipal) -> EndpointOut:
    """Resume pushing to an endpoint."""
    with session_scope() as session:
        return set_endpoint_enabled(
            session, principal=principal, endpoint=endpoint_id, enabled=True, now=utcnow()
        )
