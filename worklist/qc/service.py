"""QC indicators: each indicator is a *case query* (one row per exam, report, alert, look-up
or decline, with the standard columns below) that the same aggregate, case list, histogram
and export run over, so a figure and its drill-down can never disagree.

Standard case columns: ``case_id, exam_id, accession, clinic, discipline, modality,
priority, reader, at`` (the time that places the case in a period), ``start_at, end_at,
due_at, dur`` (seconds from start to end), ``num`` (1 when the case is in the numerator)
and ``reason`` (comma-separated reason codes of a failing or notable case).

Counts and sums are SQL aggregates on both databases; percentiles are ``percentile_cont``
on PostgreSQL and computed over the selected durations on SQLite. Report-writing compliance
(RWS-03) needs the report text, so it is evaluated in Python per report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import (
    Float,
    Numeric,
    String,
    and_,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from rdc_core.errors import InvalidInputError, NotFoundError
from rdc_core.settings import get_settings
from worklist.access import Principal, require_roles
from worklist.audit import AuditEvent, record_access, record_event
from worklist.critical_values.models import AlertState, CriticalAlert
from worklist.models import (
    Discipline,
    Exam,
    ExamState,
    Organization,
    OrgKind,
    Priority,
    QualityGrade,
    Report,
    ReportStatus,
    Role,
    User,
    WorkItem,
)
from worklist.qc.definitions import INDICATORS, Indicator, indicator
from worklist.qc.models import (
    QC_FACT_SOURCES,
    ROLLUP_CODES,
    QcDaily,
    QcExamFact,
    QcFactQueue,
    QcMonthly,
    QcReportCheck,
    QcReportFact,
    QcTarget,
    QcTatHist,
    rollup_column,
)
from worklist.qc.schemas import (
    CaseOut,
    CasePage,
    GroupOut,
    HistogramOut,
    IndicatorOut,
    TargetOut,
)
from worklist.recognition.models import RecognitionDecision, RecognitionDecline
from worklist.signing.models import SignedArtifact, SigningStage

__all__ = [
    "CHECK_BATCH",
    "FACT_BATCH",
    "GROUPS",
    "QC_ROLES",
    "QcFilters",
    "Subset",
    "check_reports",
    "compute_indicators",
    "facts_waiting",
    "histogram",
    "iter_cases",
    "list_cases",
    "list_targets",
    "month_period",
    "period_filters",
    "rebuild_rollup",
    "record_export",
    "refresh_facts",
    "require_qc",
    "set_target",
    "target_history",
]

QC_ROLES = frozenset({Role.QC, Role.ADMIN})
GROUPS = ("discipline", "clinic", "modality", "reader", "priority", "month", "reason")
Subset = Literal["all", "numerator", "failing"]

# Minutes: the national 2-hour emergency report and the 10-minute critical-value limits.
EMERGENCY_REPORT_SECONDS = 120 * 60
CRITICAL_NOTIFY_SECONDS = 10 * 60


@dataclass(frozen=True, slots=True)
class QcFilters:
    """The period [start, end) in UTC and the optional dimension filters."""

    start: datetime
    end: datetime
    tz: str = "UTC"
    discipline: str | None = None
    clinic: str | None = None
    modality: str | None = None
    reader: str | None = None
    priority: str | None = None

    def previous(self) -> QcFilters:
        """The period of the same length just before this one."""
        span = self.end - self.start
        return QcFilters(
            start=self.start - span,
            end=self.start,
            tz=self.tz,
            discipline=self.discipline,
            clinic=self.clinic,
            modality=self.modality,
            reader=self.reader,
            priority=self.priority,
        )


def period_filters(
    *,
    start: date,
    end: date,
    tz: str,
    discipline: str | None = None,
    clinic: str | None = None,
    modality: str | None = None,
    reader: str | None = None,
    priority: str | None = None,
) -> QcFilters:
    """Filters for the local calendar days ``start`` .. ``end`` (both included) in ``tz``."""
    if end < start:
        raise InvalidInputError("'to' is before 'from'")
    if discipline is not None and discipline not in {d.value for d in Discipline}:
        raise InvalidInputError(f"unknown discipline {discipline!r}")
    if priority is not None and priority not in {p.value for p in Priority}:
        raise InvalidInputError(f"unknown priority {priority!r}")
    zone = ZoneInfo(tz)
    return QcFilters(
        start=datetime.combine(start, time(), zone).astimezone(UTC),
        end=datetime.combine(end + timedelta(days=1), time(), zone).astimezone(UTC),
        tz=tz,
        discipline=discipline,
        clinic=clinic or None,
        modality=modality or None,
        reader=reader or None,
        priority=priority,
    )


def month_period(month: str) -> tuple[date, date]:
    """First and last day of ``YYYY-MM``."""
    match = re.fullmatch(r"(\d{4})-(\d{2})", month)
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise InvalidInputError("month must be YYYY-MM")
    first = date(int(match.group(1)), int(match.group(2)), 1)
    nxt = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return first, nxt - timedelta(days=1)


def require_qc(principal: Principal) -> None:
    """QC staff and administrators of the lead hospital; everyone else gets 403."""
    require_roles(principal, QC_ROLES, lead_only=True)


# --- SQL helpers ---------------------------------------------------------------------------


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _seconds(dialect: str, end: Any, start: Any) -> ColumnElement[Any]:
    """Seconds from ``start`` to ``end`` (NULL when either is NULL), to the millisecond."""
    if dialect == "postgresql":
        return cast(func.round(cast(func.extract("epoch", end - start), Numeric), 3), Float)
    return func.round((func.julianday(end) - func.julianday(start)) * 86400.0, 3)


def _month(dialect: str, at: Any, tz: str) -> ColumnElement[Any]:
    """``YYYY-MM`` of ``at`` in the local time zone."""
    if dialect == "postgresql":
        return func.to_char(func.timezone(tz, at), "YYYY-MM")
    # SQLite has no time zones: shift by the zone's offset (fixed for Asia/Shanghai).
    offset = int(datetime.now(ZoneInfo(tz)).utcoffset().total_seconds())  # type: ignore[union-attr]
    return func.strftime("%Y-%m", at, f"{offset:+d} seconds")


_NULL_TIME = cast(null(), Exam.first_received_at.type)


def _reasons(*pairs: tuple[ColumnElement[bool], str]) -> ColumnElement[Any]:
    """Comma-joined codes of the conditions that hold (NULL when none does)."""
    parts: list[ColumnElement[Any]] = [
        case((cond, literal(code + ",")), else_=literal("")) for cond, code in pairs
    ]
    joined: ColumnElement[Any] = parts[0]
    for part in parts[1:]:
        joined = joined + part
    return func.nullif(joined, "")


@dataclass(frozen=True, slots=True)
class _Source:
    """A case query, plus a Python evaluator for indicators SQL cannot decide."""

    query: Any  # a Select of the standard case columns
    evaluate: Callable[[Any], tuple[int, str | None]] | None = None
    # The query also has ``checked_compliant`` / ``checked_reasons``: cases with a stored
    # result are aggregated in SQL, only the others are evaluated in Python.
    stored: bool = False


def _exam_columns(exam: Any, clinic: Any, reader: Any) -> list[ColumnElement[Any]]:
    return [
        exam.id.label("exam_id"),
        exam.accession_number.label("accession"),
        clinic.label("clinic"),
        cast(exam.discipline, String).label("discipline"),
        exam.modality.label("modality"),
        cast(exam.priority, String).label("priority"),
        reader.label("reader"),
    ]


def _case_columns(
    *,
    case_id: Any,
    exam: Any,
    clinic: Any,
    reader: Any,
    at: Any,
    start: Any,
    end: Any,
    due: Any = None,
    dur: Any = None,
    num: Any,
    reason: Any = None,
) -> list[ColumnElement[Any]]:
    """The standard case columns, labelled (``exam`` None: a case without an exam)."""
    nothing = cast(null(), String)
    exam_columns = (
        _exam_columns(exam, clinic, reader)
        if exam is not None
        else [
            nothing.label("exam_id"),
            nothing.label("accession"),
            clinic.label("clinic"),
            nothing.label("discipline"),
            nothing.label("modality"),
            nothing.label("priority"),
            reader.label("reader"),
        ]
    )
    return [
        case_id.label("case_id"),
        *exam_columns,
        at.label("at"),
        start.label("start_at"),
        end.label("end_at"),
        (_NULL_TIME if due is None else due).label("due_at"),
        (cast(null(), Float) if dur is None else dur).label("dur"),
        num.label("num"),
        (nothing if reason is None else reason).label("reason"),
    ]


@dataclass(frozen=True, slots=True)
class _ExamRows:
    """Where exam cases are read from. Source tables: the exam ``e`` with its first report
    ``r1`` (version 1, whose ``final_at`` is the first final signing even when the report was
    amended later), its work item ``w`` (inner-joined only when ``due``), its clinic's code
    and its reader's username. Facts: one ``qc_exam_facts`` row standing for all of them
    (same attribute names), so the definitions below run unchanged over either."""

    e: Any
    r1: Any
    w: Any
    clinic: Any
    reader: Any
    # (query, due) -> the query with its FROM clause; due None: outer-join the work item
    join: Callable[[Any, bool | None], Any]
    stored: bool = False  # the facts: the turnaround stages' seconds are stored

    def stage_seconds(self, d: str, code: str) -> Any:
        """Seconds of the turnaround stage ``code`` (stored in the facts, the same value)."""
        if self.stored:
            return getattr(self.e, stage_column(code))
        start, end = TAT_STAGES[code]
        return _seconds(d, end(self.e, self.r1), start(self.e, self.r1))


def stage_column(code: str) -> str:
    """The facts column of turnaround stage ``code``: TAT-03 -> tat_03."""
    return "tat_" + code.split("-")[1]


def _source_rows() -> _ExamRows:
    e = aliased(Exam, name="e")
    r1 = aliased(Report, name="r1")
    w = aliased(WorkItem, name="w")
    o = aliased(Organization, name="o")
    u = aliased(User, name="u")

    def join(query: Any, due: bool | None) -> Any:
        query = (
            query.select_from(e)
            .join(o, o.id == e.org_id)
            .outerjoin(r1, and_(r1.exam_id == e.id, r1.version == 1))
            .outerjoin(u, u.id == r1.author_id)
        )
        if due is None:
            return query.outerjoin(w, w.exam_id == e.id)
        return query.join(w, w.exam_id == e.id) if due else query

    return _ExamRows(e, r1, w, o.code, u.username, join)


def _fact_rows() -> _ExamRows:
    f = aliased(QcExamFact, name="f")

    def join(query: Any, due: bool | None) -> Any:
        query = query.select_from(f)
        return query.where(f.has_work_item) if due else query

    return _ExamRows(f, f, f, f.clinic, f.reader, join, stored=True)


def _exam_query(facts: bool, make: Callable[[_ExamRows], Any]) -> Any:
    """The rows ``make`` selects: from the source tables, or (``facts``) from the facts of
    the exams not waiting in ``qc_fact_queue`` plus the source rows of those waiting, so the
    figures are the source tables' at every moment, however far the task is behind."""
    source = _source_rows()
    if not facts:
        return make(source)
    fact = _fact_rows()
    fresh = make(fact).where(~exists().where(QcFactQueue.exam_id == fact.e.id))
    waiting = make(source).where(source.e.id.in_(select(QcFactQueue.exam_id)))
    return union_all(fresh, waiting)


