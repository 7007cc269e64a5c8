"""The reading workflow over HTTP: claim (200 / 409), draft, submit, verify, scoping, and
the cookie session's guard against cross-site writes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.helpers import HTTP_TIMEOUT, RdcServer, alliance_passwords, storescu, wait_for


@pytest.fixture(scope="module")
def server(shared_server: RdcServer) -> RdcServer:
    """One deployment for the module: only the first test sends an exam, and it reports
    it, leaving the worklist empty as the others find it (and expect it)."""
    return shared_server


@pytest.fixture(scope="module")
def alliance() -> dict[str, str]:
    return alliance_passwords()


def _ready_item(server: RdcServer, reader: httpx.Client) -> dict:  # type: ignore[type-arg]
    items: list[dict] = []  # type: ignore[type-arg]

    def listed() -> bool:
        items[:] = reader.get("/api/v1/worklist").json()["items"]
        return bool(items)

    wait_for(listed, timeout=60, what="the exam on the worklist")
    return items[0]


def test_claim_write_submit_verify_over_http(
    server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path
) -> None:
    sent = storescu(
        dcmtk,
        [testdata / "dicom" / "CT_small.dcm"],
        port=server.dicom_port,
        calling_ae="CLINIC_A_CT",
    )
    assert all(r.returncode == 0 for r in sent)
    reader = server.client("reader", alliance["reader"])
    senior = server.client("senior", alliance["senior"])
    tech_a = server.client("tech_a", alliance["tech_a"])
    tech_b = server.client("tech_b", alliance["tech_b"])
    item = _ready_item(server, reader)
    exam_id, item_id = item["exam_id"], item["id"]
    assert item["taken"] is False and item["report_status"] is None

    won = reader.post(f"/api/v1/worklist/{item_id}/claim")
    assert won.status_code == 200, won.text
    assert won.json()["claimed_by"] == "reader" and won.json()["lease_seconds"] > 0
    lost = senior.post(f"/api/v1/worklist/{item_id}/claim")
    assert lost.status_code == 409
    assert lost.headers["content-type"] == "application/problem+json"
    assert "reader" in lost.json()["detail"]
    seen = senior.get("/api/v1/worklist").json()
    assert seen["items"][0]["taken"] is True and seen["items"][0]["claimed_by"] == "reader"
    assert seen["counts"]["claimed"] == 1
    assert tech_a.post(f"/api/v1/worklist/{item_id}/claim").status_code == 403

    assert reader.get(f"/api/v1/exams/{exam_id}/report").status_code == 404
    draft = reader.put(
        f"/api/v1/exams/{exam_id}/report",
        json={"findings": "两肺纹理清晰", "impression": "未见异常", "quality_grade": "甲"},
    )
    assert draft.status_code == 200, draft.text
    assert draft.json()["status"] == "draft"
    assert senior.put(f"/api/v1/exams/{exam_id}/report", json={"findings": "x"}).status_code == 409
    assert tech_a.get(f"/api/v1/exams/{exam_id}/report").status_code == 404  # drafts stay in

    submitted = reader.post(f"/api/v1/exams/{exam_id}/report/submit", json=reader.signing)
    assert submitted.status_code == 200, submitted.text
    report = submitted.json()
    assert report["status"] == "preliminary" and "以正式报告为准" in report["notice"]
    assert reader.get(f"/api/v1/exams/{exam_id}/report").json()["status"] == "preliminary"
    assert tech_a.get(f"/api/v1/exams/{exam_id}/report").json()["status"] == "preliminary"
    assert tech_b.get(f"/api/v1/exams/{exam_id}/report").status_code == 404
    awaiting = senior.get("/api/v1/worklist", params={"state": "awaiting_verification"}).json()
    assert [i["exam_id"] for i in awaiting["items"]] == [exam_id]

    assert (
        reader.post(
            f"/api/v1/reports/{report['id']}/verify-by-senior", json=reader.signing
        ).status_code
        == 403
    )
    verified = senior.post(f"/api/v1/reports/{report['id']}/verify-by-senior", json=senior.signing)
    assert verified.status_code == 200, verified.text
    assert verified.json()["status"] == "final" and verified.json()["locked"] is True
    assert senior.put(f"/api/v1/exams/{exam_id}/report", json={"findings": "x"}).status_code == 409
    exam = tech_a.get(f"/api/v1/exams/{exam_id}").json()
    assert exam["state"] == "FINAL" and exam["report_status"] == "final"
    assert exam["instances"][0]["frame_count"] == 1
    assert reader.get("/api/v1/worklist").json()["total"] == 0


def test_me_templates_and_priors(server: RdcServer, alliance: dict[str, str]) -> None:
    reader = server.client("reader", alliance["reader"])
    me = reader.get("/api/v1/me").json()
    assert me["username"] == "reader" and me["org_kind"] == "lead"
    templates = reader.get(
        "/api/v1/report-templates", params={"modality": "CT", "body_part": "CHEST"}
    ).json()
    assert templates[0]["code"] == "CT_CHEST" and templates[-1]["code"] == "IMAGING_GENERAL_EN"
    # one language per template: the reader picks the Chinese or the English one
    by_code = {t["code"]: t for t in templates}
    assert by_code["CT_CHEST"]["lang"] == "zh" and by_code["CT_CHEST_EN"]["lang"] == "en"
    for tpl in templates:
        text = tpl["findings"] + tpl["impression"]
        has_cjk = any("\u4e00" <= ch <= "\u9fff" for ch in text)
        assert has_cjk == (tpl["lang"] == "zh" and bool(text)), tpl["code"]
    assert reader.get("/api/v1/exams/nope/priors").status_code == 404


def test_cookie_session_needs_the_ui_header_to_write(
    server: RdcServer, alliance: dict[str, str]
) -> None:
    token = server.token("reader", alliance["reader"])
    cookies = {"rdc_session": token}
    assert (
        httpx.get(f"{server.http}/api/v1/me", cookies=cookies, timeout=HTTP_TIMEOUT).status_code
        == 200
    )
    forged = httpx.post(
        f"{server.http}/api/v1/worklist/next", cookies=cookies, timeout=HTTP_TIMEOUT
    )
    assert forged.status_code == 401
    allowed = httpx.post(
        f"{server.http}/api/v1/worklist/next",
        cookies=cookies,
        headers={"X-Requested-With": "rdc"},
        timeout=HTTP_TIMEOUT,
    )
    assert allowed.status_code == 404  # authorised; nothing to read yet
