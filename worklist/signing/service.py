"""Signing a final report (called from :mod:`worklist.finalization`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from worklist.access import Principal
from worklist.models import Exam, Report

__all__ = ["sign_final_report"]


def sign_final_report(
    session: Session,
    *,
    report: Report,
    exam: Exam,
    signer: Principal,
    recognition: dict[str, Any] | None,
    now: datetime,
) -> None:
    """Sign ``report`` as ``signer``: canonical JSON document and PAdES PDF. Not built yet."""