Stage = tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]
# The turnaround stages (exam ``e``, first report ``r1``): start and end of each.
TAT_STAGES: dict[str, Stage] = {
    "TAT-01": (lambda e, r1: e.first_received_at, lambda e, r1: e.ready_at),
    "TAT-02": (lambda e, r1: e.ready_at, lambda e, r1: e.claimed_at),
    "TAT-03": (
        lambda e, r1: e.claimed_at,
        lambda e, r1: func.coalesce(e.preliminary_at, r1.final_at),
    ),
    "TAT-04": (lambda e, r1: e.preliminary_at, lambda e, r1: r1.final_at),
    "TAT-05": (lambda e, r1: r1.final_at, lambda e, r1: e.delivered_at),
    "TAT-06": (lambda e, r1: e.delivered_at, lambda e, r1: e.acknowledged_at),
    "TAT-07": (lambda e, r1: e.first_received_at, lambda e, r1: r1.final_at),
}

_Time = Callable[[Any, Any], Any]  # (e, r1) -> a time
_Cond = Callable[[Any, Any, Any], Any]  # (e, r1, w) -> a column expression


def _not_cancelled(e: Any, r1: Any, w: Any) -> list[ColumnElement[bool]]:
    return [e.state != ExamState.CANCELLED]


def _arrival(e: Any, r1: Any) -> Any:
    return e.first_received_at


def _final(e: Any, r1: Any) -> Any:
    return r1.final_at


def _exam_start(e: Any, r1: Any = None) -> Any:
    """When the exam was done (performed; missing: arrival, and the case is flagged)."""
    return func.coalesce(e.performed_at, e.first_received_at)


@dataclass(frozen=True, slots=True)
class _ExamCases:
    """An indicator whose cases are exams: what places a case in a period (``at``), the
    interval measured, the numerator (None: the interval is known), the reasons and the
    conditions of the denominator; ``due``: only exams with a work item (its due time)."""

    at: _Time
    start: _Time
    end: _Time
    num: _Cond | None
    reason: _Cond | None
    where: Callable[[Any, Any, Any], list[ColumnElement[bool]]]
    due: bool = False
    stage: str | None = None  # a turnaround stage: its seconds are stored in the facts


def _exam_source(d: str, cases: _ExamCases, *, facts: bool) -> _Source:
    def make(rows: _ExamRows) -> Any:
        e, r1, w = rows.e, rows.r1, rows.w
        start_col, end_col = cases.start(e, r1), cases.end(e, r1)
        dur = (
            rows.stage_seconds(d, cases.stage)
            if cases.stage is not None
            else _seconds(d, end_col, start_col)
        )
        num = cases.num(e, r1, w) if cases.num is not None else case((dur.is_not(None), 1), else_=0)
        query = select(
            *_case_columns(
                case_id=e.id,
                exam=e,
                clinic=rows.clinic,
                reader=rows.reader,
                at=cases.at(e, r1),
                start=start_col,
                end=end_col,
                due=w.due_at if cases.due else None,
                dur=dur,
                num=num,
                reason=cases.reason(e, r1, w) if cases.reason is not None else None,
            )
        ).where(*cases.where(e, r1, w))
        return rows.join(query, cases.due)

    return _Source(_exam_query(facts, make))


def _exam_indicators(d: str, now: datetime) -> dict[str, _ExamCases]:
    """Every indicator whose cases are exams, by code."""

    def tat(code: str, start: _Time, end: _Time) -> _ExamCases:
        return _ExamCases(
            stage=code,
            at=_arrival,
            start=start,
            end=end,
            num=None,
            reason=lambda e, r1, w: _reasons(
                (start(e, r1).is_(None), "no_start_time"), (end(e, r1).is_(None), "not_reached")
            ),
            where=_not_cancelled,
        )

    def emergency_late(e: Any, r1: Any) -> ColumnElement[bool]:
        return _seconds(d, r1.final_at, _exam_start(e)) > EMERGENCY_REPORT_SECONDS

    def grades(grade: QualityGrade) -> _ExamCases:
        return _ExamCases(
            at=_final,
            start=lambda e, r1: _NULL_TIME,
            end=lambda e, r1: _NULL_TIME,
            num=lambda e, r1, w: case((r1.quality_grade == grade, 1), else_=0),
            reason=lambda e, r1, w: func.trim(
                cast(r1.quality_grade, String) + literal(" ") + func.coalesce(r1.quality_reason, "")
            ),
            where=lambda e, r1, w: [
                e.discipline == Discipline.IMAGING,
                r1.final_at.is_not(None),
                r1.quality_grade.is_not(None),
            ],
        )

    def emergency(discipline: Discipline) -> Callable[[Any, Any, Any], list[Any]]:
        return lambda e, r1, w: [
            e.discipline == discipline,
            e.priority == Priority.EMERGENCY,
            r1.final_at.is_not(None),
        ]

    def member_clinics(e: Any, r1: Any, w: Any) -> list[ColumnElement[bool]]:
        clinic_orgs = select(Organization.id).where(Organization.kind == OrgKind.CLINIC)
        return [e.state != ExamState.CANCELLED, e.org_id.in_(clinic_orgs)]

    return {
        **{code: tat(code, *stage) for code, stage in TAT_STAGES.items()},
        "SLA-01": _ExamCases(
            at=_arrival,
            start=lambda e, r1: e.ready_at,
            end=_final,
            num=lambda e, r1, w: case((r1.final_at <= w.due_at, 1), else_=0),
            reason=lambda e, r1, w: _reasons(
                (r1.final_at.is_(None), "overdue_unreported"), (r1.final_at > w.due_at, "late")
            ),
            where=lambda e, r1, w: [
                e.state != ExamState.CANCELLED,
                or_(
                    r1.final_at.is_not(None),
                    and_(w.due_at < now, e.rescan_requested_at.is_(None)),
                ),
            ],
            due=True,
        ),
        # RRC-02: from exam start to the first final report.
        "RRC-02": _ExamCases(
            at=_final,
            start=_exam_start,
            end=_final,
            num=lambda e, r1, w: case((emergency_late(e, r1), 0), else_=1),
            reason=lambda e, r1, w: _reasons(
                (emergency_late(e, r1), "over_120_min"),
                (e.performed_at.is_(None), "no_start_time"),
            ),
            where=emergency(Discipline.IMAGING),
        ),
        "ECG-01": _ExamCases(
            at=_final,
            start=_exam_start,
            end=_final,
            num=lambda e, r1, w: case((r1.final_at <= w.due_at, 1), else_=0),
            reason=lambda e, r1, w: _reasons((r1.final_at > w.due_at, "late")),
            where=emergency(Discipline.ECG),
            due=True,
        ),
        "IQ-01": grades(QualityGrade.A),
        "IQ-02": grades(QualityGrade.REJECT),
        "ALL-01": _ExamCases(
            at=_final,
            start=_arrival,
            end=_final,
            num=lambda e, r1, w: literal(1),
            reason=None,
            where=lambda e, r1, w: [r1.final_at.is_not(None)],
        ),
        "ALL-02": _ExamCases(
            at=_arrival,
            start=_arrival,
            end=_final,
            num=lambda e, r1, w: case((r1.final_at.is_not(None), 1), else_=0),
            reason=lambda e, r1, w: _reasons((r1.final_at.is_(None), "not_reported")),
            where=member_clinics,
        ),
        "ALL-06": _ExamCases(
            at=lambda e, r1: e.rescan_requested_at,
            start=lambda e, r1: e.ready_at,
            end=lambda e, r1: e.rescan_requested_at,
            num=lambda e, r1, w: literal(1),
            reason=lambda e, r1, w: e.rescan_reason,
            where=lambda e, r1, w: [e.rescan_requested_at.is_not(None)],
        ),
    }


def _alerts(d: str, discipline: Discipline, *, timely: bool) -> _Source:
    """Critical values of ``discipline``: notified = read back by the clinic (the moment the
    clinical side received it, DOMAIN §B5). Withdrawn and superseded alerts are not counted
    (the successor alert of an amended report is)."""
    a = aliased(CriticalAlert, name="a")
    e = aliased(Exam, name="e")
    o = aliased(Organization, name="o")
    u = aliased(User, name="u")
    dur = _seconds(d, a.acknowledged_at, a.raised_at)
    late = dur > CRITICAL_NOTIFY_SECONDS
    if timely:
        num = case((a.acknowledged_at.is_(None), 0), (late, 0), else_=1)
    else:
        num = case((a.acknowledged_at.is_(None), 0), else_=1)
    query = (
        select(
            *_case_columns(
                case_id=a.id,
                exam=e,
                clinic=o.code,
                reader=u.username,
                at=a.raised_at,
                start=a.raised_at,
                end=a.acknowledged_at,
                due=a.deadline_at,
                dur=dur,
                num=num,
                reason=_reasons(
                    (a.acknowledged_at.is_(None), "not_acknowledged"), (late, "over_10_min")
                ),
            )
        )
        .select_from(a)
        .join(e, e.id == a.exam_id)
        .join(o, o.id == a.org_id)
        .join(u, u.id == a.raised_by)
        .where(
            e.discipline == discipline,
            a.state.not_in([AlertState.WITHDRAWN, AlertState.SUPERSEDED]),
        )
    )
    return _Source(query)


def _recognition(d: str) -> _Source:
    x = aliased(RecognitionDecision, name="x")
    e = aliased(Exam, name="e")
    o = aliased(Organization, name="o")
    u = aliased(User, name="u")
    query = (
        select(
            *_case_columns(
                case_id=x.report_id,
                exam=e,
                clinic=o.code,
                reader=u.username,
                at=x.decided_at,
                start=x.decided_at,
                end=x.valid_until,
                num=case((x.granted, 1), else_=0),
                reason=func.coalesce(x.mark, "not_granted"),
            )
        )
        .select_from(x)
        .join(e, e.id == x.exam_id)
        .join(o, o.id == x.org_id)
        .join(u, u.id == x.signer_id)
    )
    return _Source(query)


