"""Critical values over HTTP against a running ``rdc serve``: a critical report raises an
alert, the server's own periodic task escalates it, the clinic reads it back exactly once,
and the register shows both sides; contacts, duty list and notifications by role."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import RdcServer, rdc_cli, report_exam, storescu, wait_for, worklist_items


@pytest.fixture
def critical_server(
    rdc_env: dict[str, str], alliance: dict[str, str], tmp_path: Path
) -> Iterator[RdcServer]:
    """``rdc serve`` whose alerts are overdue after about a second, scanned twice a second."""
    env = {
        **rdc_env,
        "RDC_CRITICAL_ESCALATION_MINUTES": "0.02",
        "RDC_CRITICAL_SCAN_INTERVAL_SECONDS": "0.5",
    }
    with RdcServer(env, tmp_path / "serve.log") as srv:
        yield srv


def _sign_critical(server: RdcServer, senior: httpx.Client, testdata: Path, dcmtk: Path) -> str:
    sent = storescu(
        dcmtk,
        [testdata / "dicom" / "CT_small.dcm"],
        port=server.dicom_port,
        calling_ae="CLINIC_A_CT",
    )
    assert all(r.returncode == 0 for r in sent)
    item = worklist_items(senior)[0]
    exam_id = str(item["exam_id"])
    signed = report_exam(
        senior,
        exam_id=exam_id,
        item_id=item["id"],
        report={
            "findings": "右侧大量气胸",
            "impression": "右侧张力性气胸 Right tension pneumothorax",
            "quality_grade": "甲",
            "critical": True,
        },
    )
    assert signed["status"] == "final"
    return exam_id


def test_critical_value_escalates_in_the_running_server_and_is_read_back(
    critical_server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path
) -> None:
    server = critical_server
    admin = server.client("admin", alliance["admin"])
    reader = server.client("reader", alliance["reader"])
    senior = server.client("senior", alliance["senior"])
    tech_a = server.client("tech_a", alliance["tech_a"])
    tech_b = server.client("tech_b", alliance["tech_b"])

    contacts = {
        "primary_name": "张医生",
        "primary_phone": "0551-6000001",
        "primary_username": "tech_a",
        "secondary_name": "李主任",
        "secondary_phone": "0551-6000002",
    }
    assert reader.put("/api/v1/critical-contacts/CLINIC_A", json=contacts).status_code == 403
    put = admin.put("/api/v1/critical-contacts/CLINIC_A", json=contacts)
    assert put.status_code == 200, put.text
    assert tech_a.get("/api/v1/critical-contacts/CLINIC_A").json()["secondary_name"] == "李主任"
    assert tech_b.get("/api/v1/critical-contacts/CLINIC_A").status_code == 404
    shown = rdc_cli(server.env, "critical", "contact", "show", "--org", "CLINIC_A")
    assert json.loads(shown.stdout)["primary_phone"] == "0551-6000001"
    rdc_cli(server.env, "critical", "duty", "add", "--username", "reader")
    assert [d["username"] for d in reader.get("/api/v1/critical-duty").json()] == ["reader"]

    exam_id = _sign_critical(server, senior, testdata, dcmtk)
    register = senior.get("/api/v1/critical-alerts").json()
    assert register["total"] == 1
    alert = register["items"][0]
    assert alert["exam_id"] == exam_id and alert["raised_by"]["username"] == "senior"
    assert alert["finding"] == "右侧张力性气胸 Right tension pneumothorax"
    assert alert["notified_at"] == alert["raised_at"] and alert["notified_within_deadline"]
    alert_id = alert["id"]
    # The primary contact is told in the portal at once (the escalation may follow already).
    mine = tech_a.get("/api/v1/notifications", params={"kind": "critical_value"}).json()
    assert {n["subject_id"] for n in mine["items"]} == {alert_id}
    assert [n["text_en"][:15] for n in mine["items"] if n["recipient_name"] is None] == [
        "Critical value:"
    ]

    # Nobody acknowledges: the server's periodic task escalates, once.
    def escalated() -> dict[str, Any] | None:
        page = reader.get("/api/v1/critical-alerts", params={"state": "escalated"}).json()
        return page["items"][0] if page["items"] else None

    row = wait_for(escalated, timeout=30, interval=0.3, what="the periodic escalation")
    first = row["escalations"][0]
    assert first["level"] == 1
    assert {(t["role"], t.get("username") or t.get("name")) for t in first["to"]} == {
        ("clinic_secondary", "李主任"),
        ("duty", "reader"),
    }
    duty = reader.get("/api/v1/notifications", params={"kind": "critical_value"}).json()
    assert [n["subject_id"] for n in duty["items"]] == [alert_id]
    assert "升级" in duty["items"][0]["text_zh"] and "escalation" in duty["items"][0]["text_en"]
    # The secondary contact has no login: the clinic sees whom to call.
    clinic = tech_a.get("/api/v1/notifications", params={"kind": "critical_value"}).json()
    assert "李主任" in [n["recipient_name"] for n in clinic["items"]]

    # Read-back: another clinic cannot see it, empty text is refused, then exactly once.
    url = f"/api/v1/critical-alerts/{alert_id}/acknowledge"
    assert tech_b.post(url, json={"read_back": "ok"}).status_code == 404
    assert tech_b.get(f"/api/v1/critical-alerts/{alert_id}").status_code == 404
    assert tech_a.post(url, json={"read_back": "   "}).status_code == 422
    assert tech_a.post(url, json={}).status_code == 422
    acked = tech_a.post(
        url, json={"read_back": "右侧张力性气胸，已复述", "receiver_name": "张医生"}
    )
    assert acked.status_code == 200, acked.text
    again = tech_a.post(url, json={"read_back": "again"})
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"

    both = reader.get(f"/api/v1/critical-alerts/{alert_id}").json()
    assert both["state"] == "acknowledged" and both["escalated"] is True
    assert both["raised_by"]["username"] == "senior" and both["raised_at"]
    assert both["acknowledged_by"]["username"] == "tech_a" and both["via"] == "portal"
    assert both["read_back"] == "右侧张力性气胸，已复述" and both["receiver_name"] == "张医生"
    assert both["acknowledged_at"] >= both["raised_at"]
    assert both["minutes_to_acknowledge"] >= 0 and both["within_deadline"] is False
    assert both["clinic_code"] == "CLINIC_A" and both["patient"]["patient_id"]
    assert tech_a.get("/api/v1/critical-alerts").json()["total"] == 1
    assert tech_b.get("/api/v1/critical-alerts").json()["total"] == 0
    assert tech_a.get("/api/v1/critical-alerts", params={"state": "bogus"}).status_code == 422

    # Notifications are read by their recipient only.
    note = duty["items"][0]["id"]
    assert tech_b.post(f"/api/v1/notifications/{note}/read").status_code == 404
    read = reader.post(f"/api/v1/notifications/{note}/read")
    assert read.status_code == 200 and read.json()["read_at"]
    left = reader.get("/api/v1/notifications", params={"kind": "critical_value"}).json()
    assert left["total"] == 0

    # The duty list is managed by administrators.
    assert reader.delete("/api/v1/critical-duty/reader").status_code == 403
    assert admin.delete("/api/v1/critical-duty/reader").status_code == 204
    assert admin.delete("/api/v1/critical-duty/reader").status_code == 404
    assert admin.post("/api/v1/critical-duty", json={"username": "tech_a"}).status_code == 422

    with server.db() as db:
        actions = {
            (row["action"], row["actor"])
            for row in db.execute(
                "SELECT action, actor FROM audit_events WHERE object_id = ?", (alert_id,)
            )
        }
        levels = db.execute(
            "SELECT level FROM critical_escalations WHERE alert_id = ?", (alert_id,)
        ).fetchall()
    assert {("raise", "user:senior"), ("acknowledge", "user:tech_a"), ("view", "user:reader")} <= (
        actions
    )
    assert ("escalate", "system") in actions
    # Each level once, however often the task ran (level 2 may have fired as well).
    assert sorted(r[0] for r in levels) in ([1], [1, 2])
