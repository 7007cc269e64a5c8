"""Lab reading (检验审核): the lab physician reviews an order the auto-verification held,
and signs its report.

The review is the exam's report draft: each result's decision (approved / rejected with a
reason) and comment, and the reviewer's comment on the whole order, live in the draft's
structured data under ``lab_review`` (:class:`LabReview`), written through
:func:`worklist.reports.save_draft`, so the work-item lease, the draft's revision and the
audit trail apply as for any report. Signing (:func:`sign_lab_report`) checks that every
held result was decided, then submits the draft through :func:`worklist.reports.submit_report`
(preliminary or final by the signer's level; signature, recognition, critical alert and
delivery as for every discipline).

The signed report's results table is the lab's report section (:func:`lab_sections`,
registered with :mod:`worklist.signing.sections`): one row per result with value, flag,
unit, reference range and the row's own mutual-recognition mark (互认) with its validity
window, plus one FHIR Observation per result.

A result's prior values are the same person's earlier results of the same analyte, from
any clinic of the alliance (the patient index links the clinics' identifiers).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from lab_results.mapping import TestCatalogue, load_catalogue
from lab_results.models import LabObservation, LabOrder
from lab_results.processing import rule_set
from lab_results.schemas import LabOrderOut, LabResultOut, RuleTraceOut
from lab_results.service import order_out
from rdc_core.errors import ConflictError, InvalidInputError, NotFoundError
from rdc_core.settings import get_settings
from worklist.access import READING_ROLES, Principal, require_roles
from worklist.audit import record_access
from worklist.models import (
    AmendmentKind,
    Discipline,
    Exam,
    ExamState,
    Report,
    ReportStatus,
    WorkItem,
    WorkItemState,
)
from worklist.patients.links import same_person_clause
from worklist.queries import get_exam, visible_exam
from worklist.recognition.catalog import catalog_items, current_catalog
from worklist.recognition.models import Accreditation, CatalogItem
from worklist.recognition.service import recognition_for_report
from worklist.reports import amend_report, report_out, save_draft, submit_report
from worklist.schemas import ExamDetail, ReportAmendIn, ReportIn, ReportOut
from worklist.signing.sections import (
    ReportSection,
    SectionObservation,
    SectionTable,
    register_section_provider,
)
from worklist.signing.service import signature_summary

__all__ = [
    "LabReadingOut",
    "LabReview",
    "ResultReview",
    "amend_lab_report",
    "approve_held",
    "check_signable",
    "display_value",
    "get_reading",
    "lab_sections",
    "review_result",
    "row_recognition",
    "set_comment",
    "sign_lab_report",
]

REVIEW_KEY = "lab_review"
MAX_PRIORS = 10
_RANGE = re.compile(
    r"^\s*([<>≤≥]=?)?\s*([-+]?\d+(?:\.\d+)?)\s*(?:[-–~—]|to)?\s*([-+]?\d+(?:\.\d+)?)?\s*$"
)
_ARROW = {"H": "↑", "HH": "↑↑", "L": "↓", "LL": "↓↓", "A": "*", "AA": "**"}
_FLAG_TEXT = {
    "H": "偏高 High",
    "L": "偏低 Low",
    "HH": "危急偏高 Critically high",
    "LL": "危急偏低 Critically low",
    "A": "异常 Abnormal",
    "AA": "危急异常 Critically abnormal",
}
_RELEASED_STATUSES = ("F", "C")
# Reasons of the report-level recognition decision that each row decides for itself.
_PER_ROW_REASONS = frozenset(
    {"not_in_catalogue", "not_accredited", "accreditation_expired", "accreditation_not_yet_valid"}
)

Decision = Literal["pending", "approved", "rejected", "auto"]


# --- the review (typed, stored in the draft, hence signed) -------------------------------------


class ResultReview(BaseModel):
    """The reviewer's decision on one result (by the result's key within the order)."""

    decision: Literal["pending", "approved", "rejected"] = "pending"
    reason: str = Field(default="", max_length=2000)  # why it was rejected
    comment: str = Field(default="", max_length=2000)
    by: str | None = None
    at: str | None = None  # ISO time of the last change


class LabReview(BaseModel):
    """The whole order's review: per result (keyed by ``system|code|sub-ID``) and overall."""

    results: dict[str, ResultReview] = Field(default_factory=dict)
    comment: str = Field(default="", max_length=10_000)

    @classmethod
    def of(cls, report: Report | None) -> LabReview:
        raw = ((report.structured or {}) if report is not None else {}).get(REVIEW_KEY)
        return cls.model_validate(raw) if isinstance(raw, dict) else cls()