def _lookups(d: str) -> _Source:
    v = aliased(AuditEvent, name="v")
    o = aliased(Organization, name="o")
    query = (
        select(
            *_case_columns(
                case_id=cast(v.seq, String),
                exam=None,
                clinic=o.code,
                reader=v.actor,
                at=v.at,
                start=v.at,
                end=_NULL_TIME,
                num=literal(1),
            )
        )
        .select_from(v)
        .outerjoin(o, o.id == v.org_id)
        .where(v.action == "lookup", v.object_type == "recognized_result")
    )
    return _Source(query)


def _declines(d: str) -> _Source:
    x = aliased(RecognitionDecline, name="x")
    r = aliased(RecognitionDecision, name="r")
    e = aliased(Exam, name="e")
    o = aliased(Organization, name="o")
    u = aliased(User, name="u")
    query = (
        select(
            *_case_columns(
                case_id=x.id,
                exam=e,
                clinic=o.code,
                reader=u.username,
                at=x.declined_at,
                start=x.declined_at,
                end=_NULL_TIME,
                num=literal(1),
                reason=cast(x.reason, String),
            )
        )
        .select_from(x)
        .join(r, r.id == x.decision_id)
        .join(e, e.id == r.exam_id)
        .join(o, o.id == x.org_id)
        .join(u, u.id == x.user_id)
    )
    return _Source(query)


# RWS-03 ------------------------------------------------------------------------------------

# Text a template or an editor leaves for the reader to fill in.
_PLACEHOLDER = re.compile(
    r"\[[^\]\n]{0,40}\]|【[^】\n]{0,40}】|_{3,}|＿{2,}|\{\{|\}\}|<[^<>\n]{1,20}>|"
    r"(?<![0-9A-Za-z])(?:xx|XX|××)(?![0-9A-Za-z])|待填|请填写|TODO",
)
_SIDES = {
    "left": re.compile(r"左|\bleft\b|\bsinistr", re.IGNORECASE),
    "right": re.compile(r"右|\bright\b|\bdextr", re.IGNORECASE),
}
_BOTH = re.compile(r"双侧|两侧|双肺|两肺|\bbilateral", re.IGNORECASE)


def report_writing_failures(
    *, signed: bool, findings: str, impression: str, grade: str | None, discipline: str
) -> list[str]:
    """Why a signed report is not compliant (empty: compliant).

    Codes: ``unsigned`` (no stored signature), ``placeholder`` (template text left to fill
    in), ``laterality`` (the impression names a side the findings never mention),
    ``missing_findings`` / ``missing_impression`` / ``missing_grade`` (imaging reports carry
    an image-quality grade)."""
    failures: list[str] = []
    if not signed:
        failures.append("unsigned")
    if _PLACEHOLDER.search(findings) or _PLACEHOLDER.search(impression):
        failures.append("placeholder")
    both = bool(_BOTH.search(findings))
    for side, pattern in _SIDES.items():
        if pattern.search(impression) and not (both or pattern.search(findings)):
            failures.append(f"laterality_{side}")
    if not findings.strip():
        failures.append("missing_findings")
    if not impression.strip():
        failures.append("missing_impression")
    if discipline == Discipline.IMAGING.value and not grade:
        failures.append("missing_grade")
    return failures


def _signed(report: Any) -> Any:
    return exists().where(
        SignedArtifact.report_id == report.id, SignedArtifact.stage == SigningStage.FINAL
    )


def _writing(d: str) -> _Source:
    """RWS-03 over every signed imaging report version; the stored check of a report
    (``qc_report_checks``) is used when there is one, otherwise its text is checked now."""
    r = aliased(Report, name="r")
    e = aliased(Exam, name="e")
    o = aliased(Organization, name="o")
    u = aliased(User, name="u")
    k = aliased(QcReportCheck, name="k")
    unchecked = k.report_id.is_(None)
    query = (
        select(
            *_case_columns(
                case_id=r.id,
                exam=e,
                clinic=o.code,
                reader=u.username,
                at=r.final_at,
                start=r.created_at,
                end=r.final_at,
                num=literal(1),
            ),
            k.compliant.label("checked_compliant"),
            k.reasons.label("checked_reasons"),
            # The text only of reports not checked yet.
            case((unchecked, _signed(r)), else_=None).label("signed"),
            case((unchecked, r.findings), else_=None).label("findings"),
            case((unchecked, r.impression), else_=None).label("impression"),
            cast(r.quality_grade, String).label("grade"),
        )
        .select_from(r)
        .join(e, e.id == r.exam_id)
        .join(o, o.id == e.org_id)
        .join(u, u.id == r.author_id)
        .outerjoin(k, k.report_id == r.id)
        .where(
            r.status == ReportStatus.FINAL,
            r.final_at.is_not(None),
            e.discipline == Discipline.IMAGING,
        )
    )

    def evaluate(row: Any) -> tuple[int, str | None]:
        if row.checked_compliant is not None:
            return (1, None) if row.checked_compliant else (0, row.checked_reasons)
        failures = report_writing_failures(
            signed=bool(row.signed),
            findings=row.findings or "",
            impression=row.impression or "",
            grade=row.grade,
            discipline=row.discipline,
        )
        return (0, ",".join(failures)) if failures else (1, None)

    return _Source(query, evaluate, stored=True)


CHECK_BATCH = 2000


def check_reports(
    session: Session, *, now: datetime, limit: int = CHECK_BATCH, after: str | None = None
) -> tuple[int, str | None]:
    """Store the RWS-03 check of up to ``limit`` signed imaging reports not checked yet, in
    report ID order after ``after`` (a caller going through a backlog passes the last ID it
    got, so each batch starts where the last ended); returns how many and the last ID.
    Idempotent: a report is checked once (its primary key)."""
    r = aliased(Report, name="r")
    e = aliased(Exam, name="e")
    rows = session.execute(
        select(
            r.id,
            _signed(r).label("signed"),
            r.findings,
            r.impression,
            cast(r.quality_grade, String).label("grade"),
            cast(e.discipline, String).label("discipline"),
        )
        .join(e, e.id == r.exam_id)
        .where(
            r.status == ReportStatus.FINAL,
            r.final_at.is_not(None),
            e.discipline == Discipline.IMAGING,
            ~exists().where(QcReportCheck.report_id == r.id),
            *([r.id > after] if after is not None else []),
        )
        .order_by(r.id)
        .limit(limit)
    ).all()
    for row in rows:
        failures = report_writing_failures(
            signed=bool(row.signed),
            findings=row.findings or "",
            impression=row.impression or "",
            grade=row.grade,
            discipline=row.discipline,
        )
        session.add(
            QcReportCheck(
                report_id=row.id,
                compliant=not failures,
                reasons=",".join(failures)[:200] or None,
                checked_at=now,
            )
        )
    session.flush()
    return len(rows), rows[-1].id if rows else after


FACT_BATCH = 2000
_ROLLUP_LOCK = 0x5143_0022  # pg_advisory_xact_lock key of the roll-up's writers


def refresh_facts(
    session: Session, *, now: datetime, limit: int = FACT_BATCH, rollup: bool = True
) -> int:
    """Recompute the facts of the exams of the oldest ``limit`` rows of ``qc_fact_queue``
    from the source tables (an exam that no longer exists loses its facts), then remove
    those queue rows (only those: a change queued meanwhile stays for the next run).
    Returns how many queue rows were consumed. Idempotent; on PostgreSQL concurrent runs
    skip each other's rows. The roll-up takes the difference (``rollup`` False: it does
    not, and the caller rebuilds it with :func:`rebuild_rollup` in the same transaction)."""
    rows = session.execute(
        select(QcFactQueue.seq, QcFactQueue.exam_id)
        .order_by(QcFactQueue.seq)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return 0
    exam_ids = sorted({row.exam_id for row in rows})
    d = _dialect(session)
    if d == "postgresql":
        # The roll-up takes differences: one refresh at a time (a second one waits).
        session.execute(select(func.pg_advisory_xact_lock(_ROLLUP_LOCK)))
    if not rollup:
        return _replace_facts(session, rows, now)
    tz = _rollup_tz()
    # The batch's exams as a subquery (a list would bind its IDs once per indicator); the
    # range may hold exams of a concurrent run's rows too: their facts do not change here,
    # so their difference is nothing.
    seqs = [row.seq for row in rows]
    batch = select(QcFactQueue.exam_id).where(QcFactQueue.seq.between(min(seqs), max(seqs)))
    daily, hist = _contributions(session, facts=True, exams=batch, tz=tz, now=now)
    _replace_facts(session, rows, now, queue=False)
    _write_report_facts(session, exam_ids)
    new_daily, new_hist = _contributions(session, facts=True, exams=batch, tz=tz, now=now)
    _merge(new_daily, daily, -1)
    _merge(new_hist, hist, -1)
    _apply_rollup(session, new_daily, new_hist)
    session.execute(delete(QcFactQueue).where(QcFactQueue.seq.in_(seqs)))
    return len(rows)


def _replace_facts(
    session: Session, rows: Sequence[Any], now: datetime, *, queue: bool = True
) -> int:
    """The facts of the exams of the queue rows ``rows`` from the source tables (and, with
    ``queue``, those queue rows removed)."""
    exam_ids = sorted({row.exam_id for row in rows})
    d = _dialect(session)
    session.execute(delete(QcExamFact).where(QcExamFact.id.in_(exam_ids)))
    source = _source_rows()
    e, r1, w = source.e, source.r1, source.w
    columns: dict[str, Any] = {
        "exam_id": e.id,
        **{name: getattr(e, name) for name in QC_FACT_SOURCES["exams"]},
        "clinic": source.clinic,
        "final_at": r1.final_at,
        "reader": source.reader,
        "quality_grade": r1.quality_grade,
        "quality_reason": r1.quality_reason,
        "has_work_item": w.id.is_not(None),
        "due_at": w.due_at,
        **{stage_column(code): source.stage_seconds(d, code) for code in TAT_STAGES},
        "refreshed_at": literal(now, QcExamFact.refreshed_at.type),
    }
    values = source.join(select(*columns.values()), None).where(e.id.in_(exam_ids))
    session.execute(insert(QcExamFact).from_select(list(columns), values))
    if queue:
        session.execute(delete(QcFactQueue).where(QcFactQueue.seq.in_([r.seq for r in rows])))
    return len(rows)


def rebuild_rollup(session: Session, *, now: datetime) -> None:
    """The roll-up and the report facts rebuilt from all the facts (after a bulk refresh:
    the backlog of an upgrade, in one transaction with it)."""
    if _dialect(session) == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_ROLLUP_LOCK)))
    for table in (QcDaily, QcMonthly, QcTatHist, QcReportFact):
        session.execute(delete(table))
    every = select(QcExamFact.id)
    batch: list[dict[str, Any]] = []
    for row, n in _writing_rows(session, every):
        batch.append(
            {
                "report_id": row.case_id,
                "exam_id": row.exam_id,
                "final_at": row.at,
                "compliant": bool(n),
            }
        )
        if len(batch) >= 5000:
            session.execute(insert(QcReportFact), batch)
            batch = []
    if batch:
        session.execute(insert(QcReportFact), batch)
    daily, hist = _contributions(session, facts=True, exams=every, tz=_rollup_tz(), now=now)
    _apply_rollup(session, daily, hist, fresh=True)


