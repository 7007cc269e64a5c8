"""Reports: drafts need the lease; residents submit preliminary, seniors verify; final is
locked; attending readers sign final directly; re-scan sends the exam back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from rdc_core.db import session_scope, utcnow
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from tests.worklist.conftest import Reading
from worklist.claims import ClaimConflictError, claim_item
from worklist.models import Exam, ExamState, User, WorkItem, WorkItemState
from worklist.queries import get_exam
from worklist.reports import (
    PRELIMINARY_NOTICE,
    ReportLockedError,
    get_report,
    request_rescan,
    save_draft,
    submit_report,
    verify_report,
)
from worklist.schemas import ReportIn, ReportOut

STUDY = "1.2.9.1"
GOOD = ReportIn(
    findings="两肺纹理清晰。Lungs clear.",
    impression="未见异常。Normal.",
    quality_grade="甲",  # type: ignore[arg-type]
)


def _claim(reading: Reading, who: str) -> None:
    with session_scope() as session:
        claim_item(
            session,
            principal=reading.people[who],
            item_id=reading.items[STUDY],
            now=utcnow(),
            lease_seconds=600,
        )


def _save(reading: Reading, who: str, data: ReportIn = GOOD) -> ReportOut:
    with session_scope() as session:
        return save_draft(
            session,
            principal=reading.people[who],
            exam_id=reading.exams[STUDY],
            data=data,
            now=utcnow(),
        )


def _submit(reading: Reading, who: str) -> ReportOut:
    with session_scope() as session:
        return submit_report(
            session, principal=reading.people[who], exam_id=reading.exams[STUDY], now=utcnow()
        )


def _verify(reading: Reading, who: str, report_id: str) -> ReportOut:
    with session_scope() as session:
        return verify_report(
            session, principal=reading.people[who], report_id=report_id, now=utcnow()
        )


def _states(reading: Reading) -> tuple[ExamState, WorkItemState, str | None]:
    with session_scope() as session:
        exam = session.get(Exam, reading.exams[STUDY])
        item = session.execute(
            select(WorkItem).where(WorkItem.exam_id == reading.exams[STUDY])
        ).scalar_one()
        assert exam is not None
        return exam.state, item.state, item.claimed_by


def test_a_draft_needs_the_lease(reading: Reading) -> None:
    with pytest.raises(ConflictError, match="claim"):
        _save(reading, "resident")
    _claim(reading, "resident")
    with pytest.raises(ClaimConflictError):
        _claim(reading, "resident2")
    with pytest.raises(ConflictError, match="claim"):
        _save(reading, "resident2")


def test_draft_saves_only_given_fields_and_detects_stale_editors(reading: Reading) -> None:
    _claim(reading, "resident")
    first = _save(reading, "resident", ReportIn(findings="F1"))
    assert first.status == "draft" and first.findings == "F1" and first.impression == ""
    second = _save(reading, "resident", ReportIn(impression="I1", revision=first.revision))
    assert (second.findings, second.impression) == ("F1", "I1")
    assert second.revision == first.revision + 1
    with pytest.raises(ConflictError, match="changed meanwhile"):
        _save(reading, "resident", ReportIn(findings="stale", revision=first.revision))


def test_resident_report_is_preliminary_until_a_senior_verifies(reading: Reading) -> None:
    _claim(reading, "resident")
    _save(reading, "resident")
    report = _submit(reading, "resident")
    assert report.status == "preliminary" and report.notice == PRELIMINARY_NOTICE
    assert _states(reading) == (ExamState.PRELIMINARY, WorkItemState.AWAITING_VERIFICATION, None)
    # The resident can no longer change it; another resident cannot verify or claim it.
    with pytest.raises(ConflictError):
        _save(reading, "resident")
    with pytest.raises(PermissionDeniedError):
        _verify(reading, "resident2", report.id)
    with pytest.raises(ClaimConflictError, match="senior"):
        _claim(reading, "resident2")
    final = _verify(reading, "chief", report.id)
    assert final.status == "final" and final.locked and final.verified_by == "chief"
    assert final.notice is None and final.author == "resident"
    assert _states(reading) == (ExamState.FINAL, WorkItemState.DONE, None)
    with pytest.raises(ReportLockedError):
        _verify(reading, "attending", report.id)


def test_a_senior_verifies_only_what_routing_lets_them_read(reading: Reading) -> None:
    _claim(reading, "resident")
    _save(reading, "resident")
    report = _submit(reading, "resident")
    with session_scope() as session:
        attending = session.execute(select(User).where(User.username == "attending")).scalar_one()
        attending.qualifications = [{"discipline": "ecg"}]  # an ECG physician: no CT
    # The CT is not on the ECG physician's worklist, so they cannot co-sign it either.
    with pytest.raises(NotFoundError):
        _verify(reading, "attending", report.id)
    assert _states(reading)[1] is WorkItemState.AWAITING_VERIFICATION
    assert _verify(reading, "chief", report.id).status == "final"


def test_a_final_report_is_locked(reading: Reading) -> None:
    _claim(reading, "attending")
    _save(reading, "attending")
    report = _submit(reading, "attending")
    assert report.status == "final" and report.locked and report.final_at is not None
    with pytest.raises(ConflictError):
        _save(reading, "attending", ReportIn(findings="changed"))
    with session_scope() as session:
        exam = get_exam(session, principal=reading.people["qc"], exam_id=reading.exams[STUDY])
    assert exam.state == "FINAL" and exam.report_status == "final"
    assert exam.final_at is not None and exam.claimed_at is not None


def test_a_chief_signs_final_directly(reading: Reading) -> None:
    with session_scope() as session:
        claim_item(
            session,
            principal=reading.people["chief"],
            item_id=reading.items[STUDY],
            now=utcnow(),
            lease_seconds=600,
        )
    _save(reading, "chief")
    assert _submit(reading, "chief").status == "final"  # a chief signs final directly


def test_incomplete_reports_are_refused(reading: Reading) -> None:
    _claim(reading, "attending")
    with pytest.raises(InvalidInputError, match="write the report"):
        _submit(reading, "attending")
    _save(reading, "attending", ReportIn(findings="something"))
    with pytest.raises(InvalidInputError, match="grade"):
        _submit(reading, "attending")
    _save(reading, "attending", ReportIn(quality_grade="废"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="reason"):
        _submit(reading, "attending")
    _save(reading, "attending", ReportIn(quality_reason="motion artefact"))
    assert _submit(reading, "attending").quality_grade == "废"


def test_letter_grades_are_accepted() -> None:
    assert ReportIn(quality_grade="b").quality_grade == "乙"  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ReportIn(quality_grade="Z")  # type: ignore[arg-type]


def test_clinic_sees_submitted_reports_only(reading: Reading) -> None:
    _claim(reading, "resident")
    _save(reading, "resident")
    with session_scope() as session, pytest.raises(NotFoundError):
        get_report(session, principal=reading.people["tech"], exam_id=reading.exams[STUDY])
    _submit(reading, "resident")
    with session_scope() as session:
        seen = get_report(session, principal=reading.people["tech"], exam_id=reading.exams[STUDY])
    assert seen.status == "preliminary" and seen.notice == PRELIMINARY_NOTICE


def test_rescan_sends_the_exam_back_with_the_reason(reading: Reading) -> None:
    _claim(reading, "resident")
    with session_scope() as session:
        exam = request_rescan(
            session,
            principal=reading.people["resident"],
            exam_id=reading.exams[STUDY],
            reason="运动伪影 motion artefact",
            now=utcnow(),
        )
    assert exam.state == "RESCAN_REQUESTED" and exam.rescan_reason == "运动伪影 motion artefact"
    assert _states(reading)[1] is WorkItemState.DONE
    with pytest.raises(ClaimConflictError):
        _claim(reading, "attending")


def test_expired_lease_stops_editing(reading: Reading) -> None:
    _claim(reading, "resident")
    with session_scope() as session, pytest.raises(ConflictError, match="claim"):
        save_draft(
            session,
            principal=reading.people["resident"],
            exam_id=reading.exams[STUDY],
            data=GOOD,
            now=utcnow() + timedelta(seconds=601),
        )
