"""QC indicators on a constructed data set with hand-computed figures (tests/worklist/
qc_dataset.py): boundaries (exactly 120 and 10 minutes, an amendment after the deadline,
an exam without a start time), filters, breakdowns, drill-down, "no data", targets."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from rdc_core.db import read_session, session_scope
from rdc_core.errors import InvalidInputError, PermissionDeniedError
from tests.worklist import qc_dataset
from worklist.access import Principal
from worklist.audit import AuditEvent, verify_chain
from worklist.directory import principal_for_user
from worklist.models import User
from worklist.qc import (
    compute_indicators,
    histogram,
    list_cases,
    list_targets,
    period_filters,
    set_target,
    target_history,
)
from worklist.qc.service import report_writing_failures

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
TZ = "Asia/Shanghai"


@pytest.fixture
def qc(database: str) -> dict[str, Principal]:
    with session_scope() as session:
        qc_dataset.build(session)
    with session_scope() as session:
        return {u.username: principal_for_user(u) for u in session.execute(select(User)).scalars()}


def _march(**kw: str) -> object:
    return period_filters(start=qc_dataset.MARCH[0], end=qc_dataset.MARCH[1], tz=TZ, **kw)


def _indicators(people: dict[str, Principal], **kw: object) -> dict[str, object]:
    filters = kw.pop("filters", None) or _march()
    with read_session() as session:
        out = compute_indicators(
            session,
            principal=people["qc"],
            filters=filters,
            now=NOW,
            **kw,  # type: ignore[arg-type]
        )
    return {i.code: i for i in out}


def test_each_indicator_matches_the_hand_computed_figures(qc: dict[str, Principal]) -> None:
    got = _indicators(qc)
    for code, (num, den, rate) in qc_dataset.EXPECTED.items():
        ind = got[code]
        assert (ind.numerator, ind.denominator, ind.rate) == (num, den, rate), code
    rrc = got["RRC-02"]
    assert rrc.target == 95.0 and rrc.status == "not_met" and rrc.direction == "higher"
    assert rrc.previous_value == 0.0 and rrc.change == 75.0  # E8 in February: 150 minutes
    assert got["IQ-02"].status == "not_met" and got["IQ-02"].direction == "lower"
    tat = got["TAT-07"]
    assert (tat.numerator, tat.denominator, tat.p50, tat.p90) == (5, 7, 115.0, 223.4)
    assert tat.value == 223.4
    assert got["ALL-01"].numerator == 5 and got["ALL-01"].denominator is None
    assert got["ALL-05"].numerator == 1 and got["ALL-06"].numerator == 1
    assert got["ALL-03"].rate == 50.0


def test_no_data_is_never_zero(qc: dict[str, Principal]) -> None:
    got = _indicators(qc)
    for code in (
        "ECG-01",
        "ECG-02",
        "ECG-03",
        "ECG-04",
        "CL-12",
        "LAB-01",
        "CL-14",
        "CL-15",
        "LAB-02",
    ):
        ind = got[code]
        assert ind.status == "no_data", code
        assert ind.value is None and ind.rate is None, code
        assert ind.numerator is None and ind.denominator is None, code
    assert got["ECG-03"].note
    # An empty period: rates have no data, counts are a real zero.
    empty = _indicators(
        qc, filters=period_filters(start=date(2025, 1, 1), end=date(2025, 1, 31), tz=TZ)
    )
    assert empty["RRC-02"].status == "no_data" and empty["RRC-02"].value is None
    assert empty["ALL-06"].value == 0 and empty["ALL-06"].status == "no_target"


def test_boundaries_show_in_the_cases(qc: dict[str, Principal]) -> None:
    with session_scope() as session:
        page = list_cases(session, principal=qc["qc"], code="RRC-02", filters=_march(), now=NOW)
        failing = list_cases(
            session, principal=qc["qc"], code="RRC-02", filters=_march(), now=NOW, subset="failing"
        )
        alerts = list_cases(session, principal=qc["qc"], code="RCV-04", filters=_march(), now=NOW)
        writing = list_cases(
            session, principal=qc["qc"], code="RWS-03", filters=_march(), now=NOW, subset="failing"
        )
    by_exam = {c.exam_id: c for c in page.items}
    assert page.total == 4
    assert by_exam["qc-E1"].minutes == 120.0 and by_exam["qc-E1"].in_numerator
    assert by_exam["qc-E2"].minutes == 100.0 and by_exam["qc-E2"].in_numerator  # amended later
    assert by_exam["qc-E3"].in_numerator and by_exam["qc-E3"].reason == "no_start_time"
    assert by_exam["qc-E3"].minutes == 110.0
    assert [c.exam_id for c in failing.items] == ["qc-E4"]
    assert failing.items[0].reason == "over_120_min" and failing.items[0].minutes == 121.0
    reasons = {c.case_id: (c.minutes, c.in_numerator, c.reason) for c in alerts.items}
    assert reasons == {
        "a-A1": (10.0, True, None),
        "a-A2": (11.0, False, "over_10_min"),
        "a-A3": (None, False, "not_acknowledged"),
    }
    assert {c.case_id: c.reason for c in writing.items} == {
        "r-E3-1": "placeholder",
        "r-E4-1": "unsigned",
        "r-E5-1": "laterality_left",
    }


def test_filters_and_breakdowns(qc: dict[str, Principal]) -> None:
    c2 = _indicators(qc, filters=_march(clinic="C2"))
    assert (c2["RRC-02"].numerator, c2["RRC-02"].denominator) == (0, 1)
    ct = _indicators(qc, filters=_march(modality="CT", priority="emergency"))
    assert (ct["RRC-02"].numerator, ct["RRC-02"].denominator) == (2, 3)
    assert _indicators(qc, filters=_march(reader="nobody"))["RRC-02"].status == "no_data"
    by_clinic = _indicators(qc, group_by="clinic", codes=["IQ-01"])["IQ-01"]
    assert {g.key: (g.numerator, g.denominator, g.rate) for g in by_clinic.groups} == {
        "C1": (2, 4, 50.0),
        "C2": (1, 1, 100.0),
    }
    year = period_filters(start=date(2026, 1, 1), end=date(2026, 3, 31), tz=TZ)
    by_month = _indicators(qc, filters=year, group_by="month", codes=["RRC-02"])["RRC-02"]
    assert {g.key: (g.numerator, g.denominator) for g in by_month.groups} == {
        "2026-02": (0, 1),
        "2026-03": (3, 4),
    }
    reasons = _indicators(qc, group_by="reason", codes=["ALL-06", "RWS-03"])
    assert [(g.key, g.numerator) for g in reasons["ALL-06"].groups] == [
        ("motion artefact 运动伪影", 1)
    ]
    assert {g.key for g in reasons["RWS-03"].groups} == {
        None,
        "placeholder",
        "unsigned",
        "laterality_left",
    }
    local_today = datetime.now(ZoneInfo(TZ)).date()
    today = period_filters(start=local_today, end=local_today, tz=TZ)
    assert _indicators(qc, filters=today, codes=["ALL-04"])["ALL-04"].value == 1.0
    with pytest.raises(InvalidInputError):
        _indicators(qc, group_by="patient")


def test_histogram_has_percentiles_and_the_limit(qc: dict[str, Principal]) -> None:
    with read_session() as session:
        h = histogram(session, principal=qc["qc"], code="RCV-04", filters=_march(), now=NOW)
        t = histogram(session, principal=qc["qc"], code="TAT-07", filters=_march(), now=NOW)
    assert h.n == 2 and h.threshold == 10.0 and sum(h.counts) == 2 and h.p50 == 10.5
    assert t.n == 5 and t.p50 == 115.0 and t.p90 == 223.4 and len(t.edges) == 21


def test_targets_are_versioned_audited_and_change_the_status(qc: dict[str, Principal]) -> None:
    with session_scope() as session:
        changed = set_target(
            session,
            principal=qc["qc"],
            code="rrc-02",
            target=70.0,
            warn_margin=5.0,
            note="county agreement 2026",
            now=NOW,
        )
    assert changed.version == 1 and changed.changed_by == "qc"
    with session_scope() as session:
        set_target(
            session,
            principal=qc["admin"],
            code="RRC-02",
            target=80.0,
            warn_margin=5.0,
            note="",
            now=NOW,
        )
    assert _indicators(qc)["RRC-02"].status == "warning"  # 75 against 80 - 5
    with read_session() as session:
        history = target_history(session, principal=qc["qc"], code="RRC-02")
        current = {t.code: t for t in list_targets(session, principal=qc["qc"])}
        events = (
            session.execute(
                select(AuditEvent.detail)
                .where(AuditEvent.action == "set_qc_target")
                .order_by(AuditEvent.seq)
            )
            .scalars()
            .all()
        )
        assert verify_chain(session)[0]
    assert [(t.version, t.target, t.changed_by) for t in history] == [
        (2, 80.0, "admin"),
        (1, 70.0, "qc"),
    ]
    assert current["RRC-02"].target == 80.0 and current["IQ-01"].version == 0
    assert events[0]["before"] == {"target": 95.0, "warn_margin": 3.0}
    assert events[1]["after"] == {"target": 80.0, "warn_margin": 5.0}
    with session_scope() as session, pytest.raises(InvalidInputError):
        set_target(
            session, principal=qc["qc"], code="IQ-01", target=120.0, warn_margin=0, note="", now=NOW
        )
    with session_scope() as session, pytest.raises(PermissionDeniedError):
        set_target(
            session,
            principal=qc["attending"],
            code="IQ-01",
            target=80.0,
            warn_margin=0,
            note="",
            now=NOW,
        )


def test_only_qc_staff_and_administrators(qc: dict[str, Principal]) -> None:
    for name in ("attending", "tech"):
        with read_session() as session, pytest.raises(PermissionDeniedError):
            compute_indicators(session, principal=qc[name], filters=_march(), now=NOW)
    assert _indicators({"qc": qc["admin"]})["RRC-02"].denominator == 4


@pytest.mark.parametrize(
    ("findings", "impression", "expected"),
    [
        ("右肺上叶结节。", "右肺上叶结节。", []),
        ("双肺纹理增多。", "左肺炎症。", []),
        ("右侧胸腔积液。", "左侧胸腔积液。", ["laterality_left"]),
        ("Right lower lobe opacity.", "Left pneumonia.", ["laterality_left"]),
        ("结节大小约 xx mm。", "结节。", ["placeholder"]),
        ("见【部位】病灶。", "病灶。", ["placeholder"]),
        ("", "未见异常。", ["missing_findings"]),
    ],
)
def test_report_writing_rules(findings: str, impression: str, expected: list[str]) -> None:
    assert (
        report_writing_failures(
            signed=True, findings=findings, impression=impression, grade="甲", discipline="imaging"
        )
        == expected
    )


def test_the_monthly_report_is_stored_once(qc: dict[str, Principal]) -> None:
    from rdc_core.settings import get_settings
    from rdc_core.storage import get_object_store
    from rdc_core.tasks import registered_periodic_tasks
    from worklist.qc.monthly import report_key, store_last_month
    from worklist.qc.tasks import STORE_MONTHLY_QC_REPORT

    assert STORE_MONTHLY_QC_REPORT in {p.name for p in registered_periodic_tasks()}
    store = get_object_store(get_settings())
    april_first = datetime(2026, 3, 31, 16, 30, tzinfo=UTC)  # 00:30 on 1 April in Shanghai
    with read_session() as session:
        key = store_last_month(session, store=store, tz=TZ, now=april_first, alliance="RDC")
        again = store_last_month(session, store=store, tz=TZ, now=april_first, alliance="RDC")
    assert key == report_key("2026-03") and again is None
    with store.open(key) as f:
        assert f.read(5) == b"%PDF-"


def test_stored_report_checks_give_the_same_figures(qc: dict[str, Principal]) -> None:
    from worklist.models import Report
    from worklist.qc.models import QcReportCheck
    from worklist.qc.service import check_reports

    with session_scope() as session:
        first, last = check_reports(session, now=NOW, limit=4)
        rest, _ = check_reports(session, now=NOW, after=last)
        assert (first, rest) == (4, 3)  # E8 (February) too
    with session_scope() as session:
        assert check_reports(session, now=NOW) == (0, None)  # each report is checked once
        stored = {
            c.report_id: (c.compliant, c.reasons)
            for c in session.execute(select(QcReportCheck)).scalars()
        }
    assert stored["r-E5-1"] == (False, "laterality_left")
    assert stored["r-E1-1"] == (True, None)
    ind = _indicators(qc, codes=["RWS-03"], group_by="reason")["RWS-03"]
    assert (ind.numerator, ind.denominator, ind.rate) == qc_dataset.EXPECTED["RWS-03"]
    assert {g.key for g in ind.groups} == {None, "placeholder", "unsigned", "laterality_left"}
    # The stored result is what counts (a signed report never changes; this one is forced).
    with session_scope() as session:
        report = session.get(Report, "r-E1-1")
        assert report is not None
        report.findings = "结节大小约 xx mm。"
    assert _indicators(qc, codes=["RWS-03"])["RWS-03"].numerator == 3
    with session_scope() as session:
        failing = list_cases(
            session,
            principal=qc["qc"],
            code="RWS-03",
            filters=_march(),
            now=NOW,
            subset="failing",
        )
    assert {c.case_id for c in failing.items} == {"r-E3-1", "r-E4-1", "r-E5-1"}


@pytest.mark.parametrize("group_by", [None, "clinic", "month"])
def test_turnaround_in_one_pass_equals_one_by_one(
    qc: dict[str, Principal], group_by: str | None
) -> None:
    together = _indicators(qc, group_by=group_by, family="turnaround")
    for code in ("TAT-01", "TAT-03", "TAT-04", "TAT-07"):
        alone = _indicators(qc, group_by=group_by, codes=[code])[code]
        assert together[code].model_dump() == alone.model_dump(), code
    assert together["TAT-07"].p90 == 223.4
