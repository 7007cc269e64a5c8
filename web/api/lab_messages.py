"""HL7 v2 lab messages over HTTP, for laboratory systems without MLLP.

``POST /api/v1/lab/messages`` takes one ER7-encoded message, or an HL7 batch (FHS/BHS ...
BTS/FTS), and answers with the acknowledgement(s) the MLLP listener would send: the same
intake service, the same durability (AA/CA only after the message is stored and indexed).
"""

from __future__ import annotations

import threading
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lab_results.intake import LabIntake, http_intake_scope
from lab_results.mapping import CatalogueEntry, load_catalogue
from lab_results.mapping_queue import MappingResolutionOut, resolve_mapping_entry
from lab_results.schemas import (
    AutoreleaseSwitchIn,
    AutoreleaseSwitchOut,
    LabOrderOut,
    LabOrderSummary,
    MappingQueueEntryOut,
)
from lab_results.service import (
    autorelease_switch,
    get_order,
    list_mapping_queue,
    list_orders,
    set_autorelease,
)
from rdc_core.db import session_scope, utcnow
from rdc_core.errors import InvalidInputError
from rdc_core.settings import Settings, get_settings
from rdc_core.storage import get_object_store
from web.params import Offset
from web.problems import problem
from web.security import CurrentPrincipal
from worklist.audit import audited_read, record_event

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["lab"])

ER7: Final = "x-application/hl7-v2+er7"
_ACCEPTED_TYPES: Final = frozenset(
    {ER7, "application/hl7-v2", "application/hl7-v2+er7", "text/plain", "application/edi-hl7"}
)

_intakes: dict[int, tuple[Settings, LabIntake]] = {}
_intakes_lock = threading.Lock()


def lab_intake(settings: Annotated[Settings, Depends(get_settings)]) -> LabIntake:
    """The intake service of this process: one for all requests, so that messages arriving
    together share one batch of object syncs and one index transaction."""
    with _intakes_lock:
        entry = _intakes.get(id(settings))
        if entry is None or entry[0] is not settings:
            intake = LabIntake(store=get_object_store(settings), zone=settings.zone)
            entry = _intakes[id(settings)] = (settings, intake)
        return entry[1]


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the acknowledgement (or a batch of them): AA/CA accepted, AR/CR "
        "refused, AE/CE error (MSA-1; the reason in ERR and MSA-3)",
        "content": {ER7: {}, "text/plain": {}},
    },
    403: {"description": "not a clinic technician/clinician or a lead-hospital administrator"},
    413: {"description": "body longer than RDC_MLLP_MAX_MESSAGE_BYTES"},
    415: {"description": "not an ER7 content type"},
    503: {"description": "database unavailable: the ACKs say AE/CE; send again"},
}


