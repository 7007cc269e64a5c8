"""Quality control: indicators, their cases, histograms, targets, exports and the monthly
report. QC staff and administrators of the lead hospital only: everyone else gets 403
(clinic users included; the figures compare clinics)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response, StreamingResponse

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.errors import InvalidInputError
from rdc_core.settings import get_settings
from web.params import CalendarMonth, LocalDay, Offset
from web.security import CurrentPrincipal
from worklist.access import Principal
from worklist.qc.export import case_table, csv_chunks, indicator_table, xlsx_chunks
from worklist.qc.monthly import monthly_report_pdf
from worklist.qc.schemas import CasePage, HistogramOut, IndicatorsOut, TargetIn, TargetOut
from worklist.qc.service import (
    QcFilters,
    compute_indicators,
    histogram,
    iter_cases,
    list_cases,
    list_targets,
    period_filters,
    record_export,
    require_qc,
    set_target,
    target_history,
)

router = APIRouter(prefix="/api/v1/qc", tags=["quality-control"])

_FORBIDDEN: dict[int | str, dict[str, Any]] = {
    403: {"description": "not QC staff or an administrator of the lead hospital"}
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    **_FORBIDDEN,
    404: {"description": "no such indicator"},
}

From = Annotated[
    LocalDay | None,
    Query(alias="from", description="first day (local), default: 1st of this month"),
]
To = Annotated[LocalDay | None, Query(description="last day (local, included), default: today")]
DisciplineQ = Annotated[str | None, Query(description="imaging | ecg | lab")]
ClinicQ = Annotated[str | None, Query(description="clinic code")]
ModalityQ = Annotated[str | None, Query(description="modality, e.g. CT")]
ReaderQ = Annotated[str | None, Query(description="reader's username")]
PriorityQ = Annotated[str | None, Query(description="emergency | urgent | routine")]
SubsetQ = Annotated[
    Literal["all", "numerator", "failing"],
    Query(description="all (the denominator), numerator, or failing (breaches)"),
]


def _filters(
    start: From = None,
    to: To = None,
    discipline: DisciplineQ = None,
    clinic: ClinicQ = None,
    modality: ModalityQ = None,
    reader: ReaderQ = None,
    priority: PriorityQ = None,
) -> QcFilters:
    """The period and dimension filters every QC route takes (local days of the
    alliance's time zone; default: this month up to today)."""
    tz = get_settings().timezone
    today = datetime.now(ZoneInfo(tz)).date()
    end = to or today
    first = start or end.replace(day=1)
    if (end - first).days > 3 * 366:
        raise InvalidInputError("the period is at most three years")
    return period_filters(
        start=first,
        end=end,
        tz=tz,
        discipline=discipline,
        clinic=clinic,
        modality=modality,
        reader=reader,
        priority=priority,
    )


Filters = Annotated[QcFilters, Depends(_filters)]


@dataclass(frozen=True, slots=True)
class _Export:
    indicator: str | None
    cases_code: str | None
    subset: str
    group_by: str | None


def _export(
    indicator: Annotated[str | None, Query(description="an indicator code, or 'all'")] = None,
    cases_code: Annotated[
        str | None, Query(alias="cases", description="case list of this code")
    ] = None,
    subset: SubsetQ = "all",
    group_by: Annotated[str | None, Query()] = None,
) -> _Export:
    return _Export(indicator, cases_code, subset, group_by)


ExportQ = Annotated[_Export, Depends(_export)]


@router.get("/indicators", response_model=IndicatorsOut, responses=_FORBIDDEN)
def indicators(
    principal: CurrentPrincipal,
    filters: Filters,
    group_by: Annotated[
        str | None,
        Query(description="discipline | clinic | modality | reader | priority | month | reason"),
    ] = None,
    code: Annotated[list[str] | None, Query(description="only these indicators")] = None,
    family: Annotated[
        str | None, Query(description="turnaround | imaging | ecg | lab | alliance")
    ] = None,
) -> IndicatorsOut:
    """Every indicator over the period: numerator, denominator, rate, value, target, status
    and the change from the period of the same length before; ``groups`` with ``group_by``."""
    with read_session() as session:
        out = compute_indicators(
            session,
            principal=principal,
            filters=filters,
            now=utcnow(),
            group_by=group_by or None,
            codes=code,
            family=family,
        )
    return IndicatorsOut(
        period_start=filters.start, period_end=filters.end, group_by=group_by, indicators=out
    )


@router.get("/indicators/{code}/cases", response_model=CasePage, responses=_NOT_FOUND)
def cases(
    code: str,
    principal: CurrentPrincipal,
    filters: Filters,
    subset: SubsetQ = "all",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> CasePage:
    """The exact cases behind a figure, with their times and reasons (audited)."""
    with session_scope() as session:
        return list_cases(
            session,
            principal=principal,
            code=code,
            filters=filters,
            now=utcnow(),
            subset=subset,
            limit=limit,
            offset=offset,
        )


@router.get("/indicators/{code}/histogram", response_model=HistogramOut, responses=_NOT_FOUND)
def indicator_histogram(
    code: str,
    principal: CurrentPrincipal,
    filters: Filters,
    bins: Annotated[int, Query(ge=2, le=100)] = 20,
) -> HistogramOut:
    """Distribution of the cases' minutes with P50, P90 and the limit line (e.g. 10 min)."""
    with read_session() as session:
        return histogram(
            session, principal=principal, code=code, filters=filters, now=utcnow(), bins=bins
        )


@router.get("/targets", response_model=list[TargetOut], responses=_FORBIDDEN)
def targets(principal: CurrentPrincipal) -> list[TargetOut]:
    """The target in force for every indicator (version 0: the shipped default)."""
    with read_session() as session:
        return list_targets(session, principal=principal)


@router.get("/targets/{code}", response_model=list[TargetOut], responses=_NOT_FOUND)
def target_versions(code: str, principal: CurrentPrincipal) -> list[TargetOut]:
    """Every version of one indicator's target, newest first: who changed it, and when."""
    with read_session() as session:
        return target_history(session, principal=principal, code=code)


@router.put("/targets/{code}", response_model=TargetOut, responses=_NOT_FOUND)
def change_target(code: str, body: TargetIn, principal: CurrentPrincipal) -> TargetOut:
    """A new version of the target (audited with before and after)."""
    with session_scope() as session:
        return set_target(
            session,
            principal=principal,
            code=code,
            target=body.target,
            warn_margin=body.warn_margin,
            note=body.note,
            now=utcnow(),
        )


def _table(
    principal: Principal, filters: QcFilters, export: _Export
) -> tuple[str, list[str], Iterator[list[Any]], Any]:
    """(file stem, header, rows, session) of an export; the caller closes the session."""
    require_qc(principal)
    indicator, cases_code = export.indicator, export.cases_code
    subset, group_by = export.subset, export.group_by
    if bool(indicator) == bool(cases_code):
        raise InvalidInputError(
            "give exactly one of indicator= (an indicator table; 'all' for every indicator)"
            " or cases= (a case list)"
        )
    with session_scope() as session:
        record_export(
            session,
            principal=principal,
            what=f"cases:{cases_code}" if cases_code else f"indicator:{indicator}",
            filters=filters,
            detail={"subset": subset, "group_by": group_by},
        )
    tz = get_settings().timezone
    context = read_session()
    session = context.__enter__()
    try:
        if cases_code:
            rows = iter_cases(
                session,
                principal=principal,
                code=cases_code,
                filters=filters,
                now=utcnow(),
                subset=subset,  # type: ignore[arg-type]
            )
            # The first case read here: a failing query answers a problem, not a cut
            # download.
            first = next(rows, None)
            header, table = case_table(
                rows if first is None else itertools.chain((first,), rows), tz
            )
            stem = f"qc-cases-{cases_code.upper()}"
        else:
            codes = None if indicator in (None, "all", "ALL") else [str(indicator)]
            out = compute_indicators(
                session,
                principal=principal,
                filters=filters,
                now=utcnow(),
                group_by=group_by,
                codes=codes,
            )
            header, table = indicator_table(out)
            stem = f"qc-indicators-{(indicator or 'all').upper()}"
    except BaseException:
        context.__exit__(None, None, None)
        raise
    local = filters.start.astimezone(ZoneInfo(tz)).date().isoformat()
    return f"{stem}-{local}", header, table, context


@router.get("/export.csv", responses={**_NOT_FOUND, 200: {"content": {"text/csv": {}}}})
def export_csv(
    principal: CurrentPrincipal,
    filters: Filters,
    export: ExportQ,
) -> StreamingResponse:
    """An indicator table (``indicator=``) or a case list (``cases=``) as CSV (UTF-8 with
    BOM), streamed, honouring the filters."""
    stem, header, rows, context = _table(principal, filters, export)

    def body() -> Iterator[bytes]:
        try:
            for chunk in csv_chunks(header, rows):
                yield chunk.encode("utf-8")
        finally:
            context.__exit__(None, None, None)

    return StreamingResponse(
        body(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{stem}.csv"'},
    )


@router.get(
    "/export.xlsx",
    responses={
        **_NOT_FOUND,
        200: {"content": {"application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": {}}},
    },
)
def export_xlsx(
    principal: CurrentPrincipal,
    filters: Filters,
    export: ExportQ,
) -> StreamingResponse:
    """The same table as XLSX, streamed as it is written row by row (constant memory)."""
    stem, header, rows, context = _table(principal, filters, export)

    def body() -> Iterator[bytes]:
        try:
            yield from xlsx_chunks(stem[:31], header, rows)
        finally:
            context.__exit__(None, None, None)

    return StreamingResponse(
        body(),
        media_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        headers={"Content-Disposition": f'attachment; filename="{stem}.xlsx"'},
    )


@router.get("/report.pdf", responses={**_FORBIDDEN, 200: {"content": {"application/pdf": {}}}})
def monthly_report(
    principal: CurrentPrincipal,
    month: Annotated[CalendarMonth, Query(description="YYYY-MM")],
) -> Response:
    """The monthly QC report (zh/en, charts included), built now from the current data."""
    settings = get_settings()
    with session_scope() as session:
        require_qc(principal)
        record_export(
            session,
            principal=principal,
            what=f"report:{month}",
            filters=_filters(),
            detail={},
        )
    with read_session() as session:
        pdf = monthly_report_pdf(
            session,
            principal=principal,
            month=month,
            tz=settings.timezone,
            now=utcnow(),
            alliance=settings.alliance_name,
        )
    return Response(
        pdf,
        media_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="qc-report-{month}.pdf"'},
    )


__all__ = ["router"]
