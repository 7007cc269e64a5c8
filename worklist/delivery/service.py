"""Scheduling delivery of a signed report version to its clinic (called from finalization)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from worklist.models import Exam, Report

__all__ = ["schedule_report_delivery"]


def schedule_report_delivery(
    session: Session, *, report: Report, exam: Exam, now: datetime
) -> None:
    """Queue push-back of ``report`` per the clinic's endpoints and notify. Not built yet."""
