"""Synthetic 12-lead ECGs with known P, PR, QRS and QT, for accuracy tests and the benchmark.

A dipole model: each wave is a time course (half-sine lobes with exact on- and offsets) along a
3-D heart vector (x left, y inferior, z anterior). Leads I and II are projections of the
frontal vector, III/aVR/aVL/aVF follow from Einthoven's and Goldberger's equations, V1-V6 are
projections on horizontal-plane directions. Onsets and offsets are therefore known exactly:
P onset to QRS onset is the PR interval, QRS onset to the end of T is QT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ecg_service.record import STANDARD_LEADS, EcgFormat, EcgRecord, PatientIdentity

__all__ = ["SyntheticTruth", "synthesize_ecg", "synthetic_set"]

# Horizontal-plane angle from the left (+x) towards anterior (+z).
_PRECORDIAL_DEG = {"V1": 115.0, "V2": 95.0, "V3": 72.0, "V4": 50.0, "V5": 25.0, "V6": 0.0}


@dataclass(frozen=True, slots=True)
class SyntheticTruth:
    """What the generator put in: intervals in ms, axes in degrees, beat onsets in seconds."""

    heart_rate_bpm: float
    rr_ms: float
    p_ms: float | None
    pr_ms: float | None
    qrs_ms: float
    qt_ms: float
    p_axis_deg: float | None
    qrs_axis_deg: float
    t_axis_deg: float
    qrs_onsets_s: tuple[float, ...]
    min_rr_ms: float
    max_rr_ms: float


def _direction(frontal_deg: float, z: float) -> np.ndarray:
    a = math.radians(frontal_deg)
    v = np.array([math.cos(a), math.sin(a), z])
    return v / np.linalg.norm(v)


def _half_sine(t: np.ndarray, start: float, dur: float) -> np.ndarray:
    out = np.zeros_like(t)
    m = (t >= start) & (t < start + dur)
    out[m] = np.sin(np.pi * (t[m] - start) / dur)
    return out


def _t_shape(t: np.ndarray, start: float, dur: float) -> np.ndarray:
    """Asymmetric T: a slow quarter-sine rise over 60 %, a quarter-cosine fall over 40 %."""
    out = np.zeros_like(t)
    rise, fall = 0.6 * dur, 0.4 * dur
    m1 = (t >= start) & (t < start + rise)
    out[m1] = np.sin(0.5 * np.pi * (t[m1] - start) / rise)
    m2 = (t >= start + rise) & (t < start + dur)
    out[m2] = np.cos(0.5 * np.pi * (t[m2] - start - rise) / fall)
    return out


def _beat_vector(
    t: np.ndarray,
    *,
    p_ms: float | None,
    pr_ms: float | None,
    qrs_ms: float,
    qt_ms: float,
    p_axis: float,
    qrs_axis: float,
    t_axis: float,
    amp: float,
) -> np.ndarray:
    """Heart vector (3, len(t)) in µV for one beat with its QRS onset at t = 0 (seconds)."""
    h = np.zeros((3, t.size))
    if p_ms and pr_ms:
        h += np.outer(_direction(p_axis, -0.1), 150.0 * _half_sine(t, -pr_ms / 1000, p_ms / 1000))
    q, r = 0.18 * qrs_ms / 1000, 0.47 * qrs_ms / 1000
    s = qrs_ms / 1000 - q - r
    h += np.outer(_direction(qrs_axis + 160.0, 0.6), 180.0 * amp * _half_sine(t, 0.0, q))
    h += np.outer(_direction(qrs_axis, -0.35), 1300.0 * amp * _half_sine(t, q, r))
    h += np.outer(_direction(qrs_axis + 200.0, -1.2), 450.0 * amp * _half_sine(t, q + r, s))
    st = 0.3 * (qt_ms - qrs_ms) / 1000
    t_dur = qt_ms / 1000 - qrs_ms / 1000 - st
    h += np.outer(_direction(t_axis, 0.25), 330.0 * _t_shape(t, qrs_ms / 1000 + st, t_dur))
    return h


def _leads_from_vector(h: np.ndarray) -> np.ndarray:
    hx, hy, hz = h
    lead_i = hx
    lead_ii = hx * 0.5 + hy * math.sqrt(3) / 2
    rows = {
        "I": lead_i,
        "II": lead_ii,
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    for name, deg in _PRECORDIAL_DEG.items():
        a = math.radians(deg)
        rows[name] = 1.4 * (hx * math.cos(a) + hz * math.sin(a)) + 0.2 * hy
    return np.vstack([rows[n] for n in STANDARD_LEADS])


def synthesize_ecg(
    *,
    heart_rate_bpm: float = 70.0,
    p_ms: float | None = 100.0,
    pr_ms: float | None = 160.0,
    qrs_ms: float = 90.0,
    qt_ms: float | None = None,
    p_axis_deg: float = 55.0,
    qrs_axis_deg: float = 50.0,
    t_axis_deg: float = 40.0,
    duration_s: float = 10.0,
    fs: float = 500.0,
    noise_uv: float = 10.0,
    wander_uv: float = 100.0,
    powerline_uv: float = 0.0,
    rr_jitter: float = 0.02,
    irregular: bool = False,
    pauses: Sequence[tuple[float, float]] = (),
    qrs_amplitude: float = 1.0,
    seed: int = 0,
) -> tuple[EcgRecord, SyntheticTruth]:
    """A 12-lead record and what it contains.

    ``qt_ms`` defaults to a QTc (Bazett) of 400 ms. ``irregular`` draws RR intervals from
    0.55-1.45 x the mean and drops the P waves (like atrial fibrillation). ``pauses`` is a list
    of (time s, length s): the first beat after ``time`` follows its predecessor by ``length``.
    """
    rng = np.random.default_rng(seed)
    rr = 60.0 / heart_rate_bpm
    if qt_ms is None:
        qt_ms = 400.0 * math.sqrt(rr)
    if irregular:
        p_ms = pr_ms = None
    # QRS onsets: start 0.6 s in so the first P wave is inside the record.
    onsets: list[float] = []
    t0 = 0.4 + (pr_ms or 0) / 1000
    pause_list = sorted(pauses)
    while t0 < duration_s - 0.05:
        onsets.append(t0)
        if pause_list and t0 >= pause_list[0][0] - 1e-9:
            step = pause_list.pop(0)[1]
        elif irregular:
            step = rr * rng.uniform(0.55, 1.45)
        else:
            step = rr * (1.0 + rng.normal(0.0, rr_jitter))
        t0 += step
    n = round(duration_s * fs)
    t = np.arange(n) / fs
    h = np.zeros((3, n))
    span_pre = ((pr_ms or 0) + 20) / 1000
    span_post = (qt_ms + 20) / 1000
    for onset in onsets:
        lo = max(0, math.floor((onset - span_pre) * fs))
        hi = min(n, math.ceil((onset + span_post) * fs))
        h[:, lo:hi] += _beat_vector(
            t[lo:hi] - onset,
            p_ms=p_ms,
            pr_ms=pr_ms,
            qrs_ms=qrs_ms,
            qt_ms=qt_ms,
            p_axis=p_axis_deg,
            qrs_axis=qrs_axis_deg,
            t_axis=t_axis_deg,
            amp=qrs_amplitude,
        )
    clean = _leads_from_vector(h)
    noise = rng.normal(0.0, noise_uv, clean.shape) if noise_uv else 0.0
    wander = np.zeros_like(clean)
    if wander_uv:
        for _ in range(2):
            f = rng.uniform(0.1, 0.45)
            phase = rng.uniform(0, 2 * np.pi, (clean.shape[0], 1))
            wander += wander_uv / 2 * np.sin(2 * np.pi * f * t[None, :] + phase)
    mains = powerline_uv * np.sin(2 * np.pi * 50.0 * t)[None, :] if powerline_uv else 0.0
    signals = clean + noise + wander + mains
    # True QRS axis: the net-amplitude axis of the noiseless beat (the definition we measure).
    tb = np.arange(-0.05, qrs_ms / 1000 + 0.05, 1 / fs)
    beat = _leads_from_vector(
        _beat_vector(
            tb,
            p_ms=None,
            pr_ms=None,
            qrs_ms=qrs_ms,
            qt_ms=qt_ms,
            p_axis=p_axis_deg,
            qrs_axis=qrs_axis_deg,
            t_axis=t_axis_deg,
            amp=qrs_amplitude,
        )
    )
    qrs_mask = (tb >= 0) & (tb <= qrs_ms / 1000)
    net_i = beat[0, qrs_mask].max() + beat[0, qrs_mask].min()
    net_avf = beat[5, qrs_mask].max() + beat[5, qrs_mask].min()
    true_qrs_axis = math.degrees(math.atan2(2 / math.sqrt(3) * net_avf, net_i))
    rrs = np.diff(onsets) * 1000 if len(onsets) > 1 else np.array([rr * 1000])
    record = EcgRecord(
        source_format=EcgFormat.WFDB,
        sampling_rate_hz=fs,
        leads=STANDARD_LEADS,
        signals_uv=signals,
        patient=PatientIdentity(patient_id=f"SYN-{seed}", name="Synthetic^ECG", sex="O"),
        device="RDC synthetic generator",
        natural_key=f"synthetic-{seed}",
    )
    truth = SyntheticTruth(
        heart_rate_bpm=60000.0 / float(np.mean(rrs)),
        rr_ms=float(np.mean(rrs)),
        p_ms=p_ms,
        pr_ms=pr_ms,
        qrs_ms=qrs_ms,
        qt_ms=qt_ms,
        p_axis_deg=p_axis_deg if p_ms else None,
        qrs_axis_deg=true_qrs_axis,
        t_axis_deg=_wrap(t_axis_deg),
        qrs_onsets_s=tuple(onsets),
        min_rr_ms=float(rrs.min()),
        max_rr_ms=float(rrs.max()),
    )
    return record, truth


def _wrap(deg: float) -> float:
    return (deg + 180.0) % 360.0 - 180.0


def synthetic_set(
    count: int = 40, *, seed: int = 1, fs: float = 500.0, noise_uv: float = 15.0
) -> list[tuple[EcgRecord, SyntheticTruth]]:
    """``count`` records spread over heart rates 40-180/min with random physiological
    intervals, white noise and baseline wander. At fast rates PR, QRS and QT are bounded so
    that the T wave ends before the next P wave starts (a P wave buried in T is not a test of
    interval accuracy)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        hr = 40.0 + 140.0 * i / max(1, count - 1)
        rr_ms = 60000.0 / hr
        pr = float(rng.uniform(120, 220 if hr < 120 else 150))
        p = float(rng.uniform(70, min(120, pr - 40)))
        # Room left in the cycle for QRS + ST-T, so that T ends >= 20 ms before the next P
        # (RR may be 4 % shorter with the jitter).
        room = rr_ms * 0.96 - pr - 20
        qrs = float(rng.uniform(70, max(70.0, min(130, room - 90))))
        qt = float(rng.uniform(370, 470)) * math.sqrt(rr_ms / 1000)
        qt = max(min(qt, room), qrs + 90)
        out.append(
            synthesize_ecg(
                heart_rate_bpm=hr,
                p_ms=p,
                pr_ms=pr,
                qrs_ms=qrs,
                qt_ms=qt,
                p_axis_deg=float(rng.uniform(20, 75)),
                qrs_axis_deg=float(rng.uniform(-30, 90)),
                t_axis_deg=float(rng.uniform(10, 70)),
                fs=fs,
                noise_uv=noise_uv,
                wander_uv=float(rng.uniform(50, 300)),
                seed=seed * 1000 + i,
            )
        )
    return out
