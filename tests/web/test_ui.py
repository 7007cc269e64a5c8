"""The web UI in a real headless browser (Debian's Chromium driven by Playwright) against a
running ``rdc serve --demo``: login, worklist, reading page (viewer + report), senior
verification, language switch, clinic view. Screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect, sync_playwright
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.helpers import RdcServer, wait_for
from web.ui.i18n import MESSAGES
from worklist.models import Discipline, ExamState, Priority, ReaderLevel, ReportStatus, Role

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
PASSWORD = "rdc-demo"  # web/demo.py
RANK = {"emergency": 0, "urgent": 1, "routine": 2}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def demo(rdc_env: dict[str, str], tmp_path: Path) -> Iterator[RdcServer]:
    """``rdc serve --demo`` with its four studies, three ECGs and two held lab orders on the
    worklist."""
    srv = RdcServer(rdc_env, tmp_path / "serve.log", "--demo")
    srv.start()
    try:
        with srv.client("reader", PASSWORD) as reader:
            wait_for(
                lambda: reader.get("/api/v1/worklist").json()["total"] == 9,
                timeout=60,
                what="the demo studies on the worklist",
            )
        yield srv
    finally:
        srv.stop()


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


def _context(browser: Browser) -> BrowserContext:
    context = browser.new_context(viewport={"width": 1600, "height": 900}, locale="zh-CN")
    context.set_default_timeout(15_000)
    return context


def _login(context: BrowserContext, server: RdcServer, username: str) -> Page:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.http}/ui/worklist")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("#login-form button[type=submit]")
    page.wait_for_load_state()
    assert not errors, errors
    return page


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _row(page: Page, exam_id: str) -> Locator:
    return page.locator(f"#worklist-body tr[data-exam-id='{exam_id}']")


# --- the reading flow -----------------------------------------------------------------------


def _store_prior(server: RdcServer, testdata: Path) -> str:
    """A multi-frame MR (10 frames) of demo patient A0001 from clinic A; returns its exam ID."""
    ds = pydicom.dcmread(testdata / "dicom" / "emri_small.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.PatientName = "A0001", "Wang^Fang=王^芳"
    ds.PatientSex, ds.PatientBirthDate = "F", "19580312"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["ui-test", "prior"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["ui-test", "prior", "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["ui-test", "prior", "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate, ds.StudyDescription = "20250101", "头颅MR Brain MRI"
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    with server.client("reader", PASSWORD) as reader:
        exams = reader.get("/api/v1/exams", params={"clinic": "CLINIC_A", "limit": 500}).json()
        wait_for(
            lambda: reader.get("/api/v1/worklist").json()["total"] == 10,
            what="the prior on the worklist too",
        )
    return next(e["id"] for e in exams["items"] if e["study_instance_uid"] == ds.StudyInstanceUID)


def test_resident_reads_and_senior_verifies(
    demo: RdcServer, browser: Browser, testdata: Path
) -> None:
    prior_id = _store_prior(demo, testdata)
    reader_ctx, senior_ctx, clinic_ctx = _context(browser), _context(browser), _context(browser)
    try:
        page = _login(reader_ctx, demo, "reader")
        expect(page).to_have_url(re.compile(r"/ui/worklist$"))
        rows = page.locator("#worklist-body tr[data-exam-id]")
        expect(rows).to_have_count(10)  # 5 imaging exams, 3 ECGs, 2 lab orders
        priorities = [rows.nth(i).get_attribute("data-priority") for i in range(10)]
        assert priorities[0] == "emergency"
        assert [RANK[p or ""] for p in priorities] == sorted(RANK[p or ""] for p in priorities)
        expect(page.locator("[data-count=open]")).to_have_text("10")
        expect(rows.first.locator(".countdown")).to_have_text(re.compile(r"\d+:\d\d:\d\d"))
        # The demo ECG with a long QTc is first, marked as a suspected critical ECG.
        expect(rows.first).to_have_attribute("data-discipline", "ecg")
        expect(rows.first.locator(".badge.triage")).to_have_text("疑似危急")
        _shot(page, "worklist")

        # Claim the emergency CT (three slices).
        ct = page.locator("#worklist-body tr[data-discipline=imaging]").first
        expect(ct).to_have_attribute("data-priority", "emergency")
        exam_id = ct.get_attribute("data-exam-id")
        assert exam_id
        ct.get_by_role("button", name="领取").click()
        expect(page).to_have_url(re.compile(rf"/ui/read/{exam_id}$"))
        expect(page.locator("#lease-status")).to_contain_text("我已领取")

        # The senior sees it as taken, without a claim button.
        senior = _login(senior_ctx, demo, "senior")
        taken = _row(senior, exam_id)
        expect(taken.locator(".state")).to_have_text("已被 刘洋 Liu Yang 领取")
        expect(taken.get_by_role("button", name="领取")).to_have_count(0)

        # Viewer: frames scroll with the wheel and the keys; the image follows.
        image = page.locator("#vp-main .vp-image")
        frame = page.locator("#vp-main .vp-frame")
        expect(frame).to_have_text("帧 1 / 3")
        expect(image).to_have_attribute("src", re.compile(r"/frames/1/rendered$"))
        first_src = image.get_attribute("src")
        page.locator("#vp-main .vp-stage").hover()
        page.mouse.wheel(0, 120)
        expect(frame).to_have_text("帧 2 / 3")
        expect(image).not_to_have_attribute("src", first_src or "")
        page.keyboard.press("ArrowDown")
        expect(frame).to_have_text("帧 3 / 3")
        expect(page.locator("#vp-main .vp-slider")).to_have_value("3")
        wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth > 0"), what="a frame")

        # Window/level: the lung preset key, then a right-drag, each asks for a new rendering.
        with page.expect_response(lambda r: "window=-600,1500,linear" in r.url) as preset:
            page.keyboard.press("1")
        assert preset.value.ok and preset.value.headers["content-type"] == "image/png"
        expect(page.locator("[data-preset=lung]")).to_have_class(re.compile(r"\bon\b"))
        box = page.locator("#vp-main .vp-stage").bounding_box()
        assert box
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        with page.expect_response(
            lambda r: "/rendered?window=" in r.url and "window=-600,1500," not in r.url
        ) as dragged:
            page.mouse.move(x, y)
            page.mouse.down(button="right")
            page.mouse.move(x + 80, y + 40, steps=8)
            page.mouse.up(button="right")
        assert dragged.value.ok
        assert image.get_attribute("data-window") != "-600,1500"
        page.keyboard.press("0")
        expect(image).to_have_attribute("data-window", "default")

        # The DICOM header of the shown instance.
        page.click("#header-toggle")
        expect(page.locator("#header-table")).to_contain_text("PatientID")
        expect(page.locator("#header-table")).to_contain_text("A0001")
        page.click("#header-toggle")

        # The patient's prior (the multi-frame MR) beside the current exam, played as cine.
        page.select_option("#prior-select", prior_id)
        prior = page.locator("#vp-prior")
        expect(prior).to_be_visible()
        expect(prior.locator(".vp-frame")).to_have_text("帧 1 / 10")
        prior_image = prior.locator(".vp-image")
        expect(prior_image).to_have_attribute("src", re.compile(r"/frames/1/rendered$"))
        wait_for(lambda: prior_image.evaluate("i => i.complete && i.naturalWidth > 0"))
        prior.locator(".vp-stage").click()  # the prior's viewport takes the keys
        page.keyboard.press(" ")
        expect(page.locator("#cine")).to_have_text("暂停")
        expect(prior.locator(".vp-frame")).to_have_text(re.compile(r"帧 ([2-9]|10) / 10"))
        page.keyboard.press(" ")
        expect(page.locator("#cine")).to_have_text("播放")
        expect(frame).to_have_text("帧 3 / 3")  # the current exam stayed where it was
        _shot(page, "prior")
        page.click("#prior-close")
        expect(prior).to_be_hidden()

        # Report: a template, an impression, a grade; autosaved, then signed with ctrl+enter.
        page.select_option("#template-select", "CT_CHEST")
        expect(page.locator("#findings")).to_have_value(re.compile("两肺纹理清晰"))
        page.fill("#impression", "右肺上叶小结节，建议随访。")
        page.check("input[name=quality_grade][value=甲]")
        expect(page.locator("#save-state")).to_contain_text("已保存", timeout=10_000)

        # A signature is deliberate: a stray `s` while viewing the image only opens the
        # signing dialog (what is signed, a password field) and signs nothing.
        sign = page.locator("#sign-dialog")
        page.locator("#vp-main .vp-stage").click()
        page.keyboard.press("s")
        expect(sign).to_be_visible()
        expect(page.locator("#sd-outcome")).to_have_text(re.compile("初步报告"))
        expect(page.locator("#sd-impression")).to_have_text("右肺上叶小结节，建议随访。")
        expect(page.locator("#sd-patient")).to_contain_text(page.locator("#ei-pid").inner_text())
        expect(page.locator("#sd-exam")).to_contain_text("CT")
        expect(page.locator("#sd-critical")).to_have_text("否")
        expect(page.locator("#sd-hr")).to_have_text("由上级医师审核签发时判定")
        expect(page.locator("#sd-password")).to_be_focused()
        page.keyboard.press("s")  # typed into the password field, nothing else
        page.keyboard.press("Escape")
        expect(sign).to_be_hidden()
        expect(page.locator("#rp-status")).to_have_text("草稿")
        with demo.client("reader", PASSWORD) as reader_api:
            draft = reader_api.get(f"/api/v1/exams/{exam_id}/report").json()
        assert draft["status"] == "draft" and draft["submitted_at"] is None
        # Ctrl+Enter opens it too; a wrong password signs nothing; the right one signs.
        page.locator("#impression").press("Control+Enter")
        expect(sign).to_be_visible()
        page.fill("#sd-password", "not-my-password")
        page.click("#sd-sign")
        expect(page.locator("#sd-error")).to_have_text("密码错误，未签名")
        expect(page.locator("#rp-status")).to_have_text("草稿")
        page.fill("#sd-password", PASSWORD)
        _shot(page, "sign-dialog")
        page.click("#sd-sign")
        expect(sign).to_be_hidden()
        expect(page.locator("#rp-status")).to_have_text("初步报告")
        expect(page.locator("#rp-notice")).to_contain_text("以正式报告为准")
        expect(page.locator("#impression")).not_to_be_editable()
        expect(page.locator("#ei-state")).to_have_text("初步报告待审核")
        page.locator(".report-pane").evaluate("pane => pane.scrollTo(0, 0)")
        _shot(page, "reading")

        # Shortcuts: the help overlay; `n` claims the next exam (the demo ECG a pre-screen
        # put first in the queue) and opens it; Release gives it back to the queue.
        page.keyboard.press("?")
        expect(page.locator("#help")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("#help")).to_be_hidden()
        page.keyboard.press("n")
        expect(page).not_to_have_url(re.compile(exam_id))
        expect(page.locator("#ei-desc")).to_contain_text("12-lead ECG")
        expect(page.locator("#lease-status")).to_contain_text("我已领取")
        page.get_by_role("button", name="释放").click()
        expect(page).to_have_url(re.compile(r"/ui/worklist$"))
        expect(
            page.locator("tr[data-priority=urgent]").get_by_role("button", name="领取")
        ).to_be_visible()

        # The senior opens it from the worklist, sees the preliminary report and verifies it.
        senior.reload()
        expect(_row(senior, exam_id).locator(".state")).to_have_text("待审核")
        _row(senior, exam_id).get_by_role("link", name="审核").click()
        expect(senior).to_have_url(re.compile(rf"/ui/read/{exam_id}$"))
        expect(senior.locator("#rp-status")).to_have_text("初步报告")
        expect(senior.locator("#findings")).to_have_value(re.compile("两肺纹理清晰"))
        senior.get_by_role("button", name="审核签发").click()
        expect(senior.locator("#sign-dialog")).to_be_visible()
        expect(senior.locator("#sd-outcome")).to_have_text(re.compile("正式报告"))
        expect(senior.locator("#rp-status")).to_have_text("初步报告")
        senior.fill("#sd-password", PASSWORD)
        senior.click("#sd-sign")
        expect(senior.locator("#rp-status")).to_have_text("正式报告")
        expect(senior.locator("#rp-locked")).to_be_visible()
        expect(senior.locator("#rp-verifier")).to_have_text("陈静 Chen Jing")  # a name, not a login
        for field in ("#findings", "#impression", "#recommendation", "#quality-reason"):
            expect(senior.locator(field)).not_to_be_editable()
        expect(senior.locator("input[name=quality_grade][value=甲]")).to_be_disabled()
        expect(senior.locator("#verify-btn")).to_be_hidden()
        expect(senior.locator("#submit-btn")).to_be_hidden()
        expect(senior.locator("#ei-state")).to_have_text("已出正式报告")
        _shot(senior, "final-report")

        # The clinic sees the final report, read-only.
        clinic = _login(clinic_ctx, demo, "doctor_a")
        expect(clinic).to_have_url(re.compile(r"/ui/clinic$"))
        clinic.locator(f"tr[data-exam-id='{exam_id}']").get_by_role("link", name="查看报告").click()
        expect(clinic).to_have_url(re.compile(rf"/ui/report/{exam_id}$"))
        expect(clinic.locator("#rp-status")).to_have_text("正式报告")
        expect(clinic.locator("#impression")).to_have_value("右肺上叶小结节，建议随访。")
        expect(clinic.locator("#impression")).not_to_be_editable()
        _shot(clinic, "clinic-report")
    finally:
        for context in (reader_ctx, senior_ctx, clinic_ctx):
            context.close()


# --- language, clinic view, session ---------------------------------------------------------


def test_language_clinic_view_and_session(demo: RdcServer, browser: Browser) -> None:
    context = _context(browser)
    try:
        with demo.client("reader", PASSWORD) as reader:
            params = {"clinic": "CLINIC_A", "limit": 500}
            own = reader.get("/api/v1/exams", params=params).json()["total"]
            assert own >= 2 and reader.get("/api/v1/exams").json()["total"] > own
        page = _login(context, demo, "doctor_a")
        expect(page).to_have_url(re.compile(r"/ui/clinic$"))
        rows = page.locator("#exams-body tr[data-exam-id]")
        expect(rows).to_have_count(own)  # clinic A's demo studies, not clinic B's
        assert {rows.nth(i).get_attribute("data-clinic") for i in range(own)} == {"CLINIC_A"}
        expect(page.locator("h1")).to_have_text("本机构检查与报告")
        _shot(page, "clinic")

        page.click("#lang-switch")
        expect(page.locator("h1")).to_have_text("Our exams and reports")
        expect(page.locator("html")).to_have_attribute("lang", "en")
        expect(page.locator("#exams thead")).to_contain_text("Priority")
        expect(rows).to_have_count(own)
        _shot(page, "clinic-en")
        page.click("#lang-switch")
        expect(page.locator("h1")).to_have_text("本机构检查与报告")

        # A clinic user has no worklist page.
        page.goto(f"{demo.http}/ui/worklist")
        expect(page).to_have_url(re.compile(r"/ui/clinic$"))

        page.get_by_role("button", name="退出").click()
        expect(page).to_have_url(re.compile(r"/login$"))
        page.goto(f"{demo.http}/ui/clinic")
        expect(page).to_have_url(re.compile(r"/login\?next=%2Fui%2Fclinic$"))
    finally:
        context.close()
    _check_session_rules(demo)


def _check_session_rules(demo: RdcServer) -> None:
    """The session cookie's flags, login failures, redirects that stay on this site, and the
    X-Requested-With rule for cookie-authorised changes."""
    with httpx.Client(base_url=demo.http, follow_redirects=False, timeout=30) as http:
        assert http.get("/ui/worklist").headers["location"] == "/login?next=%2Fui%2Fworklist"

        bad = http.post("/login", data={"username": "reader", "password": "wrong"})
        assert bad.status_code == 401 and "用户名或密码错误" in bad.text

        cross = http.post(
            "/login",
            data={"username": "reader", "password": PASSWORD},
            headers={"Origin": "https://evil.example"},
        )
        assert cross.status_code == 403 and "rdc_session" not in cross.headers.get("set-cookie", "")

        # Only local paths are followed after login.
        ok = http.post(
            "/login", data={"username": "reader", "password": PASSWORD, "next": "//evil.example/"}
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/ui/worklist"
        cookie = ok.headers["set-cookie"]
        assert cookie.startswith("rdc_session=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie

        page = http.get("/ui/worklist")
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]

        # The cookie alone never authorises a change; with X-Requested-With it does.
        assert http.post("/api/v1/worklist/next").status_code == 401
        lease = http.post("/api/v1/worklist/next", headers={"X-Requested-With": "rdc"})
        assert lease.status_code == 200 and lease.json()["claimed_by"] == "reader"

        en = http.get("/ui/lang/en", params={"next": "/ui/worklist"})
        assert en.headers["location"] == "/ui/worklist"
        assert "Reading worklist" in http.get("/ui/worklist").text
        elsewhere = http.get("/ui/lang/en", params={"next": "https://evil.example"})
        assert elsewhere.headers["location"] == "/"


# --- the message catalogue ------------------------------------------------------------------

_WEB = REPO / "web"
_KEY_IN_TEMPLATE = re.compile(r"""\bt\(\s*["']([A-Za-z0-9_.甲乙丙废]+)["']""")


def test_catalogue_is_complete_in_both_languages() -> None:
    zh, en = MESSAGES["zh-CN"], MESSAGES["en"]
    assert zh.keys() == en.keys()
    assert all(v.strip() for v in zh.values()) and all(v.strip() for v in en.values())
    used: set[str] = set()
    for path in [*(_WEB / "templates").glob("*.html"), *(_WEB / "static").glob("*.js")]:
        used |= {k for k in _KEY_IN_TEMPLATE.findall(path.read_text()) if not k.endswith(".")}
    used |= {f"priority.{p.value}" for p in Priority}
    used |= {f"discipline.{d.value}" for d in Discipline}
    used |= {f"exam_state.{s.value}" for s in ExamState}
    used |= {f"role.{r.value}" for r in Role} | {f"level.{lv.value}" for lv in ReaderLevel}
    used |= {f"report_status.{s.value}" for s in ReportStatus} | {"report_status.none"}
    used |= {f"quality.{g}" for g in "甲乙丙废"}
    assert sorted(used - zh.keys()) == []
