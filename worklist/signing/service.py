"""Signing a final report (called from :mod:`worklist.finalization`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy.orm import Session

from worklist.access import Principal
from worklist.models import Exam, Report

__all__ = ["get_signed_artifact", "sign_final_report", "signature_summary"]


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


def get_signed_artifact(
    session: Session, *, report_id: str, kind: Literal["pdf", "document"]
) -> bytes:
    """The signed PDF or the signed JSON document of a report version. Not built yet."""
    raise NotImplementedError


def signature_summary(session: Session, *, report_id: str) -> dict[str, Any] | None:
    """Who signed the report version, when, with which certificate. Not built yet."""
    return None
