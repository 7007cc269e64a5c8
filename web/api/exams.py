"""Exams: list with filters and paging, and one exam with its instances."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from rdc_core.db import session_scope, utcnow
from web.security import CurrentPrincipal
from worklist.models import ExamState, Priority
from worklist.queries import get_exam, list_exams, list_priors
from worklist.reports import request_rescan
from worklist.schemas import ExamDetail, ExamSummary, Page

router = APIRouter(prefix="/api/v1/exams", tags=["exams"])


@router.get("", response_model=Page[ExamSummary])
def exams(
    principal: CurrentPrincipal,
    clinic: Annotated[str | None, Query(description="clinic code")] = None,
    state: ExamState | None = None,
    modality: str | None = None,
    priority: Priority | None = None,
    patient_name: Annotated[
        str | None,
        Query(
            max_length=320,
            description="DICOM name match: * and ? wildcards, each name group "
            "(alphabetic, case-insensitive; ideographic; phonetic), e.g. 王* or =王^芳",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Page[ExamSummary]:
    """Exams the caller may see (a clinic sees only its own), newest first."""
    with session_scope() as session:
        return list_exams(
            session,
            principal=principal,
            clinic=clinic,
            state=state,
            modality=modality,
            priority=priority,
            patient_name=patient_name,
            limit=limit,
            offset=offset,
        )


@router.get(
    "/{exam_id}",
    response_model=ExamDetail,
    responses={404: {"description": "no such exam, or it belongs to another clinic"}},
)
def exam(exam_id: str, principal: CurrentPrincipal) -> ExamDetail:
    """One exam with its instances. Another clinic's exam answers 404, never 403."""
    with session_scope() as session:
        return get_exam(session, principal=principal, exam_id=exam_id)


class RescanRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


@router.get("/{exam_id}/priors", response_model=list[ExamSummary], responses={404: {}})
def priors(exam_id: str, principal: CurrentPrincipal) -> list[ExamSummary]:
    """The same patient's other exams, newest first."""
    with session_scope() as session:
        return list_priors(session, principal=principal, exam_id=exam_id)


@router.post(
    "/{exam_id}/rescan",
    response_model=ExamDetail,
    responses={409: {"description": "not holding the exam's lease, or already reported"}},
)
def rescan(exam_id: str, body: RescanRequest, principal: CurrentPrincipal) -> ExamSummary:
    """Send the exam back to the clinic for a re-scan, with the reason."""
    with session_scope() as session:
        return request_rescan(
            session, principal=principal, exam_id=exam_id, reason=body.reason, now=utcnow()
        )
