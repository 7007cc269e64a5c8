"""GET /healthz: the process is up and its database and store answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from rdc_core.db import read_session
from rdc_core.errors import RDCError
from rdc_core.storage import get_object_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> JSONResponse:
    """200 with ``{"status": "ok"}`` when database and store answer, else 503 naming the part."""
    checks: dict[str, str] = {}
    try:
        with read_session() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except (RDCError, Exception) as exc:
        checks["database"] = f"error: {exc}"
    try:
        get_object_store().check()
        checks["store"] = "ok"
    except RDCError as exc:
        checks["store"] = f"error: {exc}"
    healthy = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status_code=200 if healthy else 503,
    )