def facts_waiting(session: Session) -> int:
    """How many changes wait in ``qc_fact_queue`` (a gauge of how far the task is behind)."""
    return int(session.execute(select(func.count()).select_from(QcFactQueue)).scalar_one())


def _source(session: Session, ind: Indicator, now: datetime, *, facts: bool) -> _Source | None:
    """The cases of ``ind``; exam cases from the facts (``facts``) or the source tables."""
    if ind.unavailable:
        return None
    d = _dialect(session)
    exams = _exam_indicators(d, now)
    if ind.code in exams:
        return _exam_source(d, exams[ind.code], facts=facts)
    builders: dict[str, Callable[[], _Source]] = {
        "RCV-04": lambda: _alerts(d, Discipline.IMAGING, timely=True),
        "RWS-03": lambda: _writing(d),
        "ECG-02": lambda: _alerts(d, Discipline.ECG, timely=True),
        "CL-14": lambda: _alerts(d, Discipline.LAB, timely=False),
        "CL-15": lambda: _alerts(d, Discipline.LAB, timely=True),
        "ALL-03": lambda: _recognition(d),
        "ALL-04": lambda: _lookups(d),
        "ALL-05": lambda: _declines(d),
    }
    assert set(builders) == set(_OTHER_SOURCES)
    build = builders.get(ind.code)
    return None if build is None else build()


# The indicators whose cases are not exams (their case queries: ``_source``).
_OTHER_SOURCES = ("RCV-04", "RWS-03", "ECG-02", "CL-14", "CL-15", "ALL-03", "ALL-04", "ALL-05")


def _has_source(session: Session, ind: Indicator, now: datetime) -> bool:
    """Whether ``ind`` has a case query (what ``_source`` would build)."""
    if ind.unavailable:
        return False
    return ind.code in _OTHER_SOURCES or ind.code in _exam_indicators(_dialect(session), now)


def _filtered(source: _Source, filters: QcFilters) -> Any:
    """The case query restricted to the period and filters, as a subquery."""
    sub = source.query.subquery("cases")
    conditions: list[ColumnElement[bool]] = [sub.c.at >= filters.start, sub.c.at < filters.end]
    for name in ("discipline", "clinic", "modality", "reader", "priority"):
        value = getattr(filters, name)
        if value is not None:
            conditions.append(sub.c[name] == value)
    return sub, conditions


def _group_key(session: Session, sub: Any, group_by: str | None, tz: str) -> ColumnElement[Any]:
    if group_by is None:
        return literal("all").label("key")
    if group_by == "month":
        return _month(_dialect(session), sub.c.at, tz).label("key")
    return sub.c[group_by].label("key")


