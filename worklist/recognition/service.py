"""Evaluating mutual recognition when a report is signed (called from finalization)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from worklist.access import Principal
from worklist.models import Exam, Report

__all__ = ["evaluate_report", "recognition_for_report"]


def evaluate_report(
    session: Session, *, report: Report, exam: Exam, signer: Principal, now: datetime
) -> dict[str, Any] | None:
    """Decide and record whether the report's result carries the HR mark. Not built yet."""
    return None


def recognition_for_report(session: Session, *, report_id: str) -> dict[str, Any] | None:
    """The recorded recognition decision of a report version. Not built yet."""
    return None
