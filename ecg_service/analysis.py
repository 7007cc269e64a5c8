"""Measurements from an :class:`EcgRecord`: R peaks, rhythm, signal quality per lead, a median
beat and global intervals fused over the leads (earliest onset, latest offset), QTc and axes.

Our own delineation on the median beat (scipy): neurokit2's delineators are single-lead and
work beat by beat on the raw signal; on the median beat a slope threshold (QRS, P) and the
tangent method (end of T) are faster and met the accuracy bars on the synthetic set
(tests/ecg_service/test_accuracy.py; bench/ecg.py has the figures).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

# scipy is imported inside the functions that use it: it takes about a second to import,
# and every rdc process (serve, worker, beat) imports this module at start-up.
from ecg_service.record import DeviceMeasurement, EcgRecord, RecordedBeat

__all__ = [
    "MEASUREMENT_KEYS",
    "MIN_RELIABLE_RATE_HZ",
    "EcgAnalysis",
    "Fiducials",
    "LeadQuality",
    "Rhythm",
    "analyse",
    "detect_r_peaks",
]

MEASUREMENT_KEYS: tuple[str, ...] = (
    "heart_rate_bpm",
    "rr_ms",
    "pr_ms",
    "qrs_ms",
    "qt_ms",
    "qtc_bazett_ms",
    "qtc_fridericia_ms",
    "p_axis_deg",
    "qrs_axis_deg",
    "t_axis_deg",
)
MIN_RELIABLE_RATE_HZ = 500.0
ANALYSIS_RATE_HZ = 500.0  # faster records are resampled to this before measuring
MAINS_HZ: tuple[float, ...] = (50.0,)
# Delineation settings (see tests/ecg_service/test_accuracy.py for what they achieve).
MEDIAN_LP_HZ = 150.0
QRS_FRAC = 0.1
P_FRAC = 0.1
SPREAD = 0.01
DERIV_WIN_S = 0.008
SLOW_DERIV_WIN_S = 0.016
UNRELIABLE = "measurement unreliable"

QualityStatus = Literal["ok", "flat", "noisy", "lead_off"]


@dataclass(frozen=True, slots=True)
class LeadQuality:
    lead: str
    status: QualityStatus
    amplitude_uv: float
    noise_uv: float
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Rhythm:
    beat_count: int
    r_peaks_s: tuple[float, ...]
    mean_rate_bpm: float | None
    mean_rr_ms: float | None
    min_rr_ms: float | None
    max_rr_ms: float | None
    rr_cv: float | None
    irregular: bool


@dataclass(frozen=True, slots=True)
class Fiducials:
    """Global fiducials on the median beat, ms from the beat's R fiducial (negative before)."""

    p_on_ms: float | None = None
    p_off_ms: float | None = None
    qrs_on_ms: float | None = None
    qrs_off_ms: float | None = None
    t_end_ms: float | None = None

    @property
    def p_ms(self) -> float | None:
        if self.p_on_ms is None or self.p_off_ms is None:
            return None
        return self.p_off_ms - self.p_on_ms