@router.post("/lab/messages", responses=_RESPONSES, response_class=Response)
async def post_lab_messages(
    request: Request,
    principal: CurrentPrincipal,
    intake: Annotated[LabIntake, Depends(lab_intake)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    """Receive one HL7 v2 message or a batch; the response body is the acknowledgement(s)."""
    restrict_to_org = http_intake_scope(principal)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _ACCEPTED_TYPES:
        return problem(
            415,
            f"send ER7-encoded HL7 v2 as {ER7} or text/plain, not {media or 'no content type'}",
            instance=request.url.path,
        )
    limit = settings.mllp_max_message_bytes
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return problem(413, f"body longer than {limit} bytes", instance=request.url.path)
    if not body.strip():
        raise InvalidInputError("empty body: send one HL7 v2 message or a batch")
    answer, acks = await run_in_threadpool(
        intake.receive_body, bytes(body), channel="http", restrict_to_org=restrict_to_org
    )
    with session_scope() as session:
        record_event(
            session,
            actor=principal.actor,
            action="lab.messages.receive",
            object_type="lab_message",
            object_id=",".join(a.control_id for a in acks)[:100],
            org_id=principal.org_id,
            detail={"acks": [{"control_id": a.control_id, "code": a.code} for a in acks]},
        )
    outage = any(a.outcome == "failed" for a in acks)
    return Response(
        content=answer,
        status_code=503 if outage else 200,
        media_type=ER7 if media == ER7 else "text/plain; charset=utf-8",
        headers={"Retry-After": "30"} if outage else None,
    )


# --- the result model: orders, the mapping queue, the auto-release switch ----------------

_ORDER_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such order, or it belongs to another clinic"}
}


@router.get("/lab/orders", response_model=list[LabOrderSummary])
def lab_orders(
    principal: CurrentPrincipal,
    patient_id: Annotated[str | None, Query(description="the patient ID the clinic sent")] = None,
    issuer: Annotated[str | None, Query(description="its assigning authority")] = None,
    clinic: Annotated[str | None, Query(description="clinic code")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> list[LabOrderSummary]:
    """Lab orders, newest first; a clinic sees only its own."""
    with audited_read() as session:
        return list_orders(
            session,
            principal=principal,
            patient_id=patient_id,
            issuer=issuer,
            clinic=clinic,
            limit=limit,
            offset=offset,
        )


@router.get("/lab/orders/{order_id}", response_model=LabOrderOut, responses=_ORDER_NOT_FOUND)
def lab_order(order_id: str, principal: CurrentPrincipal) -> LabOrderOut:
    """One order (its ID is its exam's ID) with its results: code, LOINC, value, unit,
    reference range, flags, status, the auto-verification trace and earlier versions."""
    with audited_read() as session:
        return get_order(session, principal=principal, order_id=order_id)


@router.get("/lab/mapping-queue", response_model=list[MappingQueueEntryOut])
def lab_mapping_queue(
    principal: CurrentPrincipal,
    include_resolved: Annotated[bool, Query(description="also the resolved codes")] = False,
) -> list[MappingQueueEntryOut]:
    """Observation codes no mapping covers (administrators): never guessed, held here."""
    with audited_read() as session:
        return list_mapping_queue(session, principal=principal, include_resolved=include_resolved)


@router.get("/lab/catalogue", response_model=list[CatalogueEntry])
def lab_catalogue(principal: CurrentPrincipal) -> list[CatalogueEntry]:
    """The alliance test catalogue (the LOINC subset the results map to, with Chinese names
    and UCUM units). LOINC is copyright © Regenstrief Institute, Inc. and the LOINC Committee
    and is available at no cost under the license at https://loinc.org/license"""
    return list(load_catalogue().entries)


class MappingResolveIn(BaseModel):
    """The catalogue LOINC a held local code means; ``all_senders``: for every sender (a
    ``*`` row of the local-code table), else only for the entry's sending facility."""

    loinc: str = Field(min_length=3, max_length=16, examples=["2823-3"])
    all_senders: bool = False


@router.post(
    "/lab/mapping-queue/{entry_id}/resolve",
    response_model=MappingResolutionOut,
    responses={
        404: {"description": "no such queue entry"},
        409: {"description": "the code is already mapped to another LOINC"},
        422: {"description": "the LOINC is not in the alliance test catalogue"},
    },
)
def resolve_lab_mapping(
    entry_id: str,
    body: MappingResolveIn,
    principal: CurrentPrincipal,
    settings: Annotated[Settings, Depends(get_settings)],
) -> MappingResolutionOut:
    """Map a held code to a catalogue LOINC (administrators); the orders held with it are
    verified again (released, alerted or kept for review). Idempotent; audited with the
    state before and after."""
    with session_scope() as session:
        return resolve_mapping_entry(
            session,
            principal=principal,
            entry_id=entry_id,
            loinc=body.loinc,
            all_senders=body.all_senders,
            store=get_object_store(settings),
            settings=settings,
            now=utcnow(),
        )


@router.get("/lab/autorelease", response_model=AutoreleaseSwitchOut)
def lab_autorelease(principal: CurrentPrincipal) -> AutoreleaseSwitchOut:
    """Whether orders that pass auto-verification are released automatically now."""
    with audited_read() as session:
        return autorelease_switch(session, principal=principal)


@router.put("/lab/autorelease", response_model=AutoreleaseSwitchOut)
def put_lab_autorelease(
    body: AutoreleaseSwitchIn, principal: CurrentPrincipal
) -> AutoreleaseSwitchOut:
    """The stop switch (administrators): ``{"enabled": false}`` holds every order for a lab
    physician until it is turned on again; audited."""
    with session_scope() as session:
        return set_autorelease(
            session, principal=principal, enabled=body.enabled, reason=body.reason, now=utcnow()
        )
