"""The QC page in Chromium against a running ``rdc serve`` holding the constructed data set:
QC staff land on it, the cards show the figures, a chart is drawn (ECharts served by RDC),
and a card drills down to its cases. Screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from rdc_core.db import dispose_engines, session_scope
from tests.helpers import RdcServer, database_url
from tests.worklist import qc_dataset

ARTIFACTS = Path(__file__).resolve().parents[2] / "tests" / "artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"


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


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_qc_page_cards_charts_and_drill_down(
    server: RdcServer, rdc_env: dict[str, str], browser: Browser
) -> None:
    with session_scope(database_url(rdc_env)) as session:
        qc_dataset.build(session, with_orgs=False)
    dispose_engines()
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, locale="zh-CN")
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    external: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith(server.http) else external.append(r.url),
    )
    page.goto(f"{server.http}/")
    page.fill("#username", "qc")
    page.fill("#password", qc_dataset.PASSWORD)
    page.click("#login-form button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/qc$"))  # QC staff land on the QC page
    page.goto(f"{server.http}/ui/qc?from=2026-03-01&to=2026-03-31")
    card = page.locator(".qc-card[data-code='RRC-02']")
    expect(card.locator(".qc-value")).to_have_text("75.0 %")
    expect(card.locator(".qc-status")).to_have_text("未达标")
    expect(page.locator(".qc-card[data-code='ECG-03'] .qc-value")).to_have_text("无数据")
    expect(page.locator("#cv-hist canvas")).to_have_count(1)
    _shot(page, "qc-overview")

    card.click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#trend canvas")).to_have_count(1)
    expect(page.locator("#hist canvas")).to_have_count(1)
    rows = page.locator("#cases tbody tr")
    expect(rows).to_have_count(4)
    expect(page.locator("#breakdown tbody tr")).to_have_count(2)  # CLINIC_A, CLINIC_B
    page.select_option("#subset", "failing")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("ACC-E4")
    expect(rows.first).to_contain_text("超过120分钟")
    assert "cases=RRC-02" in (page.get_attribute("#cases-xlsx", "href") or "")
    # The trend chart has drawn something on its canvas (not blank).
    drawn = page.evaluate(
        """() => {
          const c = document.querySelector('#trend canvas');
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
          return n;
        }"""
    )
    assert drawn > 1000
    _shot(page, "qc-drill-down")
    # QC staff change the target: a new version, and the card's status follows.
    expect(page.locator("#target-value")).to_have_value("95")
    page.fill("#target-value", "70")
    page.fill("#target-note", "2026 county agreement")
    page.click("#target-save")
    expect(card.locator(".qc-status")).to_have_text("达标")
    expect(page.locator("#target-version")).to_contain_text("qc")
    # A reader is sent back to the worklist; the API refuses them too (tests/web/test_qc_api).
    assert not errors, errors
    assert not external, external  # nothing from a CDN
    context.close()