@dataclass(frozen=True, slots=True)
class EcgAnalysis:
    """What RDC measured. ``measurements`` has exactly :data:`MEASUREMENT_KEYS`; a ``None``
    value has its reason in ``missing``. Device values are in ``device_measurements``."""

    sampling_rate_hz: float
    leads: tuple[str, ...]
    duration_s: float
    quality: tuple[LeadQuality, ...]
    rhythm: Rhythm
    measurements: dict[str, float | None]
    missing: dict[str, str]
    fiducials: Fiducials
    median_beat: RecordedBeat | None
    device_measurements: tuple[DeviceMeasurement, ...] = ()
    flags: tuple[str, ...] = ()
    reliable: bool = True
    source: str = "RDC median-beat analysis"
    extra: dict[str, float] = field(default_factory=dict)

    def value(self, key: str) -> float | None:
        return self.measurements.get(key)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary (no signals): what ``GET /api/v1/ecg/{exam_id}`` will show."""
        return {
            "sampling_rate_hz": self.sampling_rate_hz,
            "leads": list(self.leads),
            "duration_s": self.duration_s,
            "reliable": self.reliable,
            "flags": list(self.flags),
            "quality": [
                {
                    "lead": q.lead,
                    "status": q.status,
                    "reason": q.reason,
                    "amplitude_uv": q.amplitude_uv,
                    "noise_uv": q.noise_uv,
                }
                for q in self.quality
            ],
            "measurements": dict(self.measurements),
            "missing": dict(self.missing),
            "source": self.source,
            "device_measurements": [
                {
                    "key": m.key,
                    "label": m.label,
                    "value": m.value,
                    "unit": m.unit,
                    "source": m.source,
                }
                for m in self.device_measurements
            ],
            "rhythm": {
                "beat_count": self.rhythm.beat_count,
                "mean_rate_bpm": self.rhythm.mean_rate_bpm,
                "mean_rr_ms": self.rhythm.mean_rr_ms,
                "min_rr_ms": self.rhythm.min_rr_ms,
                "max_rr_ms": self.rhythm.max_rr_ms,
                "rr_cv": self.rhythm.rr_cv,
                "irregular": self.rhythm.irregular,
            },
            "fiducials_ms": {
                "p_on": self.fiducials.p_on_ms,
                "p_off": self.fiducials.p_off_ms,
                "qrs_on": self.fiducials.qrs_on_ms,
                "qrs_off": self.fiducials.qrs_off_ms,
                "t_end": self.fiducials.t_end_ms,
            },
        }


# --- filtering -------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _sos(fs: float, lo: float | None, hi: float | None, order: int) -> np.ndarray | None:
    from scipy.signal import butter

    nyq = fs / 2
    if hi is not None and hi >= nyq * 0.95:
        hi = None
    if lo and hi:
        return butter(order, [lo / nyq, hi / nyq], btype="band", output="sos")
    if lo:
        return butter(order, lo / nyq, btype="high", output="sos")
    if hi:
        return butter(order, hi / nyq, btype="low", output="sos")
    return None


def _bandpass(
    x: np.ndarray, fs: float, lo: float | None, hi: float | None, order: int = 2
) -> np.ndarray:
    """Zero-phase Butterworth filter along the last axis (``None`` leaves that edge open)."""
    from scipy.signal import sosfiltfilt

    sos = _sos(float(fs), lo, hi, order)
    if sos is None:
        return x
    padlen = min(x.shape[-1] - 1, int(3 * fs))
    return sosfiltfilt(sos, x, axis=-1, padlen=padlen)


@lru_cache(maxsize=16)
def _notch_design(fs: float, f0: float) -> tuple[np.ndarray, np.ndarray]:
    from scipy.signal import iirnotch

    return iirnotch(f0, 30.0, fs)


def _notch(x: np.ndarray, fs: float) -> np.ndarray:
    """Remove mains interference (50 Hz in China; MAINS_HZ) before the median beat."""
    from scipy.signal import filtfilt

    for f0 in MAINS_HZ:
        if fs > 2.5 * f0 and x.shape[-1] > 3 * fs:
            b, a = _notch_design(float(fs), f0)
            x = filtfilt(b, a, x, axis=-1)
    return x


# --- R peaks ---------------------------------------------------------------------------------


def detect_r_peaks(signals: np.ndarray, fs: float) -> np.ndarray:
    """QRS complexes in one or more simultaneous leads (rows, µV): sample indices of R.

    Pan-Tompkins style: 5-18 Hz band, squared slope summed over the leads, a 100 ms moving
    integration, peaks above a threshold that follows the local QRS energy, a search back
    for missed beats in long gaps and a refractory period of 200 ms."""
    from scipy.ndimage import uniform_filter1d
    from scipy.signal import find_peaks

    x = np.atleast_2d(np.asarray(signals, dtype=np.float64))
    n = x.shape[1]
    if n < int(fs):
        return np.zeros(0, dtype=np.int64)
    bp = _bandpass(x, fs, 5.0, 18.0, order=2)
    slope = np.gradient(bp, axis=1) * fs / 1000.0
    energy = np.sqrt(uniform_filter1d((slope**2).sum(axis=0), max(1, int(0.1 * fs))))
    cand, _props = find_peaks(energy, distance=max(1, int(0.2 * fs)))
    if cand.size == 0:
        return cand.astype(np.int64)
    h = energy[cand]
    # Local reference: the second-largest candidate within +-3 s (one artefact spike does not
    # raise it; a 3.5 s pause or 30/min still has QRS complexes in the window).
    t = cand / fs
    span = 31  # candidates are >= 200 ms apart: at most 31 within +-3 s
    nb = np.arange(cand.size)[:, None] + np.arange(-(span // 2), span // 2 + 1)[None, :]
    valid = (nb >= 0) & (nb < cand.size)
    nb_c = np.clip(nb, 0, cand.size - 1)
    valid &= np.abs(t[nb_c] - t[:, None]) <= 3.0
    heights = np.where(valid, h[nb_c], -np.inf)
    top2 = -np.partition(-heights, 1, axis=1)[:, :2]
    ref = np.where(np.isfinite(top2[:, 1]), top2[:, 1], top2[:, 0])
    floor = 0.03 * float(np.percentile(h, 90))  # nothing below this is a QRS
    accepted = h >= np.maximum(0.3 * ref, floor)
    keep = list(cand[accepted])
    # Search back: a gap longer than 1.66 x the running RR gets its largest candidate if it
    # is above half the threshold.
    if len(keep) >= 3:
        rr = np.diff(keep)
        med = float(np.median(rr))
        extra: list[int] = []
        for a, b in itertools.pairwise(keep):
            if b - a > 1.66 * med:
                # Not in the T wave of the beat before (360 ms), nor just before the next.
                inside = (cand > a + 0.36 * fs) & (cand < b - 0.25 * fs) & ~accepted
                if inside.any():
                    idx = np.flatnonzero(inside)
                    best = idx[np.argmax(h[idx])]
                    if h[best] >= max(0.2 * ref[best], floor):
                        extra.append(int(cand[best]))
        keep = sorted(keep + extra)
    peaks = np.asarray(keep, dtype=np.int64)
    # Refine each to the largest absolute deflection of the summed band-passed leads.
    if peaks.size:
        w = max(1, int(0.05 * fs))
        mag = (bp**2).sum(axis=0)
        refined = np.empty_like(peaks)
        for k, p in enumerate(peaks):
            lo, hi = max(0, p - w), min(n, p + w + 1)
            refined[k] = lo + int(np.argmax(mag[lo:hi]))
        peaks = np.unique(refined)
        if peaks.size > 1:  # refinement may have pulled two peaks together
            close = np.diff(peaks) < int(0.2 * fs)
            if close.any():
                drop = np.flatnonzero(close) + 1
                peaks = np.delete(peaks, drop)
    return peaks


# --- quality ---------------------------------------------------------------------------------


def _constant_fraction(raw: np.ndarray, fs: float) -> np.ndarray:
    """Per lead, the fraction of the record inside runs of identical samples lasting 200 ms
    or more (an electrode off; coarse 8-bit data repeats samples too, but briefly)."""
    if raw.shape[1] < 2:
        return np.ones(raw.shape[0])
    min_run = max(2, int(0.2 * fs))
    out = np.zeros(raw.shape[0])
    same = np.diff(raw, axis=1) == 0
    for i, row in enumerate(same):
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        lengths = ends - starts + 1
        out[i] = lengths[lengths >= min_run].sum() / raw.shape[1]
    return out


def _quality(
    leads: tuple[str, ...], raw: np.ndarray, raw_fs: float, hp: np.ndarray, fs: float
) -> tuple[LeadQuality, ...]:
    """Per lead: constant (electrode off) from the samples as recorded; amplitude, noise and
    wander from ``hp`` (high-passed, at ``fs``)."""
    from scipy.ndimage import uniform_filter1d

    out = []
    lp = _bandpass(hp, fs, None, 40.0, order=4)
    const = _constant_fraction(raw, raw_fs)
    lo_hi = np.percentile(hp, [0.5, 99.5], axis=1)
    amp = lo_hi[1] - lo_hi[0]
    resid = hp - lp
    noise = 1.4826 * np.median(np.abs(resid - np.median(resid, axis=1, keepdims=True)), axis=1)
    if raw.shape[1] > 3 * raw_fs:
        wander = uniform_filter1d(raw, size=int(raw_fs), axis=1, mode="nearest")
        w_lo_hi = np.percentile(wander, [1, 99], axis=1)
        wander_pp = w_lo_hi[1] - w_lo_hi[0]
    else:
        wander_pp = np.zeros(len(hp))
    for i, lead in enumerate(leads):
        status: QualityStatus = "ok"
        reason = None
        if const[i] >= 0.5:
            status, reason = "lead_off", f"signal constant for {const[i]:.0%} of the record"
        elif amp[i] < 80.0:
            status, reason = "flat", f"amplitude {amp[i]:.0f} µV (< 80 µV)"
        elif noise[i] > 50.0:
            status, reason = "noisy", f"high-frequency noise {noise[i]:.0f} µV RMS (> 50 µV)"
        elif wander_pp[i] > 3000.0:
            status, reason = "noisy", f"baseline wander {wander_pp[i]:.0f} µV (> 3 mV)"
        out.append(
            LeadQuality(lead, status, round(float(amp[i]), 1), round(float(noise[i]), 1), reason)
        )
    return tuple(out)


# --- median beat and delineation -------------------------------------------------------------


def _median_beat(
    x: np.ndarray, peaks: np.ndarray, fs: float, pre: int, post: int
) -> tuple[np.ndarray, int]:
    n = x.shape[1]
    ok = peaks[(peaks - pre >= 0) & (peaks + post < n)]
    offsets = np.arange(-pre, post + 1)
    beats = x[:, ok[:, None] + offsets[None, :]]  # (leads, beats, win)
    tmpl = np.median(beats, axis=1)
    # Align each beat on the QRS of the template (+-10 ms), then keep the dominant beats.
    q0, q1 = pre - int(0.06 * fs), pre + int(0.08 * fs)
    lag_max = max(1, int(0.01 * fs))
    lags = np.arange(-lag_max, lag_max + 1)
    seg_t = tmpl[:, q0:q1] - tmpl[:, q0:q1].mean(axis=1, keepdims=True)
    scores = np.empty((lags.size, ok.size))
    for j, lag in enumerate(lags):
        seg = x[:, (ok + lag)[:, None] + np.arange(q0 - pre, q1 - pre)[None, :]]
        seg = seg - seg.mean(axis=2, keepdims=True)
        scores[j] = np.einsum("lbw,lw->b", seg, seg_t)
    best = lags[np.argmax(scores, axis=0)]
    aligned = np.clip(ok + best, pre, n - post - 1)
    beats = x[:, aligned[:, None] + offsets[None, :]]
    seg = beats[:, :, q0:q1] - beats[:, :, q0:q1].mean(axis=2, keepdims=True)
    num = np.einsum("lbw,lw->b", seg, seg_t)
    den = np.sqrt(np.einsum("lbw,lbw->b", seg, seg) * float((seg_t**2).sum())) + 1e-12
    corr = num / den
    dominant = corr >= 0.9
    if dominant.sum() >= 3:
        beats = beats[:, dominant, :]
    return np.median(beats, axis=1), int(beats.shape[1])


def _robust_extreme(values: list[float], *, earliest: bool, spread: float) -> float | None:
    """The earliest (or latest) value that another lead confirms within ``spread`` samples:
    one lead's noise does not move a global onset, a late offset seen in two leads does."""
    if not values:
        return None
    arr = np.sort(np.asarray(values))
    if not earliest:
        arr = arr[::-1]
    if arr.size == 1:
        return float(arr[0])
    for k in range(arr.size - 1):
        if abs(arr[k + 1] - arr[k]) <= spread:
            return float(arr[k])
    return float(np.median(arr))


