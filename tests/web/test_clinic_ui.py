"""The clinic page in a real headless browser (Debian's Chromium driven by Playwright)
against a running ``rdc serve``: a technician marks an exam's urgency (the due time follows,
the change is audited), sees the image count, sees a reader's re-scan request with its
reason, who asked and when, and answers it: declining with a reason puts the exam back on
the reading queue and tells the reader; sending new images puts it back by itself.
Screenshots go to tests/artifacts/ui/ (viewport 1366x768, the clinic's laptop)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from pydicom.uid import generate_uid

from tests.helpers import RdcServer, c_store, storescu, wait_for, worklist_items

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


def _login(browser: Browser, server: RdcServer, username: str, password: str) -> Page:
    context = browser.new_context(viewport={"width": 1366, "height": 768}, locale="zh-CN")
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.http}/ui/clinic")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/clinic$"))
    page.on("close", lambda _: None)
    page.context.errors = errors  # type: ignore[attr-defined]
    return page


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _audited(server: RdcServer, action: str, exam_id: str) -> list[Any]:
    with server.db() as db:
        return list(
            db.execute(
                "SELECT detail FROM audit_events WHERE action = ? AND object_id = ?",
                (action, exam_id),
            ).fetchall()
        )


def test_technician_marks_urgency_and_answers_rescan_requests(
    server: RdcServer,
    alliance: dict[str, str],
    testdata: Path,
    dcmtk: Path,
    browser: Browser,
    tmp_path: Path,
) -> None:
    source = testdata / "dicom" / "CT_small.dcm"
    sent = storescu(dcmtk, [source], port=server.dicom_port, calling_ae="CLINIC_A_CT")
    assert all(r.returncode == 0 for r in sent)
    reader = server.client("reader", alliance["reader"])
    tech = server.client("tech_a", alliance["tech_a"])
    item = worklist_items(reader)[0]
    exam_id = item["exam_id"]
    due_before = datetime.fromisoformat(item["due_at"])
    assert item["priority"] == "routine"

    # --- urgency, on the clinic page ---------------------------------------------------------
    page = _login(browser, server, "tech_a", alliance["tech_a"])
    row = page.locator(f"#exams-body tr[data-exam-id='{exam_id}']")
    expect(row.locator("td.images")).to_have_text("1")
    row.locator(".set-priority").click()
    expect(page.locator("#answer-dialog")).to_be_visible()
    page.select_option("#answer-priority", "emergency")
    page.click("#answer-submit")
    expect(page.locator("#answer-error")).to_be_visible()  # a reason is required
    page.fill("#answer-reason", "胸痛急诊 chest pain")
    page.click("#answer-submit")
    expect(row).to_have_attribute("data-priority", "emergency")
    expect(row.locator(".badge.prio-emergency")).to_be_visible()
    _shot(page, "clinic_urgency")
    exam = tech.get(f"/api/v1/exams/{exam_id}").json()
    assert exam["priority"] == "emergency" and exam["priority_reason"] == "胸痛急诊 chest pain"
    listed = worklist_items(reader)[0]
    assert listed["priority"] == "emergency"
    assert datetime.fromisoformat(listed["due_at"]) < due_before  # the due time follows
    assert _audited(server, "set_priority", exam_id)
    # by API, with the named errors
    bad = tech.post(f"/api/v1/exams/{exam_id}/priority", json={"priority": "soon", "reason": "x"})
    assert bad.status_code == 422
    other = server.client("tech_b", alliance["tech_b"])
    hidden = other.post(
        f"/api/v1/exams/{exam_id}/priority", json={"priority": "routine", "reason": "x"}
    )
    assert hidden.status_code == 404
    ok = tech.post(
        f"/api/v1/exams/{exam_id}/priority", json={"priority": "urgent", "reason": "复核"}
    )
    assert ok.status_code == 200 and ok.json()["priority"] == "urgent"

    # --- a re-scan request reaches the technician ----------------------------------------
    assert reader.post(f"/api/v1/worklist/{item['id']}/claim").status_code == 200
    asked = reader.post(f"/api/v1/exams/{exam_id}/rescan", json={"reason": "运动伪影 motion"})
    assert asked.status_code == 200, asked.text
    exam = tech.get(f"/api/v1/exams/{exam_id}").json()
    assert exam["state"] == "RESCAN_REQUESTED" and exam["rescan_reason"] == "运动伪影 motion"
    assert exam["rescan_requested_by"] == "reader" and exam["rescan_requested_at"]
    notes = tech.get("/api/v1/notifications", params={"kind": "rescan_requested"}).json()
    assert [n["subject_id"] for n in notes["items"]] == [exam_id]

    page.reload()
    row = page.locator(f"#exams-body tr[data-exam-id='{exam_id}']")
    expect(row.locator(".rescan-reason")).to_contain_text("运动伪影 motion")
    expect(row.locator(".rescan-by")).to_contain_text("reader")
    expect(page.locator("#notif-count")).to_have_text("1")
    _shot(page, "clinic_rescan_request")
    row.locator(".decline-rescan").click()
    page.fill("#answer-reason", "患者已离院 patient has left")
    page.click("#answer-submit")
    expect(row).to_have_attribute("data-state", "READY")
    expect(row.locator(".rescan-declined")).to_contain_text("患者已离院")
    expect(page.locator("#notif-count")).to_have_text("0")  # answered: the notice is read
    _shot(page, "clinic_rescan_declined")
    assert not page.context.errors  # type: ignore[attr-defined]

    back = worklist_items(reader)[0]
    assert back["exam_id"] == exam_id and back["state"] == "OPEN"
    told = reader.get("/api/v1/notifications", params={"kind": "rescan_declined"}).json()
    assert [n["subject_id"] for n in told["items"]] == [exam_id]
    assert _audited(server, "decline_rescan", exam_id)
    again = tech.post(f"/api/v1/exams/{exam_id}/rescan/decline", json={"reason": "x"})
    assert again.status_code == 409  # nothing waits for an answer now

    # --- answering with new images puts the exam back by itself ----------------------------
    assert reader.post(f"/api/v1/worklist/{back['id']}/claim").status_code == 200
    asked = reader.post(f"/api/v1/exams/{exam_id}/rescan", json={"reason": "层厚不足"})
    assert asked.status_code == 200, asked.text
    assert reader.get("/api/v1/worklist").json()["items"] == []
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert c_store(server.dicom_port, ds, calling_ae="CLINIC_A_CT") == 0
    back = worklist_items(reader)[0]
    assert back["exam_id"] == exam_id and back["state"] == "OPEN"
    exam = wait_for(
        lambda: (e := tech.get(f"/api/v1/exams/{exam_id}").json())["state"] == "READY" and e,
        timeout=30,
        what="the exam back on the queue",
    )
    assert exam["instance_count"] == 2
    for client in (reader, tech, other):
        client.close()
    page.context.close()
