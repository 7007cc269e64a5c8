"""Corrected results (OBX-11 C) make a new version of the order's results; history is kept."""

from __future__ import annotations

import pytest

from lab_results import apply_correction
from lab_results.corrections import result_key
from tests.lab_results.lab_messages import message, obx

K, NA, GLU = "2823-3", "2951-2", "14749-6"


def _original():
    msg = message(obx(K, "6.5", "mmol/L", flags="HH"), obx(NA, "140", "mmol/L"), control_id="M1")
    version = apply_correction(None, msg.orders[0], control_id="M1")
    assert version is not None
    return version


def test_first_message_is_version_one() -> None:
    v1 = _original()
    assert (v1.version, v1.kind, v1.order_key, v1.control_id) == (1, "original", "FL-1", "M1")
    assert [c.change for c in v1.changes] == ["added", "added"]
    assert v1.previous_version is None


def test_a_correction_makes_version_two_and_keeps_version_one() -> None:
    v1 = _original()
    corrected = message(obx(K, "4.5", "mmol/L", status="C"), control_id="M2")
    v2 = apply_correction(v1, corrected.orders[0], control_id="M2")
    assert v2 is not None
    assert (v2.version, v2.kind, v2.previous_version, v2.control_id) == (2, "correction", 1, "M2")
    (change,) = v2.changes
    assert change.model_dump() == {
        "key": f"LN|{K}|",
        "change": "corrected",
        "previous_value": "6.5",
        "value": "4.5",
        "previous_status": "F",
        "status": "C",
    }
    k2 = v2.result(f"LN|{K}|")
    assert k2 is not None and (k2.value, k2.status, k2.flags) == ("4.5", "C", [])
    na2 = v2.result(f"LN|{NA}|")
    assert na2 is not None and na2.value == "140"  # not re-sent: carried over
    # history: version 1 is untouched
    k1 = v1.result(f"LN|{K}|")
    assert k1 is not None and (k1.value, k1.status, k1.flags) == ("6.5", "F", ["HH"])
    assert v2.warnings == []


def test_resending_the_same_results_makes_no_new_version() -> None:
    v1 = _original()
    again = message(obx(K, "6.5", "mmol/L", flags="HH"), obx(NA, "140", "mmol/L"), control_id="M3")
    assert apply_correction(v1, again.orders[0], control_id="M3") is None


def test_preliminary_to_final_is_an_update_and_new_results_are_added() -> None:
    prelim = message(obx(K, "4.0", "mmol/L", status="P"))
    v1 = apply_correction(None, prelim.orders[0], control_id="M1")
    assert v1 is not None
    final = message(obx(K, "4.1", "mmol/L"), obx(GLU, "5.0", "mmol/L"))
    v2 = apply_correction(v1, final.orders[0], control_id="M2")
    assert v2 is not None and v2.kind == "update"
    assert [(c.key, c.change) for c in v2.changes] == [
        (f"LN|{K}|", "updated"),
        (f"LN|{GLU}|", "added"),
    ]
    assert v2.warnings == []


def test_deleted_results_leave_the_new_version() -> None:
    v1 = _original()
    deleted = message(obx(NA, "", "mmol/L", status="D"))
    v2 = apply_correction(v1, deleted.orders[0], control_id="M2")
    assert v2 is not None
    assert [result_key(r) for r in v2.results] == [f"LN|{K}|"]
    assert v2.changes[0].change == "deleted"
    assert len(v1.results) == 2


def test_a_final_result_changed_without_c_is_versioned_with_a_warning() -> None:
    v1 = _original()
    changed = message(obx(NA, "150", "mmol/L"))
    v2 = apply_correction(v1, changed.orders[0], control_id="M2")
    assert v2 is not None and v2.kind == "update"
    assert v2.warnings == [f"LN|{NA}|: final result changed without OBX-11 C"]


def test_a_correction_without_an_original_is_kept_with_a_warning() -> None:
    msg = message(obx(K, "4.5", "mmol/L", status="C"))
    v1 = apply_correction(None, msg.orders[0], control_id="M9")
    assert v1 is not None and v1.version == 1
    assert v1.warnings == ["corrected results (OBX-11 C) for an order with no earlier version"]


def test_sub_ids_tell_repeated_codes_apart() -> None:
    msg = message(obx(K, "4.0", "mmol/L", sub_id="1"), obx(K, "4.4", "mmol/L", sub_id="2"))
    v1 = apply_correction(None, msg.orders[0], control_id="M1")
    assert v1 is not None and len(v1.results) == 2
    fix = message(obx(K, "4.3", "mmol/L", sub_id="2", status="C"))
    v2 = apply_correction(v1, fix.orders[0], control_id="M2")
    assert v2 is not None
    assert [r.value for r in v2.results] == ["4.0", "4.3"]


def test_another_orders_message_is_refused() -> None:
    v1 = _original()
    other = message(obx(K, "4.5", "mmol/L", status="C"), filler="FL-2")
    with pytest.raises(ValueError, match="FL-2"):
        apply_correction(v1, other.orders[0], control_id="M2")
