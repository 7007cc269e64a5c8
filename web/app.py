"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from web.api import auth, exams, health, reports, worklist
from web.problems import install_problem_handlers

__all__ = ["create_app"]


def create_app() -> FastAPI:
    """Build the HTTP application (routes, problem handlers); settings are read per request."""
    app = FastAPI(
        title="RDC — remote diagnostic centre",
        version="0.1.0",
        description="Imaging, ECG and lab intake for a medical alliance; one reading worklist.",
    )
    install_problem_handlers(app)
    for module in (health, auth, exams, worklist, reports):
        app.include_router(module.router)
    return app
