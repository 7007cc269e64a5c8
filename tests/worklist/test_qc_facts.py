"""The per-exam QC facts (qc_exam_facts) give exactly the figures of the reference
definitions over the source tables (``facts=False``): before the task ran (every exam
still queued), after it ran, and after later changes written by plain SQL and the ORM,
which the database triggers queue whatever code path wrote them."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from rdc_core.db import read_session, session_scope
from tests.worklist import qc_dataset
from worklist.access import Principal
from worklist.directory import principal_for_user
from worklist.models import Exam, ExamState, Organization, Priority, Report, User, WorkItem
from worklist.qc import GROUPS, INDICATORS, compute_indicators, histogram, list_cases, service
from worklist.qc.models import (
    QC_FACT_SOURCES,
    QcDaily,
    QcExamFact,
    QcFactQueue,
    QcMonthly,
    QcTatHist,
)
from worklist.qc.service import BUCKET_RATIO, period_filters
from worklist.qc.tasks import refresh_facts_task

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
TZ = "Asia/Shanghai"
# The whole first half of 2026 (the data set is in February and March), and March alone.
PERIODS = (
    (qc_dataset.MARCH[0].replace(month=1), qc_dataset.MARCH[1].replace(month=6, day=30)),
    qc_dataset.MARCH,
)
EXAM_CODES = [
    "TAT-01", "TAT-02", "TAT-03", "TAT-04", "TAT-05", "TAT-06", "TAT-07", "SLA-01",
    "RRC-02", "ECG-01", "IQ-01", "IQ-02", "ALL-01", "ALL-02", "ALL-06",
]  # fmt: skip


@pytest.fixture
def qc(database: str) -> Principal:
    with session_scope() as session:
        qc_dataset.build(session)
    with session_scope() as session:
        user = session.execute(select(User).where(User.username == "qc")).scalar_one()
        return principal_for_user(user)


def _figures(principal: Principal, *, facts: bool) -> list[Any]:
    """Every indicator, every breakdown, both periods; case lists and histograms of the
    exam indicators (what the dashboard, the drill-down and the exports read)."""
    out: list[Any] = []
    with read_session() as session:
        for start, end in PERIODS:
            filters = period_filters(start=start, end=end, tz=TZ)
            for group_by in (None, *GROUPS) if start.month == 1 else (None,):
                out.append(
                    [
                        i.model_dump()
                        for i in compute_indicators(
                            session,
                            principal=principal,
                            filters=filters,
                            now=NOW,
                            group_by=group_by,
                            facts=facts,
                        )
                    ]
                )
            one = period_filters(start=start, end=end, tz=TZ, discipline="imaging", clinic="C1")
            out.append(
                [
                    i.model_dump()
                    for i in compute_indicators(
                        session, principal=principal, filters=one, now=NOW, facts=facts
                    )
                ]
            )
            for code in EXAM_CODES if start.month == 1 else ():
                out.append(
                    histogram(
                        session, principal=principal, code=code, filters=filters, now=NOW,
                        facts=facts,
                    ).model_dump()
                )  # fmt: skip
    with session_scope() as session:  # case lists are audited: a write session
        for start, end in PERIODS[:1]:
            filters = period_filters(start=start, end=end, tz=TZ)
            for code in EXAM_CODES:
                for subset in ("all", "numerator", "failing"):
                    page = list_cases(
                        session, principal=principal, code=code, filters=filters, now=NOW,
                        subset=subset, limit=1000, facts=facts,
                    )  # fmt: skip
                    out.append(page.model_dump())
    return out


def _waiting() -> int:
    with read_session() as session:
        return int(session.execute(select(func.count()).select_from(QcFactQueue)).scalar_one())


def _assert_same(principal: Principal, reference: list[Any] | None = None) -> list[Any]:
    """The facts' figures are the reference's (computed here unless given: the task writes
    only the facts, so the reference of the same source rows is reused); returns it."""
    reference = reference or _figures(principal, facts=False)
    facts = _figures(principal, facts=True)
    for i, (x, y) in enumerate(zip(reference, facts, strict=True)):
        if isinstance(x, list):
            for a, b in zip(x, y, strict=True):
                assert a == b, (i, a["code"], {k: (a[k], b[k]) for k in a if a[k] != b[k]})
        assert x == y, i
    # Not vacuous: the data set has cases in these (the changes below add others).
    counted = {i["code"] for i in reference[0] if i["numerator"]}
    assert counted >= {"TAT-01", "TAT-07", "SLA-01", "RRC-02", "IQ-01", "IQ-02", "ALL-01", "ALL-02"}
    return reference


def _assert_histograms_close(principal: Principal, monkeypatch: pytest.MonkeyPatch) -> None:
    """The roll-up's turnaround percentiles from histograms (forced: the data set is small
    enough for exact ones) are within one bucket of the exact ones, and everything else is
    the same: |estimate - exact| <= (r - 1) / 2 * exact + 0.5 s, plus 0.1 min of rounding."""
    calls: list[int] = []
    real = service._tat_hists

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(service, "EXACT_PERCENTILES_UP_TO", -1)
        patch.setattr(service, "_tat_hists", spy)
        _compare_histograms(principal)
    assert calls  # the histograms were read


def _close(exact: float | None, estimate: float | None) -> bool:
    if exact is None or estimate is None:
        return exact is estimate
    return abs(estimate - exact) <= (BUCKET_RATIO - 1) / 2 * abs(exact) + 0.5 / 60 + 0.11


def _compare_histograms(principal: Principal) -> None:
    close = _close

    loose = {"p50", "p90", "value", "previous_value", "change", "status", "groups"}
    with read_session() as session:
        for start, end in PERIODS:
            filters = period_filters(start=start, end=end, tz=TZ)
            for group_by in (None, "clinic", "month"):
                exact, rolled = (
                    compute_indicators(
                        session, principal=principal, filters=filters, now=NOW,
                        group_by=group_by, rollup=rollup,
                    )
                    for rollup in (False, True)
                )  # fmt: skip
                for x, y in zip(exact, rolled, strict=True):
                    if x.kind != "duration":
                        assert x == y
                        continue
                    assert x.model_dump(exclude=loose) == y.model_dump(exclude=loose)
                    assert close(x.p50, y.p50) and close(x.p90, y.p90), x.code
                    assert close(x.previous_value, y.previous_value), x.code
                    for gx, gy in zip(x.groups or [], y.groups or [], strict=True):
                        assert (gx.key, gx.numerator, gx.denominator) == (
                            gy.key, gy.numerator, gy.denominator,
                        )  # fmt: skip
                        assert close(gx.p50, gy.p50) and close(gx.p90, gy.p90), x.code


def test_facts_give_the_reference_figures_before_and_after_the_task(
    qc: Principal, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _waiting() > 0  # the data set's writes were queued by the triggers
    before = _assert_same(qc)  # everything waiting: read from the source tables
    assert refresh_facts_task() > 0
    assert _waiting() == 0
    with read_session() as session:
        assert session.execute(select(func.count()).select_from(QcExamFact)).scalar_one() == (
            session.execute(select(func.count()).select_from(Exam)).scalar_one()
        )
    _assert_same(qc, before)  # everything from the facts
    assert refresh_facts_task() == 0  # idempotent: nothing left to do

    # Changes by every kind of writer, each column an indicator reads.
    with session_scope() as session:
        exams = {e.accession_number: e for e in session.execute(select(Exam)).scalars()}
        names = sorted(a for a in exams if a)
        first, second, third = (exams[n] for n in names[:3])
        first.priority = (
            Priority.EMERGENCY if first.priority != Priority.EMERGENCY else (Priority.ROUTINE)
        )
        second.state = ExamState.CANCELLED
        third.claimed_at = (third.ready_at or third.first_received_at) + timedelta(minutes=7)
        third.rescan_requested_at = third.first_received_at + timedelta(hours=1)
        third.rescan_reason = "motion"
        session.execute(
            update(WorkItem)
            .where(WorkItem.exam_id == exams[names[3]].id)
            .values(due_at=exams[names[3]].first_received_at)
        )
        session.execute(
            update(Report)
            .where(Report.exam_id == exams[names[4]].id, Report.version == 1)
            .values(final_at=exams[names[4]].first_received_at + timedelta(minutes=121))
        )
        session.execute(update(Organization).where(Organization.code == "C2").values(code="C2X"))
        session.execute(
            update(User).where(User.username == "attending").values(username="attending2")
        )
        session.execute(delete(Exam).where(Exam.id == exams[names[5]].id))
    assert _waiting() > 0
    after = _assert_same(qc)  # the changed exams read from the source tables
    _assert_histograms_close(qc, monkeypatch)
    refresh_facts_task()
    assert _waiting() == 0
    with read_session() as session:
        fact = session.get(QcExamFact, third.id)
        assert fact is not None and fact.rescan_reason == "motion"
        assert session.get(QcExamFact, exams[names[5]].id) is None
        clinics = set(session.execute(select(QcExamFact.clinic)).scalars())
        assert "C2X" in clinics and "C2" not in clinics
    _assert_same(qc, after)
    _assert_histograms_close(qc, monkeypatch)


def test_the_triggers_watch_every_column_the_facts_copy() -> None:
    """The migration's trigger column lists are the model's QC_FACT_SOURCES, and every
    source column of a fact is among them."""
    (path,) = (Path(__file__).parents[2] / "rdc_core/migrations/versions").glob("*_qc_facts.py")
    spec = importlib.util.spec_from_file_location("qc_facts_migration", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)

    def columns(text: str) -> tuple[str, ...]:
        return tuple(c.strip() for c in text.split(","))

    assert columns(migration._EXAM_COLUMNS) == QC_FACT_SOURCES["exams"]
    assert columns(migration._REPORT_COLUMNS) == QC_FACT_SOURCES["reports"]
    assert columns(migration._WORK_ITEM_COLUMNS) == QC_FACT_SOURCES["work_items"]
    copied = {c.name for c in QcExamFact.__table__.columns if not c.name.startswith("tat_")} - {
        "exam_id", "clinic", "reader", "has_work_item", "refreshed_at",
    }  # fmt: skip
    watched = set(QC_FACT_SOURCES["exams"]) | set(QC_FACT_SOURCES["reports"]) | {"due_at"}
    assert copied <= watched, copied - watched
    assert len(INDICATORS) == 28


def test_turnaround_and_critical_values_by_discipline(qc: Principal) -> None:
    """ECG and lab exams (April of the data set): turnaround per discipline, their own
    critical-value indicators, and the imaging ones "no data"; both paths."""
    refresh_facts_task()
    april = period_filters(start=qc_dataset.APRIL_DAYS[0], end=qc_dataset.APRIL_DAYS[1], tz=TZ)
    ecg_only = period_filters(
        start=qc_dataset.APRIL_DAYS[0], end=qc_dataset.APRIL_DAYS[1], tz=TZ, discipline="ecg"
    )
    with read_session() as session:
        for facts in (False, True):
            out = {
                i.code: i
                for i in compute_indicators(
                    session, principal=qc, filters=april, now=NOW, group_by="discipline",
                    facts=facts,
                )
            }  # fmt: skip
            for code, expected in qc_dataset.EXPECTED_APRIL.items():
                assert (out[code].numerator, out[code].denominator, out[code].rate) == expected
            groups = out["TAT-07"].groups or []
            assert {g.key: (g.p50, g.p90) for g in groups} == qc_dataset.EXPECTED_APRIL_TAT
            sla = {g.key: g.rate for g in out["SLA-01"].groups or []}
            assert sla == {"ecg": 50.0, "lab": 50.0}
            for code in ("RCV-04", "RWS-03", "RRC-02", "IQ-01"):
                assert out[code].status == "no_data", code
            ecg = {
                i.code: i
                for i in compute_indicators(
                    session, principal=qc, filters=ecg_only, now=NOW, facts=facts
                )
            }
            assert (ecg["TAT-07"].p50, ecg["TAT-07"].p90) == qc_dataset.EXPECTED_APRIL_TAT["ecg"]
            assert (ecg["ECG-02"].numerator, ecg["ECG-02"].denominator) == (1, 1)
            assert ecg["CL-14"].status == "no_data" and ecg["SLA-01"].rate == 50.0


def _rollup_rows() -> dict[str, set[tuple[Any, ...]]]:
    """The roll-up tables' rows, without those whose counters are all zero (differences
    that cancelled out leave them behind; a rebuild writes none)."""
    out: dict[str, set[tuple[Any, ...]]] = {}
    with read_session() as session:
        for table in (QcDaily, QcMonthly, QcTatHist):
            columns = list(table.__table__.columns)
            keys = [c for c in columns if c.primary_key]
            counters = [c for c in columns if not c.primary_key]
            out[table.__tablename__] = {
                tuple(row)
                for row in session.execute(select(*keys, *counters))
                if any(row[len(keys) :])
            }
    return out


def test_the_monthly_rollup_sums_the_days_and_a_rebuild_gives_the_same(qc: Principal) -> None:
    """qc_monthly is qc_daily summed by month, kept so by the refresh task's differences
    (an exam moved to another month, one cancelled) and by a rebuild from the facts."""
    refresh_facts_task()
    with session_scope() as session:
        exams = sorted(
            session.execute(select(Exam).where(Exam.accession_number.is_not(None))).scalars(),
            key=lambda e: e.accession_number or "",
        )
        exams[0].first_received_at = exams[0].first_received_at - timedelta(days=40)
        exams[1].state = ExamState.CANCELLED
    assert refresh_facts_task() > 0
    incremental = _rollup_rows()
    months: dict[tuple[Any, ...], list[int]] = {}
    for day, *dims_and_counts in incremental["qc_daily"]:
        dims, counts = tuple(dims_and_counts[:4]), dims_and_counts[4:]
        total = months.setdefault((day[:7], *dims), [0] * len(counts))
        for i, n in enumerate(counts):
            total[i] += n
    assert {(*k, *v) for k, v in months.items() if any(v)} == incremental["qc_monthly"]
    assert incremental["qc_monthly"] and incremental["qc_tat_hist"]
    with session_scope() as session:
        service.rebuild_rollup(session, now=NOW)
    assert _rollup_rows() == incremental
