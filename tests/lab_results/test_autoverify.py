"""Auto-verification: each rule type, pass and hold; critical values; the stop switch."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from lab_results import (
    AUTOVERIFIED_MARK,
    AutoverificationResult,
    PriorResult,
    RuleSet,
    autoverify,
    load_rules,
    reference_change_value,
)
from tests.lab_results.lab_messages import mapped, obx

RULES = load_rules()
COLLECTED = datetime(2026, 2, 28, 23, 0, tzinfo=UTC)  # 20260301070000 in Asia/Shanghai

K, NA, GLU = "2823-3", "2951-2", "14749-6"
TC, HDL, LDL, ALB, TP = "14647-2", "14646-4", "22748-8", "1751-7", "2885-2"
HGB, PLT, WBC, INR, BCX, UA = "718-7", "777-3", "6690-2", "6301-6", "600-7", "14933-6"


def outcome(result: AutoverificationResult, rule_id: str, index: int = 0) -> tuple[str, str]:
    matches = [o for o in result.results[index].trace if o.rule_id == rule_id]
    assert len(matches) == 1, (rule_id, result.results[index].trace)
    return matches[0].verdict, matches[0].reason


def test_a_normal_panel_is_released_with_a_full_trace() -> None:
    order = mapped(
        obx(K, "4.2", "mmol/L", flags="N"),
        obx(NA, "140", "mmol/L"),
        obx(GLU, "5.2", "mmol/L"),
        obx(TC, "4.8", "mmol/L"),
        obx(HDL, "1.3", "mmol/L"),
        obx(LDL, "2.9", "mmol/L"),
    )
    result = autoverify(order, [], RULES)
    assert result.verdict == "release"
    assert result.mark == AUTOVERIFIED_MARK == "自动审核"
    assert result.critical_findings == []
    for r in result.results:
        assert r.verdict == "pass"
        assert {o.verdict for o in r.trace} == {"pass"}
    trace = [o.model_dump() for o in result.results[0].trace]
    assert {
        "rule_id": "result_status",
        "version": "autoverify-2026.1",
        "verdict": "pass",
        "reason": "OBX-11 F",
    } in trace
    assert {o["rule_id"] for o in trace} >= {
        "result_status",
        "mapping",
        "missing_value",
        "non_numeric",
        "unit",
        "instrument_flags",
        "specimen_quality",
        "reportable_range",
        "critical_limits",
        "reference_range",
        "delta_check",
    }
    critical = next(o for o in trace if o["rule_id"] == "critical_limits")
    assert critical["version"] == "critical-2026.1"
    assert [o.rule_id for o in result.results[5].trace if o.rule_id.startswith("logic:")] == [
        "logic:lipid_ldl_hdl_le_tc"
    ]


@pytest.mark.parametrize(
    ("line", "rule_id", "verdict", "reason"),
    [
        (obx(K, "4.2", "mmol/L", status="F"), "result_status", "pass", "OBX-11 F"),
        (obx(K, "4.2", "mmol/L", status="C"), "result_status", "pass", "OBX-11 C"),
        (obx(K, "4.2", "mmol/L", status="P"), "result_status", "hold", "OBX-11 P is not final"),
        (obx(K, "", "mmol/L", status="X"), "missing_value", "hold", "no result value"),
        (obx(K, "4.2", "mmol/L"), "missing_value", "pass", "value present"),
        (
            obx(K, "haemolysed", "mmol/L", value_type="ST"),
            "non_numeric",
            "hold",
            "value 'haemolysed' is not a number",
        ),
        (obx(K, "4.2", "mmol/L"), "non_numeric", "pass", "numeric value"),
        (obx(K, "16.5", "mg/dL"), "unit", "hold", "unit mg/dL is not the catalogue's mmol/L"),
        (obx(K, "4.2", "mmol/l"), "unit", "pass", "unit mmol/L"),
        (obx(K, "4.2", "mmol/L", flags="W"), "instrument_flags", "hold", "flag W (OBX-8)"),
        (
            obx(K, ">10", "mmol/L", flags=">", value_type="ST"),
            "instrument_flags",
            "hold",
            "flag > (OBX-8)",
        ),
        (
            obx(K, ">10", "mmol/L", value_type="ST"),
            "instrument_flags",
            "hold",
            "censored value >10 (outside measuring range)",
        ),
        (obx(K, "4.2", "mmol/L", flags="N"), "instrument_flags", "pass", "no instrument flags"),
        (
            obx(K, "12.0", "mmol/L"),
            "reportable_range",
            "hold",
            "12 outside the reportable range [1, 10]: dilute or repeat",
        ),
        (obx(K, "4.2", "mmol/L"), "reportable_range", "pass", "4.2 within [1, 10]"),
        (
            obx(K, "5.6", "mmol/L", flags="H"),
            "reference_range",
            "hold",
            "5.6 outside [3.5, 5.3] (rule set)",
        ),
        (obx(K, "4.2", "mmol/L"), "reference_range", "pass", "4.2 within [3.5, 5.3] (rule set)"),
        (
            obx(GLU, "8.0", "mmol/L", flags="H"),
            "reference_range",
            "pass",
            "8 outside [3.9, 6.1] but within the release limits [3.5, 11.1]",
        ),
        (
            obx(GLU, "12.0", "mmol/L", flags="H"),
            "reference_range",
            "hold",
            "12 outside [3.9, 6.1] (rule set)",
        ),
        (
            obx(K, "4.2", "mmol/L", system="L"),
            "mapping",
            "hold",
            "local code 2823-3 of CLINIC_A has no mapping: waiting in the mapping queue",
        ),
        (obx(K, "4.2", "mmol/L"), "mapping", "pass", "K LOINC 2823-3 (loinc)"),
        (
            obx("1834-1", "3.0", "ng/mL"),
            "rules_configured",
            "hold",
            "no auto-verification rules for AFP",
        ),
    ],
)
def test_rule_table(line: str, rule_id: str, verdict: str, reason: str) -> None:
    result = autoverify(mapped(line), [], RULES)
    assert outcome(result, rule_id) == (verdict, reason)
    if verdict == "hold":
        assert result.verdict == "hold" and result.mark is None
        assert any(reason in r for r in result.hold_reasons)


def test_critical_potassium_opens_a_finding_with_its_limit() -> None:
    result = autoverify(mapped(obx(K, "6.5", "mmol/L", flags="H")), [], RULES)
    assert result.verdict == "hold"
    assert result.results[0].verdict == "critical"
    (finding,) = result.critical_findings
    assert finding.model_dump() == {
        "analyte": "K",
        "name_zh": "钾",
        "code": "2823-3",
        "value": "6.5",
        "numeric": 6.5,
        "unit": "mmol/L",
        "limit": ">= 6.2",
        "direction": "high",
    }
    assert outcome(result, "critical_limits") == (
        "critical",
        "6.5 mmol/L is critical (high: >= 6.2 mmol/L)",
    )


@pytest.mark.parametrize(
    ("line", "limit", "direction"),
    [
        (obx(K, "2.8", "mmol/L"), "<= 2.8", "low"),  # inclusive
        (obx(K, "6.2", "mmol/L"), ">= 6.2", "high"),
        (obx(NA, "120", "mmol/L"), "<= 120", "low"),
        (obx(NA, "161", "mmol/L"), ">= 160", "high"),
        (obx(GLU, "2.1", "mmol/L"), "<= 2.2", "low"),
        (obx(GLU, "25", "mmol/L"), ">= 24.8", "high"),
        (obx("2000-8", "1.4", "mmol/L"), "<= 1.5", "low"),
        (obx("2000-8", "3.3", "mmol/L"), ">= 3.25", "high"),
        (obx(HGB, "69", "g/L"), "< 70", "low"),
        (obx(PLT, "29", "10*9/L"), "< 30", "low"),
        (obx(WBC, "1.9", "10*9/L"), "< 2", "low"),
        (obx(WBC, "30.1", "10*9/L"), "> 30", "high"),
        (obx(INR, "3.6", "{INR}"), "> 3.5", "high"),
    ],
)
def test_critical_limit_seed_table(line: str, limit: str, direction: str) -> None:
    (finding,) = autoverify(mapped(line), [], RULES).critical_findings
    assert (finding.limit, finding.direction) == (limit, direction)


@pytest.mark.parametrize(
    "line",
    [
        obx(K, "2.9", "mmol/L"),
        obx(K, "6.1", "mmol/L"),
        obx(HGB, "70", "g/L"),  # "< 70": 70 itself is not critical
        obx(PLT, "30", "10*9/L"),
        obx(WBC, "30", "10*9/L"),
        obx(INR, "3.5", "{INR}"),
        obx(K, "6.5", "mg/dL"),  # another unit: not compared (held by the unit rule)
    ],
)
def test_values_at_or_inside_the_limits_are_not_critical(line: str) -> None:
    assert autoverify(mapped(line), [], RULES).critical_findings == []


@pytest.mark.parametrize(("flag", "direction"), [("LL", "low"), ("HH", "high"), ("AA", "abnormal")])
def test_sender_flags_ll_hh_count_as_critical(flag: str, direction: str) -> None:
    result = autoverify(mapped(obx(K, "4.2", "mmol/L", flags=flag)), [], RULES)
    (finding,) = result.critical_findings
    assert (finding.analyte, finding.limit, finding.direction) == ("K", f"flag {flag}", direction)
    assert result.verdict == "hold"
    # an unmapped code flagged HH still reaches the critical-value loop
    unmapped = autoverify(mapped(obx("LOCAL1", "99", "U/L", flags=flag, system="L")), [], RULES)
    assert [f.analyte for f in unmapped.critical_findings] == ["LOCAL1"]


def test_positive_blood_culture_is_critical_and_no_growth_is_not() -> None:
    positive = autoverify(
        mapped(obx(BCX, "3092008^Staphylococcus aureus^SCT", value_type="CWE")), [], RULES
    )
    (finding,) = positive.critical_findings
    assert (finding.analyte, finding.limit) == ("BCX", "positive blood culture")
    assert positive.verdict == "hold"
    negative = autoverify(mapped(obx(BCX, "264868006^No growth^SCT", value_type="CWE")), [], RULES)
    assert negative.critical_findings == []
    assert negative.verdict == "release"
    text = autoverify(mapped(obx(BCX, "阳性，检出革兰阳性球菌", value_type="ST")), [], RULES)
    assert len(text.critical_findings) == 1


def test_stop_switch_never_releases_but_still_reports_criticals() -> None:
    normal = mapped(obx(K, "4.2", "mmol/L"))
    assert autoverify(normal, [], RULES).verdict == "release"
    stopped = autoverify(normal, [], RULES, stop_switch=True)
    assert stopped.verdict == "hold" and stopped.mark is None
    assert [(o.rule_id, o.verdict) for o in stopped.order_trace] == [("stop_switch", "hold")]
    assert stopped.results[0].verdict == "pass"
    critical = autoverify(mapped(obx(K, "7.0", "mmol/L")), [], RULES, stop_switch=True)
    assert len(critical.critical_findings) == 1


def test_rcv_formula_against_a_hand_computed_value() -> None:
    # √2 · 1.96 · √(2.0² + 4.6²) = 1.41421356 · 1.96 · 5.01597448 = 13.9036 %
    assert reference_change_value(2.0, 4.6, 1.96) == pytest.approx(13.9036, abs=1e-4)
    assert reference_change_value(2.0, 4.6, 2.58) == pytest.approx(
        math.sqrt(2) * 2.58 * math.sqrt(25.16)
    )


def _prior(analyte: str, value: float, days: float, unit: str = "mmol/L") -> PriorResult:
    return PriorResult(
        analyte=analyte, value=value, unit=unit, observed_at=COLLECTED - timedelta(days=days)
    )


@pytest.mark.parametrize(
    ("line", "priors", "verdict", "reason"),
    [
        (
            obx(K, "4.6", "mmol/L"),
            [_prior("K", 4.0, 2)],
            "hold",
            "exceeds: change +15.0 % since 2026-02-26 (prior 4) vs RCV 13.9 %",
        ),
        (
            obx(K, "4.5", "mmol/L"),
            [_prior("K", 4.0, 2)],
            "pass",
            "change +12.5 % since 2026-02-26 (prior 4) vs RCV 13.9 %",
        ),
        # the latest prior within the window counts
        (
            obx(K, "4.5", "mmol/L"),
            [_prior("K", 3.6, 5), _prior("K", 4.4, 1)],
            "pass",
            "change +2.3 % since 2026-02-27 (prior 4.4) vs RCV 13.9 %",
        ),
        (obx(K, "4.6", "mmol/L"), [_prior("K", 3.6, 8)], "pass", "no prior result within 7 days"),
        (obx(K, "4.6", "mmol/L"), [_prior("NA", 140, 1)], "pass", "no prior result"),
        (
            obx(NA, "146", "mmol/L"),
            [_prior("NA", 137, 1)],
            "hold",
            "exceeds: change +9 mmol/L since 2026-02-27 vs limit 8",
        ),
        (
            obx(NA, "144", "mmol/L"),
            [_prior("NA", 137, 1)],
            "pass",
            "change +7 mmol/L since 2026-02-27 vs limit 8",
        ),
        (
            obx("1742-6", "36", "U/L"),
            [_prior("ALT", 20, 10, "U/L")],
            "hold",
            "exceeds: change +80.0 % since 2026-02-18 (prior 20) vs limit 50.0 %",
        ),
        (
            obx(K, "4.6", "mmol/L"),
            [_prior("K", 4.0, 1, "mg/dL")],
            "hold",
            "prior result is in mg/dL, not mmol/L",
        ),
    ],
)
def test_delta_check(line: str, priors: list[PriorResult], verdict: str, reason: str) -> None:
    assert outcome(autoverify(mapped(line), priors, RULES), "delta_check") == (verdict, reason)


def test_delta_check_rate_per_day() -> None:
    data = RULES.model_dump()
    data["analytes"]["CREA"]["delta"] = {"method": "rate", "limit": 20, "lookback_days": 10}
    rules = RuleSet.model_validate(data)
    line = obx("14682-9", "100", "umol/L")
    held = autoverify(mapped(line), [_prior("CREA", 40, 2, "umol/L")], rules)
    assert outcome(held, "delta_check") == (
        "hold",
        "exceeds: change +30.00 umol/L/day since 2026-02-26 vs limit 20",
    )
    passed = autoverify(mapped(line), [_prior("CREA", 80, 2, "umol/L")], rules)
    assert outcome(passed, "delta_check")[0] == "pass"


def test_logic_ldl_plus_hdl_above_tc_holds_all_three() -> None:
    order = mapped(obx(TC, "4.5", "mmol/L"), obx(HDL, "1.5", "mmol/L"), obx(LDL, "3.5", "mmol/L"))
    result = autoverify(order, [], RULES)
    assert result.verdict == "hold"
    for i in range(3):
        verdict, reason = outcome(result, "logic:lipid_ldl_hdl_le_tc", i)
        assert verdict == "hold"
        assert reason == "LDL-C + HDL-C ≤ TC: LDL + HDL = 5, TC = 4.5 (violated)"
    ok = autoverify(
        mapped(obx(TC, "4.5", "mmol/L"), obx(HDL, "1.5", "mmol/L"), obx(LDL, "2.9", "mmol/L")),
        [],
        RULES,
    )
    assert outcome(ok, "logic:lipid_ldl_hdl_le_tc") == (
        "pass",
        "LDL-C + HDL-C ≤ TC: LDL + HDL = 4.4, TC = 4.5",
    )
    assert ok.verdict == "release"


def test_logic_albumin_above_total_protein_holds() -> None:
    result = autoverify(mapped(obx(ALB, "50", "g/L"), obx(TP, "45", "g/L")), [], RULES)
    assert outcome(result, "logic:albumin_le_total_protein")[0] == "hold"
    assert outcome(result, "logic:albumin_le_total_protein", 1)[0] == "hold"
    # a logic rule whose analytes are not all in the order does not apply
    alone = autoverify(mapped(obx(ALB, "45", "g/L")), [], RULES)
    assert not [o for o in alone.results[0].trace if o.rule_id.startswith("logic:")]


HEM_SPM = "SPM|1|S1||SER|||||||||||||20260301070000|20260301073000||||||HEM^Hemolyzed^HL70493"
CLOT_SPM = "SPM|1|S1||BLD|||||||||||||20260301070000|20260301073000||||||CLOT^Clotted^HL70493"


def test_specimen_condition_holds_the_analytes_it_affects() -> None:
    result = autoverify(
        mapped(obx(K, "4.2", "mmol/L"), obx(NA, "140", "mmol/L"), spm=HEM_SPM), [], RULES
    )
    assert outcome(result, "specimen_quality", 0) == ("hold", "specimen condition HEM (SPM-24)")
    assert outcome(result, "specimen_quality", 1) == ("pass", "specimen acceptable")
    assert result.verdict == "hold"
    clotted = autoverify(mapped(obx(NA, "140", "mmol/L"), spm=CLOT_SPM), [], RULES)
    assert outcome(clotted, "specimen_quality")[0] == "hold"


def test_hil_indices_against_per_analyte_thresholds() -> None:
    high = autoverify(
        mapped(obx(K, "4.2", "mmol/L"), obx("HIL-H", "80", "", system="L")), [], RULES
    )
    assert len(high.results) == 1  # the index is not a result
    assert outcome(high, "specimen_quality") == ("hold", "hemolysis index 80 > 50")
    low = autoverify(mapped(obx(K, "4.2", "mmol/L"), obx("HIL-H", "30", "", system="L")), [], RULES)
    assert outcome(low, "specimen_quality") == ("pass", "specimen acceptable")
    assert low.verdict == "release"


def test_sex_specific_reference_range() -> None:
    line = obx(UA, "400", "umol/L")
    assert (
        outcome(autoverify(mapped(line, sex="F"), [], RULES, sex="F"), "reference_range")[0]
        == "hold"
    )
    assert outcome(autoverify(mapped(line), [], RULES, sex="M"), "reference_range")[0] == "pass"


def test_reference_range_from_obx7_when_the_rule_set_has_none() -> None:
    data = RULES.model_dump()
    data["analytes"]["K"]["reference_range"] = None
    rules = RuleSet.model_validate(data)
    result = autoverify(mapped(obx(K, "5.6", "mmol/L", ref="3.5-5.8")), [], rules)
    assert outcome(result, "reference_range") == ("pass", "5.6 within [3.5, 5.8] (OBX-7)")
    none = autoverify(mapped(obx(K, "5.6", "mmol/L")), [], rules)
    assert outcome(none, "reference_range") == ("hold", "no reference range configured or sent")


def test_an_order_without_results_is_held() -> None:
    result = autoverify(mapped(), [], RULES)
    assert result.verdict == "hold"
    assert result.order_trace[0].reason == "the order has no results"


@pytest.mark.parametrize(
    ("value", "verdict"), [("NEG", "pass"), ("阴性", "pass"), ("2+", "hold"), ("+-", "hold")]
)
def test_qualitative_results_release_only_when_normal(value: str, verdict: str) -> None:
    result = autoverify(mapped(obx("20454-5", value, value_type="ST")), [], RULES)
    assert outcome(result, "qualitative_value")[0] == verdict
    assert result.verdict == ("release" if verdict == "pass" else "hold")


def test_unrecognised_blood_culture_text_is_held_not_guessed() -> None:
    result = autoverify(mapped(obx(BCX, "pending review", value_type="ST")), [], RULES)
    assert outcome(result, "critical_qualitative") == (
        "hold",
        "result 'pending review' not recognised",
    )
    assert result.critical_findings == []
