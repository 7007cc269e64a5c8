"""The reading queue: list with filters and counts, claim / renew / release / reassign."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.settings import Settings, get_settings
from web.params import Offset
from web.security import CurrentPrincipal
from worklist.audit import audited_read
from worklist.claims import (
    WorklistFilter,
    claim_item,
    claim_next,
    list_readers,
    list_worklist,
    reassign_item,
    release_item,
    renew_item,
)
from worklist.models import Discipline, Priority
from worklist.schemas import LeaseOut, ReaderOut, WorklistPage

router = APIRouter(prefix="/api/v1", tags=["worklist"])
AppSettings = Annotated[Settings, Depends(get_settings)]
_TAKEN: dict[int | str, dict[str, Any]] = {
    409: {"description": "another reader holds the exam, or it is no longer open"}
}


class Reassignment(BaseModel):
    username: str


class Released(BaseModel):
    item_id: str
    released: bool = True


@router.get(
    "/worklist",
    response_model=WorklistPage,
    responses={403: {"description": "clinic users have no reading worklist"}},
)
def worklist(
    principal: CurrentPrincipal,
    discipline: Discipline | None = None,
    modality: str | None = None,
    clinic: Annotated[str | None, Query(description="clinic code")] = None,
    priority: Priority | None = None,
    state: Annotated[
        str | None, Query(description="open | claimed | awaiting_verification")
    ] = None,
    mine: bool = False,
    patient_name: Annotated[
        str | None,
        Query(
            max_length=320,
            description="DICOM name match: * and ? wildcards, each name group "
            "(alphabetic, case-insensitive; ideographic; phonetic), e.g. 王* or =王^芳",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> WorklistPage:
    """The reading queue of the lead hospital: most urgent, then earliest due, first."""
    filters = WorklistFilter(
        discipline=discipline,
        modality=modality,
        clinic=clinic,
        priority=priority,
        state=state,
        mine=mine,
        patient_name=patient_name,
    )
    with audited_read() as session:
        return list_worklist(
            session,
            principal=principal,
            now=utcnow(),
            filters=filters,
            limit=limit,
            offset=offset,
        )


@router.post("/worklist/next", response_model=LeaseOut, responses={404: {}})
def next_item(principal: CurrentPrincipal, settings: AppSettings) -> LeaseOut:
    """Claim the most urgent free exam I may read."""
    with session_scope() as session:
        return claim_next(
            session,
            principal=principal,
            now=utcnow(),
            lease_seconds=settings.claim_lease_seconds,
        )


@router.post("/worklist/{item_id}/claim", response_model=LeaseOut, responses=_TAKEN)
def claim(item_id: str, principal: CurrentPrincipal, settings: AppSettings) -> LeaseOut:
    """Claim the exam for the lease time (claiming again renews). 409 while someone else
    holds it."""
    with session_scope() as session:
        return claim_item(
            session,
            principal=principal,
            item_id=item_id,
            now=utcnow(),
            lease_seconds=settings.claim_lease_seconds,
        )


@router.post("/worklist/{item_id}/renew", response_model=LeaseOut, responses=_TAKEN)
def renew(item_id: str, principal: CurrentPrincipal, settings: AppSettings) -> LeaseOut:
    """Extend my lease while the report is open."""
    with session_scope() as session:
        return renew_item(
            session,
            principal=principal,
            item_id=item_id,
            now=utcnow(),
            lease_seconds=settings.claim_lease_seconds,
        )


@router.post("/worklist/{item_id}/release", response_model=Released, responses=_TAKEN)
def release(item_id: str, principal: CurrentPrincipal) -> Released:
    """Give the exam back to the queue."""
    with session_scope() as session:
        release_item(session, principal=principal, item_id=item_id, now=utcnow())
    return Released(item_id=item_id)


@router.post("/worklist/{item_id}/reassign", response_model=LeaseOut, responses=_TAKEN)
def reassign(
    item_id: str, body: Reassignment, principal: CurrentPrincipal, settings: AppSettings
) -> LeaseOut:
    """A senior hands the exam to another reader."""
    with session_scope() as session:
        return reassign_item(
            session,
            principal=principal,
            item_id=item_id,
            username=body.username,
            now=utcnow(),
            lease_seconds=settings.claim_lease_seconds,
        )


@router.get("/readers", response_model=list[ReaderOut])
def readers(principal: CurrentPrincipal) -> list[ReaderOut]:
    """Readers of the lead hospital (for reassignment)."""
    with read_session() as session:
        return list_readers(session, principal=principal)
