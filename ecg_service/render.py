"""The 12-lead trace on standard ECG paper, as PNG (Pillow) or SVG bytes.

Geometry is in millimetres of paper: 1 mm minor and 5 mm major grid, ``speed`` mm/s and
``gain`` mm/mV, a 1 mV calibration pulse at the start of every row. The page shows
250 mm of paper, i.e. 10 s at 25 mm/s, 5 s at 50 mm/s.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ecg_service.analysis import EcgAnalysis, _bandpass
from ecg_service.record import EcgRecord

__all__ = ["LAYOUTS", "render_trace"]

Layout = Literal["3x4", "6x2", "12x1"]
LAYOUTS: dict[str, list[list[str]]] = {
    "3x4": [["I", "aVR", "V1", "V4"], ["II", "aVL", "V2", "V5"], ["III", "aVF", "V3", "V6"]],
    "6x2": [["I", "V1"], ["II", "V2"], ["III", "V3"], ["aVR", "V4"], ["aVL", "V5"], ["aVF", "V6"]],
    "12x1": [[lead] for lead in ("I", "II", "III", "aVR", "aVL", "aVF")]
    + [[f"V{k}"] for k in range(1, 7)],
}
_ROW_MM = {"3x4": 36.0, "6x2": 28.0, "12x1": 20.0}
PAPER_MM = 250.0
HEADER_MM = 16.0
BOTTOM_MM = 4.0
RIGHT_MM = 4.0
_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)
_MINOR = (255, 214, 214)
_MAJOR = (236, 140, 140)
_INK = (0, 0, 0)
_WARN = (190, 0, 0)


@dataclass(frozen=True, slots=True)
class _Trace:
    label: str
    x0: float  # mm
    baseline: float  # mm (y grows downwards)
    points: np.ndarray  # (n, 2) mm
    calibration: bool


@dataclass(frozen=True, slots=True)
class _Page:
    width: float
    height: float
    grid_top: float
    traces: list[_Trace]
    pulses: list[list[tuple[float, float]]]
    header: list[tuple[str, bool]]  # (text, warning)
    left: float


def _fmt(v: float | None, unit: str = "") -> str:
    return "—" if v is None else f"{v:.0f}{unit}"


def _header(
    record: EcgRecord, analysis: EcgAnalysis | None, speed: float, gain: float, hp: float
) -> list[tuple[str, bool]]:
    p = record.patient
    who = "  ".join(
        s
        for s in (
            (p.name or "").replace("^", " ").strip(),
            f"ID {p.patient_id}" if p.patient_id else "",
            {"M": "男 M", "F": "女 F"}.get(p.sex or "", p.sex or ""),
            f"DOB {p.birth_date.isoformat()}" if p.birth_date else "",
            f"{p.age_years} y" if p.age_years is not None and not p.birth_date else "",
            record.acquired_at.strftime("%Y-%m-%d %H:%M:%S") if record.acquired_at else "",
            record.device or "",
        )
        if s
    )
    lines = [(who or "—", False)]
    settings = f"{speed:g} mm/s  {gain:g} mm/mV  {hp:g}-150 Hz  {record.sampling_rate_hz:g} Hz"
    if analysis is not None:
        m = analysis.measurements
        settings += (
            f"   HR {_fmt(m['heart_rate_bpm'])}/min  PR {_fmt(m['pr_ms'])} ms"
            f"  QRS {_fmt(m['qrs_ms'])} ms  QT {_fmt(m['qt_ms'])} ms"
            f"  QTcB {_fmt(m['qtc_bazett_ms'])} ms  QTcF {_fmt(m['qtc_fridericia_ms'])} ms"
            f"  P/QRS/T {_fmt(m['p_axis_deg'])}/{_fmt(m['qrs_axis_deg'])}/"
            f"{_fmt(m['t_axis_deg'])}°  (RDC)"
        )
    lines.append((settings, False))
    if analysis is not None and analysis.flags:
        lines.append(("; ".join(analysis.flags), True))
    return lines


def _envelope(x_mm: np.ndarray, y_mm: np.ndarray, per_col: int) -> np.ndarray:
    """Keep each group of ``per_col`` samples' min and max (in time order) so QRS spikes
    survive the decimation to the output resolution."""
    if per_col <= 2 or x_mm.size < 2 * per_col:
        return np.column_stack([x_mm, y_mm])
    n = (x_mm.size // per_col) * per_col
    xs = x_mm[:n].reshape(-1, per_col)
    ys = y_mm[:n].reshape(-1, per_col)
    rows = np.arange(ys.shape[0])
    imin = ys.argmin(axis=1)
    imax = ys.argmax(axis=1)
    first = np.minimum(imin, imax)
    second = np.maximum(imin, imax)
    out_x = np.empty(2 * rows.size)
    out_y = np.empty(2 * rows.size)
    out_x[0::2], out_x[1::2] = xs[rows, first], xs[rows, second]
    out_y[0::2], out_y[1::2] = ys[rows, first], ys[rows, second]
    if n < x_mm.size:
        out_x = np.concatenate([out_x, x_mm[n:]])
        out_y = np.concatenate([out_y, y_mm[n:]])
    return np.column_stack([out_x, out_y])


def _layout_page(
    record: EcgRecord,
    analysis: EcgAnalysis | None,
    layout: str,
    speed: float,
    gain: float,
    rhythm_lead: str,
    step_mm: float,
    highpass_hz: float,
) -> _Page:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}")
    if speed <= 0 or gain <= 0:
        raise ValueError("speed and gain must be positive")
    rows = [list(r) for r in LAYOUTS[layout]]
    with_rhythm = layout == "3x4"
    fs = record.sampling_rate_hz
    seconds = PAPER_MM / speed
    x = record.signals_uv[:, : round((seconds + 1.0) * fs)]  # filter only what is shown
    if x.shape[1] > 3 * fs:
        x = _bandpass(x, fs, highpass_hz, 150.0, order=2)
    pulse_w = 0.2 * speed
    left = float(np.ceil((pulse_w + 6.0) / 5.0) * 5.0)
    row_mm = _ROW_MM[layout] * max(1.0, gain / 10.0)
    n_rows = len(rows) + (1 if with_rhythm else 0)
    grid_top = HEADER_MM
    height = grid_top + n_rows * row_mm + BOTTOM_MM
    width = left + PAPER_MM + RIGHT_MM
    traces: list[_Trace] = []
    pulses: list[list[tuple[float, float]]] = []
    all_rows: list[list[str]] = rows + ([[rhythm_lead]] if with_rhythm else [])
    for r, names in enumerate(all_rows):
        baseline = grid_top + (r + 0.6) * row_mm
        p0 = 2.0
        cal = gain  # 1 mV
        pulses.append(
            [
                (p0, baseline),
                (p0 + 1.5, baseline),
                (p0 + 1.5, baseline - cal),
                (p0 + 1.5 + pulse_w, baseline - cal),
                (p0 + 1.5 + pulse_w, baseline),
                (p0 + 3.0 + pulse_w, baseline),
            ]
        )
        col_s = seconds / len(names)
        for c, name in enumerate(names):
            x0 = left + c * PAPER_MM / len(names)
            if name not in record.leads:
                traces.append(_Trace(f"{name} —", x0, baseline, np.zeros((0, 2)), False))
                continue
            i0 = round(c * col_s * fs)
            i1 = min(x.shape[1], round((c + 1) * col_s * fs))
            if i1 - i0 < 2:
                traces.append(_Trace(name, x0, baseline, np.zeros((0, 2)), False))
                continue
            seg = x[record.leads.index(name), i0:i1]
            seg = seg - float(np.median(seg))
            t = np.arange(seg.size) / fs
            xs = x0 + t * speed
            ys = baseline - seg / 1000.0 * gain
            per_col = int(fs * step_mm / speed)
            traces.append(_Trace(name, x0, baseline, _envelope(xs, ys, per_col), c == 0))
    return _Page(
        width=width,
        height=height,
        grid_top=grid_top,
        traces=traces,
        pulses=pulses,
        header=_header(record, analysis, speed, gain, highpass_hz),
        left=left,
    )


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in _FONTS:
        if Path(path).exists():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.load_default()


_PALETTE = [255, 255, 255, *_MINOR, *_MAJOR, *_INK, *_WARN]
_WHITE_I, _MINOR_I, _MAJOR_I, _INK_I, _WARN_I = range(5)


@lru_cache(maxsize=16)
def _grid(w: int, h: int, top: int, ppm: float) -> Image.Image:
    img = Image.new("P", (w, h), _WHITE_I)
    img.putpalette(_PALETTE)
    draw = ImageDraw.Draw(img)
    n_x = int(w / ppm) + 1
    n_y = int((h - top) / ppm) + 1
    for major in (False, True):
        colour = _MAJOR_I if major else _MINOR_I
        for k in range(n_x):
            if (k % 5 == 0) == major:
                xp = round(k * ppm)
                draw.line([(xp, top), (xp, h)], fill=colour, width=1)
        for k in range(n_y):
            if (k % 5 == 0) == major:
                yp = top + round(k * ppm)
                draw.line([(0, yp), (w, yp)], fill=colour, width=1)
    return img


def _png(page: _Page, ppm: float) -> bytes:
    w, h = round(page.width * ppm), round(page.height * ppm)
    top = round(page.grid_top * ppm)
    img = _grid(w, h, top, ppm).copy()
    draw = ImageDraw.Draw(img)
    line_w = max(1, round(ppm * 0.3))
    for pulse in page.pulses:
        draw.line([(px * ppm, py * ppm) for px, py in pulse], fill=_INK_I, width=line_w)
    font_label = _font(max(10, round(3.2 * ppm)))
    for tr in page.traces:
        if tr.points.shape[0] >= 2:
            pts = (tr.points * ppm).ravel().tolist()
            draw.line(pts, fill=_INK_I, width=line_w)
        draw.text(
            ((tr.x0 + 1.0) * ppm, (tr.baseline - 9.0) * ppm),
            tr.label,
            fill=_INK_I,
            font=font_label,
        )
        if not tr.calibration and tr.x0 > page.left + 1:  # column separator tick
            xp = tr.x0 * ppm
            draw.line(
                [(xp, (tr.baseline - 3) * ppm), (xp, (tr.baseline + 3) * ppm)],
                fill=_INK_I,
                width=line_w,
            )
    font_head = _font(max(10, round(3.4 * ppm)))
    for k, (text, warn) in enumerate(page.header):
        draw.text(
            (2 * ppm, (1.0 + 4.8 * k) * ppm),
            text,
            fill=_WARN_I if warn else _INK_I,
            font=font_head,
        )
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _points(points: np.ndarray) -> str:
    flat = np.round(points, 2).ravel().tolist()
    return ("%g,%g " * points.shape[0] % tuple(flat)).rstrip()


def _svg(page: _Page) -> bytes:
    w, h = page.width, page.height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w:.1f}mm" height="{h:.1f}mm" '
        f'viewBox="0 0 {w:.1f} {h:.1f}">',
        "<defs>",
        '<pattern id="minor" width="1" height="1" patternUnits="userSpaceOnUse">'
        '<path d="M 1 0 L 0 0 0 1" fill="none" stroke="#ffd6d6" stroke-width="0.06"/>'
        "</pattern>",
        '<pattern id="major" width="5" height="5" patternUnits="userSpaceOnUse">'
        '<rect width="5" height="5" fill="url(#minor)"/>'
        '<path d="M 5 0 L 0 0 0 5" fill="none" stroke="#ec8c8c" stroke-width="0.12"/>'
        "</pattern>",
        "</defs>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<rect x="0" y="{page.grid_top:.1f}" width="{w:.1f}" height="{h - page.grid_top:.1f}" '
        'fill="url(#major)" transform="translate(0 0)"/>',
        '<g font-family="Noto Sans CJK SC, WenQuanYi Micro Hei, DejaVu Sans, sans-serif">',
    ]
    for k, (text, warn) in enumerate(page.header):
        colour = "#be0000" if warn else "#000"
        parts.append(
            f'<text x="2" y="{4.0 + 4.8 * k:.1f}" font-size="3.4" fill="{colour}">'
            f"{escape(text)}</text>"
        )
    for pulse in page.pulses:
        pts = " ".join(f"{x:.2f},{y:.2f}" for x, y in pulse)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#000" stroke-width="0.3"/>')
    for tr in page.traces:
        if tr.points.shape[0] >= 2:
            pts = _points(tr.points)
            parts.append(
                f'<polyline points="{pts}" fill="none" stroke="#000" stroke-width="0.3" '
                'stroke-linejoin="round"/>'
            )
        parts.append(
            f'<text x="{tr.x0 + 1:.1f}" y="{tr.baseline - 6.0:.1f}" font-size="3.2">'
            f"{escape(tr.label)}</text>"
        )
        if not tr.calibration and tr.x0 > page.left + 1:
            parts.append(
                f'<line x1="{tr.x0:.2f}" y1="{tr.baseline - 3:.2f}" x2="{tr.x0:.2f}" '
                f'y2="{tr.baseline + 3:.2f}" stroke="#000" stroke-width="0.3"/>'
            )
    parts.append("</g></svg>")
    return "\n".join(parts).encode("utf-8")


def render_trace(
    record: EcgRecord,
    analysis: EcgAnalysis | None = None,
    *,
    layout: str = "3x4",
    speed: float = 25.0,
    gain: float = 10.0,
    fmt: Literal["png", "svg"] = "png",
    rhythm_lead: str = "II",
    px_per_mm: float = 5.0,
    highpass_hz: float = 0.5,
) -> bytes:
    """The trace as PNG or SVG bytes. ``layout``: ``3x4`` (+ a rhythm strip of
    ``rhythm_lead``), ``6x2`` or ``12x1``; ``speed`` mm/s (25 or 50); ``gain`` mm/mV (5, 10,
    20). The header names the patient, time, settings and, given ``analysis``, our
    measurements."""
    if fmt not in ("png", "svg"):
        raise ValueError("fmt must be 'png' or 'svg'")
    if rhythm_lead not in record.leads and record.leads:
        rhythm_lead = "II" if "II" in record.leads else record.leads[0]
    step = 1.0 / px_per_mm if fmt == "png" else 0.2
    page = _layout_page(record, analysis, layout, speed, gain, rhythm_lead, step, highpass_hz)
    return _png(page, px_per_mm) if fmt == "png" else _svg(page)
