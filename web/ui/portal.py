"""The clinic report portal: a clinic's signed reports with their versions (current marked,
earlier ones listed), HR mark, delivery and receipt, download links (PDF, signed JSON,
FHIR) and the acknowledge button. Lead staff see every clinic's reports.

Like the other pages, the page carries layout and labels; ``portal.js`` reads the data from
``GET /api/v1/reports`` with the session cookie, so the API's scoping and audit apply.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from web.ui.pages import _current, _render, _to_login
from worklist.models import ReportStatus, Role

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


@router.get("/ui/portal")
def portal_page(request: Request) -> Response:
    """The report portal (clinic users: their own reports)."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    return _render(
        request,
        "portal_reports.html",
        principal=principal,
        page="portal",
        statuses=[s.value for s in ReportStatus if s is not ReportStatus.DRAFT],
        config={"clinicUser": principal.is_clinic_user},
    )


@router.get("/ui/recognized")
def recognized_page(request: Request) -> Response:
    """Recognised results: look up a patient's results still valid today; clinicians
    decline one with a standard reason and the patient told."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    return _render(
        request,
        "recognized.html",
        principal=principal,
        page="recognized",
        config={"canDecline": principal.is_clinic_user and principal.role is Role.CLINICIAN},
    )
