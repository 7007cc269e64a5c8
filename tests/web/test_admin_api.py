"""The administration console's API and CLI against a running ``rdc serve``: clinics
(list, add, edit, disable), users (add, edit, reset password, disable), routing rules and SLA
targets taking effect on the next study sent by storescu without a restart (and READY exams
keeping their due time unless asked), every change audited with before/after, and the audit
trail search and CSV export for QC."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pydicom.uid import generate_uid

from tests.helpers import HTTP_TIMEOUT, RdcServer, echoscu, rdc_cli, storescu, wait_for


def ct_study(testdata: Path, folder: Path, tag: str, *, priority: str = "") -> Path:
    """A copy of CT_small.dcm as a study of its own (new UIDs)."""
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["admin-test", tag])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["admin-test", tag, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["admin-test", tag, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.BodyPartExamined = "CHEST"
    if priority:
        ds.RequestedProcedurePriority = priority
    path = folder / f"{tag}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def send_and_wait(
    server: RdcServer, admin: httpx.Client, dcmtk: Path, path: Path, ae: str = "CLINIC_A_CT"
) -> dict[str, Any]:
    """Send ``path`` by storescu; returns the exam (with its work item's due time) once READY,
    and the work item's pool."""
    sent = storescu(dcmtk, [path], port=server.dicom_port, calling_ae=ae)
    assert all(r.returncode == 0 for r in sent), sent[0].stderr
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)

    def ready() -> dict[str, Any] | None:
        exams = admin.get("/api/v1/exams", params={"limit": 500}).json()["items"]
        exam = next((e for e in exams if e["study_instance_uid"] == uid), None)
        if exam is None or exam["state"] != "READY":
            return None
        detail: dict[str, Any] = admin.get(f"/api/v1/exams/{exam['id']}").json()
        return detail

    exam: dict[str, Any] = wait_for(ready, timeout=60, what=f"study {uid} READY")
    row = server.db().execute("SELECT pool FROM work_items WHERE exam_id = ?", (exam["id"],))
    exam["pool"] = row.fetchone()[0]  # type: ignore[index]
    return exam