def _delineate(m: np.ndarray, fs: float, r: int, rr_s: float, leads: tuple[str, ...], good):
    """Global fiducials (sample indices in ``m``) and per-lead baseline levels."""
    from scipy.ndimage import maximum_filter1d
    from scipy.signal import savgol_filter

    n = m.shape[1]
    win = max(5, round(DERIV_WIN_S * fs) | 1)
    slow_win = max(7, round(SLOW_DERIV_WIN_S * fs) | 1)
    # µV per sample: a short window for the QRS, a longer one for the slow P and T waves.
    dq = savgol_filter(m, win, 2, deriv=1, axis=1, mode="nearest")
    d = savgol_filter(m, slow_win, 2, deriv=1, axis=1, mode="nearest")
    # Derivative noise: the derivative of what a 24 ms quadratic fit leaves over.
    resid = m - savgol_filter(m, max(5, round(0.024 * fs) | 1), 2, axis=1, mode="nearest")
    noise_q = 1.4826 * np.median(
        np.abs(savgol_filter(resid, win, 2, deriv=1, axis=1, mode="nearest")), axis=1
    )
    noise_d = 1.4826 * np.median(
        np.abs(savgol_filter(resid, slow_win, 2, deriv=1, axis=1, mode="nearest")), axis=1
    )
    amp = np.ptp(m[:, max(0, r - int(0.08 * fs)) : r + int(0.08 * fs)], axis=1)
    ms = fs / 1000.0
    res: dict[str, float | None] = {}
    qrs_on: list[float] = []
    qrs_off: list[float] = []
    valid = [i for i in range(m.shape[0]) if good[i] and amp[i] >= max(150.0, 0.15 * amp.max())]
    for i in valid:
        a = np.abs(dq[i])
        lo, hi = max(1, r - int(0.12 * fs)), min(n - 1, r + int(0.16 * fs))
        core0, core1 = max(lo, r - int(0.06 * fs)), min(hi, r + int(0.08 * fs))
        pk = core0 + int(np.argmax(a[core0:core1]))
        th = max(QRS_FRAC * a[pk], 4.0 * noise_q[i])
        act = maximum_filter1d((a > th).astype(np.int8), size=max(3, int(0.016 * fs))) > 0
        s = pk
        while s > lo and act[s - 1]:
            s -= 1
        e = pk
        while e < hi and act[e + 1]:
            e += 1
        above = np.flatnonzero(a[s : e + 1] > th)
        if above.size == 0:
            continue
        on, off = s + above[0], s + above[-1]
        # Sub-sample: where |d| crosses the threshold.
        qrs_on.append(on - _frac(a[on - 1], a[on], th))
        qrs_off.append(off + _frac(a[off + 1], a[off], th))
    q_on = _robust_extreme(qrs_on, earliest=True, spread=SPREAD * fs)
    q_off = _robust_extreme(qrs_off, earliest=False, spread=SPREAD * fs)
    res["qrs_on"], res["qrs_off"] = q_on, q_off
    base = np.zeros(m.shape[0])
    if q_on is None or q_off is None:
        return res, base, d
    i_on = math.floor(q_on)
    b0, b1 = max(0, i_on - int(0.02 * fs)), max(1, i_on - int(0.004 * fs))
    base = np.median(m[:, b0:b1], axis=1)
    # T wave: tangent at the steepest descent after the peak, meets the baseline.
    t_lo = int(q_off + 0.04 * fs)
    t_hi = min(n - 2, int(q_on + min(0.62 * rr_s + 0.16, rr_s - 0.09) * fs))
    t_ends: list[float] = []
    if t_hi - t_lo > int(0.05 * fs):
        # The T peak of the beat: the largest spatial magnitude after the QRS; each lead's
        # own peak must lie within 60 ms of it (so a following P wave is never taken for T).
        rows = [i for i in range(m.shape[0]) if good[i]]
        spatial = np.sqrt(((m[rows, t_lo:t_hi] - base[rows, None]) ** 2).sum(axis=0))
        g_pk = t_lo + int(np.argmax(spatial))
        w_lo, w_hi = max(t_lo, g_pk - int(0.06 * fs)), min(t_hi, g_pk + int(0.06 * fs))
        for i in rows:
            y = m[i] - base[i]
            pk = w_lo + int(np.argmax(np.abs(y[w_lo:w_hi])))
            t_amp = y[pk]
            if abs(t_amp) < max(60.0, 8 * noise_d[i]) or pk >= t_hi - 2:
                continue
            sign = 1.0 if t_amp > 0 else -1.0
            # Steepest descent between the peak and the return to baseline.
            back = np.flatnonzero(sign * y[pk:t_hi] <= 0.05 * abs(t_amp))
            stop = pk + (int(back[0]) + 1 if back.size else t_hi - pk)
            fall = -sign * d[i][pk:stop]
            if fall.size < 2:
                continue
            j = pk + int(np.argmax(fall))
            if fall[j - pk] <= 0:
                continue
            t_end = j - y[j] / d[i][j]
            if pk < t_end < t_hi + 0.05 * fs:
                t_ends.append(float(t_end))
    res["t_end"] = _robust_extreme(t_ends, earliest=False, spread=SPREAD * fs)
    # P wave: between the previous T end (or 400 ms) and the QRS onset.
    p_hi = int(q_on - 0.02 * fs)
    p_lo = int(q_on - min(0.40, 0.8 * rr_s) * fs)
    if res["t_end"] is not None:
        p_lo = max(p_lo, int(res["t_end"] - rr_s * fs + 0.02 * fs))
    p_lo = max(1, p_lo)
    p_on: list[float] = []
    p_off: list[float] = []
    if p_hi - p_lo > int(0.04 * fs):
        for i in range(m.shape[0]):
            if not good[i]:
                continue
            y = m[i] - base[i]
            seg = y[p_lo:p_hi] - np.linspace(y[p_lo], y[p_hi], p_hi - p_lo)
            k = int(np.argmax(np.abs(seg)))
            pk = p_lo + k
            p_amp = seg[k]
            if abs(p_amp) < max(40.0, 10 * noise_d[i]) or k < 2 or pk > p_hi - 2:
                continue
            sign = 1.0 if p_amp > 0 else -1.0
            rise = sign * d[i][p_lo:pk]
            fall = -sign * d[i][pk:p_hi]
            if rise.size < 2 or fall.size < 2:
                continue
            js, je = p_lo + int(np.argmax(rise)), pk + int(np.argmax(fall))
            th = max(P_FRAC * max(rise.max(), fall.max()), 3.0 * noise_d[i])
            s = js
            while s > p_lo and sign * d[i][s - 1] > th:
                s -= 1
            e = je
            while e < p_hi - 1 and -sign * d[i][e + 1] > th:
                e += 1
            if s <= p_lo or e - s < 0.03 * fs:
                continue
            p_on.append(s - _frac(sign * d[i][s - 1], sign * d[i][s], th))
            p_off.append(e + _frac(-sign * d[i][e + 1], -sign * d[i][e], th))
    if len(p_on) >= min(3, sum(bool(g) for g in good)):
        res["p_on"] = _robust_extreme(p_on, earliest=True, spread=SPREAD * fs)
        res["p_off"] = _robust_extreme(p_off, earliest=False, spread=SPREAD * fs)
    _ = ms
    return res, base, d


