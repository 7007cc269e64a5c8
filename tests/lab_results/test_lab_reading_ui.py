"""Lab reading in a real browser (Debian's Chromium driven by Playwright) against one
``rdc serve``: ORU messages over a real MLLP socket (two earlier orders of the same person,
then one whose potassium the auto-verification holds), the lab physician's page (flag, hold
reason, prior values), approval, signing with the password dialog (a wrong password first),
a rejected result, then the signed PDF (analytes, units, ranges, 互认 per row; rendered to
PNG), the HL7 push-back at a strict HIS, the clinic's portal, and the FHIR
DiagnosticReport with one Observation per result (LOINC, UCUM). Screenshots go to
tests/artifacts/ui/."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.helpers import free_port, mllp_exchange, rdc_cli, wait_for
from tests.lab_results.conftest import LabDeployment
from tests.lab_results.test_report_push import His, strict_hl7apy_problem
from tests.web.test_ui import ARTIFACTS, _context, _shot, browser

__all__ = ["browser"]

FACILITY = "ELAB-3"  # one of CLINIC_A's sending facilities (conftest)
PATIENT = "LR-0001"
TODAY = date.today()


def _oru(control_id: str, filler: str, collected: date, *obx: str) -> bytes:
    when = collected.strftime("%Y%m%d") + "0730"
    lines = [
        f"MSH|^~\\&|LIS|{FACILITY}|RDC|LEAD|{when}||ORU^R01^ORU_R01|{control_id}|P|2.5.1",
        f"PID|1||{PATIENT}^^^CLINIC_A^MR||Li^Lei||19600202|M",
        f"OBR|1|PL-{filler}|{filler}|BMP^基础代谢 Basic metabolic panel^L|||{when}"
        f"||||||{when}|||||||||{when}|||F",
    ]
    for n, line in enumerate(obx, start=1):
        lines.append(f"OBX|{n}|{line}|||{when}")
    return "\r".join(lines).encode("utf-8")


def _k(value: str, flag: str = "") -> str:
    return f"NM|2823-3^Potassium^LN||{value}|mmol/L|3.5-5.3|{flag}|||F"


def _na(value: str) -> str:
    return f"NM|2951-2^Sodium^LN||{value}|mmol/L|137-147||||F"


def _glu(value: str) -> str:
    return f"NM|14749-6^Glucose^LN||{value}|mmol/L|3.9-6.1||||F"


def _send(lab: LabDeployment, message: bytes) -> None:
    with socket.create_connection(("127.0.0.1", lab.server.mllp_port), timeout=30) as sock:
        ack = mllp_exchange(sock, message)
    assert b"MSA|AA" in ack or b"MSA|CA" in ack, ack


@pytest.fixture(scope="module")
def his(lab: LabDeployment) -> Iterator[His]:
    """Clinic A's HIS: an HL7 endpoint that validates every ORU strictly (hl7apy, v2.5.1)."""
    port = free_port()
    receiver = His(port, strict=True)
    rdc_cli(
        lab.env, "delivery", "endpoint", "add", "--clinic", "CLINIC_A", "--channel", "hl7",
        "--host", "127.0.0.1", "--port", str(port), "--app", "HIS", "--facility", "CLINIC_A",
        "--pdf", "link",
    )  # fmt: skip
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def order(lab: LabDeployment, his: His) -> Iterator[str]:
    """The recognition catalogue and clinic A's lab accreditation, two earlier orders and
    the held one; yields the held order's exam ID."""
    workdir = lab.workdir
    catalogue = workdir / "catalogue.csv"
    catalogue.write_text(
        "code,discipline,name_zh,name_en,scope_mark,scope_note,valid_days,test_codes\n"
        "LAB-ELEC,lab,电解质,Electrolytes,HR,,30,2823-3 2951-2\n"
        "LAB-GLU,lab,血糖,Glucose,HR,,30,14749-6\n",
        encoding="utf-8",
    )
    rdc_cli(lab.env, "catalog", "load", str(catalogue))
    accreditation = workdir / "accreditation.csv"
    accreditation.write_text(
        "org,discipline,item_code,valid_from,valid_to,note\n"
        f"CLINIC_A,lab,,{TODAY.year - 1}-01-01,{TODAY.year + 1}-12-31,省临检中心室间质评 EQA\n",
        encoding="utf-8",
    )
    rdc_cli(lab.env, "accreditation", "load", str(accreditation))
    messages = [
        _oru("LR-1", "F-LR-1", TODAY - timedelta(days=20), _k("4.1"), _na("141")),
        _oru("LR-2", "F-LR-2", TODAY - timedelta(days=5), _k("4.4"), _na("140")),
        _oru("LR-3", "F-LR-3", TODAY, _k("5.9", "H"), _na("141"), _glu("5.2")),
    ]
    with lab.client("senior") as api:

        def processed(filler: str) -> str | None:
            orders = api.get(
                "/api/v1/lab/orders", params={"patient_id": PATIENT, "issuer": "CLINIC_A"}
            )
            assert orders.status_code == 200, orders.text
            rows = [o for o in orders.json() if o["filler_number"] == filler]
            return rows[0]["exam_id"] if rows else None

        # One after the other: each order's delta check sees the ones before it.
        exam_id = ""
        for n, message in enumerate(messages, start=1):
            _send(lab, message)
            exam_id = wait_for(
                lambda n=n: processed(f"F-LR-{n}"), timeout=90, what=f"lab order {n} processed"
            )
        yield exam_id