# --- what the page reads ------------------------------------------------------------------------


class PriorValue(BaseModel):
    order_id: str
    observed_at: datetime | None
    value: str
    numeric: float | None
    unit: str
    flags: list[str]


class ReviewedResult(BaseModel):
    id: str
    key: str
    code: str
    code_system: str
    loinc: str | None
    analyte: str | None
    name_zh: str
    name_en: str
    value_type: str
    value: str
    display_value: str  # a coded result's text; else the value as sent
    numeric: float | None
    unit: str
    reference_range: str
    range_low: float | None
    range_high: float | None
    flags: list[str]
    critical: bool
    status: str
    version: int
    verdict: str  # auto-verification: pass, hold or critical
    reasons: list[RuleTraceOut]  # the rules that did not pass (what held it)
    trace: list[RuleTraceOut]
    priors: list[PriorValue]
    decision: Decision
    decision_reason: str = ""
    comment: str = ""
    decided_by: str | None = None
    decided_at: str | None = None


class OrderHead(BaseModel):
    id: str
    placer_number: str
    filler_number: str
    service: str
    collected_at: datetime | None
    received_at: datetime | None
    reported_at: datetime | None
    priority: str
    specimen: str
    verdict: str
    critical: bool
    released_at: datetime | None
    auto_released: bool
    order_trace: list[RuleTraceOut]


class LabReadingOut(BaseModel):
    """The lab review page's data: exam, order, results with priors and decisions, the
    draft or signed report and what still blocks signing."""

    exam: ExamDetail
    order: OrderHead
    results: list[ReviewedResult]
    comment: str
    blocking: list[str]  # names of held results still without a decision
    report: ReportOut | None
    signature: dict[str, Any] | None


def parse_range(text: str) -> tuple[float | None, float | None]:
    """(low, high) of a reference range as sent (``3.5-5.3``, ``<5.2``, ``>1.0``)."""
    match = _RANGE.match(text or "")
    if match is None:
        return None, None
    op, first, second = match.groups()
    a = float(first)
    if second is not None and not op:
        return a, float(second)
    if op and op.startswith(("<", "≤")):
        return None, a
    if op and op.startswith((">", "≥")):
        return a, None
    return None, None


_CODED_TYPES = frozenset({"CE", "CWE", "CNE"})


def _coding(result: LabResultOut) -> tuple[str, str, str] | None:
    """(system, code, display) of a coded result (CWE/CE/CNE: ``code^text^system``)."""
    if result.value_type.upper() not in _CODED_TYPES or not result.value.strip():
        return None
    parts = [*result.value.split("~", 1)[0].split("^"), "", "", ""][:3]
    code, text, system = (p.strip() for p in parts)
    system = {"LN": "http://loinc.org", "SCT": "http://snomed.info/sct"}.get(system, system)
    return system, code, text or code


def display_value(result: LabResultOut) -> str:
    """The value as a reader reads it: a coded result's text (else its code), a text
    result as sent, a number as sent."""
    coding = _coding(result)
    if coding is not None:
        return coding[2]
    return result.value


def _order(session: Session, exam: Exam) -> LabOrder:
    if exam.discipline is not Discipline.LAB:
        raise NotFoundError(f"exam {exam.id} is not a lab order")
    order = session.get(LabOrder, exam.id)
    if order is None:
        order = session.execute(
            select(LabOrder).where(LabOrder.exam_id == exam.id)
        ).scalar_one_or_none()
    if order is None:
        raise NotFoundError(f"exam {exam.id} has no lab results yet")
    return order


def _current_report(session: Session, exam_id: str) -> Report | None:
    return session.execute(
        select(Report).where(Report.exam_id == exam_id).order_by(Report.version.desc()).limit(1)
    ).scalar_one_or_none()


