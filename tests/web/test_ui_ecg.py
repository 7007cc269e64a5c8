"""The ECG reading console in a real headless browser (Debian's Chromium driven by
Playwright) against ``rdc serve --demo``: two ECGs of one person uploaded over HTTP (a PTB
WFDB record as the prior, the DICOM 12-lead as the current one); the trace drawn on the
grid, a caliper measured, a reader's measurement kept beside the machine's, a statement
picked by search, the prior ECG side by side with the deltas, the report signed with the
password dialog; then the signed PDF (statement and measurements in its text, an A4
landscape page with the trace on the grid) and the FHIR DiagnosticReport's LOINC-coded
Observations. Screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from playwright.sync_api import Browser, expect

from tests.helpers import RdcServer, wait_for
from tests.web.test_ui import ARTIFACTS, PASSWORD, _context, _login, _row, _shot, browser

__all__ = ["browser"]  # the fixture, shared with test_ui


@pytest.fixture
def demo(rdc_env: dict[str, str], tmp_path: Path) -> Iterator[RdcServer]:
    """``rdc serve --demo`` once its studies (and any demo ECGs) are on the worklist."""
    srv = RdcServer(rdc_env, tmp_path / "serve.log", "--demo")
    srv.start()
    try:
        with srv.client("reader", PASSWORD) as reader:
            wait_for(
                lambda: reader.get("/api/v1/worklist").json()["total"] >= 4,
                timeout=60,
                what="the demo studies on the worklist",
            )
        yield srv
    finally:
        srv.stop()


FINDINGS = "窦性心律，心率约61次/分，各间期正常。"


def _upload(api: object, paths: list[Path], **form: str) -> str:
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    response = api.post("/api/v1/ecg", files=files, data=form)  # type: ignore[attr-defined]
    assert response.status_code == 201, response.text
    exam_id: str = response.json()["exam_id"]
    return exam_id


def _recorded_today(ecg: Path, tmp_path: Path) -> Path:
    """pydicom's 12-lead ECG as recorded this morning (clinic A's ECG accreditation is
    this year's, so the report earns the HR mark)."""
    ds = pydicom.dcmread(ecg / "dicom" / "waveform_ecg.dcm")
    today = date.today().strftime("%Y%m%d")
    ds.AcquisitionDateTime = f"{today}083000"
    ds.ContentDate, ds.ContentTime = today, "083000"
    ds.StudyDate, ds.StudyTime = today, "083000"
    path = tmp_path / "waveform_ecg_today.dcm"
    ds.save_as(path)
    return path


