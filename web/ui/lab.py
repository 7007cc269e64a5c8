"""The lab physician's review page (检验审核): one lab order's results, the rules that held
them, each analyte's prior values, approve / reject / comment and signing.

Like the other pages, the page carries layout and labels; ``lab.js`` reads the order from
``GET /api/v1/lab/exams/{exam_id}/reading`` with the session cookie, so the API's scoping,
leases and audit apply.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from web.ui.pages import _EXAM_ID, _current, _home, _render, _to_login

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


@router.get("/ui/lab/{exam_id}")
def lab_page(exam_id: str, request: Request) -> Response:
    """The lab order's results for review and signing (read-only for clinics and when
    someone else holds the order)."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if not _EXAM_ID.match(exam_id):
        return RedirectResponse(_home(principal), status_code=303)
    return _render(
        request,
        "lab.html",
        principal=principal,
        page="lab",
        config={"examId": exam_id, "home": _home(principal)},
    )