def _login(context: BrowserContext, lab: LabDeployment, username: str) -> Page:
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{lab.server.http}/ui/worklist")
    page.fill("#username", username)
    page.fill("#password", lab.passwords[username])
    page.click("#login-form button[type=submit]")
    page.wait_for_load_state()
    assert not errors, errors
    return page


def test_review_sign_and_the_signed_lab_report(
    lab: LabDeployment, order: str, his: His, browser: Browser
) -> None:
    # The lab physician has a display name: the page and the PDF show it, not the login.
    rdc_cli(lab.env, "user", "edit", "senior", "--name", "王审核")
    context = _context(browser)
    try:
        page = _login(context, lab, "senior")
        # The worklist opens a lab exam on the lab page.
        row = page.locator(f"#worklist-body tr[data-exam-id='{order}']")
        expect(row).to_be_visible()
        expect(row.locator("td.patient a")).to_have_attribute("href", f"/ui/lab/{order}")
        row.get_by_role("button", name="领取").click()
        expect(page).to_have_url(re.compile(rf"/ui/lab/{order}$"))
        expect(page.locator("#lease-status")).to_contain_text("我已领取")

        # The held potassium: value, ↑ H, unit, range, the rules that held it, two priors.
        k = page.locator("tr.lab-row[data-code='2823-3']")
        expect(k).to_have_attribute("data-verdict", "hold")
        expect(k.locator(".lab-value")).to_have_text("5.9")
        expect(k.locator(".lab-flag")).to_contain_text("↑ H")
        expect(k.locator(".lab-unit")).to_have_text("mmol/L")
        expect(k.locator(".lab-range")).to_have_text("3.5-5.3")
        expect(k.locator(".av-reasons li[data-rule='reference_range']")).to_be_visible()
        expect(k.locator(".av-reasons li[data-rule='delta_check']")).to_be_visible()
        expect(k.locator(".spark-n")).to_have_text("2 次历史")
        expect(k.locator("svg.spark circle")).to_have_count(3)
        expect(page.locator("#lab-blocking")).to_contain_text("钾")
        expect(page.locator("#sign-btn")).to_be_disabled()
        _shot(page, "lab-reading-held")

        # Approve it (with a comment), then comment on the whole order; sign is enabled.
        k.locator("button[data-act='comment']").click()
        page.fill("#rv-text", "复查后结果一致 Confirmed on re-run")
        page.click("#rv-ok")
        expect(k.locator(".rv-comment")).to_contain_text("复查后结果一致")
        k.locator("button[data-act='approve']").click()
        expect(k).to_have_attribute("data-decision", "approved")
        page.fill("#lab-comment", "血钾轻度升高，建议复查 Mild hyperkalaemia; repeat")
        expect(page.locator("#save-state")).to_contain_text("已保存", timeout=10_000)
        expect(page.locator("#sign-btn")).to_be_enabled()

        # Reject the glucose (a reason is required): it is reported as rejected, unmarked.
        glu = page.locator("tr.lab-row[data-code='14749-6']")
        glu.locator("button[data-act='reject']").click()
        page.click("#rv-ok")
        expect(page.locator("#rv-error")).to_have_text("请填写原因")
        page.fill("#rv-text", "标本放置过久 Specimen too old")
        page.click("#rv-ok")
        expect(glu).to_have_attribute("data-decision", "rejected")
        expect(glu.locator(".rv-reason")).to_have_text("标本放置过久 Specimen too old")

        # Sign: a wrong password is refused (nothing signed), the right one signs.
        page.click("#sign-btn")
        dialog = page.locator("#sign-dialog")
        expect(dialog).to_be_visible()
        expect(page.locator("#sd-outcome")).to_have_text(re.compile("正式报告"))
        expect(page.locator("#sd-results")).to_contain_text("5.9 mmol/L H")
        expect(page.locator("#sd-results")).to_contain_text("葡萄糖 已拒绝")
        expect(page.locator("#sd-hr")).to_contain_text("HR")
        page.fill("#sd-password", "not-my-password")
        page.click("#sd-sign")
        expect(page.locator("#sd-error")).to_contain_text("密码")
        page.fill("#sd-password", lab.passwords["senior"])
        _shot(page, "lab-sign-dialog")
        page.click("#sd-sign")
        expect(dialog).to_be_hidden()
        expect(page.locator("#sig-panel")).to_be_visible()
        expect(page.locator("#rp-status")).to_have_text("正式报告")
        expect(page.locator("#sign-btn")).to_be_hidden()
        expect(page.locator("#lab-verdict")).to_have_text("已审核签发")
        expect(page.locator("#sig-author")).to_have_text("王审核")
        expect(page.locator("#sig-signer")).to_have_text("王审核")
        _shot(page, "lab-reading-signed")
        # The same page in English (read-only now: the report is signed).
        context.add_cookies([{"name": "lang", "value": "en", "url": lab.server.http}])
        page.reload()
        expect(page.locator("#lab-verdict")).to_have_text("Reviewed and signed")
        expect(k.locator(".rv")).to_have_text("Approved")
        expect(k.locator("button")).to_have_count(0)
        _shot(page, "lab-reading-signed-en")
        pdf_href = page.locator("#sig-pdf").get_attribute("href")
        fhir_href = page.locator("#sig-fhir").get_attribute("href")
    finally:
        context.close()
    assert pdf_href and fhir_href

    with lab.client("senior") as api:
        pdf = api.get(pdf_href)
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        fhir = api.get(fhir_href)
        assert fhir.status_code == 200, fhir.text
        resource = fhir.json()

    # The clinic's portal lists the signed lab report; the clinic reads the same FHIR.
    with lab.client("tech_a") as clinic:
        listed = clinic.get("/api/v1/reports", params={"exam_id": order})
        assert listed.status_code == 200, listed.text
        (item,) = listed.json()["items"]
        assert item["discipline"] == "lab" and item["status"] == "final"
        assert pdf_href == f"/api/v1/reports/{item['report_id']}/pdf"
        assert clinic.get(fhir_href).json()["result"] == resource["result"]

    # The PDF: every analyte with its value, unit and range; the 互认 mark on each row.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pdf_path = ARTIFACTS / "lab-report.pdf"
    pdf_path.write_bytes(pdf.content)
    assert shutil.which("pdftotext"), "poppler-utils is required"
    text = subprocess.run(
        ["pdftotext", "-layout", str(pdf_path), "-"], capture_output=True, text=True, check=True
    ).stdout
    for expected in ("钾", "钠", "葡萄糖", "5.9", "141", "mmol/L", "3.5-5.3", "137-147"):
        assert expected in text, expected
    assert "↑H" in text
    until_7 = (TODAY + timedelta(days=7)).isoformat()  # K and Na: 7-day window
    assert text.count(f"HR 至 {until_7}") == 2, text
    assert text.count("HR 至") == 2, text  # the rejected glucose has no mark
    assert "已拒绝 Rejected — 标本放置过久" in text
    assert "血钾轻度升高" in text
    assert "王审核" in text and "senior" not in text  # Reported by / Signed by: the name
    subprocess.run(
        [
            "pdftoppm",
            "-png",
            "-r",
            "80",
            "-f",
            "1",
            "-l",
            "1",
            str(pdf_path),
            str(ARTIFACTS / "lab-report"),
        ],
        check=True,
    )
    assert any(Path(ARTIFACTS).glob("lab-report*.png"))

    # FHIR: a DiagnosticReport whose results are Observations coded in LOINC with UCUM units.
    assert resource["resourceType"] == "DiagnosticReport"
    assert resource["category"][0]["coding"][0]["code"] == "LAB"
    observations = {
        r["code"]["coding"][0]["code"]: r
        for r in resource.get("contained", [])
        if r["resourceType"] == "Observation"
    }
    assert set(observations) == {"2823-3", "2951-2"}  # not the rejected glucose
    assert len(resource["result"]) == 2
    potassium = observations["2823-3"]
    assert potassium["code"]["coding"][0]["system"] == "http://loinc.org"
    assert potassium["valueQuantity"] == {
        "value": 5.9,
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
    }
    assert potassium["referenceRange"][0]["low"]["value"] == 3.5
    assert potassium["referenceRange"][0]["high"]["value"] == 5.3
    assert potassium["interpretation"][0]["coding"][0]["code"] == "H"

    # The HIS got the ORU^R01 push-back: one OBX per result, LOINC, UCUM, range, flag.
    def pushed() -> str | None:
        found = [m for m in his.messages if "PL-F-LR-3" in m]
        return found[-1] if found else None

    oru = wait_for(pushed, timeout=90, what="the ORU of the signed lab report at the HIS")
    segments = [segment.split("|") for segment in oru.split("\r")]
    obx = {f[3].split("^")[0]: f for f in segments if f[0] == "OBX"}
    assert obx["2823-3"][2] == "NM" and obx["2823-3"][5] == "5.9"
    assert obx["2823-3"][6:9] == ["mmol/L^^UCUM", "3.5-5.3", "H"]
    assert obx["2951-2"][5] == "141" and "14749-6" not in obx
    assert all(obx[code][11] == "F" for code in ("2823-3", "2951-2"))
    assert strict_hl7apy_problem(oru) == ""

    # Amend the signed report from the lab page: the shared amend dialog, then the password.
    context = _context(browser)
    try:
        page = _login(context, lab, "senior")
        page.goto(f"{lab.server.http}/ui/lab/{order}")
        expect(page.locator("#sig-panel")).to_be_visible()
        page.click("#amend-btn")
        expect(page.locator("#amend-dialog")).to_be_visible()
        expect(page.locator("#amend-findings")).to_have_count(0)  # results come from the order
        expect(page.locator("#amend-impression")).to_have_value(re.compile("血钾轻度升高"))
        page.click("#amend-submit")
        expect(page.locator("#amend-error")).to_have_text("请填写修订原因")
        page.fill("#amend-reason-input", "补充复查建议 Repeat advice added")
        page.fill("#amend-impression", "血钾轻度升高，请于24小时内复查 Repeat within 24 h")
        _shot(page, "lab-amend-dialog")
        page.click("#amend-submit")
        expect(page.locator("#sign-dialog")).to_be_visible()
        expect(page.locator("#sd-results")).to_contain_text("补充复查建议")
        page.fill("#sd-password", "not-my-password")
        page.click("#sd-sign")
        expect(page.locator("#sd-error")).to_contain_text("密码")
        page.fill("#sd-password", lab.passwords["senior"])
        page.click("#sd-sign")
        expect(page.locator("#sign-dialog")).to_be_hidden()
        expect(page.locator("#lab-amendment")).to_contain_text("第 2 版")
        expect(page.locator("#lab-amendment")).to_contain_text("补充复查建议")
        expect(page.locator("#sig-author")).to_have_text("王审核")
        _shot(page, "lab-reading-amended")
    finally:
        context.close()
    with lab.client("senior") as api:
        reading = api.get(f"/api/v1/lab/exams/{order}/reading").json()
        amended = reading["report"]
        assert amended["version"] == 2 and amended["amendment_kind"] == "amended"
        assert amended["status"] == "final" and "24小时内复查" in amended["impression"]
        assert reading["comment"].startswith("血钾轻度升高，请于24小时内复查")
        # The rejected glucose stays rejected in the new version; no password, no version.
        assert next(r for r in reading["results"] if r["loinc"] == "14749-6")["decision"] == (
            "rejected"
        )
        refused = api.post(f"/api/v1/lab/exams/{order}/amend", json={"reason": "x"})
        assert refused.status_code == 403
        pdf2 = api.get(f"/api/v1/reports/{amended['id']}/pdf")
        assert pdf2.status_code == 200
    pdf2_path = ARTIFACTS / "lab-report-v2.pdf"
    pdf2_path.write_bytes(pdf2.content)
    text2 = subprocess.run(
        ["pdftotext", "-layout", str(pdf2_path), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "24小时内复查" in text2 and "补充复查建议" in text2 and "王审核" in text2
    assert text2.count("HR 至") == 2, text2

    # The clinic's HIS gets the new version as a corrected result (OBR-25/OBX-11 C).
    def pushed_v2() -> str | None:
        found = [m for m in his.messages if "PL-F-LR-3" in m and "|C|" in m.split("\r")[2]]
        return found[-1] if found else None

    oru2 = wait_for(pushed_v2, timeout=90, what="the ORU of the amended lab report at the HIS")
    assert "24小时内复查" in oru2