def test_ecg_console_reads_and_signs(
    demo: RdcServer, browser: Browser, testdata: Path, tmp_path: Path
) -> None:
    ecg = testdata / "ecg"
    with demo.client("senior", PASSWORD) as api:
        # The same person (ID 642341 at clinic A): a PTB record without identity in the
        # file (named by the form) as the prior, the DICOM 12-lead as today's ECG.
        wfdb = ecg / "wfdb"
        prior_id = _upload(
            api,
            [wfdb / "s0010_re.hea", wfdb / "s0010_re.dat", wfdb / "s0010_re.xyz"],
            clinic="CLINIC_A",
            patient_id="642341",
            patient_name="Anonymous",
        )
        current_id = _upload(api, [_recorded_today(ecg, tmp_path)], clinic="CLINIC_A")
        machine = api.get(f"/api/v1/ecg/{current_id}").json()["measurements"]
        assert machine["qt_ms"] is not None
        statements = api.get("/api/v1/ecg-statements", params={"q": "窦性心律"}).json()
        assert statements[0]["code"] == "SR" and statements[0]["en"] == "Sinus rhythm"

    ctx = _context(browser)
    try:
        page = _login(ctx, demo, "senior")
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        row = _row(page, current_id)
        expect(row).to_be_visible()
        row.get_by_role("button", name="领取").click()
        expect(page).to_have_url(re.compile(rf"/ui/ecg/{current_id}$"))
        expect(page.locator("#lease-status")).to_contain_text("我已领取")

        # The trace on the grid: the canvas is drawn with ink (black) and grid (pink).
        canvas = page.locator("#ecg-current canvas")
        wait_for(lambda: canvas.evaluate("c => c.width") > 600, what="the trace drawn")
        ink = canvas.evaluate(
            """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                 let black = 0, grid = 0;
                 for (let i = 0; i < d.length; i += 4) {
                   if (d[i] < 60 && d[i + 1] < 60 && d[i + 2] < 60) black++;
                   else if (d[i] > 200 && d[i + 1] < 200 && d[i + 2] < 200) grid++;
                 }
                 return [black, grid]; }"""
        )
        assert ink[0] > 2000 and ink[1] > 20000, ink
        median = page.locator("#ecg-median")
        wait_for(lambda: median.evaluate("c => c.height") > 100, what="the median beats")

        # A caliper over 200 screen pixels: the time is 200 px / (px per mm) / 25 mm/s.
        box = canvas.bounding_box()
        assert box
        x0, y0 = box["x"] + 200, box["y"] + 60
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 + 100, y0 + 20, steps=4)
        page.mouse.move(x0 + 200, y0 + 40, steps=4)
        page.mouse.up()
        readout = page.locator("#caliper-readout")
        expect(readout).to_have_text(re.compile(r"^\d+ ms · \d+ bpm · \d\.\d\d mV$"))
        ms = int(readout.inner_text().split(" ms")[0])
        px_per_mm = box["width"] / 269.0  # 15 mm margin + 250 mm of paper + 4 mm
        expected = 200 / px_per_mm / 25.0 * 1000.0
        assert abs(ms - expected) <= 0.02 * expected, (ms, expected)

        # 6x2 at 50 mm/s, 20 mm/mV redraws; back to the standard view.
        page.click("[data-layout='6x2']")
        page.click("[data-speed='50']")
        page.click("[data-gain='20']")
        expect(page.locator("[data-layout='6x2']")).to_have_class(re.compile(r"\bon\b"))
        expect(readout).to_have_text("拖动测量")
        page.click("[data-layout='3x4']")
        page.click("[data-speed='25']")
        page.click("[data-gain='10']")

        # The reader's QT is kept beside the machine's.
        qt = page.locator("#ecg-meas tr[data-key='qt_ms'] input")
        expect(qt).to_be_editable()
        qt.fill("400")
        qt.dispatch_event("change")
        expect(page.locator("#ecg-meas-state")).to_have_text("测量值已保存")
        with demo.client("senior", PASSWORD) as api:
            stored = api.get(f"/api/v1/ecg/{current_id}").json()
        assert stored["reader_measurements"] == {"qt_ms": 400.0}
        assert stored["measurements"]["qt_ms"] == machine["qt_ms"]

        # A statement picked by search goes into the report.
        page.fill("#stmt-search", "窦性心律")
        hit = page.locator("#stmt-results .stmt-hit[data-code='SR']")
        expect(hit).to_be_visible()
        hit.click()
        expect(page.locator("#stmt-picked li")).to_have_count(1)
        expect(page.locator("#stmt-picked")).to_contain_text("Sinus rhythm")
        expect(page.locator("#impression")).to_have_value(re.compile("窦性心律"))
        page.fill("#findings", FINDINGS)
        page.check("input[name=quality_grade][value=甲]")
        expect(page.locator("#save-state")).to_contain_text("已保存", timeout=10_000)
        with demo.client("senior", PASSWORD) as api:
            draft = api.get(f"/api/v1/exams/{current_id}/report").json()
        assert draft["structured"]["ecg_statements"] == ["SR"]

        # The prior ECG side by side, with the deltas.
        page.select_option("#ecg-prior-select", prior_id)
        expect(page.locator("#ecg-prior")).to_be_visible()
        prior_canvas = page.locator("#ecg-prior canvas")
        wait_for(lambda: prior_canvas.evaluate("c => c.width") > 300, what="the prior trace")
        delta = page.locator("#ecg-meas tr[data-key='heart_rate_bpm'] td").nth(4)
        expect(delta).to_have_text(re.compile(r"^[+-]?\d+$|^0$"))
        _shot(page, "ecg-console")

        # Sign with the password dialog.
        page.get_by_role("button", name="提交签发").click()
        sign = page.locator("#sign-dialog")
        expect(sign).to_be_visible()
        expect(page.locator("#sd-hr")).to_contain_text("HR")
        page.fill("#sd-password", PASSWORD)
        page.click("#sd-sign")
        expect(sign).to_be_hidden()
        expect(page.locator("#rp-status")).to_have_text("正式报告")
        expect(page.locator("#hr-mark")).to_have_text("HR")
        expect(qt).not_to_be_editable()

        # The read-only report view of an ECG shows the report beside the trace.
        page.goto(f"{demo.http}/ui/report/{current_id}")
        expect(page.locator("#report-view")).to_be_visible()
        expect(page.locator("#rv-impression")).to_contain_text("窦性心律")
        expect(page.locator("#stmt-picked")).to_contain_text("Sinus rhythm")
        view_canvas = page.locator("#ecg-current canvas")
        wait_for(lambda: view_canvas.evaluate("c => c.width") > 600, what="the trace")
        _shot(page, "ecg-report-view")
        # The same page in English.
        page.click("#lang-switch")
        expect(page.locator(".ecg-median-box h3")).to_have_text("Median beats")
        expect(page.locator("#ecg-meas tr[data-key='qt_ms'] th")).to_have_text("QT (ms)")
        wait_for(lambda: view_canvas.evaluate("c => c.width") > 600, what="the trace")
        _shot(page, "ecg-report-view-en")
        page.click("#lang-switch")
        assert not errors, errors
    finally:
        ctx.close()

    with demo.client("senior", PASSWORD) as api:
        report = api.get(f"/api/v1/exams/{current_id}/report").json()
        pdf = api.get(f"/api/v1/reports/{report['id']}/pdf")
        assert pdf.status_code == 200
        fhir = api.get(f"/api/v1/reports/{report['id']}/fhir").json()
        document = api.get(f"/api/v1/reports/{report['id']}/document").json()
        check = api.get(f"/api/v1/reports/{report['id']}/verify").json()
        assert check["valid"] is True, check["reasons"]
        assert check["document"]["valid"] and check["pdf"]["valid"]
        # Signed: the reader's QT is final now.
        refused = api.put(
            f"/api/v1/ecg/{current_id}/reader-measurements",
            json={"measurements": {"qt_ms": 420}},
        )
        assert refused.status_code == 409

    # The signed document carries the ECG section: reported QT is the reader's.
    section = document["document"]["sections"][0]
    assert section["key"] == "ecg" and section["landscape"] is True
    reported = section["data"]["reported"]
    assert reported["qt_ms"] == 400.0
    # QTc follows the reader's QT (Bazett QT/√RR with the machine's RR).
    assert reported["qtc_bazett_ms"] == round(400.0 / (machine["rr_ms"] / 1000.0) ** 0.5)
    assert section["data"]["statements"][0]["code"] == "SR"

    path = tmp_path / "ecg-report.pdf"
    path.write_bytes(pdf.content)
    text = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "心电图诊断报告" in text and "窦性心律 Sinus rhythm" in text
    assert "QT (ms)" in text and "医师 Reader" in text and "400" in text
    info = subprocess.run(
        ["pdfinfo", "-f", "1", "-l", "2", str(path)], capture_output=True, text=True, check=True
    ).stdout
    sizes = re.findall(r"Page\s+(\d) size:\s+([\d.]+) x ([\d.]+)", info)
    assert [(float(w) > float(h)) for _, w, h in sizes] == [False, True], info
    subprocess.run(
        ["pdftoppm", "-f", "2", "-l", "2", "-r", "80", "-png", str(path), str(tmp_path / "p")],
        check=True,
    )
    [png] = sorted(tmp_path.glob("p*.png"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "ecg-report-page2.png").write_bytes(png.read_bytes())
    img = Image.open(png).convert("RGB")
    assert img.width > img.height
    px = np.asarray(img, dtype=np.int32)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    grid = int(((r > 200) & (g > 120) & (g < 230) & (b > 120) & (b < 230)).sum())
    ink = int(((r < 60) & (g < 60) & (b < 60)).sum())
    # The grid covers most of the page, the twelve leads and the rhythm strip are inked.
    assert grid > 0.05 * r.size and ink > 0.005 * r.size, (grid, ink, r.size)

    # FHIR: the measurements as Observations with their LOINC codes.
    assert fhir["category"][0]["coding"][0]["code"] == "EC"
    observations = {
        c["code"]["coding"][0]["code"]: c
        for c in fhir["contained"]
        if c["resourceType"] == "Observation"
    }
    for code in ("8867-4", "8625-6", "8633-2", "8634-0", "8636-5", "8632-0"):
        assert code in observations, (code, sorted(observations))
        assert observations[code]["code"]["coding"][0]["system"] == "http://loinc.org"
    assert observations["8634-0"]["valueQuantity"] == {
        "value": 400.0,
        "unit": "ms",
        "system": "http://unitsofmeasure.org",
        "code": "ms",
    }
    refs = {r["reference"] for r in fhir["result"]}
    assert {f"#{o['id']}" for o in observations.values()} <= refs