def _priors(
    session: Session, *, principal: Principal, order: LabOrder, results: Sequence[LabResultOut]
) -> dict[str, list[PriorValue]]:
    analytes = {r.analyte for r in results if r.analyte}
    if not analytes:
        return {}
    stmt = (
        select(LabObservation, LabOrder)
        .join(LabOrder, LabOrder.id == LabObservation.order_id)
        .where(
            same_person_clause(LabObservation.patient_ref, [order.patient_ref]),
            LabObservation.analyte.in_(sorted(analytes)),
            LabObservation.current.is_(True),
            LabObservation.order_id != order.id,
        )
        .order_by(LabObservation.observed_at.desc())
    )
    if principal.is_clinic_user:
        stmt = stmt.where(LabOrder.org_id == principal.org_id)
    before = order.collected_at
    out: dict[str, list[PriorValue]] = {}
    for row, _prior_order in session.execute(stmt):
        if before is not None and row.observed_at is not None and row.observed_at >= before:
            continue
        values = out.setdefault(str(row.analyte), [])
        if len(values) < MAX_PRIORS:
            values.append(
                PriorValue(
                    order_id=row.order_id,
                    observed_at=row.observed_at,
                    value=row.value,
                    numeric=row.numeric,
                    unit=row.unit,
                    flags=list(row.flags or []),
                )
            )
    for values in out.values():
        values.reverse()  # oldest first, as a trend reads
    return out


def _with_reference(results: Sequence[LabResultOut], *, sex: str | None) -> list[LabResultOut]:
    """The results, a missing reference range (OBX-7 empty) filled from the rule set's
    interval for the analyte (by sex when it has one): the report always prints a range."""
    rules = rule_set(get_settings())
    out = []
    for result in results:
        rule = rules.analytes.get(result.analyte or "") if not result.reference_range else None
        interval = (rule.by_sex.get(sex or "") or rule.reference_range) if rule else None
        if interval is not None:
            low, high = interval
            result = result.model_copy(update={"reference_range": f"{low:g}-{high:g}"})
        out.append(result)
    return out


def _decision(result: LabResultOut, review: LabReview) -> ResultReview:
    return review.results.get(result.key) or ResultReview()


def _effective(result: LabResultOut, review: LabReview) -> Decision:
    decided = _decision(result, review).decision
    if decided != "pending":
        return decided
    return "auto" if result.verdict == "pass" else "pending"


def _name(result: LabResultOut) -> str:
    return result.name_zh or result.name_en or result.code_text or result.code


def _reviewed(
    result: LabResultOut, review: LabReview, priors: dict[str, list[PriorValue]]
) -> ReviewedResult:
    stored = _decision(result, review)
    low, high = parse_range(result.reference_range)
    return ReviewedResult(
        id=result.id,
        key=result.key,
        code=result.code,
        code_system=result.code_system,
        loinc=result.loinc,
        analyte=result.analyte,
        name_zh=result.name_zh or result.code_text,
        name_en=result.name_en,
        value_type=result.value_type,
        value=result.value,
        display_value=display_value(result),
        numeric=result.numeric,
        unit=result.unit,
        reference_range=result.reference_range,
        range_low=low,
        range_high=high,
        flags=[f for f in result.flags if f],
        critical=result.critical,
        status=result.status,
        version=result.version,
        verdict=result.verdict,
        reasons=[t for t in result.autoverification if t.verdict != "pass"],
        trace=result.autoverification,
        priors=priors.get(result.analyte or "", []),
        decision=_effective(result, review),
        decision_reason=stored.reason,
        comment=stored.comment,
        decided_by=stored.by,
        decided_at=stored.at,
    )


def _specimen(order: LabOrderOut) -> str:
    parts = []
    for spm in order.specimens:
        kind = spm.get("type") or ""
        text = kind.get("text") if isinstance(kind, dict) else kind
        condition = spm.get("condition") or []
        label = str(text or spm.get("specimen_id") or "")
        if isinstance(condition, list) and condition:
            label += f" ({', '.join(str(c) for c in condition)})"
        if label:
            parts.append(label)
    return "; ".join(parts)


def _blocking(results: Sequence[ReviewedResult]) -> list[str]:
    return [r.name_zh or r.name_en or r.code for r in results if r.decision == "pending"]


