"""The QC tasks: the exam facts, the report-writing checks, the monthly report (edges:
each opens its own session)."""

from __future__ import annotations

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.settings import get_settings
from rdc_core.storage import get_object_store
from rdc_core.tasks import periodic, task
from worklist.qc.monthly import store_last_month
from worklist.qc.service import (
    CHECK_BATCH,
    FACT_BATCH,
    check_reports,
    facts_waiting,
    rebuild_rollup,
    refresh_facts,
)

__all__ = [
    "CHECK_REPORTS",
    "REFRESH_FACTS",
    "STORE_MONTHLY_QC_REPORT",
    "check_reports_task",
    "refresh_facts_task",
    "store_monthly_qc_report",
]

STORE_MONTHLY_QC_REPORT = "worklist.qc.store_monthly_report"
CHECK_REPORTS = "worklist.qc.check_reports"
REFRESH_FACTS = "worklist.qc.refresh_facts"
BULK_BACKLOG = 50_000  # queued changes above which the facts are rebuilt in bulk
BULK_BATCH = 20_000


@task(REFRESH_FACTS)
def refresh_facts_task() -> int:
    """Bring ``qc_exam_facts`` up to date with every change queued by the database triggers
    (batches of FACT_BATCH queue rows, one transaction each); returns how many rows. Until
    it runs, the queued exams are read from the source tables: the figures never lag, they
    are only slower to compute."""
    total = 0
    with session_scope() as session:
        if facts_waiting(session) > BULK_BACKLOG:
            # A backlog (an upgrade queues every exam): the facts in bulk, then the roll-up
            # rebuilt from them, in one transaction (readers see the old state until then).
            while done := refresh_facts(session, now=utcnow(), limit=BULK_BATCH, rollup=False):
                total += done
            rebuild_rollup(session, now=utcnow())
    while True:
        with session_scope() as session:
            done = refresh_facts(session, now=utcnow())
        total += done
        if done < FACT_BATCH:
            return total


periodic(REFRESH_FACTS, interval=lambda: 10.0)


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
