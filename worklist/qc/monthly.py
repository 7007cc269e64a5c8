"""The monthly QC report: built on demand for any month, and stored for the month just
ended by a periodic task (it runs hourly and stores last month's report when the store has
none yet, so the report appears on the 1st and a missed run catches up)."""

from __future__ import annotations

import logging
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session

from rdc_core.storage import ObjectStore
from worklist.access import Principal
from worklist.models import OrgKind, Role
from worklist.qc.pdf import TrendSeries, render_monthly_pdf
from worklist.qc.service import compute_indicators, month_period, period_filters, require_qc

__all__ = [
    "SYSTEM_PRINCIPAL",
    "TREND_CODES",
    "monthly_report_pdf",
    "report_key",
    "store_last_month",
]

log = logging.getLogger(__name__)

TREND_CODES = ("RRC-02", "RCV-04", "RWS-03", "IQ-01", "IQ-02", "SLA-01", "TAT-07", "ALL-03")
# The scheduled task acts as the QC function itself, not as a person.
SYSTEM_PRINCIPAL = Principal(
    user_id="system", username="system", role=Role.QC, org_id="", org_kind=OrgKind.LEAD
)


def report_key(month: str) -> str:
    return f"qc/reports/{month}.pdf"


def _shift(month_start: date, months: int) -> date:
    index = month_start.year * 12 + month_start.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def monthly_report_pdf(
    session: Session, *, principal: Principal, month: str, tz: str, now: datetime, alliance: str
) -> bytes:
    """The report of ``month`` (YYYY-MM): all indicators and 12-month trends."""
    require_qc(principal)
    first, last = month_period(month)
    filters = period_filters(start=first, end=last, tz=tz)
    indicators = compute_indicators(session, principal=principal, filters=filters, now=now)
    trend_start = _shift(first, -11)
    months = [_shift(first, -k).strftime("%Y-%m") for k in range(11, -1, -1)]
    trend = compute_indicators(
        session,
        principal=principal,
        filters=period_filters(start=trend_start, end=last, tz=tz),
        now=now,
        group_by="month",
        codes=TREND_CODES,
        previous=False,
    )
    series = []
    for ind in trend:
        by_month = {g.key: g.value for g in ind.groups or []}
        series.append(
            TrendSeries(
                code=ind.code,
                title=f"{ind.name_zh} {ind.name_en}",
                months=months,
                values=[by_month.get(m) for m in months],
                target=ind.target,
                unit=ind.unit,
            )
        )
    generated = now.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M %Z")
    return render_monthly_pdf(
        alliance=alliance, month=month, generated_at=generated, indicators=indicators, trends=series
    )


def store_last_month(
    session: Session, *, store: ObjectStore, tz: str, now: datetime, alliance: str
) -> str | None:
    """Store the report of the month before ``now`` (local time) unless it is stored
    already; returns its key when this call wrote it."""
    local = now.astimezone(ZoneInfo(tz)).date()
    month = _shift(date(local.year, local.month, 1), -1).strftime("%Y-%m")
    key = report_key(month)
    if store.exists(key):
        return None
    pdf = monthly_report_pdf(
        session, principal=SYSTEM_PRINCIPAL, month=month, tz=tz, now=now, alliance=alliance
    )
    store.put_bytes(key, pdf)
    log.info("stored the QC report of %s as %s", month, key)
    return key