def _reading(
    session: Session, *, principal: Principal, exam: ExamDetail, order: LabOrder
) -> LabReadingOut:
    full = order_out(session, order)
    report = _current_report(session, exam.id)
    review = LabReview.of(report)
    priors = _priors(session, principal=principal, order=order, results=full.results)
    current = _with_reference(full.results, sex=exam.patient.sex)
    results = [_reviewed(r, review, priors) for r in current]
    visible_report = report
    if report is not None and principal.is_clinic_user and report.status is ReportStatus.DRAFT:
        visible_report = None
    return LabReadingOut(
        exam=exam,
        order=OrderHead(
            id=order.id,
            placer_number=full.placer_number,
            filler_number=full.filler_number,
            service=full.service_text or full.service_code,
            collected_at=full.collected_at,
            received_at=full.specimen_received_at,
            reported_at=full.reported_at,
            priority=full.priority,
            specimen=_specimen(full),
            verdict=full.verdict,
            critical=full.critical,
            released_at=full.released_at,
            auto_released=full.auto_released,
            order_trace=full.order_trace,
        ),
        results=results,
        comment=review.comment,
        blocking=_blocking(results),
        report=report_out(visible_report) if visible_report is not None else None,
        signature=(
            signature_summary(session, report_id=visible_report.id) if visible_report else None
        ),
    )


def get_reading(session: Session, *, principal: Principal, exam_id: str) -> LabReadingOut:
    """The lab order of ``exam_id`` for the review page (audited)."""
    exam = get_exam(session, principal=principal, exam_id=exam_id)
    row = visible_exam(session, principal=principal, exam_id=exam_id)
    order = _order(session, row)
    record_access(session, principal, action="view", object_type="lab_order", object_id=order.id)
    return _reading(session, principal=principal, exam=exam, order=order)


# --- review actions (each saves the draft under the caller's lease) ------------------------------


def _summary_line(result: LabResultOut, decision: Decision, reason: str) -> str:
    if decision == "rejected":
        return f"{_name(result)}: 已拒绝 Rejected ({reason})"
    flags = [f for f in result.flags if f and f != "N"]
    flag_text = " ".join(f"{_ARROW.get(f, '')}{f}" for f in flags)
    range_text = f" [{result.reference_range}]" if result.reference_range else ""
    return (
        f"{_name(result)} {display_value(result)} {result.unit}".strip()
        + (f" {flag_text}" if flag_text else "")
        + range_text
    )


def _save(
    session: Session,
    *,
    principal: Principal,
    exam: Exam,
    order: LabOrder,
    review: LabReview,
    now: datetime,
) -> None:
    """Write the review into the exam's draft (created on the first action)."""
    full = order_out(session, order)
    report = _current_report(session, exam.id)
    if report is not None and report.status is ReportStatus.FINAL:
        raise ConflictError("the lab report is signed; it can no longer be reviewed")
    structured = dict(report.structured or {}) if report is not None else {}
    structured[REVIEW_KEY] = review.model_dump(mode="json")
    codes: set[str] = set()
    for result in full.results:
        if _effective(result, review) == "rejected":
            continue
        codes.update(c for c in (result.loinc, result.analyte, result.code) if c)
    structured["test_codes"] = sorted(codes)
    findings = "\n".join(
        _summary_line(r, _effective(r, review), _decision(r, review).reason) for r in full.results
    )
    # A critical order's draft names its critical values (the open alert follows that text):
    # the reviewer's comment comes after it, never instead of it.
    critical_line = ""
    if report is not None and report.critical and report.impression.startswith("危急值"):
        critical_line = report.impression.split("\n", 1)[0]
    save_draft(
        session,
        principal=principal,
        exam_id=exam.id,
        data=ReportIn(
            structured=structured,
            findings=findings or "—",
            impression="\n".join(p for p in (critical_line, review.comment) if p),
        ),
        now=now,
    )


def _begin(
    session: Session, *, principal: Principal, exam_id: str
) -> tuple[Exam, LabOrder, LabReview]:
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    order = _order(session, exam)
    return exam, order, LabReview.of(_current_report(session, exam.id))


def _finish(
    session: Session, *, principal: Principal, exam: Exam, order: LabOrder
) -> LabReadingOut:
    session.flush()
    detail = get_exam(session, principal=principal, exam_id=exam.id)
    return _reading(session, principal=principal, exam=detail, order=order)


