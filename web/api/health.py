"""Liveness, readiness and metrics: what load balancers and Prometheus ask."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import case, func, select, text

from rdc_core.db import read_session, utcnow
from rdc_core.metrics import GaugeSample, register_gauge_source
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from worklist.audit_anchor import VerificationStatus, load_status
from worklist.models import Exam, ExamState, Priority, WorkItem, WorkItemState

router = APIRouter(tags=["health"])

BROKER_TIMEOUT_SECONDS = 3.0


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

    # Any kombu URL: redis:// (and rediss://) or amqp:// (and amqps://, pyamqp://) for RabbitMQ.
    timeout = BROKER_TIMEOUT_SECONDS
    with Connection(
        settings.broker_url,
        connect_timeout=timeout,
        transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout},
    ) as connection:
        connection.ensure_connection(max_retries=1)


_AUDIT_STATUS_TTL = 15.0
_audit_cache: tuple[float, VerificationStatus | None] | None = None
_audit_lock = threading.Lock()


def _audit_status() -> VerificationStatus | None:
    """The last verification of the audit trail (kept in the object store by whichever
    process ran it), read at most every 15 s."""
    global _audit_cache
    with _audit_lock:
        cached = _audit_cache
        if cached is not None and time.monotonic() - cached[0] < _AUDIT_STATUS_TTL:
            return cached[1]
        status = load_status(get_object_store())
        _audit_cache = (time.monotonic(), status)
        return status


def _audit_detail() -> dict[str, Any]:
    try:
        status = _audit_status()
    except Exception as exc:  # the store's own check reports the store; say why here
        return {"intact": None, "error": str(exc)}
    if status is None:
        return {"intact": None, "checked_at": None}
    return asdict(status)


def _report(checks: dict[str, object], **detail: Any) -> JSONResponse:
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()  # type: ignore[operator]
            results[name] = "ok"
        except Exception as exc:  # report every failure, whatever its kind
            results[name] = f"error: {exc}"
    healthy = all(v == "ok" for v in results.values())
    return JSONResponse(
        {"status": "ok" if healthy else "unavailable", "checks": results, **detail},
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
    """200 only when the database, the store and the broker (Celery backend) answer.

    ``audit`` shows the last verification of the audit trail (``intact`` false: tampering
    found, with the first bad sequence number and why). It does not make the replica
    unready: a broken trail is an incident to investigate, not a reason to stop reading."""
    return _report(
        {"database": _check_database, "store": _check_store, "broker": _check_broker},
        audit=_audit_detail(),
    )


def backlog_samples() -> list[GaugeSample]:
    """What users wait for: exams still receiving, and open work items (all, and overdue) by
    priority. Two aggregate queries on indexed columns."""
    now = utcnow()
    with read_session() as session:
        receiving = session.scalar(
            select(func.count()).select_from(Exam).where(Exam.state == ExamState.RECEIVING)
        )
        rows = session.execute(
            select(
                WorkItem.priority,
                func.count(),
                func.coalesce(func.sum(case((WorkItem.due_at < now, 1), else_=0)), 0),
            )
            .where(WorkItem.state == WorkItemState.OPEN)
            .group_by(WorkItem.priority)
        ).all()
    counts = {Priority(priority): (total, overdue) for priority, total, overdue in rows}
    samples: list[GaugeSample] = [("rdc_exams_receiving", (), receiving or 0)]
    for priority in Priority:  # every priority, so that each series exists from the start
        total, overdue = counts.get(priority, (0, 0))
        samples.append(("rdc_work_items_open", (priority.value,), total))
        samples.append(("rdc_work_items_overdue", (priority.value,), overdue))
    return samples


# Computed when Prometheus scrapes, kept 5 s: many replicas and scrapers cost two queries each
# per 5 s at most. A database that does not answer within the timeout leaves these series out
# of the scrape (rdc_metrics_source_up{source="worklist"} 0); the scrape itself succeeds.
register_gauge_source("worklist", backlog_samples, ttl=5.0, timeout=2.5)


def audit_samples() -> list[GaugeSample]:
    """Whether the last verification found the audit trail intact, and when it ran (no
    series before the first verification)."""
    status = _audit_status()
    if status is None:
        return []
    return [
        ("rdc_audit_chain_intact", (), 1 if status.intact else 0),
        ("rdc_audit_chain_verified_timestamp_seconds", (), status.checked_at_timestamp),
    ]


register_gauge_source("audit", audit_samples, ttl=5.0, timeout=2.5)


@router.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of this process, with the backlog of the whole deployment."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
