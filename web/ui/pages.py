"""Server-rendered pages: login/logout, the reading worklist, the reading page, the clinic view,
the read-only report view and the critical-value register.

Pages carry layout, labels and the page's configuration; their scripts (web/static) fetch the
data from the JSON API with the same session cookie, so every read goes through the API's
access rules and audit. A page request without a valid session redirects to /login.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy import select

from rdc_core.db import session_scope
from rdc_core.errors import AuthenticationError, PermissionDeniedError, TooManyAttemptsError
from rdc_core.settings import get_settings
from web.problems import problem
from web.security import (
    SESSION_COOKIE,
    client_address,
    issue_token,
    password_login,
    principal_from_request,
    refuse_foreign_origin,
)
from web.ui.i18n import LANG_COOKIE, LANGS, catalogue, pick_lang, translator
from worklist.access import Principal
from worklist.accounts import revoke_tokens
from worklist.audit import record_access
from worklist.exam_actions import CLINIC_ANSWER_ROLES, PRIORITY_ROLES
from worklist.models import Discipline, Organization, OrgKind, Priority, Role

__all__ = ["STATIC_DIR", "TEMPLATE_DIR", "router"]

_WEB = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = _WEB / "templates"
STATIC_DIR = _WEB / "static"

templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
router = APIRouter(include_in_schema=False)

_EXAM_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
# Lead-hospital roles that see the critical-value register (the API enforces the same).
_REGISTER_ROLES = frozenset({Role.READER, Role.SENIOR_READER, Role.QC, Role.ADMIN})
_QC_ROLES = frozenset({Role.QC, Role.ADMIN})
_MODALITIES = ("CT", "MR", "DX", "CR", "US", "MG", "XA", "RF", "NM", "PT", "ECG", "LAB")
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    ),
}


# --- helpers -------------------------------------------------------------------------------


def _current(request: Request) -> Principal | None:
    """The signed-in user of a page request, or None (no, expired or revoked session)."""
    if not request.cookies.get(SESSION_COOKIE):
        return None
    try:
        return principal_from_request(request, get_settings())
    except AuthenticationError:
        return None


def _home(principal: Principal) -> str:
    if principal.is_clinic_user:
        return "/ui/clinic"
    return "/ui/qc" if principal.role is Role.QC else "/ui/worklist"


def _safe_next(value: str | None) -> str | None:
    """``value`` when it is a path on this site (never another host), else None."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return None
    if any(ord(ch) < 0x20 for ch in value):
        return None
    parts = urlsplit(value)
    return value if not parts.scheme and not parts.netloc else None


def _here(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def _to_login(request: Request) -> RedirectResponse:
    return RedirectResponse(f"/login?next={quote(_here(request), safe='')}", status_code=303)


@lru_cache(maxsize=64)
def _asset_version(name: str) -> str:
    path = STATIC_DIR / name
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "0"


def _asset(name: str) -> str:
    """The URL of a static file, versioned by its content so browsers never run stale code."""
    return f"/static/{name}?v={_asset_version(name)}"


def _script_json(value: Any) -> Markup:
    """JSON safe to place inside a <script type="application/json"> element."""
    text = json.dumps(value, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


def _render(
    request: Request,
    template: str,
    *,
    principal: Principal | None,
    page: str,
    status_code: int = 200,
    config: dict[str, Any] | None = None,
    **context: Any,
) -> HTMLResponse:
    lang = pick_lang(request.cookies.get(LANG_COOKIE))
    other = next(code for code in LANGS if code != lang)
    settings = get_settings()
    page_config = {
        "page": page,
        "lang": lang,
        "tz": settings.timezone,
        "user": None
        if principal is None
        else {
            "username": principal.username,
            "role": principal.role.value,
            "level": principal.level.value if principal.level else None,
            "org_kind": principal.org_kind.value,
        },
        **(config or {}),
    }
    response = templates.TemplateResponse(
        request,
        template,
        {
            "t": translator(lang),
            "lang": lang,
            "other_lang": other,
            "lang_switch_url": f"/ui/lang/{other}?next={quote(_here(request), safe='')}",
            "principal": principal,
            "page": page,
            "tz": settings.timezone,
            "asset": _asset,
            "config_json": _script_json(page_config),
            "messages_json": _script_json(catalogue(lang)),
            **context,
        },
        status_code=status_code,
    )
    response.headers.update(_SECURITY_HEADERS)
    return response


# --- session -------------------------------------------------------------------------------


@router.get("/")
def root(request: Request) -> Response:
    principal = _current(request)
    return RedirectResponse(_home(principal) if principal else "/login", status_code=303)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    principal = _current(request)
    if principal is not None:
        return RedirectResponse(_safe_next(next) or _home(principal), status_code=303)
    return _render(request, "login.html", principal=None, page="login", next=_safe_next(next) or "")


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2048)] = "",
) -> Response:
    """Check the password (as POST /api/v1/auth/token does, audited) and set the session."""

    def again(error: str, status: int) -> HTMLResponse:
        return _render(
            request,
            "login.html",
            principal=None,
            page="login",
            status_code=status,
            next=_safe_next(next) or "",
            username=username,
            error=error,
        )

    try:
        refuse_foreign_origin(request)
    except PermissionDeniedError:
        return again("login.cross_site", 403)
    if not username or not password:
        return again("login.missing", 400)
    try:
        principal = password_login(
            username=username, password=password, address=client_address(request)
        )
    except TooManyAttemptsError as exc:
        locked = again("login.locked", 429)
        locked.headers["Retry-After"] = str(exc.retry_after)
        return locked
    except AuthenticationError:
        return again("login.failed", 401)
    token, expires_in = issue_token(principal, get_settings())
    response = RedirectResponse(_safe_next(next) or _home(principal), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=expires_in,
        path="/",
        httponly=True,
        samesite="strict",
        # Behind the TLS ingress the scheme is https once the proxy is trusted
        # (RDC_FORWARDED_ALLOW_IPS); production always marks the cookie Secure.
        secure=request.url.scheme == "https" or get_settings().env == "production",
    )
    return response


