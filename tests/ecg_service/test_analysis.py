"""Measurement record shape, signal quality, sampling-rate flag, device values beside ours."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ecg_service import MEASUREMENT_KEYS, analyse, read_ecg, synthesize_ecg


def test_measurement_keys_exactly() -> None:
    rec, _ = synthesize_ecg(seed=3)
    a = analyse(rec)
    assert tuple(a.measurements) == MEASUREMENT_KEYS
    assert set(MEASUREMENT_KEYS) == {
        "heart_rate_bpm", "rr_ms", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms",
        "qtc_fridericia_ms", "p_axis_deg", "qrs_axis_deg", "t_axis_deg",
    }  # fmt: skip
    assert all(v is not None for v in a.measurements.values())
    assert a.missing == {}
    m = a.measurements
    rr_s = m["rr_ms"] / 1000  # type: ignore[operator]
    # QTc from the unrounded QT: within 1 ms of the formula on the rounded one.
    assert abs(m["qtc_bazett_ms"] - m["qt_ms"] / rr_s**0.5) <= 1.5  # type: ignore[operator]
    assert abs(m["qtc_fridericia_ms"] - m["qt_ms"] / rr_s ** (1 / 3)) <= 1.5  # type: ignore[operator]
    assert a.reliable and a.flags == ()
    assert a.median_beat is not None and a.median_beat.leads == rec.leads


def test_below_500_hz_flagged_unreliable(testdata: Path) -> None:
    base = testdata / "ecg" / "wfdb"
    a = analyse(read_ecg(base / "3000003_0003.hea", base / "3000003_0003.dat"))
    assert not a.reliable
    assert any(f.startswith("measurement unreliable") and "125 Hz" in f for f in a.flags)
    ok = analyse(synthesize_ecg(fs=500)[0])
    assert ok.reliable


def test_null_values_carry_reasons() -> None:
    rec, _ = synthesize_ecg(heart_rate_bpm=70)
    only_v = replace(rec, leads=("V1", "V2"), signals_uv=rec.signals_uv[6:8])
    a = analyse(only_v)
    assert a.measurements["qrs_axis_deg"] is None
    assert "aVF" in a.missing["qrs_axis_deg"]
    assert set(a.missing) <= set(MEASUREMENT_KEYS)
    for key, value in a.measurements.items():
        assert (value is None) == (key in a.missing), key


def test_no_beats_means_nulls_with_reason() -> None:
    rec, _ = synthesize_ecg(duration_s=10)
    rng = np.random.default_rng(0)
    noise_only = replace(rec, signals_uv=rng.normal(0, 20, rec.signals_uv.shape))
    a = analyse(noise_only)
    assert all(v is None for k, v in a.measurements.items() if k not in ("heart_rate_bpm", "rr_ms"))
    assert all(key in a.missing for key in ("pr_ms", "qrs_ms", "qt_ms"))


def test_lead_quality_flat_noisy_lead_off() -> None:
    rec, _ = synthesize_ecg(seed=5, noise_uv=8.0)
    x = rec.signals_uv.copy()
    rng = np.random.default_rng(1)
    idx = {lead: i for i, lead in enumerate(rec.leads)}
    x[idx["V2"]] = 0.0  # electrode off: the channel sits at a constant value
    x[idx["V3"]] = rng.normal(0, 3.0, x.shape[1])  # flat: a few µV of noise only
    x[idx["V4"]] += rng.normal(0, 150.0, x.shape[1])  # heavy EMG noise
    a = analyse(replace(rec, signals_uv=x))
    status = {q.lead: q.status for q in a.quality}
    assert status["V2"] == "lead_off"
    assert status["V3"] == "flat"
    assert status["V4"] == "noisy"
    assert all(status[lead] == "ok" for lead in ("I", "II", "III", "aVR", "aVL", "aVF", "V1"))
    assert all(q.reason for q in a.quality if q.status != "ok")
    # Measurements survive the three bad leads.
    assert a.measurements["qrs_ms"] is not None and a.measurements["qt_ms"] is not None


def test_device_measurements_kept_beside_ours(testdata: Path) -> None:
    rec = read_ecg(testdata / "ecg" / "dicom" / "waveform_ecg.dcm")
    a = analyse(rec)
    assert a.source == "RDC median-beat analysis"
    assert a.device_measurements == rec.device_measurements
    assert {m.key for m in a.device_measurements} >= {"pr_ms", "qrs_ms", "qt_ms"}
    assert a.measurements["heart_rate_bpm"] == 61.0


def test_coarse_8_bit_samples_are_not_lead_off(testdata: Path) -> None:
    """MIMIC's 125 Hz 8-bit record repeats samples often, but never for 200 ms."""
    base = testdata / "ecg" / "wfdb"
    a = analyse(read_ecg(base / "3000003_0003.hea", base / "3000003_0003.dat"))
    assert [q.status for q in a.quality] == ["ok", "ok"]
    assert a.rhythm.beat_count >= 9


def test_noise_only_is_flagged_unreliable() -> None:
    rec, _ = synthesize_ecg()
    noise = np.random.default_rng(0).normal(0, 500, rec.signals_uv.shape)
    a = analyse(replace(rec, signals_uv=noise))
    assert not a.reliable
    assert any("no clean lead" in f for f in a.flags)


def test_as_dict_is_json(testdata: Path) -> None:
    import json

    a = analyse(read_ecg(testdata / "ecg" / "dicom" / "waveform_ecg.dcm"))
    data = json.loads(json.dumps(a.as_dict()))
    assert list(data["measurements"]) == list(MEASUREMENT_KEYS)
    assert data["sampling_rate_hz"] == 1000.0
    assert {d["key"] for d in data["device_measurements"]} >= {"pr_ms", "qrs_ms"}
    assert all(d["source"] for d in data["device_measurements"])
    assert len(data["quality"]) == 12