def _t(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _events(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/api/v1/audit/events", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_admin_console_api_and_cli(
    server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path, tmp_path: Path
) -> None:
    admin = server.client("admin", alliance["admin"])
    reader = server.client("reader", alliance["reader"])
    tech_a = server.client("tech_a", alliance["tech_a"])

    # --- only administrators change anything; QC reads ------------------------------------
    for client in (reader, tech_a):
        assert client.get("/api/v1/routing-rules").status_code == 403
        assert client.put("/api/v1/sla-targets", json=[]).status_code == 403
        assert client.get("/api/v1/users").status_code == 403
        assert client.get("/api/v1/audit/events").status_code == 403
        assert client.get("/api/v1/audit/events.csv").status_code == 403
    created = admin.post(
        "/api/v1/users",
        json={
            "username": "qc1",
            "password": "qc-pass-123",
            "role": "qc",
            "org_code": "LEAD",
            "display_name": "王质控",
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["display_name"] == "王质控"
    again = admin.post(
        "/api/v1/users",
        json={"username": "qc1", "password": "x-pass-123", "role": "qc", "org_code": "LEAD"},
    )
    assert again.status_code == 409
    bad_role = admin.post(
        "/api/v1/users",
        json={"username": "qc2", "password": "x-pass-123", "role": "qc", "org_code": "CLINIC_A"},
    )
    assert bad_role.status_code == 422 and "lead hospital" in bad_role.text
    qc = server.client("qc1", "qc-pass-123")
    assert qc.get("/api/v1/routing-rules").status_code == 200
    assert qc.put("/api/v1/routing-rules", json=[]).status_code == 403
    assert qc.get("/api/v1/users").status_code == 200

    # --- clinics ------------------------------------------------------------------------
    clinics = {c["code"]: c for c in admin.get("/api/v1/clinics").json()}
    assert clinics["CLINIC_A"]["ae_titles"] == ["CLINIC_A_CT", "CLINIC_A_DR"]
    assert clinics["CLINIC_A"]["active"] is True and "LEAD" not in clinics
    new = admin.post(
        "/api/v1/clinics", json={"code": "CLINIC_C", "name": "城西卫生院", "ae_titles": ["C_US"]}
    )
    assert new.status_code == 201, new.text
    assert admin.post("/api/v1/clinics", json={"code": "CLINIC_C", "name": "X"}).status_code == 409
    edited = admin.patch(
        "/api/v1/clinics/CLINIC_C", json={"name": "城西中心卫生院", "ae_titles": ["C_US", "C_DR"]}
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["ae_titles"] == ["C_DR", "C_US"]
    taken = admin.patch("/api/v1/clinics/CLINIC_C", json={"ae_titles": ["CLINIC_A_CT"]})
    assert taken.status_code == 409
    assert admin.get("/api/v1/clinics").json()[-1]["ae_titles"] == ["C_DR", "C_US"]  # unchanged
    assert admin.patch("/api/v1/clinics/NOPE", json={"name": "x"}).status_code == 404

    assert echoscu(dcmtk, server.dicom_port, "CLINIC_B_MR").returncode == 0
    disabled = admin.patch("/api/v1/clinics/CLINIC_B", json={"active": False})
    assert disabled.status_code == 200 and disabled.json()["active"] is False
    assert echoscu(dcmtk, server.dicom_port, "CLINIC_B_MR").returncode != 0
    tech_b = httpx.post(
        f"{server.http}/api/v1/auth/token",
        data={"username": "tech_b", "password": alliance["tech_b"]},
        timeout=HTTP_TIMEOUT,
    )
    assert tech_b.status_code == 401
    admin.patch("/api/v1/clinics/CLINIC_B", json={"active": True})
    assert echoscu(dcmtk, server.dicom_port, "CLINIC_B_MR").returncode == 0

    # --- users ----------------------------------------------------------------------------
    patched = admin.patch(
        "/api/v1/users/reader",
        json={
            "display_name": "李医生",
            "level": "attending",
            "qualifications": [{"discipline": "imaging", "modality": "ct"}],
        },
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["qualifications"] == [{"discipline": "imaging", "modality": "CT"}]
    assert patched.json()["level"] == "attending"
    assert admin.patch("/api/v1/users/tech_a", json={"level": "chief"}).status_code == 422
    assert admin.patch("/api/v1/users/admin", json={"active": False}).status_code == 409
    pw = admin.post("/api/v1/users/senior/password", json={"password": "new-senior-pw"})
    assert pw.status_code == 204
    old = httpx.post(
        f"{server.http}/api/v1/auth/token",
        data={"username": "senior", "password": alliance["senior"]},
        timeout=HTTP_TIMEOUT,
    )
    assert old.status_code == 401
    senior = server.client("senior", "new-senior-pw")
    assert senior.get("/api/v1/worklist").status_code == 200
    gone = admin.post("/api/v1/users/senior/disable")
    assert gone.status_code == 200 and gone.json()["active"] is False
    assert senior.get("/api/v1/worklist").status_code == 401  # the token stops working at once
    users = {u["username"]: u for u in admin.get("/api/v1/users").json()}
    assert users["senior"]["active"] is False and users["reader"]["display_name"] == "李医生"

    # --- routing rules and SLA targets, without a restart ----------------------------------
    before = send_and_wait(server, admin, dcmtk, ct_study(testdata, tmp_path, "before"))
    assert before["pool"] == "imaging"
    assert _t(before["due_at"]) - _t(before["first_received_at"]) == timedelta(hours=24)

    bad_rule = admin.put("/api/v1/routing-rules", json=[{"clinic": "NOPE", "pool": "x"}])
    assert bad_rule.status_code == 404
    rules = admin.put(
        "/api/v1/routing-rules",
        json=[
            {"modality": "MR", "pool": "mr-team"},
            {"modality": "ct", "body_part": "chest", "clinic": "CLINIC_A", "pool": "ct-chest"},
        ],
    )
    assert rules.status_code == 200, rules.text
    assert [r["pool"] for r in admin.get("/api/v1/routing-rules").json()["rules"]] == [
        "mr-team",
        "ct-chest",
    ]
    assert (
        admin.put(
            "/api/v1/sla-targets",
            json=[{"discipline": "imaging", "priority": "routine", "minutes": 0}],
        ).status_code
        == 422
    )
    sla = admin.put(
        "/api/v1/sla-targets",
        json=[{"discipline": "imaging", "priority": "routine", "minutes": 90}],
    )
    assert sla.status_code == 200, sla.text
    assert sla.json()["rescheduled"] == 0
    target = next(
        t
        for t in sla.json()["targets"]
        if (t["discipline"], t["priority"]) == ("imaging", "routine")
    )
    assert target == {
        "discipline": "imaging",
        "priority": "routine",
        "minutes": 90,
        "default_minutes": 1440,
        "configured": True,
    }

    after = send_and_wait(server, admin, dcmtk, ct_study(testdata, tmp_path, "after"))
    assert after["pool"] == "ct-chest"
    assert _t(after["due_at"]) - _t(after["first_received_at"]) == timedelta(minutes=90)
    # The exam READY before the change keeps its due time ...
    kept = admin.get(f"/api/v1/exams/{before['id']}").json()
    assert kept["due_at"] == before["due_at"]
    # ... unless asked.
    applied = admin.put(
        "/api/v1/sla-targets",
        params={"apply_to_ready": "true"},
        json=[{"discipline": "imaging", "priority": "routine", "minutes": 60}],
    )
    assert applied.json()["rescheduled"] == 2
    moved = admin.get(f"/api/v1/exams/{before['id']}").json()
    assert _t(moved["due_at"]) - _t(moved["first_received_at"]) == timedelta(minutes=60)

    # --- audit: every change with before/after; search and export for QC -------------------
    rule_events = _events(qc, action="routing_rules.update")
    assert len(rule_events) == 1
    assert rule_events[0]["actor"] == "user:admin"
    assert rule_events[0]["detail"]["before"] == []
    assert [r["pool"] for r in rule_events[0]["detail"]["after"]] == ["mr-team", "ct-chest"]
    sla_events = _events(qc, action="sla_targets.update")
    assert [e["detail"]["before"] for e in sla_events] == [
        {"imaging/routine": 90},
        {"imaging/routine": 1440},
    ]
    assert sla_events[0]["detail"]["after"]["rescheduled"] == 2
    clinic_events = _events(qc, action="clinic.*")
    assert {(e["action"], e["object_id"]) for e in clinic_events} >= {
        ("clinic.create", "CLINIC_C"),
        ("clinic.update", "CLINIC_C"),
        ("clinic.update", "CLINIC_B"),
    }
    b_off = next(
        e
        for e in clinic_events
        if e["object_id"] == "CLINIC_B" and not e["detail"]["after"]["active"]
    )
    assert b_off["detail"]["before"]["active"] is True
    user_events = _events(qc, action="user.*")
    assert {e["action"] for e in user_events} == {
        "user.create",
        "user.update",
        "user.reset_password",
        "user.disable",
    }
    assert "new-senior-pw" not in json.dumps(user_events)
    reader_update = next(e for e in user_events if e["object_id"] == "reader")
    assert reader_update["detail"]["before"]["display_name"] == "reader"
    assert reader_update["detail"]["after"]["display_name"] == "李医生"

    # By user, exam, patient and time.
    reader.get(f"/api/v1/exams/{after['id']}")
    by_reader = _events(qc, user="reader")
    assert by_reader and {e["actor"] for e in by_reader} == {"user:reader"}
    by_exam = _events(qc, exam=after["id"])
    assert {"user:reader", "user:admin"} <= {e["actor"] for e in by_exam}
    assert all(
        e["object_id"] == after["id"] or after["id"] in json.dumps(e["detail"]) for e in by_exam
    )
    assert not any(e["object_id"] == before["id"] for e in by_exam)
    by_uid = _events(qc, exam=after["study_instance_uid"])
    assert [e["seq"] for e in by_uid] == [e["seq"] for e in by_exam]
    by_patient = _events(qc, patient=after["patient"]["patient_id"])
    assert {e["seq"] for e in by_exam} <= {e["seq"] for e in by_patient}
    views = _events(qc, exam=after["id"], action="view", user="reader")
    assert len(views) == 1 and views[0]["object_type"] == "exam"
    seq = views[0]["seq"]
    at = _t(views[0]["at"])
    window = _events(
        qc,
        **{
            "from": (at - timedelta(seconds=1)).isoformat(),
            "to": (at + timedelta(seconds=1)).isoformat(),
        },
    )
    assert seq in {e["seq"] for e in window}
    assert not _events(qc, to=(at - timedelta(days=1)).isoformat(), user="reader", action="view")
    naive = qc.get("/api/v1/audit/events", params={"from": "2026-01-01T08:00:00"})
    assert naive.status_code == 422

    page = qc.get("/api/v1/audit/events", params={"action": "user.*", "limit": 2}).json()
    assert page["total"] == len(user_events) and len(page["items"]) == 2
    exported = qc.get("/api/v1/audit/events.csv", params={"action": "user.*"})
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.content.decode("utf-8-sig"))))
    assert [int(r["seq"]) for r in rows] == sorted(e["seq"] for e in user_events)
    assert (
        json.loads(next(r for r in rows if r["object_id"] == "reader")["detail"])["after"][
            "display_name"
        ]
        == "李医生"
    )
    same = qc.get("/api/v1/audit/events", params={"action": "user.*", "format": "csv"})
    assert same.content == exported.content
    # The searches themselves are audited.
    searches = _events(admin, user="qc1", action="audit.*")
    assert {"audit.search", "audit.export"} <= {e["action"] for e in searches}
    chain = qc.get("/api/v1/audit/chain").json()
    assert chain["intact"] is True and chain["first_bad_seq"] is None and chain["events"] > 20

    # --- the same from the command line ----------------------------------------------------
    env = server.env
    listed = json.loads(rdc_cli(env, "clinic", "list", "--json").stdout)
    assert {c["code"] for c in listed} == {"CLINIC_A", "CLINIC_B", "CLINIC_C"}
    refused = rdc_cli(env, "clinic", "add", "--code", "CLINIC_A", "--name", "改名", check=False)
    assert refused.returncode != 0 and "--update" in refused.stderr
    assert json.loads(rdc_cli(env, "clinic", "list", "--json").stdout)[0]["name"] == "Clinic A"
    rdc_cli(
        env, "clinic", "add", "--code", "CLINIC_A", "--name", "城东", "--ae", "A_US", "--update"
    )
    a = json.loads(rdc_cli(env, "clinic", "list", "--json").stdout)[0]
    assert a["name"] == "城东" and "A_US" in a["ae_titles"]
    rdc_cli(env, "clinic", "disable", "CLINIC_C")
    assert not json.loads(rdc_cli(env, "clinic", "list", "--json").stdout)[2]["active"]
    rdc_cli(
        env,
        "user",
        "add",
        "--username",
        "dr_wang",
        "--role",
        "reader",
        "--org",
        "LEAD",
        "--name",
        "王医生",
        "--password-stdin",
        input="wang-pass-123\n",
    )
    rdc_cli(env, "user", "edit", "dr_wang", "--level", "chief", "--pool", "ct-chest")
    cli_users = {
        u["username"]: u for u in json.loads(rdc_cli(env, "user", "list", "--json").stdout)
    }
    assert cli_users["dr_wang"]["display_name"] == "王医生"
    assert cli_users["dr_wang"]["level"] == "chief" and cli_users["dr_wang"]["pools"] == [
        "ct-chest"
    ]
    rdc_cli(env, "user", "disable", "dr_wang")
    assert (
        httpx.post(
            f"{server.http}/api/v1/auth/token",
            data={"username": "dr_wang", "password": "wang-pass-123"},
            timeout=HTTP_TIMEOUT,
        ).status_code
        == 401
    )
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("- {modality: DX, pool: dx-team}\n", encoding="utf-8")
    rdc_cli(env, "routing", "set", str(rules_file))
    assert json.loads(rdc_cli(env, "routing", "list", "--json").stdout)[0]["pool"] == "dx-team"
    rdc_cli(env, "sla", "set", "--discipline", "ecg", "--priority", "routine", "--minutes", "45")
    ecg = [
        t
        for t in json.loads(rdc_cli(env, "sla", "list", "--json").stdout)
        if t["discipline"] == "ecg" and t["priority"] == "routine"
    ]
    assert ecg[0]["minutes"] == 45
    cli_events = _events(qc, user="cli")
    assert {
        "clinic.update",
        "user.create",
        "user.update",
        "user.disable",
        "routing_rules.update",
        "sla_targets.update",
    } <= {e["action"] for e in cli_events}
    found = rdc_cli(env, "audit", "search", "--user", "admin", "--action", "user.*")
    lines = [json.loads(line) for line in found.stdout.splitlines()]
    assert {e["action"] for e in lines} == {
        "user.create",
        "user.update",
        "user.reset_password",
        "user.disable",
    }
    assert all(e["actor"] == "user:admin" for e in lines)
    exported_cli = rdc_cli(env, "audit", "search", "--action", "routing_rules.update", "--csv")
    cli_rows = list(csv.DictReader(io.StringIO(exported_cli.stdout)))
    assert [r["actor"] for r in cli_rows] == ["user:admin", "cli"]
    naive_cli = rdc_cli(env, "audit", "search", "--from", "2026-01-01T08:00", check=False)
    assert naive_cli.returncode != 0 and "time zone" in naive_cli.stderr
    assert "intact" in rdc_cli(env, "audit", "check").stderr
