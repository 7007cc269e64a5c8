"""UI defects clinics and readers hit, in a real headless browser (Debian's Chromium driven
by Playwright) at a 1366x768 laptop viewport against a running ``rdc serve``: no "taken by
null" for QC/admin, the claim column on screen, readable overlays, long patient IDs kept in
their header, no 404 per exam without a report, and the clinic's report page showing the
formatted report with Print giving the signed PDF. Screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers import RdcServer, c_store, report_exam, worklist_items

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
LONG_ID = "PID-" + "0123456789" * 5 + "-XYZ"  # 58 characters, DICOM allows 64


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


class _Session:
    def __init__(self, browser: Browser, server: RdcServer, username: str, password: str):
        self.context = browser.new_context(viewport={"width": 1366, "height": 768}, locale="zh-CN")
        self.context.set_default_timeout(20_000)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.missing: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on(
            "response",
            lambda r: self.missing.append(r.url) if r.status == 404 else None,
        )
        self.page.goto(f"{server.http}/login")
        self.page.fill("#username", username)
        self.page.fill("#password", password)
        self.page.click("#login-form button[type=submit]")
        self.page.wait_for_load_state()

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _fits(page: Page, selector: str) -> bool:
    return bool(page.eval_on_selector(selector, "n => n.scrollWidth <= n.clientWidth + 1"))


def test_ui_defects_at_1366(
    server: RdcServer, alliance: dict[str, str], testdata: Path, browser: Browser, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = LONG_ID
    ds.PatientName = "Wang^Fang=王^芳"
    ds.PatientBirthDate = "19800315"
    ds.StudyDescription = "胸部CT平扫 Chest CT without contrast, low dose screening protocol"
    assert c_store(server.dicom_port, ds, calling_ae="CLINIC_A_CT") == 0
    reader_api = server.client("reader", alliance["reader"])
    item = worklist_items(reader_api)[0]
    exam_id = item["exam_id"]

    # QC / admin: an unclaimed row says open, never "taken by null"
    admin = _Session(browser, server, "admin", alliance["admin"])
    admin.page.goto(f"{server.http}/ui/worklist")
    row = admin.page.locator(f"#worklist-body tr[data-exam-id='{exam_id}']")
    expect(row).to_be_visible()
    expect(row.locator("td.state")).not_to_contain_text("null")
    expect(row.locator("td.state")).to_have_text(re.compile(r"待"))
    admin.shot("worklist_admin_1366")

    # the reader: the claim column is on screen, nothing scrolls sideways
    reader = _Session(browser, server, "reader", alliance["reader"])
    reader.page.goto(f"{server.http}/ui/worklist")
    claim = reader.page.locator(f"#worklist-body tr[data-exam-id='{exam_id}'] button.claim")
    expect(claim).to_be_visible()
    box = claim.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1366
    assert _fits(reader.page, ".table-wrap")
    reader.shot("worklist_reader_1366")

    # the reading page: no 404 for the report not written yet, the long ID stays inside
    reader.page.goto(f"{server.http}/ui/read/{exam_id}")
    expect(reader.page.locator("#ei-pid")).to_have_text(LONG_ID)
    expect(reader.page.locator("#vp-main .vp-image")).to_be_visible()
    reader.page.wait_for_load_state("networkidle")
    assert not [u for u in reader.missing if "/report" in u], reader.missing
    assert _fits(reader.page, "#exam-info")
    shadow = reader.page.eval_on_selector(
        "#vp-main .vp-overlay.tl", "n => getComputedStyle(n).textShadow"
    )
    assert shadow and shadow != "none"
    reader.shot("reading_long_id_1366")
    reader.context.close()
    admin.context.close()

    # a final report, then the clinic's report page: the report as text, Print -> the PDF
    submitted = report_exam(
        reader_api,
        exam_id=exam_id,
        item_id=item["id"],
        report={"findings": "两肺纹理清晰", "impression": "未见异常", "quality_grade": "甲"},
    )
    with server.client("senior", alliance["senior"]) as senior:
        verified = senior.post(
            f"/api/v1/reports/{submitted['id']}/verify-by-senior", json=senior.signing
        )
        assert verified.status_code == 200, verified.text
    clinic = _Session(browser, server, "tech_a", alliance["tech_a"])
    clinic.page.goto(f"{server.http}/ui/report/{exam_id}")
    view = clinic.page.locator("#report-view")
    expect(view).to_be_visible()
    expect(view.locator("#rv-findings")).to_have_text("两肺纹理清晰")
    expect(view.locator("#rv-impression")).to_have_text("未见异常")
    expect(clinic.page.locator("#report-form")).to_be_hidden()
    expect(clinic.page.locator("#sig-pdf")).to_have_attribute("href", re.compile(r"/pdf$"))
    clinic.shot("clinic_report_page_1366")
    clinic.page.click("#print-btn")
    frame = clinic.page.locator("iframe#print-frame")
    expect(frame).to_have_attribute("src", f"/api/v1/reports/{submitted['id']}/pdf")
    assert not clinic.errors and not admin.errors and not reader.errors

    # the signed PDF names the patient as people read it, with the age at the exam and
    # the human report number
    with server.client("tech_a", alliance["tech_a"]) as tech:
        pdf = tech.get(f"/api/v1/reports/{submitted['id']}/pdf")
        listed = tech.get("/api/v1/reports").json()["items"]
    assert pdf.status_code == 200
    saved = tmp_path / "report.pdf"
    saved.write_bytes(pdf.content)
    text = subprocess.run(
        ["pdftotext", "-layout", str(saved), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "王芳 / Wang Fang" in text and "Wang^Fang" not in text and "=王" not in text
    assert "Age at exam: 23岁 / 23 y" in " ".join(text.split())  # performed 2004-01-19
    number = listed[0]["report_number"]
    assert re.fullmatch(r"RDC-\d{4}-\d{6}", number) and f"{number} · v1" in text
    subprocess.run(
        [
            "pdftoppm",
            "-png",
            "-r",
            "70",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            str(saved),
            str(ARTIFACTS / "report_pdf_patient_name"),
        ],
        check=True,
    )
    clinic.context.close()
    reader_api.close()