def _logout(request: Request) -> Response:
    principal = _current(request)
    if principal is not None:
        with session_scope() as session:
            revoke_tokens(session, user_id=principal.user_id)  # every session of this user ends
            record_access(
                session,
                principal,
                action="logout",
                object_type="user",
                object_id=principal.user_id,
            )
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    return _logout(request)


@router.get("/logout")
def logout_link(request: Request) -> Response:
    return _logout(request)


@router.get("/ui/lang/{code}")
def switch_language(code: str, request: Request, next: str | None = None) -> Response:
    """Remember the UI language in the ``lang`` cookie and go back to the page."""
    response = RedirectResponse(_safe_next(next) or "/", status_code=303)
    response.set_cookie(
        LANG_COOKIE,
        pick_lang(code),
        max_age=365 * 24 * 3600,
        path="/",
        samesite="lax",
        secure=request.url.scheme == "https" or get_settings().env == "production",
    )
    return response


# --- pages ---------------------------------------------------------------------------------


@router.get("/ui/worklist")
def worklist_page(request: Request) -> Response:
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if principal.is_clinic_user:
        return RedirectResponse("/ui/clinic", status_code=303)
    return _render(
        request,
        "worklist.html",
        principal=principal,
        page="worklist",
        disciplines=[d.value for d in Discipline],
        priorities=[p.value for p in Priority],
        modalities=_MODALITIES,
    )


def _is_ecg(exam_id: str) -> bool:
    """Whether the exam is an ECG (read in the ECG console); the page shows no data, the
    console's API calls apply the access rules."""
    from worklist.models import Exam

    with session_scope() as session:
        discipline = session.execute(
            select(Exam.discipline).where(Exam.id == exam_id)
        ).scalar_one_or_none()
    return discipline is Discipline.ECG


def _exam_page(
    request: Request, exam_id: str, *, mode: str, template: str = "read.html"
) -> Response:
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if not _EXAM_ID.match(exam_id):
        return RedirectResponse(_home(principal), status_code=303)
    if mode == "read" and principal.is_clinic_user:
        return RedirectResponse(f"/ui/report/{exam_id}", status_code=303)
    if template == "read.html" and _is_ecg(exam_id):
        if mode == "read":
            return RedirectResponse(f"/ui/ecg/{exam_id}", status_code=303)
        template = "ecg.html"  # the report beside the trace, read-only
    return _render(
        request,
        template,
        principal=principal,
        page=mode,
        mode=mode,
        config={"examId": exam_id, "mode": mode, "home": _home(principal)},
        home=_home(principal),
    )


@router.get("/ui/read/{exam_id}")
def reading_page(exam_id: str, request: Request) -> Response:
    """Viewer and report side by side; claims the exam's work item when it is free."""
    return _exam_page(request, exam_id, mode="read")


@router.get("/ui/ecg/{exam_id}")
def ecg_reading_page(exam_id: str, request: Request) -> Response:
    """The ECG reading console: the 12 leads on the grid, calipers, median beats, the
    measurements by source, statements and the prior ECG, beside the report."""
    return _exam_page(request, exam_id, mode="read", template="ecg.html")


@router.get("/ui/report/{exam_id}")
def report_page(exam_id: str, request: Request) -> Response:
    """The report (read-only) beside the images, for clinics and lead staff alike."""
    return _exam_page(request, exam_id, mode="report")


