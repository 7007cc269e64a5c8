"""The alliance patient index: look up a person by any of their identifiers, and (admins)
link, unlink and review proposed matches."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from rdc_core.db import session_scope, utcnow
from web.security import CurrentPrincipal
from worklist.patients import (
    Candidate,
    PersonOut,
    find_person,
    get_person,
    link_identifiers,
    match_candidates,
    unlink_identifiers,
)

router = APIRouter(prefix="/api/v1/patients", tags=["patients"])


class LinkIn(BaseModel):
    identifiers: list[str] = Field(
        min_length=1, max_length=50, description="ISSUER|ID of each identifier"
    )
    reason: str = Field(min_length=1, max_length=2000)


@router.get(
    "",
    response_model=PersonOut,
    responses={
        404: {"description": "no such identifier (a clinic sees only its own)"},
        409: {"description": "the identifier names several persons"},
        422: {"description": "not ISSUER|ID, or a national ID with a bad check digit"},
    },
)
def lookup(
    principal: CurrentPrincipal,
    identifier: Annotated[str, Query(description="ISSUER|ID", max_length=200)],
) -> PersonOut:
    """The person an identifier belongs to, with every linked identifier (national ID
    masked) and the exams the caller may see."""
    with session_scope() as session:
        return find_person(session, principal=principal, identifier=identifier)


@router.get("/candidates", response_model=list[Candidate])
def candidates(
    principal: CurrentPrincipal, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[Candidate]:
    """Possible matches (same name in either script, birth date and sex) for an
    administrator to review; never linked automatically."""
    with session_scope() as session:
        return match_candidates(session, principal=principal, limit=limit)


@router.post("/link", response_model=PersonOut, responses={404: {}, 409: {}, 422: {}})
def link(body: LinkIn, principal: CurrentPrincipal) -> PersonOut:
    """An administrator links identifiers into one person (audited with the reason)."""
    with session_scope() as session:
        return link_identifiers(
            session,
            principal=principal,
            identifiers=body.identifiers,
            reason=body.reason,
            now=utcnow(),
        )


@router.post("/unlink", response_model=list[PersonOut], responses={404: {}, 409: {}, 422: {}})
def unlink(body: LinkIn, principal: CurrentPrincipal) -> list[PersonOut]:
    """An administrator takes identifiers out of their person (audited with the reason);
    answers the persons they now form."""
    with session_scope() as session:
        return unlink_identifiers(
            session,
            principal=principal,
            identifiers=body.identifiers,
            reason=body.reason,
            now=utcnow(),
        )


@router.get("/{person_id}", response_model=PersonOut, responses={404: {}})
def person(person_id: str, principal: CurrentPrincipal) -> PersonOut:
    """One person with every linked identifier; a clinic sees only persons with one of its
    identifiers (others answer 404)."""
    with session_scope() as session:
        return get_person(session, principal=principal, person_id=person_id)
