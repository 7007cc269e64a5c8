"""Pre-screen rule table: each seeded rule fires on the ECG it describes and not on others."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ecg_service import analyse, load_rules, prescreen, synthesize_ecg
from ecg_service.prescreen import DEFAULT_RULES_PATH

CASES = {
    "normal": dict(heart_rate_bpm=72),
    "brady30": dict(heart_rate_bpm=30, duration_s=12),
    "brady40": dict(heart_rate_bpm=40, duration_s=12),
    "pause35": dict(heart_rate_bpm=70, pauses=[(4.0, 3.5)]),
    "pause25": dict(heart_rate_bpm=70, pauses=[(4.0, 2.5)]),
    "long_qt": dict(heart_rate_bpm=60, qt_ms=600),
    "qt_520": dict(heart_rate_bpm=60, qt_ms=520),
    "wide_fast": dict(heart_rate_bpm=160, qrs_ms=140, pr_ms=120, p_ms=70, qt_ms=240),
    "narrow_fast": dict(heart_rate_bpm=160, qrs_ms=85, pr_ms=120, p_ms=70, qt_ms=240),
    "wide_slow": dict(heart_rate_bpm=80, qrs_ms=140),
    "af_short_rr": dict(heart_rate_bpm=150, irregular=True, qt_ms=220),
    "af_slow": dict(heart_rate_bpm=75, irregular=True),
}


@pytest.fixture(scope="module")
def matched() -> dict[str, set[str]]:
    out = {}
    for name, kw in CASES.items():
        rec, _ = synthesize_ecg(seed=11, **kw)  # type: ignore[arg-type]
        out[name] = {m.code for m in prescreen(analyse(rec))}
    return out


@pytest.mark.parametrize(
    ("code", "fires_on", "silent_on"),
    [
        ("CV-BRADY-35", ["brady30"], ["brady40", "normal", "pause35"]),
        ("CV-PAUSE-3S", ["pause35"], ["pause25", "brady30", "normal"]),
        ("CV-QTC-550", ["long_qt"], ["qt_520", "normal"]),
        ("MP-QTC-500", ["qt_520"], ["long_qt", "normal"]),
        ("CV-WIDE-TACHY-150", ["wide_fast"], ["narrow_fast", "wide_slow", "normal"]),
        ("CV-IRREG-SHORT-RR-250", ["af_short_rr"], ["af_slow", "narrow_fast", "normal"]),
    ],
)
def test_rule_fires_and_stays_silent(matched, code, fires_on, silent_on) -> None:
    for name in fires_on:
        assert code in matched[name], (name, matched[name])
    for name in silent_on:
        assert code not in matched[name], (name, matched[name])


def test_normal_ecg_matches_nothing(matched) -> None:
    assert matched["normal"] == set()


def test_match_carries_reasons_and_labels() -> None:
    rec, _ = synthesize_ecg(heart_rate_bpm=160, qrs_ms=140, pr_ms=120, p_ms=70, qt_ms=240)
    (match,) = prescreen(analyse(rec))
    assert match.code == "CV-WIDE-TACHY-150" and match.tier == "critical"
    assert "宽QRS" in match.label_zh and "Wide-complex" in match.label_en
    assert match.reasons[0].startswith("measurements.heart_rate_bpm = 160 ≥ 150")
    assert match.reasons[1].startswith("measurements.qrs_ms = ")


def test_a_province_overrides_the_table(tmp_path: Path) -> None:
    table = yaml.safe_load(DEFAULT_RULES_PATH.read_text("utf-8"))
    for rule in table["rules"]:
        if rule["code"] == "CV-BRADY-35":  # Zhejiang: mean rate < 40
            rule["all"] = [{"field": "rhythm.mean_rate_bpm", "op": "<", "value": 40.5}]
    path = tmp_path / "zj.yaml"
    path.write_text(yaml.safe_dump(table, allow_unicode=True), "utf-8")
    rec, _ = synthesize_ecg(heart_rate_bpm=40, duration_s=12, seed=11)
    a = analyse(rec)
    assert "CV-BRADY-35" not in {m.code for m in prescreen(a)}
    assert "CV-BRADY-35" in {m.code for m in prescreen(a, load_rules(path))}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"field": "measurements.qtc_ms", "op": ">=", "value": 1}, "unknown field"),
        ({"field": "rhythm.max_rr_ms", "op": "=>", "value": 1}, "op"),
    ],
)
def test_invalid_table_is_refused(rule, message) -> None:
    table = {"rules": [{"code": "X", "label_zh": "x", "label_en": "x", "tier": "critical",
                        "all": [rule]}]}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        load_rules(table)
