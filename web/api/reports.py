"""Reports: the draft (autosaved), submission, senior verification, and the templates."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from rdc_core.db import session_scope, utcnow
from web.security import CurrentPrincipal
from worklist.report_templates import TEMPLATES, templates_for
from worklist.reports import get_report, save_draft, submit_report, verify_report
from worklist.schemas import ReportIn, ReportOut

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


@router.post("/exams/{exam_id}/report/submit", response_model=ReportOut, responses=_CONFLICT)
def submit(exam_id: str, principal: CurrentPrincipal) -> ReportOut:
    """Submit: final for attending and chief readers, preliminary for residents."""
    with session_scope() as session:
        return submit_report(session, principal=principal, exam_id=exam_id, now=utcnow())


@router.post("/reports/{report_id}/verify-by-senior", response_model=ReportOut, responses=_CONFLICT)
def verify(report_id: str, principal: CurrentPrincipal) -> ReportOut:
    """A senior verifies (co-signs) a resident's preliminary report, making it final."""
    with session_scope() as session:
        return verify_report(session, principal=principal, report_id=report_id, now=utcnow())


@router.get("/report-templates")
def report_templates(
    principal: CurrentPrincipal, modality: str = "", body_part: str = ""
) -> list[dict[str, Any]]:
    """Templates for an exam's modality and body part, the most specific first."""
    chosen = templates_for(modality=modality, body_part=body_part) if modality else TEMPLATES
    return [t.as_dict() for t in chosen]
