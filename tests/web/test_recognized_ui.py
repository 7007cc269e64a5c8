"""The clinic's recognised-results page in a real headless browser (Debian's Chromium
driven by Playwright) against a running ``rdc serve``: a clinician looks up a patient's
results still valid today and declines one with a standard reason, the patient told.
Screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pydicom
import pytest
from playwright.sync_api import Browser, expect, sync_playwright
from pydicom.uid import generate_uid

from tests.helpers import RdcServer, report_exam, storescu, worklist_items
from tests.web.test_recognition_api import _USERS, ACCREDITATIONS, CATALOG

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"


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


def test_clinician_looks_up_and_declines_a_recognised_result(
    server: RdcServer,
    alliance: dict[str, str],
    rdc_env: dict[str, str],
    testdata: Path,
    dcmtk: Path,
    browser: Browser,
    tmp_path: Path,
) -> None:
    subprocess.run([sys.executable, "-c", _USERS], env=rdc_env, check=True, timeout=120)
    with server.client("admin", alliance["admin"]) as admin:
        csv, yaml = {"content-type": "text/csv"}, {"content-type": "application/yaml"}
        assert admin.post("/api/v1/recognition/catalog", content=CATALOG, headers=csv).is_success
        assert admin.post(
            "/api/v1/recognition/accreditations", content=ACCREDITATIONS, headers=yaml
        ).is_success
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    recent = tmp_path / "recent.dcm"
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = today.strftime("%Y%m%d")
    ds.save_as(recent, enforce_file_format=True)
    sent = storescu(dcmtk, [recent], port=server.dicom_port, calling_ae="CLINIC_A_CT")
    assert all(r.returncode == 0 for r in sent)
    with server.client("senior", alliance["senior"]) as senior:
        item = worklist_items(senior)[0]
        report_exam(
            senior,
            exam_id=item["exam_id"],
            item_id=item["id"],
            report={"findings": "两肺纹理清晰", "impression": "未见异常", "quality_grade": "甲"},
        )

    context = browser.new_context(viewport={"width": 1366, "height": 768}, locale="zh-CN")
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.http}/ui/recognized")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#username", "doctor_a")
    page.fill("#password", "pw-doctor_a-123")
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/recognized$"))
    expect(page.locator("#critical-alerts")).to_have_count(1)
    page.fill("#hr-patient-id", str(ds.PatientID))
    page.click("#hr-search")
    row = page.locator("tr.result-row")
    expect(row).to_have_count(1)
    expect(row.locator(".hr-mark")).to_have_text("HR")
    expect(row).to_contain_text(today.isoformat())
    page.screenshot(path=str(ARTIFACTS / "recognized_lookup.png"))
    row.locator("button.decline").click()
    expect(page.locator("#decline-reason option")).to_have_count(7)
    page.select_option("#decline-reason", "high_stakes_decision")
    page.fill("#decline-note", "术前复查")
    page.click("#decline-submit")
    expect(page.locator("#decline-error")).to_be_visible()  # the patient must be told
    page.check("#decline-informed")
    page.screenshot(path=str(ARTIFACTS / "recognized_decline_dialog.png"))
    page.click("#decline-submit")
    expect(row.locator(".declined")).to_be_visible()
    assert not errors, errors
    context.close()

    with server.client("doctor_a", "pw-doctor_a-123") as doctor:
        declines = doctor.get("/api/v1/recognition/declines").json()
    assert len(declines) == 1 and declines[0]["reason"] == "high_stakes_decision"
    assert declines[0]["patient_informed"] is True and declines[0]["note"] == "术前复查"
