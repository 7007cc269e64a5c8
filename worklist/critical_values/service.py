"""Critical-value alerts (raised from finalization when a signed report is critical)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from worklist.access import Principal
from worklist.models import Exam, Report

__all__ = ["raise_for_report"]


def raise_for_report(
    session: Session, *, report: Report, exam: Exam, signer: Principal, now: datetime
) -> None:
    """Open a critical-value alert to the clinic when ``report.critical``. Not built yet."""
