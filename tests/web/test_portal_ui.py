"""The clinic report portal in a real headless browser (Debian's Chromium driven by
Playwright) against a running ``rdc serve``: the clinic sees its amended report with the
current version marked and the earlier one listed, downloads the signed PDF through the
page's link, and acknowledges receipt."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from tests.helpers import RdcServer
from tests.web.test_deliveries_api import final_report

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


def test_clinic_downloads_and_acknowledges_in_the_portal(
    server: RdcServer,
    alliance: dict[str, str],
    testdata: Path,
    dcmtk: Path,
    browser: Browser,
    tmp_path: Path,
) -> None:
    first = final_report(server, alliance, testdata, dcmtk)
    with server.client("tech_a", alliance["tech_a"]) as api:
        v1_ack = api.post(f"/api/v1/reports/{first}/acknowledge")
        assert v1_ack.status_code == 200, v1_ack.text
    with server.client("senior", alliance["senior"]) as senior:
        amended = senior.post(
            f"/api/v1/reports/{first}/amend",
            json={
                "kind": "corrected",
                "reason": "更正",
                "impression": "右肺小结节，建议复查",
                **senior.signing,
            },
        )
        assert amended.status_code == 200, amended.text
    current = amended.json()["id"]
    with server.client("tech_a", alliance["tech_a"]) as api:
        listed = api.get("/api/v1/reports", params={"current_only": "false"}).json()["items"]
        by_id = {i["report_id"]: i for i in listed}
        # Version 2 is a new delivery: not acknowledged with version 1's times.
        assert by_id[first]["acknowledged_at"] == v1_ack.json()["acknowledged_at"]
        assert by_id[current]["acknowledged_at"] is None
        unread = api.get("/api/v1/notifications", params={"kind": "report_version"}).json()
        assert current in {n["subject_id"] for n in unread["items"]}
        signed_pdf = api.get(f"/api/v1/reports/{current}/pdf").content

    # The amended PDF says so at the top of its first page.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pdf_path = tmp_path / "amended.pdf"
    pdf_path.write_bytes(signed_pdf)
    text = subprocess.run(
        ["pdftotext", "-l", "1", "-layout", str(pdf_path), "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    head = text[: text.index("Name")] if "Name" in text else text[:600]
    assert "更正版 Corrected" in head and "replaces v1" in head and "更正" in head
    # a human report number, the same for both versions, and the patient as people read it
    number = by_id[current]["report_number"]
    assert re.fullmatch(r"RDC-20\d\d-\d{6}", number or "")
    assert by_id[first]["report_number"] == number
    assert f"{number} · v2" in text
    assert "CompressedSamples CT1" in text and "^" not in text.split("Patient ID")[0]
    assert "Age at exam" in text
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
            str(pdf_path),
            str(ARTIFACTS / "amended_report_pdf"),
        ],
        check=True,
    )

    context = browser.new_context(
        viewport={"width": 1500, "height": 700}, locale="zh-CN", accept_downloads=True
    )
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.http}/ui/portal")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#username", "tech_a")
    page.fill("#password", alliance["tech_a"])
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/portal$"))

    row = page.locator(f"tr.report-row[data-report-id='{current}']")
    expect(row).to_be_visible()
    # The header counts the unread notifications; the list names the new version.
    expect(page.locator("#notif-count")).not_to_have_text("0")
    page.click("#notif-toggle")
    expect(page.locator("#notif-list .notif-item.kind-report_version").first).to_contain_text(
        "第2版"
    )
    page.screenshot(path=str(ARTIFACTS / "portal_notifications.png"))
    page.click("#notif-toggle")
    expect(page.locator("#critical-alerts")).to_have_count(1)  # the banner is on this page too
    expect(row.locator(".version")).to_contain_text("第2版")
    expect(row.locator(".report-number")).to_have_text(re.compile(r"^RDC-\d{4}-\d{6}$"))
    expect(row.locator(".version")).to_contain_text("当前版本")
    expect(row.locator(".version")).to_contain_text("更正")
    expect(page.locator("tr.report-row")).to_have_count(1)  # the current version only
    older = page.locator(f".older-version[data-report-id='{first}']")
    expect(older).to_contain_text("第1版")
    expect(row.locator(".ack-button")).to_be_visible()

    with page.expect_download() as download_info:
        row.locator("a.pdf-link").click()
    download = download_info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.name.endswith("-v2.pdf") and saved.read_bytes() == signed_pdf

    row.locator(".ack-button").click()
    expect(row.locator(".ack")).to_contain_text("已签收")
    with server.client("tech_a", alliance["tech_a"]) as api:
        unread = api.get("/api/v1/notifications", params={"kind": "report_version"}).json()
        assert current not in {n["subject_id"] for n in unread["items"]}  # read by the ack
    expect(row.locator(".delivered")).not_to_contain_text("未下载")  # the download delivered it
    expect(page.locator(f".older-version[data-report-id='{first}']")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "portal_amended_acknowledged.png"), full_page=True)
    # on the clinic's 1366x768 laptop every column, downloads included, stays on screen
    page.set_viewport_size({"width": 1366, "height": 768})
    assert page.eval_on_selector(".table-wrap", "n => n.scrollWidth <= n.clientWidth + 1")
    box = row.locator("a.fhir-link").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1366
    page.screenshot(path=str(ARTIFACTS / "portal_1366.png"))

    page.check("input[name=all_versions]")
    expect(page.locator("tr.report-row")).to_have_count(2)
    expect(page.locator(f"tr.report-row[data-report-id='{first}'] .version")).to_contain_text(
        "已被替代"
    )
    assert not errors, errors
    context.close()
