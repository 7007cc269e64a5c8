"""One order end to end: version, mapping, auto-verification; a correction re-verified."""

from __future__ import annotations

from lab_results import evaluate_order, load_catalogue, load_rules
from tests.lab_results.lab_messages import FACILITY, message, obx

K, NA = "2823-3", "2951-2"


def test_critical_then_corrected_to_normal() -> None:
    catalogue, rules = load_catalogue(), load_rules()
    first = message(obx(K, "6.5", "mmol/L", flags="HH"), obx(NA, "140", "mmol/L"))
    v1 = evaluate_order(
        first.orders[0], control_id="M1", facility=FACILITY, catalogue=catalogue, rules=rules
    )
    assert v1 is not None
    assert v1.version.version == 1
    assert v1.verification.verdict == "hold"
    assert {f.limit for f in v1.verification.critical_findings} == {">= 6.2", "flag HH"}

    correction = message(obx(K, "4.5", "mmol/L", status="C"), control_id="M2")
    v2 = evaluate_order(
        correction.orders[0],
        control_id="M2",
        facility=FACILITY,
        catalogue=catalogue,
        rules=rules,
        previous=v1.version,
    )
    assert v2 is not None
    assert (v2.version.version, v2.version.kind) == (2, "correction")
    # both results are verified again: the corrected K and the carried-over Na
    assert [r.code for r in v2.verification.results] == [K, NA]
    assert v2.verification.critical_findings == []
    assert v2.verification.verdict == "release"

    again = evaluate_order(
        correction.orders[0],
        control_id="M3",
        facility=FACILITY,
        catalogue=catalogue,
        rules=rules,
        previous=v2.version,
    )
    assert again is None


def test_unmapped_codes_are_listed_for_the_queue_and_the_stop_switch_holds() -> None:
    msg = message(obx("XK", "4.2", "mmol/L", system="L"), obx(NA, "140", "mmol/L"))
    result = evaluate_order(
        msg.orders[0],
        control_id="M1",
        facility=FACILITY,
        catalogue=load_catalogue(),
        rules=load_rules(),
        stop_switch=True,
    )
    assert result is not None
    assert [(u.facility, u.code) for u in result.unmapped] == [(FACILITY, "XK")]
    assert result.verification.verdict == "hold"
    mapped_locally = evaluate_order(
        msg.orders[0],
        control_id="M1",
        facility=FACILITY,
        catalogue=load_catalogue(),
        rules=load_rules(),
        local_mappings={(FACILITY, "XK"): K},
    )
    assert mapped_locally is not None
    assert mapped_locally.unmapped == []
    assert mapped_locally.verification.verdict == "release"