# --- aggregation ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Agg:
    key: str | None
    denominator: int
    numerator: int
    p50: float | None = None
    p90: float | None = None


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (PostgreSQL's percentile_cont)."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q * 100))


@dataclass(slots=True)
class _Figures:
    """One indicator's aggregates: the period's groups and total, the previous total."""

    groups: list[_Agg]
    total: _Agg | None
    previous: _Agg | None


def _sum(aggs: list[_Agg], key: str | None) -> _Agg | None:
    if not aggs:
        return None
    return _Agg(key, sum(a.denominator for a in aggs), sum(a.numerator for a in aggs))


def _aggregate(
    session: Session,
    ind: Indicator,
    source: _Source,
    filters: QcFilters,
    group_by: str | None,
    *,
    previous: bool,
) -> _Figures:
    """Groups and totals of the period (and the previous period's total) in one pass over
    the cases: GROUP BY (period, key); totals are the groups' sums, except percentiles,
    which PostgreSQL computes in a second statement grouped by period only."""
    wide = filters.previous() if previous else filters
    sub, conditions = _filtered(
        source,
        QcFilters(
            start=wide.start,
            end=filters.end,
            tz=filters.tz,
            discipline=filters.discipline,
            clinic=filters.clinic,
            modality=filters.modality,
            reader=filters.reader,
            priority=filters.priority,
        ),
    )
    period = case((sub.c.at >= filters.start, literal("cur")), else_=literal("prev")).label(
        "period"
    )
    key = _group_key(session, sub, group_by, filters.tz)
    cur: dict[str | None, _Agg] = {}
    prev: dict[str | None, _Agg] = {}
    if source.evaluate is not None:
        pending = list(conditions)
        if source.stored:
            done = sub.c.checked_compliant
            stored_key = sub.c.checked_reasons if group_by == "reason" else key
            query = (
                select(period, stored_key, func.count(), func.sum(case((done, 1), else_=0)))
                .where(*conditions, done.is_not(None))
                .group_by(period, stored_key)
            )
            for name, k, n, num in session.execute(query):
                bucket = cur if name == "cur" else prev
                k = None if k is None else str(k)
                bucket[k] = _Agg(k, int(n), int(num or 0))
            pending.append(done.is_(None))
        for row in session.execute(select(period, key, *sub.c).where(*pending)):
            num, reason = source.evaluate(row)
            k = reason if group_by == "reason" else row.key
            bucket = cur if row.period == "cur" else prev
            agg = bucket.setdefault(k, _Agg(k, 0, 0))
            agg.denominator += 1
            agg.numerator += num
        groups = sorted(cur.values(), key=lambda a: (a.key is None, a.key or ""))
        return _Figures(groups, _sum(groups, "all"), _sum(list(prev.values()), "all"))
    pg = _dialect(session) == "postgresql"
    duration = ind.kind == "duration"
    columns: list[Any] = [period, key, func.count(), func.coalesce(func.sum(sub.c.num), 0)]
    if duration and pg:
        columns += [
            func.percentile_cont(0.5).within_group(sub.c.dur),
            func.percentile_cont(0.9).within_group(sub.c.dur),
        ]
    for row in session.execute(select(*columns).where(*conditions).group_by(period, key)):
        k = None if row[1] is None else str(row[1])
        agg = _Agg(k, int(row[2]), int(row[3]))
        if duration and pg:
            agg.p50, agg.p90 = (None if v is None else float(v) for v in row[4:6])
        (cur if row[0] == "cur" else prev)[k] = agg
    groups = sorted(cur.values(), key=lambda a: (a.key is None, a.key or ""))
    total, before = _sum(groups, "all"), _sum(list(prev.values()), "all")
    if duration:
        if pg and group_by is not None:
            query = (
                select(
                    period,
                    func.percentile_cont(0.5).within_group(sub.c.dur),
                    func.percentile_cont(0.9).within_group(sub.c.dur),
                )
                .where(*conditions)
                .group_by(period)
            )
            for name, p50, p90 in session.execute(query):
                target = total if name == "cur" else before
                if target is not None:
                    target.p50 = None if p50 is None else float(p50)
                    target.p90 = None if p90 is None else float(p90)
        elif pg:
            for whole, one in ((total, cur.get("all")), (before, prev.get("all"))):
                if whole is not None and one is not None:
                    whole.p50, whole.p90 = one.p50, one.p90
        else:
            values: dict[tuple[str, str | None], list[float]] = {}
            query = select(period, key, sub.c.dur).where(*conditions, sub.c.dur.is_not(None))
            for name, k, dur in session.execute(query):
                values.setdefault((name, None if k is None else str(k)), []).append(float(dur))
            for agg in groups:
                durations = values.get(("cur", agg.key), [])
                agg.p50, agg.p90 = _percentile(durations, 0.5), _percentile(durations, 0.9)
            for whole, name in ((total, "cur"), (before, "prev")):
                if whole is not None:
                    merged = [v for (n, _), vs in values.items() if n == name for v in vs]
                    whole.p50, whole.p90 = _percentile(merged, 0.5), _percentile(merged, 0.9)
    return _Figures(groups, total, before)


def _turnaround_family(
    session: Session,
    codes: list[str],
    filters: QcFilters,
    group_by: str | None,
    *,
    previous: bool,
    facts: bool,
) -> dict[str, _Figures]:
    """The figures of several TAT-* indicators in one pass: they share their cases (every
    exam that arrived) and differ only in the stage measured, so one statement carries one
    duration column per stage (percentile_cont ignores NULLs; on SQLite the durations are
    fetched and the percentiles computed here). Same definitions as the per-indicator case
    queries (``TAT_STAGES``), which the case lists and histograms use."""
    d = _dialect(session)

    def make(rows: _ExamRows) -> Any:
        e, r1 = rows.e, rows.r1
        durations = [rows.stage_seconds(d, c).label(f"d{i}") for i, c in enumerate(codes)]
        query = select(
            *_exam_columns(e, rows.clinic, rows.reader), e.first_received_at.label("at"), *durations
        ).where(*_not_cancelled(e, r1, None))
        return rows.join(query, False)

    query = _exam_query(facts, make)
    wide = filters.previous() if previous else filters
    sub, conditions = _filtered(_Source(query), replace(filters, start=wide.start))
    period = case((sub.c.at >= filters.start, literal("cur")), else_=literal("prev")).label(
        "period"
    )
    key = _group_key(session, sub, group_by, filters.tz)
    cols = [sub.c[f"d{i}"] for i in range(len(codes))]
    cur: dict[str, dict[str | None, _Agg]] = {c: {} for c in codes}
    prev: dict[str, dict[str | None, _Agg]] = {c: {} for c in codes}
    totals: dict[tuple[str, str], tuple[float | None, float | None]] = {}
    if d == "postgresql":
        aggregates: list[Any] = [func.count()]
        for col in cols:
            aggregates += [
                func.count(col),
                func.percentile_cont(0.5).within_group(col),
                func.percentile_cont(0.9).within_group(col),
            ]

        def figures(row: Any, i: int) -> tuple[int, float | None, float | None]:
            n, p50, p90 = row[3 + 3 * i : 6 + 3 * i]
            return int(n), None if p50 is None else float(p50), None if p90 is None else float(p90)

        query = select(period, key, *aggregates).where(*conditions).group_by(period, key)
        for row in session.execute(query):
            k = None if row[1] is None else str(row[1])
            for i, code in enumerate(codes):
                n, p50, p90 = figures(row, i)
                (cur if row[0] == "cur" else prev)[code][k] = _Agg(k, int(row[2]), n, p50, p90)
        if group_by is not None:
            query = select(period, literal("all"), *aggregates).where(*conditions).group_by(period)
            for row in session.execute(query):
                for i, code in enumerate(codes):
                    _, p50, p90 = figures(row, i)
                    totals[(code, row[0])] = (p50, p90)
    else:
        values: dict[tuple[str, str, str | None], list[float]] = {}
        counts: dict[tuple[str, str | None], int] = {}
        for row in session.execute(select(period, key, *cols).where(*conditions)):
            k = None if row[1] is None else str(row[1])
            counts[(row[0], k)] = counts.get((row[0], k), 0) + 1
            for i, code in enumerate(codes):
                if row[2 + i] is not None:
                    values.setdefault((code, row[0], k), []).append(float(row[2 + i]))
        for (name, k), n in counts.items():
            for code in codes:
                vs = values.get((code, name, k), [])
                agg = _Agg(k, n, len(vs), _percentile(vs, 0.5), _percentile(vs, 0.9))
                (cur if name == "cur" else prev)[code][k] = agg
        for code in codes:
            for name in ("cur", "prev"):
                merged = [
                    v for (c, n, _), vs in values.items() if c == code and n == name for v in vs
                ]
                totals[(code, name)] = (_percentile(merged, 0.5), _percentile(merged, 0.9))
    out: dict[str, _Figures] = {}
    for code in codes:
        groups = sorted(cur[code].values(), key=lambda a: (a.key is None, a.key or ""))
        total, before = _sum(groups, "all"), _sum(list(prev[code].values()), "all")
        for whole, name, bucket in ((total, "cur", cur[code]), (before, "prev", prev[code])):
            if whole is None:
                continue
            if (code, name) in totals:
                whole.p50, whole.p90 = totals[(code, name)]
            elif len(bucket) == 1:
                only = next(iter(bucket.values()))
                whole.p50, whole.p90 = only.p50, only.p90
        out[code] = _Figures(groups, total, before)
    return out


def _value(ind: Indicator, agg: _Agg | None) -> tuple[float | None, float | None]:
    """(rate, value): rate in % for rates; value is the figure a card shows."""
    if agg is None:
        return None, 0.0 if ind.kind == "count" and not ind.unavailable else None
    if ind.kind == "count":
        return None, float(agg.numerator)
    if ind.kind == "duration":
        return None, None if agg.p90 is None else round(agg.p90 / 60.0, 1)
    if agg.denominator == 0:
        return None, None
    rate = round(agg.numerator * 100.0 / agg.denominator, 2)
    return rate, rate


def _status(ind: Indicator, value: float | None, target: float | None, margin: float) -> str:
    if ind.unavailable or (value is None and ind.kind != "count"):
        return "no_data"
    if target is None or value is None:
        return "no_target"
    if ind.direction == "higher":
        if value >= target:
            return "met"
        return "warning" if value >= target - margin else "not_met"
    if value <= target:
        return "met"
    return "warning" if value <= target + margin else "not_met"


def _group_out(ind: Indicator, agg: _Agg, target: float | None, margin: float) -> GroupOut:
    rate, value = _value(ind, agg)
    return GroupOut(
        key=agg.key,
        numerator=agg.numerator,
        denominator=agg.denominator if ind.kind != "count" else None,
        rate=rate,
        value=value,
        p50=None if agg.p50 is None else round(agg.p50 / 60.0, 1),
        p90=None if agg.p90 is None else round(agg.p90 / 60.0, 1),
        status=_status(ind, value, target, margin),
    )


def compute_indicators(
    session: Session,
    *,
    principal: Principal,
    filters: QcFilters,
    now: datetime,
    group_by: str | None = None,
    codes: Sequence[str] | None = None,
    family: str | None = None,
    previous: bool = True,
    facts: bool = True,
    rollup: bool = True,
) -> list[IndicatorOut]:
    """Every indicator (or ``codes`` / one ``family``) over ``filters``; with ``group_by``,
    each indicator also carries its breakdown. ``change`` is the difference from the
    period of the same length just before. ``facts=False`` reads the exam indicators from
    the source tables instead of ``qc_exam_facts`` (the reference the facts are tested
    against; same figures). With ``facts`` and ``rollup`` (the default), the indicators the
    daily roll-up holds are summed from it (same counts; turnaround P50/P90 from histograms,
    within one bucket of the exact values: see ``hist_percentile``)."""
    require_qc(principal)
    if group_by is not None and group_by not in GROUPS:
        raise InvalidInputError(f"group_by must be one of {', '.join(GROUPS)}")
    wanted = {c.upper() for c in codes} if codes else None
    if wanted:
        unknown = wanted - {i.code for i in INDICATORS}
        if unknown:
            raise NotFoundError(f"no indicator {', '.join(sorted(unknown))}")
    targets = _current_targets(session)
    selected = [
        i.code
        for i in INDICATORS
        if (wanted is None or i.code in wanted) and (family is None or i.family == family)
    ]
    rolled = (
        _rollup_figures(session, selected, filters, group_by, previous=previous, now=now)
        if facts and rollup
        else {}
    )
    family_codes = [c for c in selected if c in TAT_STAGES and c not in rolled]
    tat = (
        _turnaround_family(session, family_codes, filters, group_by, previous=previous, facts=facts)
        if len(family_codes) > 1 and group_by != "reason"  # reasons differ by stage
        else {}
    )
    out: list[IndicatorOut] = []
    for ind in INDICATORS:
        if wanted is not None and ind.code not in wanted:
            continue
        if family is not None and ind.family != family:
            continue
        target, margin, _ = targets.get(ind.code, (ind.target, ind.warn_margin, 0))
        measured = _has_source(session, ind, now)
        groups: list[GroupOut] | None = None
        total: _Agg | None = None
        prev_value: float | None = None
        if measured:
            figures = rolled.get(ind.code) or tat.get(ind.code)
            if figures is None:  # its case query (built only when read: building costs)
                source = _source(session, ind, now, facts=facts)
                assert source is not None
                figures = _aggregate(session, ind, source, filters, group_by, previous=previous)
            total = figures.total
            if group_by is not None:
                groups = [_group_out(ind, a, target, margin) for a in figures.groups]
            if previous:
                prev_value = _value(ind, figures.previous)[1]
        rate, value = _value(ind, total)
        if not measured:
            value = None
        # Nothing to measure: the figure is "no data", never 0 / 0.
        empty = not measured or (ind.kind != "count" and (total is None or not total.denominator))
        status = _status(ind, value, target, margin)
        out.append(
            IndicatorOut(
                code=ind.code,
                family=ind.family,
                name_zh=ind.name_zh,
                name_en=ind.name_en,
                source=ind.source,
                kind=ind.kind,
                unit=ind.unit,
                direction=ind.direction,
                numerator=None if empty else (total.numerator if total else 0),
                denominator=(
                    None if empty or ind.kind == "count" else (total.denominator if total else 0)
                ),
                rate=rate,
                value=value,
                p50=None if total is None or total.p50 is None else round(total.p50 / 60.0, 1),
                p90=None if total is None or total.p90 is None else round(total.p90 / 60.0, 1),
                target=target,
                warn_margin=margin,
                status=status,
                previous_value=prev_value,
                change=None
                if value is None or prev_value is None
                else round(value - prev_value, 2),
                numerator_label_zh=ind.numerator_zh,
                numerator_label_en=ind.numerator_en,
                denominator_label_zh=ind.denominator_zh,
                denominator_label_en=ind.denominator_en,
                note=ind.unavailable or None,
                groups=groups,
            )
        )
    return out


# --- cases ---------------------------------------------------------------------------------


def _indicator(code: str) -> Indicator:
    ind = indicator(code)
    if ind is None:
        raise NotFoundError(f"no indicator {code}")
    return ind


def _case(row: Any, num: int, reason: str | None) -> CaseOut:
    dur = row.dur
    return CaseOut.model_construct(  # values straight from the database: no validation
        case_id=str(row.case_id),
        exam_id=row.exam_id,
        accession=row.accession,
        clinic=row.clinic,
        discipline=row.discipline,
        modality=row.modality,
        priority=row.priority,
        reader=row.reader,
        at=row.at,
        start_at=row.start_at,
        end_at=row.end_at,
        due_at=row.due_at,
        minutes=None if dur is None else round(float(dur) / 60.0, 2),
        in_numerator=bool(num),
        reason=reason,
    )


def _case_rows(
    session: Session,
    source: _Source,
    filters: QcFilters,
    subset: Subset,
    *,
    stream: bool = False,
) -> Iterator[CaseOut]:
    sub, conditions = _filtered(source, filters)
    query = select(*sub.c).where(*conditions)
    if source.evaluate is None and subset != "all":
        query = query.where(sub.c.num == (1 if subset == "numerator" else 0))
    query = query.order_by(sub.c.at, sub.c.case_id)
    if stream:
        query = query.execution_options(stream_results=True, yield_per=2000)
    for row in session.execute(query):
        if source.evaluate is not None:
            num, reason = source.evaluate(row)
            if (subset == "numerator" and not num) or (subset == "failing" and num):
                continue
        else:
            num, reason = int(row.num or 0), row.reason
        yield _case(row, num, reason.rstrip(",") if reason else None)


def list_cases(
    session: Session,
    *,
    principal: Principal,
    code: str,
    filters: QcFilters,
    now: datetime,
    subset: Subset = "all",
    limit: int = 100,
    offset: int = 0,
    facts: bool = True,
) -> CasePage:
    """The cases behind one indicator: ``all`` (the denominator; for counts, every case),
    ``numerator``, or ``failing`` (denominator cases outside the numerator: breaches)."""
    require_qc(principal)
    ind = _indicator(code)
    source = _source(session, ind, now, facts=facts)
    record_access(
        session,
        principal,
        action="view",
        object_type="qc_cases",
        object_id=ind.code,
        detail={"subset": subset, "from": filters.start.isoformat(), "to": filters.end.isoformat()},
    )
    if source is None:
        return CasePage(code=ind.code, subset=subset, total=0, items=[], note=ind.unavailable)
    if source.evaluate is None:
        sub, conditions = _filtered(source, filters)
        count = select(func.count()).where(*conditions)
        if subset != "all":
            count = count.where(sub.c.num == (1 if subset == "numerator" else 0))
        total = int(session.execute(count).scalar_one())
        items = _page(session, source, filters, subset, limit, offset)
    else:
        everything = list(_case_rows(session, source, filters, subset))
        total = len(everything)
        items = everything[offset : offset + limit]
    return CasePage(code=ind.code, subset=subset, total=total, items=items)


def _page(
    session: Session, source: _Source, filters: QcFilters, subset: Subset, limit: int, offset: int
) -> list[CaseOut]:
    sub, conditions = _filtered(source, filters)
    query = select(*sub.c).where(*conditions)
    if subset != "all":
        query = query.where(sub.c.num == (1 if subset == "numerator" else 0))
    query = query.order_by(sub.c.at, sub.c.case_id).limit(limit).offset(offset)
    return [
        _case(row, int(row.num or 0), row.reason.rstrip(",") if row.reason else None)
        for row in session.execute(query)
    ]


def iter_cases(
    session: Session,
    *,
    principal: Principal,
    code: str,
    filters: QcFilters,
    now: datetime,
    subset: Subset = "all",
    facts: bool = True,
) -> Iterator[CaseOut]:
    """Every case of one indicator, streamed (server-side cursor on PostgreSQL), for exports
    (the edge records the export with :func:`record_export` first)."""
    require_qc(principal)
    ind = _indicator(code)
    source = _source(session, ind, now, facts=facts)
    if source is None:
        return iter(())
    return _case_rows(session, source, filters, subset, stream=True)


def record_export(
    session: Session, *, principal: Principal, what: str, filters: QcFilters, detail: dict[str, Any]
) -> None:
    """Audit an export (``what``: the indicator table or the case list of a code)."""
    require_qc(principal)
    record_access(
        session,
        principal,
        action="export",
        object_type="qc_export",
        object_id=what,
        detail={**detail, "from": filters.start.isoformat(), "to": filters.end.isoformat()},
    )


_THRESHOLDS = {"RRC-02": 120.0, "RCV-04": 10.0, "ECG-02": 10.0, "CL-15": 10.0}


def histogram(
    session: Session,
    *,
    principal: Principal,
    code: str,
    filters: QcFilters,
    now: datetime,
    bins: int = 20,
    facts: bool = True,
) -> HistogramOut:
    """Distribution of the cases' minutes with P50, P90 and the indicator's limit line."""
    require_qc(principal)
    ind = _indicator(code)
    source = _source(session, ind, now, facts=facts)
    minutes: list[float] = []
    if source is not None:
        sub, conditions = _filtered(source, filters)
        minutes = [
            float(v) / 60.0
            for (v,) in session.execute(
                select(sub.c.dur).where(*conditions, sub.c.dur.is_not(None))
            )
        ]
    if not minutes:
        return HistogramOut(
            code=ind.code,
            edges=[],
            counts=[],
            p50=None,
            p90=None,
            n=0,
            threshold=_THRESHOLDS.get(ind.code),
            note=ind.unavailable or None,
        )
    values = np.asarray(minutes)
    top = float(np.percentile(values, 99)) if len(values) > 20 else float(values.max())
    limit = _THRESHOLDS.get(ind.code)
    top = max(top, (limit or 0) * 1.5, 1.0)
    counts, edges = np.histogram(np.clip(values, 0, top), bins=bins, range=(0, top))
    return HistogramOut(
        code=ind.code,
        edges=[round(float(x), 2) for x in edges],
        counts=[int(c) for c in counts],
        p50=round(float(np.percentile(values, 50)), 1),
        p90=round(float(np.percentile(values, 90)), 1),
        n=len(minutes),
        threshold=limit,
    )


# --- targets -------------------------------------------------------------------------------


def _current_targets(session: Session) -> dict[str, tuple[float | None, float, int]]:
    return {t.code: (t.target, t.warn_margin, t.version) for t in _latest_rows(session)}


def list_targets(session: Session, *, principal: Principal) -> list[TargetOut]:
    """The target in force for every indicator (version 0: the shipped default)."""
    require_qc(principal)
    current = {t.code: t for t in _latest_rows(session)}
    out = []
    for ind in INDICATORS:
        row = current.get(ind.code)
        out.append(
            TargetOut(
                code=ind.code,
                name_zh=ind.name_zh,
                name_en=ind.name_en,
                direction=ind.direction,
                unit=ind.unit,
                target=row.target if row else ind.target,
                warn_margin=row.warn_margin if row else ind.warn_margin,
                version=row.version if row else 0,
                changed_by=row.changed_by if row else None,
                changed_at=row.changed_at if row else None,
                note=row.note if row else "",
            )
        )
    return out


def _latest_rows(session: Session) -> list[QcTarget]:
    latest = (
        select(QcTarget.code, func.max(QcTarget.version).label("version"))
        .group_by(QcTarget.code)
        .subquery()
    )
    return list(
        session.execute(
            select(QcTarget).join(
                latest,
                and_(QcTarget.code == latest.c.code, QcTarget.version == latest.c.version),
            )
        ).scalars()
    )


def target_history(session: Session, *, principal: Principal, code: str) -> list[TargetOut]:
    """Every version of one indicator's target, newest first."""
    require_qc(principal)
    ind = _indicator(code)
    rows = session.execute(
        select(QcTarget).where(QcTarget.code == ind.code).order_by(QcTarget.version.desc())
    ).scalars()
    return [
        TargetOut(
            code=ind.code,
            name_zh=ind.name_zh,
            name_en=ind.name_en,
            direction=ind.direction,
            unit=ind.unit,
            target=t.target,
            warn_margin=t.warn_margin,
            version=t.version,
            changed_by=t.changed_by,
            changed_at=t.changed_at,
            note=t.note,
        )
        for t in rows
    ]


def set_target(
    session: Session,
    *,
    principal: Principal,
    code: str,
    target: float | None,
    warn_margin: float,
    note: str,
    now: datetime,
) -> TargetOut:
    """A new version of ``code``'s target (QC staff or administrators), audited with the
    values before and after. Two racing changes: one gets a unique-constraint conflict."""
    require_qc(principal)
    ind = _indicator(code)
    if ind.unavailable:
        raise InvalidInputError(f"{ind.code} has no data yet; it takes no target")
    for name, value in (("target", target), ("warn_margin", warn_margin)):
        if value is not None and (not np.isfinite(value) or value < 0):
            raise InvalidInputError(f"{name} must be a finite number ≥ 0")
    if ind.unit == "%" and target is not None and target > 100:
        raise InvalidInputError("a rate's target is at most 100 (%)")
    before = _current_targets(session).get(ind.code, (ind.target, ind.warn_margin, 0))
    row = QcTarget(
        code=ind.code,
        version=before[2] + 1,
        target=target,
        warn_margin=warn_margin,
        note=note,
        changed_by=principal.username,
        changed_at=now,
    )
    session.add(row)
    session.flush()
    record_event(
        session,
        actor=principal.actor,
        org_id=principal.org_id,
        action="set_qc_target",
        object_type="qc_target",
        object_id=ind.code,
        detail={
            "version": row.version,
            "before": {"target": before[0], "warn_margin": before[1]},
            "after": {"target": target, "warn_margin": warn_margin},
            "note": note,
        },
    )
    return target_history(session, principal=principal, code=ind.code)[0]


# --- daily roll-up -------------------------------------------------------------------------
#
# qc_daily holds, per local day × clinic × discipline × modality × priority, the number of
# cases and of numerator cases of every indicator of ROLLUP_CODES, summed over the facts
# (qc_exam_facts, qc_report_facts); qc_tat_hist the turnaround stages' seconds per month ×
# clinic as log-scale histograms. The refresh task applies the difference between an
# exam's old and new facts to both in the same transaction, so they always equal the sums
# over the facts; a query subtracts what the facts of the exams still queued contribute and
# adds what their source rows do, so the figures never lag (as for the facts).
#
# Counts are exact. Percentiles from the histograms (whole months; the days of partial
# months at the ends of a period are bucketed from the facts) are estimates: with
# ``BUCKET_RATIO`` r, a value is placed in its bucket [r**(b-1), r**b) seconds (bucket 0:
# under a second), each rank at its bucket's midpoint, and P50/P90 interpolated between the
# two ranks around them as percentile_cont does, so |estimate - exact| <= (r - 1) / 2 of
# the larger of those two values + 0.5 s: within one bucket (4.4 %).

BUCKET_RATIO = 2 ** (1 / 8)
# Periods with at most this many cases of a stage (both periods) get exact percentiles.
EXACT_PERCENTILES_UP_TO = 20_000
_LOG_RATIO = math.log(BUCKET_RATIO)
_DIMS = ("clinic", "discipline", "modality", "priority")
_DailyKey = tuple[str, str, str, str, str, str]  # code, day, clinic, discipline, modality, priority
_HistKey = tuple[str, str, int, int]  # (month, clinic, stage, bucket)
_TOTAL = "\x00total"  # the key of a period's whole histogram beside its breakdown


def duration_bucket(seconds: float) -> int:
    """The histogram bucket of a duration (negative durations mirror positive ones)."""
    size = abs(seconds)
    bucket = 0 if size < 1.0 else 1 + math.floor(math.log(size) / _LOG_RATIO)
    return bucket if seconds >= 0 else -bucket - 1


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """[low, high) seconds of a bucket."""
    if bucket < 0:
        low, high = bucket_bounds(-bucket - 1)
        return -high, -low
    if bucket == 0:
        return 0.0, 1.0
    return BUCKET_RATIO ** (bucket - 1), BUCKET_RATIO**bucket


def hist_percentile(hist: dict[int, int], q: float) -> float | None:
    """Percentile ``q`` (0..1) of a histogram, interpolated like percentile_cont."""
    n = sum(hist.values())
    if n <= 0:
        return None
    h = q * (n - 1)
    low_rank = math.floor(h)
    ranks = (low_rank, min(low_rank + 1, n - 1))
    found: list[float] = []
    seen = 0
    for bucket in sorted(hist):
        count = hist[bucket]
        if count <= 0:
            continue
        while len(found) < 2 and ranks[len(found)] < seen + count:
            low, high = bucket_bounds(bucket)
            found.append((low + high) / 2)
        seen += count
        if len(found) == 2:
            break
    return found[0] + (h - low_rank) * (found[1] - found[0])


def _rollup_tz() -> str:
    return get_settings().timezone


def _local_text(dialect: str, at: Any, tz: str, *, month: bool) -> ColumnElement[Any]:
    """``YYYY-MM-DD`` (or ``YYYY-MM``) of ``at`` in the local time zone."""
    if dialect == "postgresql":
        return func.to_char(func.timezone(tz, at), "YYYY-MM" if month else "YYYY-MM-DD")
    offset = int(datetime.now(ZoneInfo(tz)).utcoffset().total_seconds())  # type: ignore[union-attr]
    return func.strftime("%Y-%m" if month else "%Y-%m-%d", at, f"{offset:+d} seconds")


def _rollup_cases(d: str, now: datetime) -> dict[str, _ExamCases]:
    """The exam indicators as the roll-up holds them: SLA-01 only its reported exams (its
    overdue unreported ones depend on the time of the query: counted when read)."""
    cases = _exam_indicators(d, now)
    cases["SLA-01"] = replace(
        cases["SLA-01"],
        where=lambda e, r1, w: [e.state != ExamState.CANCELLED, r1.final_at.is_not(None)],
    )
    return cases


def _daily_contributions(
    session: Session, *, facts: bool, exams: Any, tz: str, now: datetime
) -> dict[_DailyKey, list[int]]:
    """(code, day, dims) -> [cases, numerator] of the exams ``exams`` (IDs, a selectable),
    from their facts (``facts``) or their source rows; RWS-03 from their report facts or
    their reports."""
    d = _dialect(session)
    rows = _fact_rows() if facts else _source_rows()
    e, r1, w = rows.e, rows.r1, rows.w
    dims = [rows.clinic, cast(e.discipline, String), e.modality, cast(e.priority, String)]
    parts = []
    for code, cases in _rollup_cases(d, now).items():
        if cases.stage is not None:
            num: Any = case((rows.stage_seconds(d, cases.stage).is_not(None), 1), else_=0)
        else:
            assert cases.num is not None
            num = cases.num(e, r1, w)
        day = _local_text(d, cases.at(e, r1), tz, month=False)
        query = select(
            literal(code), day, *dims, func.count(), func.coalesce(func.sum(num), 0)
        ).where(*cases.where(e, r1, w), e.id.in_(exams))
        parts.append(rows.join(query, cases.due).group_by(day, *dims))
    out: dict[_DailyKey, list[int]] = {}
    for code, day, clinic, discipline, modality, priority, n, s in session.execute(
        union_all(*parts)
    ):
        out[(code, day, clinic, discipline, modality, priority)] = [int(n), int(s)]
    if facts:
        f = aliased(QcExamFact, name="f")
        k = aliased(QcReportFact, name="k")
        day = _local_text(d, k.final_at, tz, month=False)
        fdims = [f.clinic, cast(f.discipline, String), f.modality, cast(f.priority, String)]
        query = (
            select(day, *fdims, func.count(), func.sum(case((k.compliant, 1), else_=0)))
            .select_from(k)
            .join(f, f.id == k.exam_id)
            .where(k.exam_id.in_(exams))
            .group_by(day, *fdims)
        )
        for day_, clinic, discipline, modality, priority, n, s in session.execute(query):
            out[("RWS-03", day_, clinic, discipline, modality, priority)] = [int(n), int(s or 0)]
    else:
        for row, num in _writing_rows(session, exams):
            key = (
                "RWS-03", _local_day(row.at, tz, d), row.clinic, row.discipline, row.modality,
                row.priority,
            )  # fmt: skip
            counts = out.setdefault(key, [0, 0])
            counts[0] += 1
            counts[1] += num
    return out


def _local_day(at: datetime, tz: str, dialect: str) -> str:
    """The local day of ``at`` as the database computes it (SQLite: the zone's offset now)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    if dialect == "postgresql":
        return at.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d")
    offset = datetime.now(ZoneInfo(tz)).utcoffset() or timedelta()
    return (at.astimezone(UTC) + offset).strftime("%Y-%m-%d")


def _writing_rows(session: Session, exams: Any) -> Iterator[tuple[Any, int]]:
    """RWS-03's cases of the exams ``exams`` from the source tables, each with its result."""
    source = _writing(_dialect(session))
    sub = source.query.subquery("cases")
    assert source.evaluate is not None
    for row in session.execute(select(*sub.c).where(sub.c.exam_id.in_(exams))):
        yield row, source.evaluate(row)[0]


def _tat_contributions(
    session: Session, *, facts: bool, exams: Any, tz: str
) -> dict[_HistKey, int]:
    """(month, clinic, stage, bucket) -> exams, of the exams ``exams``."""
    d = _dialect(session)
    rows = _fact_rows() if facts else _source_rows()
    e, r1 = rows.e, rows.r1
    query = select(
        _local_text(d, e.first_received_at, tz, month=True),
        rows.clinic,
        *[rows.stage_seconds(d, code) for code in TAT_STAGES],
    ).where(*_not_cancelled(e, r1, None), e.id.in_(exams))
    out: dict[_HistKey, int] = {}
    for month, clinic, *seconds in session.execute(rows.join(query, False)):
        for stage, value in enumerate(seconds, start=1):
            if value is not None:
                key = (month, clinic, stage, duration_bucket(float(value)))
                out[key] = out.get(key, 0) + 1
    return out


def _merge(into: dict[Any, Any], other: dict[Any, Any], sign: int) -> None:
    for key, value in other.items():
        if isinstance(value, list):
            mine = into.setdefault(key, [0] * len(value))
            for i, v in enumerate(value):
                mine[i] += sign * v
        else:
            into[key] = into.get(key, 0) + sign * value


def _insert_rows(session: Session, table: Any, keys: list[str], rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), 5000):
        session.execute(insert(table), rows[start : start + 5000])


