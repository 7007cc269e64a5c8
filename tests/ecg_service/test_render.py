"""Trace rendering: grid in millimetres, calibration pulse, layouts, speed and gain, SVG."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecg_service import analyse, read_ecg, render_trace, synthesize_ecg
from ecg_service.render import HEADER_MM, PAPER_MM, RIGHT_MM

PPM = 5.0


@pytest.fixture(scope="module")
def dicom(testdata: Path):
    rec = read_ecg(testdata / "ecg" / "dicom" / "waveform_ecg.dcm")
    return rec, analyse(rec)


def _png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize(("layout", "rows"), [("3x4", 4), ("6x2", 6), ("12x1", 12)])
def test_layouts(dicom, layout: str, rows: int) -> None:
    rec, a = dicom
    img = _png(render_trace(rec, a, layout=layout, px_per_mm=PPM))
    left = 15.0  # calibration margin at 25 mm/s, rounded up to a 5 mm line
    assert img.shape[1] == round((left + PAPER_MM + RIGHT_MM) * PPM)
    ink = img.sum(axis=2) < 100
    # Every row's baseline has trace ink near it across the paper.
    row_mm = {"3x4": 36.0, "6x2": 28.0, "12x1": 20.0}[layout]
    x0 = int((left + 5) * PPM)
    for r in range(rows):
        base = (HEADER_MM + (r + 0.6) * row_mm) * PPM
        band = ink[int(base - 3 * PPM) : int(base + 3 * PPM), x0:]
        assert band.any(axis=0).mean() > 0.6, (layout, r)
    assert img.shape[0] == round((HEADER_MM + rows * row_mm + 4.0) * PPM)


def test_grid_is_millimetre_accurate(dicom) -> None:
    rec, a = dicom
    img = _png(render_trace(rec, a, px_per_mm=PPM))
    y = int((HEADER_MM + 2.5) * PPM)  # a grid row between lines, away from traces' baselines
    row = img[y]
    major = np.flatnonzero((row[:, 0] > 200) & (row[:, 1] < 170) & (row[:, 2] < 170))
    # Major (5 mm) lines every 25 px at 5 px/mm.
    spacing = np.diff(major)
    assert np.all(np.abs(spacing - 5 * PPM) <= 1), spacing[:10]


def test_calibration_pulse_is_one_millivolt(dicom) -> None:
    rec, a = dicom
    for gain in (5.0, 10.0, 20.0):
        img = _png(render_trace(rec, a, gain=gain, px_per_mm=PPM))
        ink = img.sum(axis=2) < 100
        body = ink[int(HEADER_MM * PPM) : int((HEADER_MM + 36 * max(1, gain / 10)) * PPM)]
        # The pulse's vertical edges are the longest vertical ink runs left of the trace.
        runs = []
        for x in range(int(2 * PPM), int(5 * PPM)):
            col = np.flatnonzero(body[:, x])
            if col.size:
                runs.append(col[-1] - col[0])
        line_px = max(1, round(PPM * 0.3))
        height_mm = (max(runs) - line_px + 1) / PPM
        assert abs(height_mm - gain) <= 0.4, (gain, height_mm)


def test_speed_50_shows_half_the_time(dicom) -> None:
    rec, a = dicom
    slow = render_trace(rec, a, speed=25.0, fmt="svg")
    fast = render_trace(rec, a, speed=50.0, fmt="svg")

    def last_x(svg: bytes) -> float:
        root = ET.fromstring(svg)
        lines = [e for e in root.iter() if e.tag.endswith("polyline")]
        pts = lines[-1].get("points", "").split()
        return float(pts[-1].split(",")[0]) - float(pts[0].split(",")[0])

    assert last_x(slow) == pytest.approx(PAPER_MM, abs=1.0)  # 10 s rhythm strip at 25 mm/s
    assert last_x(fast) == pytest.approx(PAPER_MM, abs=1.0)  # 5 s at 50 mm/s


def test_svg_is_valid_and_in_millimetres(dicom) -> None:
    rec, a = dicom
    svg = render_trace(rec, a, fmt="svg", layout="6x2")
    root = ET.fromstring(svg)
    assert root.get("width", "").endswith("mm") and root.get("viewBox")
    text = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    assert "642341" in text and "25 mm/s" in text and "10 mm/mV" in text
    assert "QRS 73 ms" in text or "QRS " in text
    for lead in ("I", "aVF", "V6"):
        assert lead in text.split()


def test_header_names_patient_and_flags(testdata: Path) -> None:
    base = testdata / "ecg" / "wfdb"
    rec = read_ecg(base / "3000003_0003.hea", base / "3000003_0003.dat")
    svg = render_trace(rec, analyse(rec), fmt="svg").decode()
    assert "measurement unreliable" in svg
    assert "aVR —" in svg  # a lead the record does not have is labelled, not drawn


def test_chinese_name_renders() -> None:
    from dataclasses import replace

    from ecg_service import PatientIdentity

    rec, _ = synthesize_ecg()
    rec = replace(rec, patient=PatientIdentity(patient_id="P1", name="张三", sex="M"))
    png = render_trace(rec, analyse(rec))
    assert _png(png).shape[0] > 100
    assert "张三" in render_trace(rec, fmt="svg").decode()


def test_bad_options() -> None:
    rec, _ = synthesize_ecg()
    with pytest.raises(ValueError, match="layout"):
        render_trace(rec, layout="4x3")
    with pytest.raises(ValueError, match="fmt"):
        render_trace(rec, fmt="jpg")  # type: ignore[arg-type]
