"""The administration console and the audit trail in a real headless browser (Debian's
Chromium driven by Playwright) against a running ``rdc serve``: an administrator changes a
routing rule and an SLA target in the console, a study sent by storescu afterwards is routed
to the new pool with the new due time, the exam READY before keeps its due time; users and
clinics are edited; QC finds the changes in the audit trail with the chain intact.
Screenshots go to tests/artifacts/ui/."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers import RdcServer
from tests.web.test_admin_api import _t, ct_study, send_and_wait

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts" / "ui"
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


def _login(browser: Browser, server: RdcServer, username: str, password: str, path: str) -> Page:
    context = browser.new_context(viewport={"width": 1600, "height": 900}, locale="zh-CN")
    context.set_default_timeout(60_000)  # a loaded 2-core CI machine
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(f"{server.http}{path}")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-form button[type=submit]")
    page.wait_for_load_state()
    page.errors = errors  # type: ignore[attr-defined]
    return page


def _open_tab(page: Page, tab: str) -> None:
    """Open a console tab and wait until its latest load has rendered (a row edited before
    would be replaced by the new rendering)."""
    page.click(f"#tab-{tab}")
    expect(page.locator(f"#panel-{tab}")).to_have_attribute("data-state", "ready")


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_admin_console_changes_routing_and_sla_for_the_next_study(
    server: RdcServer,
    alliance: dict[str, str],
    browser: Browser,
    testdata: Path,
    dcmtk: Path,
    tmp_path: Path,
) -> None:
    admin_api = server.client("admin", alliance["admin"])
    before = send_and_wait(server, admin_api, dcmtk, ct_study(testdata, tmp_path, "ui-before"))
    assert before["pool"] == "imaging"

    # A reader is sent home; the admin lands on the console.
    reader = _login(browser, server, "reader", alliance["reader"], "/ui/admin")
    expect(reader).to_have_url(re.compile(r"/ui/worklist"))
    expect(reader.locator("#nav-admin")).to_have_count(0)
    reader.context.close()

    page = _login(browser, server, "admin", alliance["admin"], "/ui/admin")
    expect(page).to_have_url(re.compile(r"/ui/admin"))
    expect(page.locator("#clinics tbody tr[data-code='CLINIC_A']")).to_be_visible()

    # Routing rule: CT from clinic A -> pool "ct-a".
    _open_tab(page, "routing")
    page.click("#rule-add")
    rule = page.locator("#rules tbody tr").last
    rule.locator("[name=modality]").fill("CT")
    rule.locator("[name=clinic]").select_option("CLINIC_A")
    rule.locator("[name=pool]").fill("ct-a")
    page.click("#rules-save")
    expect(page.locator("#toast")).to_have_text("已保存")
    expect(page.locator("#rules tbody tr")).to_have_count(1)
    expect(page.locator("#rules tbody tr [name=pool]")).to_have_value("ct-a")
    _shot(page, "admin-routing")

    # SLA target: imaging routine 45 minutes (READY exams keep their due time).
    _open_tab(page, "sla")
    row = page.locator("#sla tbody tr[data-discipline='imaging'][data-priority='routine']")
    row.locator("input").fill("45")
    page.click("#sla-save")
    expect(page.locator("#toast")).to_contain_text("0")
    expect(row.locator("input")).to_have_value("45")
    _shot(page, "admin-sla")

    after = send_and_wait(server, admin_api, dcmtk, ct_study(testdata, tmp_path, "ui-after"))
    assert after["pool"] == "ct-a"
    assert _t(after["due_at"]) - _t(after["first_received_at"]) == timedelta(minutes=45)
    assert admin_api.get(f"/api/v1/exams/{before['id']}").json()["due_at"] == before["due_at"]

    # Users: a display name and a level; clinics: disable clinic B.
    _open_tab(page, "users")
    user_row = page.locator("#users tbody tr[data-username='reader']")
    user_row.locator("[name=display_name]").fill("李医生")
    user_row.locator("[name=level]").select_option("attending")
    with page.expect_response(
        lambda r: r.request.method == "PATCH" and r.url.endswith("/api/v1/users/reader")
    ) as saved:
        user_row.locator("button.save").click()
    assert saved.value.status == 200, saved.value.text()
    expect(
        page.locator("#users tbody tr[data-username='reader'] [name=display_name]")
    ).to_have_value("李医生")
    # ... and the reader's pages name the person, not the login.
    renamed = _login(browser, server, "reader", alliance["reader"], "/ui/worklist")
    expect(renamed.locator("#who strong")).to_have_text("李医生")
    expect(renamed.locator("#who strong")).to_have_attribute("title", "reader")
    renamed.context.close()
    users = {u["username"]: u for u in admin_api.get("/api/v1/users").json()}
    assert users["reader"]["display_name"] == "李医生" and users["reader"]["level"] == "attending"
    _shot(page, "admin-users")
    _open_tab(page, "clinics")
    clinic_a = page.locator("#clinics tbody tr[data-code='CLINIC_A']")
    clinic_a.locator("[name=hl7_facilities]").fill("LIS_A  analyser-a")
    with page.expect_response(
        lambda r: r.request.method == "PATCH" and r.url.endswith("/api/v1/clinics/CLINIC_A")
    ) as saved:
        clinic_a.locator("button.save").click()
    assert saved.value.status == 200, saved.value.text()
    page.locator("#clinics tbody tr[data-code='CLINIC_B'] button.disable").click()
    expect(page.locator("#clinics tbody tr[data-code='CLINIC_B']")).to_have_class(
        re.compile("inactive")
    )
    clinics = {c["code"]: c for c in admin_api.get("/api/v1/clinics").json()}
    assert clinics["CLINIC_B"]["active"] is False
    assert clinics["CLINIC_A"]["hl7_facilities"] == ["LIS_A", "analyser-a"]
    _shot(page, "admin-clinics")

    # The other tabs load from their existing APIs without errors.
    for tab in ("recognition", "critical", "delivery"):
        page.click(f"#tab-{tab}")
        expect(page.locator(f"#panel-{tab}")).to_be_visible()
    _open_tab(page, "critical")
    expect(page.locator("#contacts tbody tr")).to_have_count(2)
    # Critical-value contacts and the duty list, edited row by row.
    contact = page.locator("#contacts tbody tr[data-code='CLINIC_A']")
    contact.locator("[name=primary_name]").fill("王护士")
    contact.locator("[name=primary_phone]").fill("0571-1234")
    contact.locator("[name=primary_username]").select_option("tech_a")
    with page.expect_response(lambda r: r.request.method == "PUT") as saved:
        contact.locator("button.save").click()
    assert saved.value.status == 200, saved.value.text()
    got = admin_api.get("/api/v1/critical-contacts/CLINIC_A").json()
    assert (got["primary_name"], got["primary_username"]) == ("王护士", "tech_a")
    page.locator("#duty-add [name=username]").select_option("senior")
    page.click("#duty-add button[type=submit]")
    duty = page.locator("#duty tbody tr[data-username='senior']")
    expect(duty).to_have_count(1)
    expect(page.locator("#panel-critical")).to_have_attribute("data-state", "ready")
    duty.locator("[name=on_until]").fill("2099-01-31T18:00")
    with page.expect_response(
        lambda r: r.request.method == "POST" and "critical-duty" in r.url
    ) as s2:
        duty.locator("button.save").click()
    assert s2.value.status == 200, s2.value.text()
    entry = {d["username"]: d for d in admin_api.get("/api/v1/critical-duty").json()}["senior"]
    assert entry["on_until"].startswith("2099-01-31") and entry["on_duty_now"] is True
    expect(page.locator("#duty tbody tr[data-username='senior'] [name=on_until]")).to_have_value(
        "2099-01-31T18:00"
    )
    _shot(page, "admin-critical")
    assert not page.errors  # type: ignore[attr-defined]
    assert page.locator("#message").is_hidden()

    # The audit trail shows the changes with before/after, and the chain is intact.
    page.click("#nav-audit")
    expect(page).to_have_url(re.compile(r"/ui/audit"))
    expect(page.locator("#chain")).to_have_attribute("data-state", "ok")
    page.fill("#filters [name=action]", "routing_rules.update")
    rows = page.locator("#events-body tr[data-action]")
    expect(rows.and_(page.locator(":not([data-action='routing_rules.update'])"))).to_have_count(0)
    expect(rows).to_have_count(1)
    expect(rows.locator("td.detail")).to_contain_text("ct-a")
    page.fill("#filters [name=action]", "")
    page.fill("#filters [name=user]", "admin")
    page.fill("#filters [name=exam]", after["id"])
    expect(page.locator("#export")).to_have_attribute(
        "href", re.compile(rf"events\.csv\?user=admin&exam={after['id']}$")
    )
    expect(page.locator("#total")).not_to_contain_text("0–0")
    expect(page.locator("#events-body tr[data-action='view']").first).to_be_visible()
    actions = set(
        page.locator("#events-body tr").evaluate_all("rows => rows.map(r => r.dataset.action)")
    )
    assert "view" in actions and "routing_rules.update" not in actions
    _shot(page, "audit-trail")
    assert not page.errors  # type: ignore[attr-defined]

    # In English too.
    page.click("#lang-switch")
    expect(page.locator("h1")).to_have_text("Audit trail")
    page.goto(f"{server.http}/ui/admin#sla")
    expect(page.locator("#tab-sla")).to_have_text("SLA targets")
    expect(page.locator("#sla tbody tr")).to_have_count(9)
    _shot(page, "admin-sla-en")
    page.click("#tab-users")
    expect(page.locator("#users tbody tr[data-username='reader'] button.disable")).to_have_count(1)
    expect(page.locator("#users tbody tr[data-username='admin'] button.disable")).to_have_count(0)
    assert not page.errors  # type: ignore[attr-defined]
    page.context.close()