@router.get("/ui/clinic")
def clinic_page(request: Request) -> Response:
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    return _render(
        request,
        "clinic.html",
        principal=principal,
        page="clinic",
        priorities=[p.value for p in Priority],
        modalities=_MODALITIES,
        config={
            "canSetPriority": principal.role in PRIORITY_ROLES,
            "canAnswerRescan": principal.is_clinic_user and principal.role in CLINIC_ANSWER_ROLES,
        },
    )


@router.get("/ui/patients/{person_id}")
def patient_page(person_id: str, request: Request) -> Response:
    """One person of the alliance patient index: identifiers at every clinic (national ID
    masked) and the exams the caller may see; the data comes from /api/v1/patients."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if not _EXAM_ID.match(person_id):
        return RedirectResponse(_home(principal), status_code=303)
    return _render(
        request,
        "patient.html",
        principal=principal,
        page="patient",
        config={"personId": person_id, "clinicUser": principal.is_clinic_user},
    )


@router.get("/ui/patients")
def patient_lookup_page(
    request: Request, identifier: Annotated[str, Query(max_length=200)] = ""
) -> Response:
    """The patient page of the person an identifier ``ISSUER|ID`` belongs to (the reading
    page links here)."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    return _render(
        request,
        "patient.html",
        principal=principal,
        page="patient",
        config={"identifier": identifier, "clinicUser": principal.is_clinic_user},
    )


@router.get("/ui/critical")
def critical_register_page(request: Request) -> Response:
    """The critical-value register (危急值登记) for lead-hospital staff: every alert with
    who/what/when on both sides, escalations and whether it was acknowledged in time."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if principal.is_clinic_user or principal.role not in _REGISTER_ROLES:
        return RedirectResponse(_home(principal), status_code=303)
    with session_scope() as session:
        clinics = session.execute(
            select(Organization.code, Organization.name)
            .where(Organization.kind == OrgKind.CLINIC)
            .order_by(Organization.code)
        ).all()
    return _render(request, "critical.html", principal=principal, page="critical", clinics=clinics)


@router.get("/ui/qc")
def qc_page(request: Request) -> Response:
    """Quality control (质控), the landing page of QC staff: indicator cards, trends,
    breakdowns, histograms and the cases behind each figure (QC staff and administrators)."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if principal.is_clinic_user or principal.role not in _QC_ROLES:
        return RedirectResponse(_home(principal), status_code=303)
    with session_scope() as session:
        clinics = session.execute(
            select(Organization.code, Organization.name)
            .where(Organization.kind == OrgKind.CLINIC)
            .order_by(Organization.code)
        ).all()
    return _render(
        request,
        "qc.html",
        principal=principal,
        page="qc",
        clinics=clinics,
        disciplines=[d.value for d in Discipline],
        priorities=[p.value for p in Priority],
        modalities=_MODALITIES,
        groups=("clinic", "modality", "reader", "priority", "discipline", "month", "reason"),
    )


@router.get("/ui/dicom-keywords")
def dicom_keywords(
    request: Request, tags: Annotated[str, Query(max_length=20_000)] = ""
) -> JSONResponse:
    """Keywords of DICOM tags (``tags=00100010,00280010``) for the header panel."""
    from pydicom.datadict import keyword_for_tag

    if _current(request) is None:
        return problem(401, "sign in first", instance=request.url.path)
    names: dict[str, str] = {}
    for tag in tags.split(",")[:4000]:
        if _TAG.match(tag):
            names[tag.upper()] = keyword_for_tag(int(tag, 16)) or ""
    return JSONResponse(names, headers={"Cache-Control": "private, max-age=86400"})


@router.get("/ui/admin")
def admin_page(request: Request) -> Response:
    """The administration console (administrators of the lead hospital only): clinics and
    AE titles, users, routing rules, SLA targets, recognition, critical-value contacts and
    duty list, delivery endpoints. The page's script calls the same API as the CLI."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if principal.is_clinic_user or principal.role is not Role.ADMIN:
        return RedirectResponse(_home(principal), status_code=303)
    return _render(
        request,
        "admin.html",
        principal=principal,
        page="admin",
        config={
            "roles": [r.value for r in Role],
            "levels": ["resident", "attending", "chief"],
            "disciplines": [d.value for d in Discipline],
            "priorities": [p.value for p in Priority],
            "modalities": _MODALITIES,
            "me": principal.username,
        },
    )


@router.get("/ui/audit")
def audit_page(request: Request) -> Response:
    """The audit trail for QC staff and administrators: search, chain status, CSV export."""
    principal = _current(request)
    if principal is None:
        return _to_login(request)
    if principal.is_clinic_user or principal.role not in (Role.QC, Role.ADMIN):
        return RedirectResponse(_home(principal), status_code=303)
    return _render(request, "audit.html", principal=principal, page="audit")