def _upsert(session: Session, table: Any, keys: list[str], rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    if _dialect(session) == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
    statement = upsert(table)
    counters = [c for c in rows[0] if c not in keys]
    statement = statement.on_conflict_do_update(
        index_elements=keys,
        set_={c: table.c[c] + statement.excluded[c] for c in counters},
    )
    session.execute(statement, rows)


def _apply_rollup(
    session: Session,
    daily: dict[_DailyKey, list[int]],
    hist: dict[_HistKey, int],
    *,
    fresh: bool = False,
) -> None:
    """Add the differences ``daily`` / ``hist`` to the roll-up tables (``fresh``: they are
    empty, plain inserts)."""
    upsert = _insert_rows if fresh else _upsert
    by_key: dict[tuple[str, ...], dict[str, Any]] = {}
    for (code, day, *dims), (n, s) in daily.items():
        if not n and not s:
            continue
        row = by_key.get((day, *dims))
        if row is None:
            row = {"day": day, **dict(zip(_DIMS, dims, strict=True))}
            row |= {rollup_column(c, w): 0 for c in ROLLUP_CODES for w in ("n", "s")}
            by_key[(day, *dims)] = row
        row[rollup_column(code, "n")] += n
        row[rollup_column(code, "s")] += s
    upsert(session, QcDaily.__table__, ["day", *_DIMS], list(by_key.values()))
    if fresh:  # the months summed from the days just written
        _fill_months(session)
    else:  # the same differences by month
        months: dict[tuple[str, ...], dict[str, Any]] = {}
        for (day, *dims), row in by_key.items():
            month = months.get((day[:7], *dims))
            if month is None:
                months[(day[:7], *dims)] = {"month": day[:7]} | {
                    name: value for name, value in row.items() if name != "day"
                }
            else:
                for name, value in row.items():
                    if name not in ("day", *_DIMS):
                        month[name] += value
        upsert(session, QcMonthly.__table__, ["month", *_DIMS], list(months.values()))
    upsert(
        session,
        QcTatHist.__table__,
        ["month", "clinic", "stage", "bucket"],
        [
            {"month": m, "clinic": c, "stage": st, "bucket": b, "n": n}
            for (m, c, st, b), n in hist.items()
            if n
        ],
    )


def _fill_months(session: Session) -> None:
    """``qc_monthly`` (empty) summed from ``qc_daily``."""
    daily = QcDaily.__table__
    counters = [rollup_column(c, w) for c in ROLLUP_CODES for w in ("n", "s")]
    month = func.substr(daily.c.day, 1, 7)
    dims = [daily.c[n] for n in _DIMS]
    sums = select(month, *dims, *[func.sum(daily.c[c]) for c in counters]).group_by(month, *dims)
    session.execute(insert(QcMonthly).from_select(["month", *_DIMS, *counters], sums))


def _contributions(
    session: Session, *, facts: bool, exams: Any, tz: str, now: datetime
) -> tuple[dict[_DailyKey, list[int]], dict[_HistKey, int]]:
    return (
        _daily_contributions(session, facts=facts, exams=exams, tz=tz, now=now),
        _tat_contributions(session, facts=facts, exams=exams, tz=tz),
    )


def _write_report_facts(session: Session, exam_ids: list[str]) -> None:
    """The report-writing results of the exams' signed imaging reports (the stored check
    when there is one), replacing what they had."""
    session.execute(delete(QcReportFact).where(QcReportFact.exam_id.in_(exam_ids)))
    facts = [
        {"report_id": row.case_id, "exam_id": row.exam_id, "final_at": row.at, "compliant": bool(n)}
        for row, n in _writing_rows(session, exam_ids)
    ]
    if facts:
        session.execute(insert(QcReportFact), facts)


def _local_days(filters: QcFilters) -> tuple[date, date] | None:
    """The local days [first, last] of the period, None unless it is whole days."""
    zone = ZoneInfo(filters.tz)
    start, end = filters.start.astimezone(zone), filters.end.astimezone(zone)
    if start.time() != time() or end.time() != time():
        return None
    return start.date(), end.date() - timedelta(days=1)


def _whole_months(first: date, last: date) -> tuple[list[str], list[tuple[date, date]]]:
    """The months wholly inside [first, last] and the runs of days outside them."""
    months: list[str] = []
    edges: list[tuple[date, date]] = []
    day = first
    while day <= last:
        nxt = date(day.year + day.month // 12, day.month % 12 + 1, 1)
        if day.day == 1 and nxt - timedelta(days=1) <= last:
            months.append(day.strftime("%Y-%m"))
        else:
            run_end = min(last, nxt - timedelta(days=1))
            if edges and edges[-1][1] + timedelta(days=1) == day:
                edges[-1] = (edges[-1][0], run_end)
            else:
                edges.append((day, run_end))
        day = nxt
    return months, edges


def _rollup_figures(
    session: Session,
    codes: list[str],
    filters: QcFilters,
    group_by: str | None,
    *,
    previous: bool,
    now: datetime,
) -> dict[str, _Figures]:
    """The figures of the roll-up's indicators among ``codes`` that the roll-up can give
    for these filters (none when it cannot: a reader filter or breakdown, a breakdown by
    reason, a period that is not whole local days of the roll-up's time zone); turnaround
    P50/P90 from the histograms only without a discipline, modality or priority filter."""
    tz = filters.tz
    wide = filters.previous() if previous else filters
    cur_days, wide_days = _local_days(filters), _local_days(replace(filters, start=wide.start))
    if (
        tz != _rollup_tz()
        or filters.reader is not None
        or group_by in ("reader", "reason")
        or cur_days is None
        or wide_days is None
    ):
        return {}
    hist_ok = group_by in (None, "clinic", "month") and not (
        filters.discipline or filters.modality or filters.priority
    )
    wanted = [c for c in codes if c in ROLLUP_CODES and (hist_ok or c not in TAT_STAGES)]
    if not wanted:
        return {}
    cur_first = cur_days[0].isoformat()
    first, last = wide_days[0].isoformat(), cur_days[1].isoformat()
    dim_filters = {n: getattr(filters, n) for n in _DIMS if getattr(filters, n) is not None}

    def period_of(day: str) -> str | None:
        if day < first or day > last:
            return None
        return "cur" if day >= cur_first else "prev"

    def key_of(day: str, dims: dict[str, str]) -> str:
        if group_by is None:
            return "all"
        return day[:7] if group_by == "month" else dims[group_by]

    # (period, key, code) -> [cases, numerator]
    sums: dict[tuple[str, str, str], list[int]] = {}
    columns = [rollup_column(c, w) for c in wanted for w in ("n", "s")]

    def add_row(name: str, row: Any) -> None:
        for i, code in enumerate(wanted):
            n, s = int(row[2 + 2 * i] or 0), int(row[3 + 2 * i] or 0)
            _merge(sums, {(name, str(row[1]), code): [n, s]}, 1)

    # The whole months of each period from qc_monthly (grouped by month and key: the
    # month's period is told here), their other days from qc_daily.
    prev_last = cur_days[0] - timedelta(days=1)
    spans = [("cur", cur_days)]
    if wide_days[0] <= prev_last:
        spans.append(("prev", (wide_days[0], prev_last)))
    month_period: dict[str, str] = {}
    runs: list[tuple[date, date]] = []
    for span, (span_first, span_last) in spans:
        months, edges = _whole_months(span_first, span_last)
        month_period |= dict.fromkeys(months, span)
        runs += edges
    if month_period:
        m = QcMonthly.__table__
        key: Any = literal("all") if group_by is None else m.c[group_by]
        query = (
            select(m.c.month, key, *[func.sum(m.c[c]) for c in columns])
            .where(
                m.c.month.in_(list(month_period)),
                *[m.c[n] == v for n, v in dim_filters.items()],
            )
            .group_by(m.c.month, key)
        )
        for row in session.execute(query):
            add_row(month_period[row[0]], row)
    if runs:
        t = QcDaily.__table__
        period = case((t.c.day >= cur_first, literal("cur")), else_=literal("prev"))
        key = (
            literal("all")
            if group_by is None
            else func.substr(t.c.day, 1, 7)
            if group_by == "month"
            else t.c[group_by]
        )
        in_runs = [t.c.day.between(a.isoformat(), b.isoformat()) for a, b in runs]
        query = (
            select(period, key, *[func.sum(t.c[c]) for c in columns])
            .where(or_(*in_runs), *[t.c[n] == v for n, v in dim_filters.items()])
            .group_by(period, key)
        )
        for row in session.execute(query):
            add_row(row[0], row)
    # The exams still queued: their facts out, their source rows in.
    queued = select(QcFactQueue.exam_id)
    waiting = session.execute(select(exists().where(QcFactQueue.exam_id.is_not(None)))).scalar()
    if waiting:
        delta = _daily_contributions(session, facts=False, exams=queued, tz=tz, now=now)
        _merge(delta, _daily_contributions(session, facts=True, exams=queued, tz=tz, now=now), -1)
        for (code, day, *dims), (n, s) in delta.items():
            named = dict(zip(_DIMS, dims, strict=True))
            name = period_of(day)
            if code not in wanted or name is None:
                continue
            if any(named[k] != v for k, v in dim_filters.items()):
                continue
            _merge(sums, {(name, key_of(day, named), code): [n, s]}, 1)
    if "SLA-01" in wanted:
        _overdue_unreported(session, filters, wide, group_by, now, sums)
    cases = max(
        (sum(v[0] for (_, _, c), v in sums.items() if c == code) for code in TAT_STAGES),
        default=0,
    )
    if cases <= EXACT_PERCENTILES_UP_TO:
        # Few cases: the exact percentiles (the turnaround pass over the facts reads every
        # case, so it is the cases, not the durations, that make it slow).
        wanted = [c for c in wanted if c not in TAT_STAGES]
    hists = (
        _tat_hists(session, filters, cur_days, wide_days, group_by, waiting=bool(waiting))
        if any(c in TAT_STAGES for c in wanted)
        else {}
    )
    out: dict[str, _Figures] = {}
    for code in wanted:
        cur = {
            k: _Agg(k, n, s)
            for (name, k, c), (n, s) in sums.items()
            if c == code and name == "cur" and n
        }
        prev = [
            _Agg(k, n, s)
            for (name, k, c), (n, s) in sums.items()
            if c == code and name == "prev" and n
        ]
        groups = sorted(cur.values(), key=lambda a: (a.key is None, a.key or ""))
        total, before = _sum(groups, "all"), _sum(prev, "all")
        if code in TAT_STAGES:
            stage = int(code.split("-")[1])
            for agg in groups:
                h = hists.get(("cur", agg.key or "", stage), {})
                agg.p50, agg.p90 = hist_percentile(h, 0.5), hist_percentile(h, 0.9)
            for whole, name in ((total, "cur"), (before, "prev")):
                if whole is None:
                    continue
                h = hists.get((name, "all" if group_by is None else _TOTAL, stage), {})
                whole.p50, whole.p90 = hist_percentile(h, 0.5), hist_percentile(h, 0.9)
        out[code] = _Figures(groups, total, before)
    return out


def _overdue_unreported(
    session: Session,
    filters: QcFilters,
    wide: QcFilters,
    group_by: str | None,
    now: datetime,
    sums: dict[tuple[str, str, str], list[int]],
) -> None:
    """SLA-01's cases the roll-up does not hold: exams without a first final report whose
    work item is overdue at ``now`` (none of them in the numerator)."""

    def make(rows: _ExamRows) -> Any:
        e, r1, w = rows.e, rows.r1, rows.w
        query = select(
            *_exam_columns(e, rows.clinic, rows.reader), e.first_received_at.label("at")
        ).where(
            e.state != ExamState.CANCELLED,
            r1.final_at.is_(None),
            w.due_at < now,
            e.rescan_requested_at.is_(None),
        )
        return rows.join(query, True)

    sub, conditions = _filtered(
        _Source(_exam_query(True, make)), replace(filters, start=wide.start)
    )
    period = case((sub.c.at >= filters.start, literal("cur")), else_=literal("prev"))
    key = _group_key(session, sub, group_by, filters.tz)
    for name, k, n in session.execute(
        select(period, key, func.count()).where(*conditions).group_by(period, key)
    ):
        _merge(sums, {(name, str(k), "SLA-01"): [int(n), 0]}, 1)


def _tat_hists(
    session: Session,
    filters: QcFilters,
    cur_days: tuple[date, date],
    wide_days: tuple[date, date],
    group_by: str | None,
    *,
    waiting: bool,
) -> dict[tuple[str, str, int], dict[int, int]]:
    """(period, key, stage) -> histogram of the turnaround seconds of the exams that
    arrived in the period (whole months from qc_tat_hist, other days from the facts); with
    a breakdown, key ``_TOTAL`` holds the period's histogram (every key's)."""
    tz, d = filters.tz, _dialect(session)
    out: dict[tuple[str, str, int], dict[int, int]] = {}

    def add(name: str, key: str, stage: int, bucket: int, n: int, total: bool = True) -> None:
        h = out.setdefault((name, key, stage), {})
        h[bucket] = h.get(bucket, 0) + n
        if total and group_by is not None and key != _TOTAL:
            t = out.setdefault((name, _TOTAL, stage), {})
            t[bucket] = t.get(bucket, 0) + n

    def key_of(month: str, clinic: str) -> str:
        return "all" if group_by is None else month if group_by == "month" else clinic

    prev_last = cur_days[0] - timedelta(days=1)
    periods = [("cur", cur_days)]
    if wide_days[0] <= prev_last:
        periods.append(("prev", (wide_days[0], prev_last)))
    month_period: dict[str, str] = {}
    edges: list[tuple[str, date, date]] = []
    for name, (first, last) in periods:
        months, runs = _whole_months(first, last)
        month_period |= dict.fromkeys(months, name)
        edges += [(name, a, b) for a, b in runs]
    t = QcTatHist.__table__
    if month_period:
        # Summed in the database by period and key (the months of a period and the clinics
        # of a total are many rows of the same buckets); with a breakdown, the totals too.
        cur_months = [m for m, name in month_period.items() if name == "cur"]
        name_col = case((t.c.month.in_(cur_months), literal("cur")), else_=literal("prev"))
        key_col: Any = (
            literal("all") if group_by is None else t.c.month if group_by == "month" else t.c.clinic
        )
        where = [
            t.c.month.in_(list(month_period)),
            *([t.c.clinic == filters.clinic] if filters.clinic else []),
        ]
        keys = [(key_col, False)] if group_by is None else [(key_col, False), (None, True)]
        for key_expr, whole in keys:
            columns = [name_col, t.c.stage, t.c.bucket]
            if key_expr is not None:
                columns.insert(1, key_expr)
            query = select(*columns, func.sum(t.c.n)).where(*where).group_by(*columns)
            for row in session.execute(query):
                if whole:
                    add(row[0], _TOTAL, row[1], row[2], int(row[3]))
                else:
                    add(row[0], str(row[1]), row[2], row[3], int(row[4]), total=False)
        if waiting:
            queued = select(QcFactQueue.exam_id)
            delta = _tat_contributions(session, facts=False, exams=queued, tz=tz)
            _merge(delta, _tat_contributions(session, facts=True, exams=queued, tz=tz), -1)
            for (month, clinic, stage, bucket), n in delta.items():
                if month in month_period and filters.clinic in (None, clinic):
                    add(month_period[month], key_of(month, clinic), stage, bucket, n)
    zone = ZoneInfo(tz)

    def make(rows: _ExamRows) -> Any:
        e, r1 = rows.e, rows.r1
        query = select(
            rows.clinic.label("clinic"),
            e.first_received_at.label("at"),
            _local_text(d, e.first_received_at, tz, month=True).label("month"),
            *[rows.stage_seconds(d, c).label(f"d{i}") for i, c in enumerate(TAT_STAGES, 1)],
        ).where(*_not_cancelled(e, r1, None))
        return rows.join(query, False)

    for name, first, last in edges:
        sub = _exam_query(True, make).subquery("cases")
        # Not the time itself (only its month): converting times costs.
        query = select(*[c for c in sub.c if c.name != "at"]).where(
            sub.c.at >= datetime.combine(first, time(), zone).astimezone(UTC),
            sub.c.at < datetime.combine(last + timedelta(days=1), time(), zone).astimezone(UTC),
            *([sub.c.clinic == filters.clinic] if filters.clinic else []),
        )
        for row in session.execute(query):
            for stage in range(1, 8):
                value = getattr(row, f"d{stage}")
                if value is not None:
                    add(
                        name, key_of(row.month, row.clinic), stage, duration_bucket(float(value)), 1
                    )
    return out
