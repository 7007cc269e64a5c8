"""Statement library data and search; serial comparison of measurements."""

from __future__ import annotations

from ecg_service import (
    MEASUREMENT_KEYS,
    analyse,
    compare_measurements,
    get_statement,
    search_statements,
    statement_library,
    synthesize_ecg,
)
from ecg_service.statements import STATEMENT_CATEGORIES


def test_library_seed() -> None:
    lib = statement_library()
    assert 60 <= len(lib) <= 110
    assert {s.category for s in lib} == set(STATEMENT_CATEGORIES)
    assert len({s.code for s in lib}) == len(lib)
    assert all(s.zh and s.en for s in lib)
    critical = {s.code for s in lib if s.maps_to_critical}
    assert {"VF", "VT", "3AVB", "LNGQT_550", "AFIB_WPW", "PAUSE_3S"} <= critical
    assert not get_statement("NORM").maps_to_critical  # type: ignore[union-attr]


def test_search_zh_en_and_category() -> None:
    assert [s.code for s in search_statements("房颤")][:1] == ["AFIB"]
    assert "CLBBB" in {s.code for s in search_statements("left bundle")}
    assert "CLBBB" in {s.code for s in search_statements("左束支")}
    assert search_statements("lvh")[0].code == "LVH"  # code match first
    only = search_statements("", category="comparison")
    assert only and all(s.category == "comparison" for s in only)
    assert search_statements("no such statement at all") == []
    assert len(search_statements("", limit=5)) == 5


def test_serial_comparison_deltas() -> None:
    prior = analyse(synthesize_ecg(heart_rate_bpm=60, qt_ms=400, seed=1)[0])
    current = analyse(synthesize_ecg(heart_rate_bpm=60, qt_ms=480, seed=2)[0])
    deltas = {d.key: d for d in compare_measurements(current, prior)}
    assert tuple(deltas) == MEASUREMENT_KEYS
    qt = deltas["qt_ms"]
    assert qt.delta is not None and 70 <= qt.delta <= 90 and qt.notable
    assert not deltas["qrs_ms"].notable
    # Axes wrap: 170° -> -170° is a 20° change, not 340°.
    d = {x.key: x for x in compare_measurements({"qrs_axis_deg": -170.0}, {"qrs_axis_deg": 170.0})}
    assert d["qrs_axis_deg"].delta == 20.0
    assert d["pr_ms"].delta is None and not d["pr_ms"].notable
