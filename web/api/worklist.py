"""GET /api/v1/worklist: open work items, most urgent and earliest due first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from rdc_core.db import session_scope
from web.security import CurrentPrincipal
from worklist.queries import list_worklist
from worklist.schemas import Page, WorkItemOut

router = APIRouter(prefix="/api/v1/worklist", tags=["worklist"])


@router.get(
    "",
    response_model=Page[WorkItemOut],
    responses={403: {"description": "clinic users have no reading worklist"}},
)
def worklist(
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[WorkItemOut]:
    """The reading queue of the lead hospital."""
    with session_scope() as session:
        return list_worklist(session, principal=principal, limit=limit, offset=offset)
