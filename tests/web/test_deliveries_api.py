"""Delivery over HTTP against a running ``rdc serve``: clinics list and download their
reports (PDF, signed JSON, FHIR R4 DiagnosticReport), the first fetch is the delivery,
another clinic gets 404, acknowledgement, amendments become current and are notified, and
the embedded worker pushes the report to a clinic endpoint configured through the API."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    RdcServer,
    free_port,
    rdc_cli,
    report_exam,
    storescu,
    wait_for,
    worklist_items,
)
from tests.lab_results.test_report_push import His


@pytest.fixture
def server(
    rdc_env: dict[str, str], alliance: dict[str, str], tmp_path: Path
) -> Iterator[RdcServer]:
    """``rdc serve`` whose delivery task scans often (the test waits for a push)."""
    rdc_env["RDC_DELIVERY_SCAN_INTERVAL_SECONDS"] = "0.5"
    with RdcServer(rdc_env, tmp_path / "serve.log") as srv:
        yield srv


def final_report(server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path) -> str:
    """Send CT_small from CLINIC_A, report it (reader) and verify it (senior); the report ID."""
    sent = storescu(
        dcmtk,
        [testdata / "dicom" / "CT_small.dcm"],
        port=server.dicom_port,
        calling_ae="CLINIC_A_CT",
    )
    assert all(r.returncode == 0 for r in sent)
    with server.client("reader", alliance["reader"]) as reader:
        item = worklist_items(reader)[0]
        submitted = report_exam(
            reader,
            exam_id=item["exam_id"],
            item_id=item["id"],
            report={
                "findings": "两肺纹理清晰",
                "impression": "未见异常 Normal",
                "quality_grade": "甲",
            },
        )
    report_id = str(submitted["id"])
    with server.client("senior", alliance["senior"]) as senior:
        verified = senior.post(f"/api/v1/reports/{report_id}/verify-by-senior", json=senior.signing)
        assert verified.status_code == 200, verified.text
    return report_id


def _exam_stage(server: RdcServer, report_id: str) -> tuple[Any, Any]:
    with server.db() as db:
        row = db.execute(
            "SELECT e.delivered_at, e.acknowledged_at FROM exams e "
            "JOIN reports r ON r.exam_id = e.id WHERE r.id = ?",
            (report_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def _validate_fhir(resource: dict[str, Any]) -> None:
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    DiagnosticReport.model_validate(resource)  # raises on any structural error


def test_clinic_fetches_acknowledges_and_gets_pushes(
    server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path
) -> None:
    admin = server.client("admin", alliance["admin"])
    tech_a = server.client("tech_a", alliance["tech_a"])
    tech_b = server.client("tech_b", alliance["tech_b"])
    report_id = final_report(server, alliance, testdata, dcmtk)

    # the clinic's list: its own final report, current, with its links
    listed = tech_a.get("/api/v1/reports").json()
    assert listed["total"] == 1
    item = listed["items"][0]
    assert item["report_id"] == report_id and item["current"] and item["status"] == "final"
    assert item["clinic_code"] == "CLINIC_A" and item["delivered_at"] is None
    assert item["links"]["pdf"] == f"/api/v1/reports/{report_id}/pdf"
    assert tech_b.get("/api/v1/reports").json()["total"] == 0
    naive = tech_a.get("/api/v1/reports", params={"since": "2000-01-01T08:00:00"})
    assert naive.status_code == 422, naive.text  # a time without zone is ambiguous
    aware = tech_a.get("/api/v1/reports", params={"since": "2000-01-01T08:00:00+08:00"})
    assert aware.status_code == 200 and aware.json()["total"] == 1
    for path in ("pdf", "document", "fhir"):
        assert tech_b.get(f"/api/v1/reports/{report_id}/{path}").status_code == 404
    assert tech_b.post(f"/api/v1/reports/{report_id}/acknowledge").status_code == 404
    assert tech_b.get(f"/api/v1/reports/{report_id}/deliveries").status_code == 404

    # the centre's fetch is no delivery; the clinic's first fetch is, once
    assert admin.get(f"/api/v1/reports/{report_id}/pdf").status_code == 200
    assert _exam_stage(server, report_id) == (None, None)
    fhir = tech_a.get(f"/api/v1/reports/{report_id}/fhir")
    assert fhir.status_code == 200 and fhir.headers["content-type"] == "application/fhir+json"
    first, _ = _exam_stage(server, report_id)
    assert first is not None
    pdf = tech_a.get(f"/api/v1/reports/{report_id}/pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    disposition = pdf.headers["content-disposition"]
    assert disposition.isascii() and disposition.startswith("attachment; filename=")
    assert disposition.endswith('-v1.pdf"') and pdf.content.startswith(b"%PDF")
    document = tech_a.get(f"/api/v1/reports/{report_id}/document")
    assert document.status_code == 200 and document.headers["content-type"] == "application/json"
    assert document.json()  # the signed JSON document
    assert _exam_stage(server, report_id)[0] == first
    rows = tech_a.get(f"/api/v1/reports/{report_id}/deliveries").json()
    assert [(r["channel"], r["state"], r["detail"]["user"]) for r in rows] == [
        ("portal", "delivered", "tech_a")
    ]
    with server.db() as db:
        audited = db.execute(
            "SELECT COUNT(*) FROM audit_events WHERE action = 'download' AND object_id = ?",
            (report_id,),
        ).fetchone()
    assert audited is not None and audited[0] == 4

    resource = fhir.json()
    _validate_fhir(resource)
    assert resource["resourceType"] == "DiagnosticReport" and resource["id"] == report_id
    assert resource["status"] == "final"
    assert resource["category"][0]["coding"][0]["code"] == "RAD"
    assert resource["subject"]["identifier"]["value"]
    assert resource["conclusion"] == "未见异常 Normal"
    form = resource["presentedForm"][0]
    assert form["contentType"] == "application/pdf"
    assert form["hash"] == base64.b64encode(hashlib.sha1(pdf.content).digest()).decode()
    assert form["url"].endswith(f"/api/v1/reports/{report_id}/pdf")
    assert tech_a.get(form["url"]).content == pdf.content

    ack = tech_a.post(f"/api/v1/reports/{report_id}/acknowledge")
    assert ack.status_code == 200, ack.text
    assert ack.json()["delivered_at"] is not None
    assert admin.post(f"/api/v1/reports/{report_id}/acknowledge").status_code == 403
    again = tech_a.post(f"/api/v1/reports/{report_id}/acknowledge").json()
    assert again["acknowledged_at"] == ack.json()["acknowledged_at"]
    assert _exam_stage(server, report_id)[1] is not None

    # the clinic configures its HIS; the next version is pushed by the embedded worker
    his_port = free_port()
    endpoint = admin.post(
        "/api/v1/delivery-endpoints",
        json={
            "clinic": "CLINIC_A",
            "channel": "hl7",
            "host": "127.0.0.1",
            "port": his_port,
            "receiving_application": "HIS",
            "receiving_facility": "CLINIC_A",
        },
    )
    assert endpoint.status_code == 200, endpoint.text
    assert [e["id"] for e in admin.get("/api/v1/delivery-endpoints").json()] == [
        endpoint.json()["id"]
    ]
    assert tech_a.get("/api/v1/delivery-endpoints").status_code == 403
    refused = tech_a.post(
        "/api/v1/delivery-endpoints",
        json={"clinic": "CLINIC_A", "channel": "hl7", "host": "h", "port": 1},
    )
    assert refused.status_code == 403
    his = His(his_port)
    try:
        with server.client("senior", alliance["senior"]) as senior:
            amended = senior.post(
                f"/api/v1/reports/{report_id}/amend",
                json={
                    "kind": "corrected",
                    "reason": "更正 / fix",
                    "impression": "右肺结节 Nodule",
                    **senior.signing,
                },
            )
            assert amended.status_code == 200, amended.text
        new_id = amended.json()["id"]

        def pushed() -> list[dict[str, Any]]:
            rows = admin.get(f"/api/v1/reports/{new_id}/deliveries").json()
            return [r for r in rows if r["channel"] == "hl7" and r["state"] == "delivered"]

        push = wait_for(pushed, timeout=60, what="the push to the HIS")[0]
    finally:
        his.stop()
    assert push["attempt_log"][-1]["outcome"] == "success" and push["detail"]["msa"] == "AA"
    assert len(his.messages) == 1 and his.messages[0].endswith("||||||C\r")  # corrected
    assert "右肺结节 Nodule" in his.messages[0]
    queue = admin.get("/api/v1/deliveries", params={"state": "delivered", "channel": "hl7"})
    assert [d["report_id"] for d in queue.json()["items"]] == [new_id]
    assert tech_a.get("/api/v1/deliveries").status_code == 403

    # the new version is current, replaces the old, and the clinic was told
    current = tech_a.get("/api/v1/reports").json()["items"]
    assert [(i["report_id"], i["version"], i["current"]) for i in current] == [(new_id, 2, True)]
    every = tech_a.get("/api/v1/reports", params={"current_only": "false"}).json()["items"]
    assert {(i["version"], i["current"]) for i in every} == {(1, False), (2, True)}
    notes = tech_a.get("/api/v1/notifications", params={"unread": "false"}).json()["items"]
    assert {n["subject_id"] for n in notes if n["kind"] == "report_version"} >= {
        report_id,
        new_id,
    }
    # version 1 was acknowledged (its notice is read); version 2 waits for its own receipt
    unread = tech_a.get("/api/v1/notifications").json()["items"]
    assert {n["subject_id"] for n in unread if n["kind"] == "report_version"} == {new_id}
    v2 = next(i for i in every if i["version"] == 2)
    assert v2["acknowledged_at"] is None
    new_fhir = tech_a.get(f"/api/v1/reports/{new_id}/fhir").json()
    _validate_fhir(new_fhir)
    assert new_fhir["status"] == "corrected"
    replaces = [e for e in new_fhir["extension"] if e["url"].endswith("/replaces")]
    assert replaces[0]["valueReference"]["reference"] == f"DiagnosticReport/{report_id}"
    for client in (admin, tech_a, tech_b):
        client.close()


def test_endpoint_cli(rdc_env: dict[str, str], alliance: dict[str, str]) -> None:
    added = rdc_cli(
        rdc_env,
        "delivery", "endpoint", "add", "--clinic", "CLINIC_A", "--channel", "dicom",
        "--ae", "CLINIC_PACS", "--host", "10.1.2.3", "--port", "104",
    )  # fmt: skip
    assert "dicom:CLINIC_PACS@10.1.2.3:104" in added.stdout
    rdc_cli(
        rdc_env,
        "delivery", "endpoint", "add", "--clinic", "CLINIC_A", "--channel", "hl7",
        "--host", "10.1.2.4", "--port", "2575", "--app", "HIS", "--facility", "CLINIC_A",
        "--pdf", "link",
    )  # fmt: skip
    odd = rdc_cli(
        rdc_env,
        "delivery", "endpoint", "add", "--clinic", "CLINIC_A", "--channel", "hl7",
        "--host", "10.1.2.5", "--port", "2575", "--pdf", "attach",
        check=False,
    )  # fmt: skip
    assert odd.returncode == 1 and "pdf_mode" in odd.stdout + odd.stderr
    bad = rdc_cli(
        rdc_env,
        "delivery", "endpoint", "add", "--clinic", "CLINIC_A", "--channel", "dicom",
        "--host", "10.1.2.3", "--port", "104",
        check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and "AE title" in bad.stderr
    unknown = rdc_cli(
        rdc_env,
        "delivery", "endpoint", "add", "--clinic", "NOPE", "--channel", "hl7",
        "--host", "h", "--port", "1",
        check=False,
    )  # fmt: skip
    assert unknown.returncode == 1
    rdc_cli(rdc_env, "delivery", "endpoint", "disable", "dicom:CLINIC_PACS@10.1.2.3:104")
    listed = json.loads(rdc_cli(rdc_env, "delivery", "endpoint", "list", "--json").stdout)
    assert {(e["channel"], e["host"], e["port"], e["enabled"]) for e in listed} == {
        ("dicom", "10.1.2.3", 104, False),
        ("hl7", "10.1.2.4", 2575, True),
    }
    assert next(e for e in listed if e["channel"] == "dicom")["ae_title"] == "CLINIC_PACS"
    assert {e["channel"]: e["pdf_mode"] for e in listed} == {"dicom": "embed", "hl7": "link"}
    queue = rdc_cli(rdc_env, "delivery", "run")
    assert "0 delivered, 0 failed" in queue.stdout
