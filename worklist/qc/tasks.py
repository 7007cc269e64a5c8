"""The scheduled monthly QC report (edge: opens its own read session)."""

from __future__ import annotations

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import periodic, task
from worklist.qc.monthly import store_last_month
from worklist.qc.service import CHECK_BATCH, check_reports

__all__ = [
    "CHECK_REPORTS",
    "STORE_MONTHLY_QC_REPORT",
    "check_reports_task",
    "store_monthly_qc_report",
]

STORE_MONTHLY_QC_REPORT = "worklist.qc.store_monthly_report"
CHECK_REPORTS = "worklist.qc.check_reports"


@task(CHECK_REPORTS)
def check_reports_task() -> int:
    """Store the report-writing check of signed reports not checked yet (batches of
    CHECK_BATCH, one transaction each); returns how many."""
    total = 0
    last: str | None = None
    while True:
        with session_scope() as session:
            done, last = check_reports(session, now=utcnow(), after=last)
        total += done
        if done < CHECK_BATCH:
            return total


periodic(CHECK_REPORTS, interval=lambda: 60.0)


@task(STORE_MONTHLY_QC_REPORT)
def store_monthly_qc_report() -> str | None:
    """Last month's QC report into the store, once (idempotent: a stored report is kept)."""
    settings = get_settings()
    with read_session() as session:
        return store_last_month(
            session,
            store=get_object_store(settings),
            tz=settings.timezone,
            now=utcnow(),
            alliance=settings.alliance_name,
        )


periodic(STORE_MONTHLY_QC_REPORT, interval=lambda: 3600.0)
