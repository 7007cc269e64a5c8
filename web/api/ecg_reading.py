"""The ECG reading console's API: the waveform to draw, the reader's measurements, the
serial comparison with a prior ECG, and the statement library search. Importing this
module registers the ECG report-section provider with the hub's signing."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ecg_service.reading_service import (
    ecg_signal,
    register,
    serial_comparison,
    set_reader_measurements,
)
from ecg_service.schemas import EcgOut
from ecg_service.statements import STATEMENT_CATEGORIES, search_statements
from rdc_core.db import session_scope, utcnow
from rdc_core.errors import InvalidInputError
from rdc_core.storage import get_object_store
from web.security import CurrentPrincipal
from worklist.audit import audited_read

__all__ = ["router", "statements_router"]

router = APIRouter(prefix="/api/v1/ecg", tags=["ecg"])
statements_router = APIRouter(prefix="/api/v1/ecg-statements", tags=["ecg"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such ECG exam, or another clinic's"}
}

register()


class ReaderMeasurementsIn(BaseModel):
    """The reader's values (key -> number, null = use the machine's) for the keys of
    ``GET /api/v1/ecg/{exam_id}``'s ``measurements``."""

    measurements: dict[str, float | None] = Field(default_factory=dict)


class StatementOut(BaseModel):
    code: str
    zh: str
    en: str
    category: str
    severity: str
    maps_to_critical: bool


def _signal(principal: Any, exam_id: str, max_rate_hz: float) -> dict[str, Any]:
    with audited_read() as session:
        return ecg_signal(
            session,
            principal=principal,
            exam_id=exam_id,
            store=get_object_store(),
            max_rate_hz=max_rate_hz,
        )


@router.get("/{exam_id}/signal", responses=_NOT_FOUND)
async def signal(
    exam_id: str,
    principal: CurrentPrincipal,
    max_rate_hz: Annotated[float, Query(ge=50, le=2000)] = 500.0,
) -> dict[str, Any]:
    """The leads in µV (integers, ``signals[i]`` is ``leads[i]``) at ``sampling_rate_hz``
    (decimated from ``source_rate_hz`` to at most ``max_rate_hz``), and the median beats
    with the global fiducials (ms from the start of the median window)."""
    return await run_in_threadpool(_signal, principal, exam_id, max_rate_hz)


@router.put("/{exam_id}/reader-measurements", response_model=EcgOut, responses=_NOT_FOUND)
def reader_measurements(
    exam_id: str, body: ReaderMeasurementsIn, principal: CurrentPrincipal
) -> EcgOut:
    """Keep the reader's measurements beside the machine's and the device's; the report
    states the reader's value where there is one. 409 once the report is final."""
    with session_scope() as session:
        out: EcgOut = set_reader_measurements(
            session,
            principal=principal,
            exam_id=exam_id,
            values=body.measurements,
            now=utcnow(),
        )
        return out


@router.get("/{exam_id}/serial", responses=_NOT_FOUND)
def serial(
    exam_id: str,
    principal: CurrentPrincipal,
    prior: Annotated[str, Query(min_length=1, max_length=128, description="prior exam ID")],
) -> dict[str, Any]:
    """Serial comparison: each measurement now and on the prior ECG of the same person,
    the change, and whether it is notable."""
    with audited_read() as session:
        return serial_comparison(session, principal=principal, exam_id=exam_id, prior_id=prior)


@statements_router.get("", response_model=list[StatementOut])
def statements(
    principal: CurrentPrincipal,
    q: Annotated[str, Query(max_length=100)] = "",
    category: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[StatementOut]:
    """The ECG statement library (AHA/ACC/HRS categories, Chinese and English), searched by
    code, Chinese or English text."""
    if category is not None and category not in STATEMENT_CATEGORIES:
        raise InvalidInputError(f"category must be one of {', '.join(STATEMENT_CATEGORIES)}")
    return [
        StatementOut(
            code=s.code,
            zh=s.zh,
            en=s.en,
            category=s.category,
            severity=s.severity,
            maps_to_critical=s.maps_to_critical,
        )
        for s in search_statements(q, category=category, limit=limit)
    ]
