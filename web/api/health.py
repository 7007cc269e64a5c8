"""Liveness, readiness and metrics: what load balancers and Prometheus ask."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from rdc_core.db import read_session
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store

router = APIRouter(tags=["health"])


def _check_database() -> None:
    with read_session() as session:
        session.execute(text("SELECT 1"))


def _check_store() -> None:
    get_object_store().check()


def _check_broker() -> None:
    settings = get_settings()
    if settings.task_backend != "celery":
        return
    from kombu import Connection

    with Connection(settings.broker_url, connect_timeout=3) as connection:
        connection.ensure_connection(max_retries=1)


def _report(checks: dict[str, object]) -> JSONResponse:
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()  # type: ignore[operator]
            results[name] = "ok"
        except Exception as exc:  # report every failure, whatever its kind
            results[name] = f"error: {exc}"
    healthy = all(v == "ok" for v in results.values())
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", "checks": results},
        status_code=200 if healthy else 503,
    )


@router.get("/healthz")
def healthz() -> JSONResponse:
    """200 with ``{"status": "ok"}`` when the database and the store answer, else 503."""
    return _report({"database": _check_database, "store": _check_store})


@router.get("/livez")
def livez() -> JSONResponse:
    """200 while the process serves requests (restart it when this fails)."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
def readyz() -> JSONResponse:
    """200 only when the database, the store and the broker (Celery backend) answer."""
    return _report({"database": _check_database, "store": _check_store, "broker": _check_broker})


@router.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of this process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
