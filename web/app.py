"""The FastAPI application factory."""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from rdc_core.settings import get_settings
from web.api import (
    admin,
    audit,
    auth,
    critical_values,
    deliveries,
    ecg,
    ecg_reading,
    exams,
    health,
    lab_messages,
    lab_reading,
    patients,
    qc,
    recognition,
    reports,
    worklist,
)
from web.dicomweb import router as dicomweb_router
from web.problems import install_problem_handlers
from web.ui import STATIC_DIR
from web.ui import router as ui_router

__all__ = ["create_app"]

# Browser apps on other origins (a viewer such as OHIF) call these; the web UI is same-origin.
_CORS_PATHS: Final = ("/api/", "/dicomweb/", "/dicomweb")
_CORS_HEADERS: Final = ["Authorization", "Accept", "Content-Type", "If-None-Match", "Range"]
_CORS_EXPOSED: Final = ["Warning", "Content-Location", "Location", "ETag", "Content-Length"]


class _PathScopedCORS:
    """Starlette's CORSMiddleware for the API and DICOMweb paths only.

    Credentials (cookies) are never allowed across origins: other origins authenticate
    with a bearer token in the Authorization header."""

    def __init__(self, app: ASGIApp, /, **options: Any) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith(_CORS_PATHS):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app() -> FastAPI:
    """Build the HTTP application (routes, problem handlers, CORS from
    ``RDC_CORS_ORIGINS``); other settings are read per request."""
    app = FastAPI(
        title="RDC — remote diagnostic centre",
        version="0.1.0",
        description="Imaging, ECG and lab intake for a medical alliance; one reading worklist.",
    )
    install_problem_handlers(app)
    for module in (
        health,
        auth,
        audit,
        exams,
        ecg,
        ecg_reading,
        worklist,
        reports,
        deliveries,
        patients,
        recognition,
        critical_values,
        lab_messages,
        lab_reading,
        admin,
        qc,
    ):
        app.include_router(module.router)
    app.include_router(ecg_reading.statements_router)
    app.include_router(ui_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(dicomweb_router)
    origins = get_settings().cors_origin_list
    if origins:
        app.add_middleware(
            _PathScopedCORS,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            allow_headers=_CORS_HEADERS,
            expose_headers=_CORS_EXPOSED,
            allow_credentials=False,
            max_age=600,
        )
    return app
