"""Signed reports in a real headless browser (Debian's Chromium driven by Playwright) against
a running ``rdc serve --demo``: key images marked with ``k``, signing with a critical finding,
the signature panel and its verification, the PDF, the HR mark, an amended version, the
clinic's critical-value banner with its read-back, and the register. Screenshots go to
tests/artifacts/ui/."""

from __future__ import annotations

import re

from playwright.sync_api import Browser, expect

from tests.helpers import RdcServer, wait_for
from tests.web.test_ui import PASSWORD, _context, _login, _row, _shot, browser, demo

__all__ = ["browser", "demo"]  # the fixtures, shared with test_ui

FINDING = "右肺上叶见一大小约2.5 cm肿块，纵隔气管旁可见气胸征象。"
IMPRESSION = "右侧张力性气胸，请立即处理。"
CORRECTED = "右侧气胸（约30%），请立即处理。"
READ_BACK = "右侧气胸，立即处理，已知晓"


def test_sign_verify_amend_and_critical_value(demo: RdcServer, browser: Browser) -> None:
    senior_ctx, clinic_ctx, qc_ctx = _context(browser), _context(browser), _context(browser)
    try:
        # The chief reader claims the emergency CT.
        page = _login(senior_ctx, demo, "senior")
        rows = page.locator("#worklist-body tr[data-discipline=imaging]")
        expect(rows.first).to_have_attribute("data-priority", "emergency")
        exam_id = rows.first.get_attribute("data-exam-id")
        assert exam_id
        _row(page, exam_id).get_by_role("button", name="领取").click()
        expect(page).to_have_url(re.compile(rf"/ui/read/{exam_id}$"))
        expect(page.locator("#lease-status")).to_contain_text("我已领取")

        # Key image: frame 2 marked with `k`, shown in the report pane with a thumbnail.
        expect(page.locator("#vp-main .vp-frame")).to_have_text("帧 1 / 3")
        page.locator("#vp-main .vp-stage").click()
        page.keyboard.press("ArrowDown")
        expect(page.locator("#vp-main .vp-frame")).to_have_text("帧 2 / 3")
        expect(page.locator("#ki-empty")).to_be_visible()
        page.keyboard.press("k")
        items = page.locator("#ki-list .ki-item")
        expect(items).to_have_count(1)
        expect(items.first).to_contain_text("第 2 帧")
        expect(page.locator("#key-toggle")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#vp-key")).to_be_visible()
        thumb = items.first.locator("img")
        expect(thumb).to_have_attribute("src", re.compile(r"/frames/1/rendered\?viewport=96,96$"))
        wait_for(lambda: thumb.evaluate("i => i.complete && i.naturalWidth > 0"), what="thumb")
        # Moving away and clicking the thumbnail jumps back to the marked frame.
        page.keyboard.press("ArrowDown")
        expect(page.locator("#vp-key")).to_be_hidden()
        items.first.locator(".ki-thumb").click()
        expect(page.locator("#vp-main .vp-frame")).to_have_text("帧 2 / 3")

        # The help overlay lists `k`.
        page.keyboard.press("?")
        expect(page.locator("#help")).to_contain_text("关键图像")
        page.keyboard.press("Escape")

        # The report with a critical finding, grade 甲; autosaved with its key image.
        page.fill("#findings", FINDING)
        page.fill("#impression", IMPRESSION)
        page.check("input[name=quality_grade][value=甲]")
        page.check("#critical")
        expect(page.locator("#save-state")).to_contain_text("已保存", timeout=10_000)
        with demo.client("senior", PASSWORD) as senior_api:
            draft = senior_api.get(f"/api/v1/exams/{exam_id}/report").json()
        assert len(draft["key_images"]) == 1 and draft["critical"] is True

        # Sign: the signature panel, the alert sent, key images locked.
        page.get_by_role("button", name="提交签发").click()
        sign = page.locator("#sign-dialog")
        expect(sign).to_be_visible()
        expect(page.locator("#sd-outcome")).to_have_text(re.compile("正式报告"))
        expect(page.locator("#sd-critical")).to_contain_text("是")
        expect(page.locator("#sd-hr")).to_contain_text("HR")
        expect(page.locator("#sd-impression")).to_have_text(IMPRESSION)
        page.fill("#sd-password", PASSWORD)
        _shot(page, "sign-dialog-final")
        page.click("#sd-sign")
        expect(sign).to_be_hidden()
        expect(page.locator("#rp-status")).to_have_text("正式报告")
        expect(page.locator("#sig-panel")).to_be_visible()
        expect(page.locator("#sig-signer")).to_contain_text("senior")
        expect(page.locator("#sig-serial")).not_to_be_empty()
        expect(page.locator("#critical-sent")).to_contain_text("等待复述确认")
        expect(page.locator("#ki-list .ki-remove")).to_have_count(0)
        expect(page.locator("#key-toggle")).to_be_disabled()

        # Verify the signature; the PDF link answers a PDF.
        page.click("#sig-verify")
        expect(page.locator("#sig-result")).to_contain_text("✓ 签名有效")
        expect(page.locator("#sig-result")).to_have_attribute("data-valid", "true")
        pdf_href = page.locator("#sig-pdf").get_attribute("href")
        assert pdf_href and pdf_href.endswith("/pdf")
        pdf = page.request.get(demo.http + pdf_href)
        assert pdf.ok and pdf.headers["content-type"] == "application/pdf"
        assert pdf.body().startswith(b"%PDF")

        # The HR mark with the exam data: clinic A is accredited for imaging.
        hr = page.locator("#exam-info #hr-panel")
        expect(hr).to_be_visible()
        expect(hr).to_have_attribute("data-granted", "true")
        expect(page.locator("#hr-mark")).to_have_text("HR")
        expect(hr).to_contain_text("互认有效期至")
        page.locator(".report-pane").evaluate("pane => pane.scrollTo(0, 0)")
        _shot(page, "report-signed")

        # Amend (corrected, with a reason): version 2 is current, version 1 still listed.
        page.get_by_role("button", name="修订报告").click()
        dialog = page.locator("#amend-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#amend-impression")).to_have_value(IMPRESSION)
        dialog.locator("input[name=kind][value=corrected]").check()
        page.fill("#amend-impression", CORRECTED)
        dialog.get_by_role("button", name="签发新版本").click()
        expect(page.locator("#amend-error")).to_contain_text("请填写修订原因")
        page.fill("#amend-reason-input", "气胸程度描述有误")
        _shot(page, "amend-dialog")
        dialog.get_by_role("button", name="签发新版本").click()
        expect(sign).to_be_visible()
        expect(page.locator("#sd-impression")).to_have_text(CORRECTED)
        page.fill("#sd-password", PASSWORD)
        page.click("#sd-sign")
        expect(sign).to_be_hidden()
        expect(dialog).to_be_hidden()
        versions = page.locator("#version-list .version")
        expect(versions).to_have_count(2)
        expect(page.locator("#version-list .version.current")).to_have_attribute(
            "data-version", "2"
        )
        expect(page.locator("#version-list .version.current")).to_contain_text("更正")
        expect(page.locator("#rp-version")).to_have_text("第 2 版")
        expect(page.locator("#impression")).to_have_value(CORRECTED)
        expect(page.locator("#amend-reason")).to_contain_text("气胸程度描述有误")
        # The earlier version stays readable.
        page.locator("#version-list .version[data-version='1'] button").click()
        expect(page.locator("#old-version")).to_contain_text("第 1 版")
        expect(page.locator("#impression")).to_have_value(IMPRESSION)
        expect(page.locator("#amend-btn")).to_be_hidden()
        page.click("#back-to-current")
        expect(page.locator("#impression")).to_have_value(CORRECTED)
        expect(page.locator("#amend-btn")).to_be_visible()

        # The clinic: the critical banner, read back. The correction superseded version 1's
        # alert (never read back) and raised one for version 2: one card.
        clinic = _login(clinic_ctx, demo, "doctor_a")
        expect(clinic).to_have_url(re.compile(r"/ui/clinic$"))
        banner = clinic.locator("#critical-alerts")
        expect(banner).to_be_visible()
        cards = banner.locator(".cv-card")
        expect(cards).to_have_count(1)
        expect(banner).to_contain_text(CORRECTED)
        expect(cards.first.locator(".cv-countdown")).to_have_text(re.compile(r"\d+:\d\d:\d\d"))
        _shot(clinic, "clinic-critical")
        cards.first.get_by_role("button", name="确认收到").click()
        expect(cards.first.locator(".error-text")).to_contain_text("请先复述")
        card = cards.first
        card.locator("textarea[name=read_back]").fill(READ_BACK)
        card.locator("input[name=receiver_name]").fill("李医生")
        card.get_by_role("button", name="确认收到").click()
        expect(cards).to_have_count(0)
        expect(banner).to_be_hidden()

        # The clinic's report page: signature, HR, both versions, the current one marked.
        clinic.goto(f"{demo.http}/ui/report/{exam_id}")
        expect(clinic.locator("#sig-panel")).to_be_visible()
        expect(clinic.locator("#hr-mark")).to_have_text("HR")
        expect(clinic.locator("#version-list .version")).to_have_count(2)
        expect(clinic.locator("#version-list .version.current")).to_have_attribute(
            "data-version", "2"
        )
        expect(clinic.locator("#amend-btn")).to_be_hidden()
        expect(clinic.locator("#critical-alerts")).to_be_hidden()
        clinic.click("#sig-verify")
        expect(clinic.locator("#sig-result")).to_contain_text("✓ 签名有效")
        _shot(clinic, "clinic-report-signed")
        clinic.click("#lang-switch")
        expect(clinic.locator("#hr-panel")).to_contain_text("Recognisable until")
        expect(clinic.locator("#version-list .version.current")).to_contain_text("Corrected")
        _shot(clinic, "clinic-report-signed-en")

        # The reader's page now says the alert was read back.
        page.reload()
        expect(page.locator("#critical-sent")).to_contain_text("复述确认")
        expect(page.locator("#critical-sent")).to_have_attribute("data-state", "acknowledged")

        # QC: the register shows both sides with the read-back, and the superseded alert.
        qc = _login(qc_ctx, demo, "qc")
        qc.click("#nav-critical")
        expect(qc).to_have_url(re.compile(r"/ui/critical$"))
        register = qc.locator("#alerts-body tr[data-alert-id]")
        expect(register).to_have_count(3)  # and the demo's critical potassium (clinic B)
        qc.select_option("#filters select[name=state]", "superseded")
        expect(register).to_have_count(1)
        expect(register.first).to_contain_text("由第 2 版报告取代")
        qc.select_option("#filters select[name=state]", "acknowledged")
        expect(register).to_have_count(1)
        first = register.first
        expect(first).to_have_attribute("data-state", "acknowledged")
        expect(first.locator(".read-back")).to_have_text(READ_BACK)
        expect(first.locator(".ack-by")).to_contain_text("doctor_a")
        expect(first.locator(".ack-by")).to_contain_text("李医生")
        expect(first).to_contain_text("senior")
        expect(first.locator(".in-time")).to_have_text("是")
        qc.select_option("#filters select[name=state]", "open")
        expect(register).to_have_count(1)  # the lab's critical potassium, not read back yet
        expect(register.first).to_contain_text("6.9")
        qc.select_option("#filters select[name=clinic]", "CLINIC_A")
        expect(qc.locator("#alerts-body tr.placeholder")).to_be_visible()
        qc.click("#filters button[type=reset]")
        expect(register).to_have_count(3)
        _shot(qc, "critical-register")
    finally:
        for context in (senior_ctx, clinic_ctx, qc_ctx):
            context.close()
