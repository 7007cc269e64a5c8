"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from web.api import (
    admin,
    audit,
    auth,
    critical_values,
    deliveries,
    exams,
    health,
    lab_messages,
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


def create_app() -> FastAPI:
    """Build the HTTP application (routes, problem handlers); settings are read per request."""
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
        worklist,
        reports,
        deliveries,
        patients,
        recognition,
        critical_values,
        lab_messages,
        admin,
        qc,
    ):
        app.include_router(module.router)
    app.include_router(ui_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(dicomweb_router)
    return app