def review_result(
    session: Session,
    *,
    principal: Principal,
    exam_id: str,
    result_id: str,
    decision: Literal["pending", "approved", "rejected"] | None,
    reason: str | None,
    comment: str | None,
    now: datetime,
) -> LabReadingOut:
    """Approve or reject (with a reason) one result, and/or set its comment. Needs the
    caller's lease on the exam (as every draft change)."""
    exam, order, review = _begin(session, principal=principal, exam_id=exam_id)
    result = session.get(LabObservation, result_id)
    if result is None or result.order_id != order.id or not result.current:
        raise NotFoundError(f"no current result {result_id} in this order")
    entry = review.results.get(result.result_key) or ResultReview()
    if decision is not None:
        if decision == "rejected" and not (reason or "").strip():
            raise InvalidInputError("say why the result is rejected")
        entry.decision = decision
        entry.reason = (reason or "").strip()[:2000] if decision == "rejected" else ""
    if comment is not None:
        entry.comment = comment.strip()[:2000]
    entry.by = principal.username
    entry.at = now.isoformat()
    review.results[result.result_key] = entry
    _save(session, principal=principal, exam=exam, order=order, review=review, now=now)
    record_access(
        session,
        principal,
        action="review_result",
        object_type="lab_result",
        object_id=result.id,
        detail={"decision": entry.decision, "reason": entry.reason, "comment": entry.comment},
    )
    return _finish(session, principal=principal, exam=exam, order=order)


def approve_held(
    session: Session, *, principal: Principal, exam_id: str, now: datetime
) -> LabReadingOut:
    """Approve every held result not decided yet (the order-level approval)."""
    exam, order, review = _begin(session, principal=principal, exam_id=exam_id)
    approved = []
    for result in order_out(session, order).results:
        if _effective(result, review) != "pending":
            continue
        entry = review.results.get(result.key) or ResultReview()
        entry.decision, entry.reason = "approved", ""
        entry.by, entry.at = principal.username, now.isoformat()
        review.results[result.key] = entry
        approved.append(result.id)
    _save(session, principal=principal, exam=exam, order=order, review=review, now=now)
    record_access(
        session,
        principal,
        action="approve_results",
        object_type="lab_order",
        object_id=order.id,
        detail={"results": approved},
    )
    return _finish(session, principal=principal, exam=exam, order=order)


def set_comment(
    session: Session, *, principal: Principal, exam_id: str, comment: str, now: datetime
) -> LabReadingOut:
    """The reviewer's comment on the whole order (printed on the report)."""
    exam, order, review = _begin(session, principal=principal, exam_id=exam_id)
    review.comment = comment.strip()[:10_000]
    _save(session, principal=principal, exam=exam, order=order, review=review, now=now)
    return _finish(session, principal=principal, exam=exam, order=order)


def check_signable(session: Session, *, principal: Principal, exam_id: str) -> None:
    """Whether ``principal`` could sign this lab order at all (a lead-hospital reader, a lab
    exam they see), before their password is judged: a request that cannot sign anything
    never counts as a wrong password (nor locks the account)."""
    require_roles(principal, READING_ROLES, lead_only=True)
    _order(session, visible_exam(session, principal=principal, exam_id=exam_id))


def sign_lab_report(
    session: Session, *, principal: Principal, exam_id: str, now: datetime
) -> LabReadingOut:
    """Sign the reviewed order: every held result must be approved or rejected, and at least
    one result must remain. The draft is refreshed from the current results, then submitted
    (final for attending and chief physicians, preliminary for residents). The caller has
    confirmed the signing password."""
    exam, order, review = _begin(session, principal=principal, exam_id=exam_id)
    full = order_out(session, order)
    pending = [_name(r) for r in full.results if _effective(r, review) == "pending"]
    if pending:
        raise InvalidInputError(f"review every held result first: {', '.join(pending)}")
    if not any(_effective(r, review) != "rejected" for r in full.results):
        raise InvalidInputError("every result is rejected: return the order to the clinic instead")
    _save(session, principal=principal, exam=exam, order=order, review=review, now=now)
    signed = submit_report(session, principal=principal, exam_id=exam.id, now=now)
    if signed.status is ReportStatus.FINAL:
        # Released to the clinic by the lab physician's signature.
        order.released_at = now
        order.released_by = principal.user_id
        order.report_id = signed.id
        order.auto_released = False
    record_access(session, principal, action="sign", object_type="lab_order", object_id=order.id)
    return _finish(session, principal=principal, exam=exam, order=order)


