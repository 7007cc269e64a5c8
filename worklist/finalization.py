"""What happens when a report version becomes final, in the signer's transaction.

In order: mutual recognition is decided (the signed document records the decision), the
report is signed (canonical JSON document and PAdES PDF, stored before the commit), a
critical finding opens an alert to the clinic, and delivery to the clinic is scheduled.
Any failure raises and the caller's transaction rolls back: a report is never final
without its signature.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from worklist.access import Principal
from worklist.critical_values.service import raise_for_report
from worklist.delivery.service import schedule_report_delivery
from worklist.models import Exam, Report
from worklist.recognition.service import evaluate_report
from worklist.signing.service import sign_final_report

__all__ = ["finalize_report"]


def finalize_report(
    session: Session, *, report: Report, exam: Exam, signer: Principal, now: datetime
) -> None:
    """Run every consequence of ``report`` becoming final; the caller commits."""
    recognition = evaluate_report(session, report=report, exam=exam, signer=signer, now=now)
    sign_final_report(
        session, report=report, exam=exam, signer=signer, recognition=recognition, now=now
    )
    raise_for_report(session, report=report, exam=exam, signer=signer, now=now)
    schedule_report_delivery(session, report=report, exam=exam, now=now)
