"""Exams: list with filters and paging, and one exam with its instances."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from rdc_core.db import session_scope, utcnow
from web.params import Offset
from web.security import CurrentPrincipal
from worklist.audit import audited_read
from worklist.exam_actions import decline_rescan, set_priority
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
    offset: Offset = 0,
) -> Page[ExamSummary]:
    """Exams the caller may see (a clinic sees only its own), newest first."""
    with audited_read() as session:
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
    with audited_read() as session:
        return get_exam(session, principal=principal, exam_id=exam_id)


class RescanRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


@router.get("/{exam_id}/priors", response_model=list[ExamSummary], responses={404: {}})
def priors(exam_id: str, principal: CurrentPrincipal) -> list[ExamSummary]:
    """The same patient's other exams, newest first."""
    with audited_read() as session:
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


class RescanDecline(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, description="why it cannot be repeated")


@router.post(
    "/{exam_id}/rescan/decline",
    response_model=ExamDetail,
    responses={
        403: {"description": "not the exam's clinic"},
        404: {},
        409: {"description": "no re-scan request waits for an answer"},
    },
)
def rescan_decline(exam_id: str, body: RescanDecline, principal: CurrentPrincipal) -> ExamDetail:
    """The clinic cannot repeat the exam: it goes back to the reading queue as it is, with
    the reason (sending new images instead puts it back by itself)."""
    with session_scope() as session:
        return decline_rescan(
            session, principal=principal, exam_id=exam_id, reason=body.reason, now=utcnow()
        )


class PriorityChange(BaseModel):
    priority: Priority
    reason: str = Field(min_length=1, max_length=2000)


@router.post(
    "/{exam_id}/priority",
    response_model=ExamDetail,
    responses={
        403: {"description": "role may not set the urgency"},
        404: {},
        409: {"description": "the exam is reported already"},
    },
)
def priority_change(exam_id: str, body: PriorityChange, principal: CurrentPrincipal) -> ExamDetail:
    """Mark the exam's urgency (emergency, urgent, routine) with the reason, audited; the
    reading queue's due time follows."""
    with session_scope() as session:
        return set_priority(
            session,
            principal=principal,
            exam_id=exam_id,
            priority=body.priority,
            reason=body.reason,
            now=utcnow(),
        )
