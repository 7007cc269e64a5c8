"""The scheduled monthly QC report (edge: opens its own read session)."""

from __future__ import annotations

from rdc_core.db import read_session, utcnow
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import periodic, task
from worklist.qc.monthly import store_last_month

__all__ = ["STORE_MONTHLY_QC_REPORT", "store_monthly_qc_report"]

STORE_MONTHLY_QC_REPORT = "worklist.qc.store_monthly_report"


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