def _frac(outside: float, inside: float, th: float) -> float:
    """Fraction of a sample between ``outside`` (below th) and ``inside`` (above)."""
    if inside == outside:
        return 0.0
    return float(np.clip((inside - th) / (inside - outside), 0.0, 1.0))


def _axis(
    leads: tuple[str, ...], values: np.ndarray, good: list[bool]
) -> tuple[float | None, str | None]:
    def get(name: str) -> float | None:
        if name in leads and good[leads.index(name)]:
            return float(values[leads.index(name)])
        return None

    lead_i, avf = get("I"), get("aVF")
    ii, iii = get("II"), get("III")
    if lead_i is None and ii is not None and iii is not None:
        lead_i = ii - iii
    if avf is None and ii is not None and iii is not None:
        avf = (ii + iii) / 2
    if lead_i is None or avf is None:
        return None, "needs leads I and aVF (or II and III)"
    if abs(lead_i) < 1e-9 and abs(avf) < 1e-9:
        return None, "no net deflection in I or aVF"
    return round(math.degrees(math.atan2(2 / math.sqrt(3) * avf, lead_i)), 0), None


# --- the analysis ----------------------------------------------------------------------------


def analyse(record: EcgRecord) -> EcgAnalysis:
    """Measure one record. Never raises for a readable record: what cannot be measured is
    ``None`` with its reason in ``missing``."""
    from scipy.signal import resample_poly

    fs = record.sampling_rate_hz
    flags: list[str] = []
    reliable = True
    if fs < MIN_RELIABLE_RATE_HZ:
        reliable = False
        flags.append(f"{UNRELIABLE}: sampled at {fs:g} Hz (< {MIN_RELIABLE_RATE_HZ:g} Hz)")
    raw = record.signals_uv
    x = raw
    if fs > ANALYSIS_RATE_HZ * 1.01 and raw.shape[1] > 12:
        # Measure at 500 Hz: what the delineation is tuned and tested at, and half the work.
        g = math.gcd(round(fs), int(ANALYSIS_RATE_HZ))
        if abs(fs - round(fs)) < 1e-6:
            x = resample_poly(raw, int(ANALYSIS_RATE_HZ) // g, round(fs) // g, axis=1)
            fs = ANALYSIS_RATE_HZ
    hp = _bandpass(x, fs, 0.5, None, order=2) if x.shape[1] > 12 else x - x.mean(1, keepdims=True)
    quality = _quality(record.leads, raw, record.sampling_rate_hz, hp, fs)
    good = [q.status in ("ok", "noisy") for q in quality]
    clean = [q.status == "ok" for q in quality]
    use = [i for i, ok in enumerate(clean) if ok] or [i for i, ok in enumerate(good) if ok]
    if not use:
        flags.append("no usable lead: every lead is flat or off")
    elif not any(clean):
        reliable = False
        flags.append(f"{UNRELIABLE}: no clean lead (every lead is noisy, flat or off)")
    peaks = detect_r_peaks(hp[use], fs) if use else np.zeros(0, dtype=np.int64)
    rr = np.diff(peaks) / fs * 1000.0
    rhythm = Rhythm(
        beat_count=int(peaks.size),
        r_peaks_s=tuple(float(p) / fs for p in peaks),
        mean_rate_bpm=round(60000.0 / float(rr.mean()), 1) if rr.size else None,
        mean_rr_ms=round(float(rr.mean()), 1) if rr.size else None,
        min_rr_ms=round(float(rr.min()), 1) if rr.size else None,
        max_rr_ms=round(float(rr.max()), 1) if rr.size else None,
        rr_cv=round(float(rr.std() / rr.mean()), 3) if rr.size >= 2 else None,
        irregular=bool(rr.size >= 4 and float(rr.std() / rr.mean()) > 0.12),
    )
    meas: dict[str, float | None] = dict.fromkeys(MEASUREMENT_KEYS)
    missing: dict[str, str] = {}
    if rr.size:
        meas["rr_ms"] = rhythm.mean_rr_ms
        meas["heart_rate_bpm"] = round(60000.0 / float(rr.mean()), 0)
    fid = Fiducials()
    median: RecordedBeat | None = None
    if peaks.size >= 4 and rr.size:
        rr_s = float(np.median(rr)) / 1000.0
        pre = int(min(0.5, max(0.25, 0.7 * rr_s)) * fs)
        post = int(min(0.8, max(0.4, 0.95 * rr_s)) * fs)
        inside = peaks[(peaks - pre >= 0) & (peaks + post < x.shape[1])]
        if inside.size >= 3:
            m, _used = _median_beat(_notch(hp, fs), inside, fs, pre, post)
            m = _bandpass(m, fs, None, MEDIAN_LP_HZ, order=3)
            median = RecordedBeat(sampling_rate_hz=fs, leads=record.leads, signals_uv=m)
            res, base, _ = _delineate(m, fs, pre, rr_s, record.leads, good)

            def rel(key: str) -> float | None:
                v = res.get(key)
                return None if v is None else round((v - pre) / fs * 1000.0, 1)

            fid = Fiducials(
                p_on_ms=rel("p_on"),
                p_off_ms=rel("p_off"),
                qrs_on_ms=rel("qrs_on"),
                qrs_off_ms=rel("qrs_off"),
                t_end_ms=rel("t_end"),
            )
            _fill(meas, missing, fid, m, base, pre, fs, record.leads, good, rhythm)
        else:
            missing_reason = "too few complete beats for a median beat"
            _mark_missing(meas, missing, missing_reason)
    else:
        _mark_missing(meas, missing, f"{peaks.size} QRS complexes detected (need 4)")
    if rhythm.beat_count < 2:
        missing.setdefault("heart_rate_bpm", "fewer than 2 QRS complexes detected")
        missing.setdefault("rr_ms", "fewer than 2 QRS complexes detected")
    return EcgAnalysis(
        sampling_rate_hz=record.sampling_rate_hz,
        leads=record.leads,
        duration_s=round(record.duration_s, 3),
        quality=quality,
        rhythm=rhythm,
        measurements=meas,
        missing={k: v for k, v in missing.items() if k in MEASUREMENT_KEYS},
        fiducials=fid,
        median_beat=median,
        device_measurements=record.device_measurements,
        flags=tuple(flags),
        reliable=reliable,
        extra={"p_ms": fid.p_ms} if fid.p_ms is not None else {},
    )


def _mark_missing(meas: dict[str, float | None], missing: dict[str, str], reason: str) -> None:
    for key in MEASUREMENT_KEYS:
        if meas.get(key) is None:
            missing.setdefault(key, reason)


def _fill(meas, missing, fid: Fiducials, m, base, pre, fs, leads, good, rhythm: Rhythm) -> None:
    if fid.qrs_on_ms is not None and fid.qrs_off_ms is not None:
        meas["qrs_ms"] = round(fid.qrs_off_ms - fid.qrs_on_ms, 0)
    else:
        _mark_missing_keys(missing, ("qrs_ms", "qt_ms", "pr_ms"), "QRS onset/offset not found")
    if fid.p_on_ms is not None and fid.qrs_on_ms is not None:
        meas["pr_ms"] = round(fid.qrs_on_ms - fid.p_on_ms, 0)
    else:
        missing.setdefault("pr_ms", "no P wave found in 3 or more leads")
    if fid.t_end_ms is not None and fid.qrs_on_ms is not None:
        qt = fid.t_end_ms - fid.qrs_on_ms
        meas["qt_ms"] = round(qt, 0)
        if rhythm.mean_rr_ms:
            rr_s = rhythm.mean_rr_ms / 1000.0
            meas["qtc_bazett_ms"] = round(qt / math.sqrt(rr_s), 0)
            meas["qtc_fridericia_ms"] = round(qt / rr_s ** (1 / 3), 0)
    else:
        missing.setdefault("qt_ms", "end of T wave not found")
    if meas["qt_ms"] is None:
        for key in ("qtc_bazett_ms", "qtc_fridericia_ms"):
            missing.setdefault(key, "no QT interval")

    def idx(ms_value: float) -> int:
        return round(pre + ms_value * fs / 1000.0)

    y = m - base[:, None]
    if fid.qrs_on_ms is not None and fid.qrs_off_ms is not None:
        seg = y[:, idx(fid.qrs_on_ms) : idx(fid.qrs_off_ms) + 1]
        meas["qrs_axis_deg"], why = _axis(leads, seg.max(axis=1) + seg.min(axis=1), good)
        if why:
            missing["qrs_axis_deg"] = why
        if fid.t_end_ms is not None:
            t_seg = y[:, idx(fid.qrs_off_ms) : idx(fid.t_end_ms) + 1]
            meas["t_axis_deg"], why = _axis(leads, t_seg.sum(axis=1), good)
            if why:
                missing["t_axis_deg"] = why
        else:
            missing.setdefault("t_axis_deg", "end of T wave not found")
    else:
        missing.setdefault("qrs_axis_deg", "QRS onset/offset not found")
        missing.setdefault("t_axis_deg", "QRS onset/offset not found")
    if fid.p_on_ms is not None and fid.p_off_ms is not None:
        p_seg = y[:, idx(fid.p_on_ms) : idx(fid.p_off_ms) + 1]
        meas["p_axis_deg"], why = _axis(leads, p_seg.sum(axis=1), good)
        if why:
            missing["p_axis_deg"] = why
    else:
        missing.setdefault("p_axis_deg", "no P wave found in 3 or more leads")


def _mark_missing_keys(missing: dict[str, str], keys: tuple[str, ...], reason: str) -> None:
    for key in keys:
        missing.setdefault(key, reason)