def amend_lab_report(
    session: Session,
    *,
    principal: Principal,
    exam_id: str,
    kind: AmendmentKind,
    reason: str,
    comment: str | None,
    now: datetime,
) -> LabReadingOut:
    """A new signed version of the order's signed lab report (amended, corrected or
    appended), by an attending or chief reader; the caller has confirmed the signing
    password. The new version's results table is built from the order's current results (a
    correction that arrived after signing is in it), the review's decisions carried over;
    ``comment`` replaces the order comment (appended: is added after it). No lease needed:
    the order goes off the lab worklist again."""
    exam = visible_exam(session, principal=principal, exam_id=exam_id)
    order = _order(session, exam)
    report = _current_report(session, exam.id)
    if report is None or report.status is not ReportStatus.FINAL:
        raise ConflictError("the lab report is not signed: sign it instead of amending it")
    review = LabReview.of(report)
    new_comment = review.comment
    if comment is not None:
        text = comment.strip()[:10_000]
        if kind is AmendmentKind.APPENDED:
            new_comment = "\n".join(p for p in (review.comment, text) if p)[:10_000]
        else:
            new_comment = text
    review.comment = new_comment
    full = order_out(session, order)
    findings = "\n".join(
        _summary_line(r, _effective(r, review), _decision(r, review).reason) for r in full.results
    )
    structured = dict(report.structured or {})
    structured[REVIEW_KEY] = review.model_dump(mode="json")
    if kind is AmendmentKind.APPENDED:
        # An addendum: the text is added after the signed one (amend_report appends it).
        added = (comment or "").strip()[:10_000] or None
        data = ReportAmendIn(
            kind=kind,
            reason=reason,
            impression=added,
            structured={REVIEW_KEY: structured[REVIEW_KEY]},
        )
    else:
        data = ReportAmendIn(
            kind=kind,
            reason=reason,
            findings=findings or "—",
            impression=new_comment,
            structured=structured,
        )
    amended = amend_report(session, principal=principal, report_id=report.id, data=data, now=now)
    order.released_at = now
    order.released_by = principal.user_id
    order.report_id = amended.id
    order.auto_released = False
    exam.state = ExamState.FINAL
    session.execute(
        update(WorkItem)
        .where(WorkItem.exam_id == exam.id, WorkItem.state != WorkItemState.DONE)
        .values(state=WorkItemState.DONE, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    record_access(
        session,
        principal,
        action="amend",
        object_type="lab_order",
        object_id=order.id,
        detail={"kind": kind.value, "reason": reason, "report_id": amended.id},
    )
    return _finish(session, principal=principal, exam=exam, order=order)


# --- per-row mutual recognition ------------------------------------------------------------------


class RowRecognition(BaseModel):
    """Whether one result carries the 互认 mark in the signed report, and until when."""

    granted: bool
    mark: str | None = None
    item_code: str | None = None
    window_days: int | None = None
    recognizable_until: str | None = None  # ISO date
    reason: str  # why (not): a short bilingual text

    @property
    def cell(self) -> str:
        if self.granted and self.recognizable_until:
            return f"{self.mark} 至 {self.recognizable_until}"
        return "—"


def _collection_date(order: LabOrder, exam: Exam) -> date:
    at = order.collected_at or exam.performed_at or exam.first_received_at
    return at.astimezone(get_settings().zone).date()


def _accredited(session: Session, exam: Exam, item: CatalogItem, on: date) -> bool:
    rows = session.execute(
        select(Accreditation).where(
            Accreditation.org_id == exam.org_id,
            Accreditation.discipline == Discipline.LAB,
            Accreditation.item_code.in_((item.code, "")),
        )
    ).scalars()
    return any(a.valid_from <= on <= a.valid_to for a in rows)


def row_recognition(
    *,
    result: LabResultOut,
    decision: Decision,
    exam_decision: dict[str, Any] | None,
    items: Sequence[CatalogItem],
    accredited: dict[str, bool],
    tests: TestCatalogue,
    collected: date,
) -> RowRecognition:
    """The 互认 mark of one result of a final report: the report's own decision must not
    fail on the signer, the result must be approved and final with a value, and its analyte
    in a lab item of the catalogue for which the clinic is accredited on the collection
    date. The window is the analyte's 互认时限 from the test catalogue (else the
    item's validity), counted from the collection date."""
    if exam_decision is None:
        return RowRecognition(granted=False, reason="报告未终审 / not a final report")
    if decision == "rejected":
        return RowRecognition(granted=False, reason="结果已拒绝 / result rejected")
    if result.status not in _RELEASED_STATUSES or not result.value.strip():
        return RowRecognition(granted=False, reason="非最终结果 / not a final result")
    codes = {c for c in (result.loinc, result.analyte, result.code) if c}
    item = next((i for i in items if codes.intersection(i.test_codes or [])), None)
    if item is None:
        return RowRecognition(granted=False, reason="不在互认目录 / not in the catalogue")
    if not accredited.get(item.code):
        return RowRecognition(
            granted=False, item_code=item.code, reason="机构未通过该项目质控 / not accredited"
        )
    # The report's own decision matched one catalogue item for the whole order; here each
    # row has its item and accreditation, so only the rest (signer, final) must hold.
    failed = [
        str(r.get("text"))
        for r in exam_decision.get("reasons") or []
        if not r.get("passed") and r.get("code") not in _PER_ROW_REASONS
    ]
    if failed:
        return RowRecognition(granted=False, item_code=item.code, reason="; ".join(failed)[:200])
    entry = tests.by_loinc(result.loinc or "") or tests.by_analyte(result.analyte or "")
    window = entry.recognition_window_days if entry and entry.recognition_window_days else None
    days = window or item.valid_days
    until = collected + timedelta(days=days)
    return RowRecognition(
        granted=True,
        mark=item.scope_mark,
        item_code=item.code,
        window_days=days,
        recognizable_until=until.isoformat(),
        reason=f"{item.code} {item.name_zh}: {days} 天 / days",
    )


# --- the signed report's section -----------------------------------------------------------------

_COLUMNS = (
    "检验项目 Test",
    "结果 Result",
    "提示 Flag",
    "单位 Unit",
    "参考区间 Reference range",
    "互认 Recognition",
)


def _flag_cell(result: LabResultOut) -> str:
    flags = [f for f in result.flags if f and f != "N"]
    text = " ".join(f"{_ARROW.get(f, '')}{f}" for f in flags)
    if result.critical:
        text = f"{text} 危急 Critical".strip()
    return text


def _interpretation(result: LabResultOut) -> list[str]:
    return [f for f in result.flags if f in ("H", "L", "HH", "LL", "A", "AA", "N")]


def lab_sections(session: Session, *, exam: Exam, report: Report) -> list[ReportSection]:
    """The results table of a lab report version: one row per current result with its
    decision, flag, unit, reference range and 互认 mark; one Observation per numeric, text
    or coded result; the review and the per-row decisions in the section's data."""
    order = session.get(LabOrder, exam.id)
    if order is None:
        return []
    full = order_out(session, order)
    review = LabReview.of(report)
    exam_decision = (
        recognition_for_report(session, report_id=report.id)
        if report.status is ReportStatus.FINAL
        else None
    )
    catalog = current_catalog(session)
    items = [
        i
        for i in (catalog_items(session, version=catalog.version) if catalog else [])
        if i.discipline is Discipline.LAB
    ]
    collected = _collection_date(order, exam)
    accredited = {i.code: _accredited(session, exam, i, collected) for i in items}
    tests = load_catalogue()
    rows: list[tuple[str, ...]] = []
    observations: list[SectionObservation] = []
    data_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for result in _with_reference(full.results, sex=exam.patient.sex):
        decision = _effective(result, review)
        stored = _decision(result, review)
        mark = row_recognition(
            result=result,
            decision=decision,
            exam_decision=exam_decision,
            items=items,
            accredited=accredited,
            tests=tests,
            collected=collected,
        )
        name = result.name_zh or result.code_text or result.code
        short_en = result.name_en.split(" [", 1)[0].strip()  # LOINC's component
        label = f"{name} {short_en}".strip() if short_en and short_en != name else name
        if result.loinc:
            label += f" ({result.loinc})"
        rejected = decision == "rejected"
        rows.append(
            (
                label,
                "已拒绝 Rejected" if rejected else (display_value(result) or "—"),
                "" if rejected else _flag_cell(result),
                result.unit or "",
                result.reference_range or "—",
                mark.cell,
            )
        )
        if rejected:
            notes.append(f"{name}: 已拒绝 Rejected — {stored.reason}")
        if stored.comment:
            notes.append(f"{name}: {stored.comment}")
        low, high = parse_range(result.reference_range)
        if not rejected and result.numeric is not None and result.loinc:
            observations.append(
                SectionObservation(
                    key=result.key,
                    code=result.loinc,
                    display=f"{name} {result.name_en}".strip(),
                    value=float(result.numeric),
                    unit=result.unit,
                    source=result.performing_lab or result.method,
                    reference_low=low,
                    reference_high=high,
                    reference_text=result.reference_range,
                    interpretation=tuple(_interpretation(result)),
                )
            )
        elif not rejected and result.numeric is None and result.value.strip() and result.loinc:
            # A text (ST/TX/FT) or coded (CWE/CE) result: FHIR valueString or
            # valueCodeableConcept, and the push-back's OBX keeps its value type.
            coding = _coding(result)
            observations.append(
                SectionObservation(
                    key=result.key,
                    code=result.loinc,
                    display=f"{name} {result.name_en}".strip(),
                    value=None,
                    unit=result.unit,
                    source=result.performing_lab or result.method,
                    reference_text=result.reference_range,
                    interpretation=tuple(_interpretation(result)),
                    value_type=(result.value_type or "ST").upper(),
                    value_string="" if coding else result.value,
                    value_coding=coding,
                )
            )
        data_rows.append(
            {
                "key": result.key,
                "code": result.code,
                "code_system": result.code_system,
                "loinc": result.loinc,
                "analyte": result.analyte,
                "name_zh": result.name_zh,
                "name_en": result.name_en,
                "value_type": result.value_type,
                "value": result.value,
                "numeric": result.numeric,
                "comparator": result.comparator,
                "unit": result.unit,
                "reference_range": result.reference_range,
                "reference_low": low,
                "reference_high": high,
                "flags": list(result.flags),
                "interpretation": _interpretation(result),
                "critical": result.critical,
                "status": result.status,
                "version": result.version,
                "observed_at": result.observed_at.isoformat() if result.observed_at else None,
                "verdict": result.verdict,
                "decision": decision,
                "decision_reason": stored.reason,
                "comment": stored.comment,
                "recognition": mark.model_dump(mode="json"),
            }
        )
    if order.auto_released or (report.structured or {}).get("autoverified"):
        notes.append("自动审核 Auto-verified (WS/T 616-2018)")
    recognised = sum(1 for r in data_rows if r["recognition"]["granted"])
    notes.append(
        f"互认项目 {recognised}/{len(data_rows)} · 互认标识逐项标注，有效期自采样日起算 "
        "Recognition is marked per test, valid from the collection date."
    )
    notes.append(
        "LOINC is copyright © Regenstrief Institute, Inc. and the LOINC Committee and is "
        "available at no cost under the license at https://loinc.org/license"
    )
    return [
        ReportSection(
            key="lab",
            title="检验结果 Laboratory results",
            table=SectionTable(columns=_COLUMNS, rows=tuple(rows)),
            table_title=(
                f"采样 Collected {collected.isoformat()}"
                + (f" · 检验单号 Filler {full.filler_number}" if full.filler_number else "")
                + (f" · 标本 Specimen {_specimen(full)}" if _specimen(full) else "")
            ),
            paragraphs=tuple(notes),
            observations=tuple(observations),
            data={
                "order_id": order.id,
                "placer_number": full.placer_number,
                "filler_number": full.filler_number,
                "collected_at": full.collected_at.isoformat() if full.collected_at else None,
                "received_at": (
                    full.specimen_received_at.isoformat() if full.specimen_received_at else None
                ),
                "reported_at": full.reported_at.isoformat() if full.reported_at else None,
                "auto_released": order.auto_released,
                "rules_version": full.rules_version,
                "comment": review.comment,
                "results": data_rows,
            },
        )
    ]


register_section_provider(Discipline.LAB.value, lab_sections)
