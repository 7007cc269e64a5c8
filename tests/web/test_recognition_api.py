"""Mutual recognition over HTTP against ``rdc serve``: loading the catalogue and
accreditations (admin only), two exams signed through the reading workflow, the lookup's
validity window across clinics, declines and their scoping."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pydicom
from pydicom.uid import generate_uid

from tests.helpers import RdcServer, report_exam, storescu, worklist_items

CATALOG = """\
code,discipline,name_zh,name_en,scope_mark,valid_days,min_grade,modality
CT-ANY,imaging,CT检查,CT examination,HR,180,乙,CT
"""
ACCREDITATIONS = """\
accreditations:
  - {org: CLINIC_A, discipline: imaging, valid_from: 2000-01-01, valid_to: 2099-12-31,
     note: 省临检中心 EQA}
"""
_USERS = """
from rdc_core.db import session_scope
from worklist.directory import add_user
from worklist.models import Role
with session_scope() as s:
    for name, role, org in (("doctor_a", Role.CLINICIAN, "CLINIC_A"),
                            ("doctor_b", Role.CLINICIAN, "CLINIC_B"),
                            ("qc", Role.QC, "LEAD")):
        add_user(s, username=name, role=role, org_code=org, password="pw-" + name + "-123")
"""


def _sign(reader: httpx.Client, exam_id: str, item_id: str) -> str:
    signed = report_exam(
        reader,
        exam_id=exam_id,
        item_id=item_id,
        report={"findings": "两肺纹理清晰", "impression": "未见异常", "quality_grade": "甲"},
    )
    assert signed["status"] == "final"
    return str(signed["id"])


def test_recognition_over_http(
    server: RdcServer,
    alliance: dict[str, str],
    rdc_env: dict[str, str],
    testdata: Path,
    dcmtk: Path,
    tmp_path: Path,
) -> None:
    subprocess.run([sys.executable, "-c", _USERS], env=rdc_env, check=True, timeout=120)
    admin = server.client("admin", alliance["admin"])
    senior = server.client("senior", alliance["senior"])
    tech_a = server.client("tech_a", alliance["tech_a"])
    doctor_a = server.client("doctor_a", "pw-doctor_a-123")
    doctor_b = server.client("doctor_b", "pw-doctor_b-123")
    qc = server.client("qc", "pw-qc-123")

    # Reference data: admin only; a bad row answers 422 and changes nothing.
    csv = {"content-type": "text/csv"}
    assert (
        tech_a.post("/api/v1/recognition/catalog", content=CATALOG, headers=csv).status_code == 403
    )
    assert qc.post("/api/v1/recognition/catalog", content=CATALOG, headers=csv).status_code == 403
    bad = admin.post(
        "/api/v1/recognition/catalog", content=CATALOG + "X,imaging,x,,HR,0,,CT\n", headers=csv
    )
    assert bad.status_code == 422 and "row 3" in bad.json()["detail"]
    loaded = admin.post("/api/v1/recognition/catalog", content=CATALOG, headers=csv)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json() == {"version": 1, "created": True, "item_count": 1}
    assert (
        admin.post("/api/v1/recognition/catalog", content=CATALOG, headers=csv).json()["created"]
        is False
    )
    catalog = tech_a.get("/api/v1/recognition/catalog").json()
    assert catalog["current_version"] == 1 and catalog["items"][0]["code"] == "CT-ANY"
    yaml = {"content-type": "application/yaml"}
    acc = admin.post("/api/v1/recognition/accreditations", content=ACCREDITATIONS, headers=yaml)
    assert acc.status_code == 200, acc.text
    assert acc.json()["inserted"] == 1
    assert qc.get("/api/v1/recognition/accreditations").json()[0]["org"] == "CLINIC_A"
    assert tech_a.get("/api/v1/recognition/accreditations").status_code == 403

    # Two CT exams of the same patient: one done today, the original done in 2004.
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    original = testdata / "dicom" / "CT_small.dcm"
    recent = tmp_path / "recent.dcm"
    ds = pydicom.dcmread(original)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = today.strftime("%Y%m%d")
    ds.save_as(recent, enforce_file_format=True)
    sent = storescu(dcmtk, [original, recent], port=server.dicom_port, calling_ae="CLINIC_A_CT")
    assert all(r.returncode == 0 for r in sent), [r.stderr for r in sent]
    items = worklist_items(senior, count=2)
    reports = {}
    for item in items:
        uid = item["study_instance_uid"]
        reports["recent" if uid == ds.StudyInstanceUID else "old"] = _sign(
            senior, item["exam_id"], item["id"]
        )
    decision = tech_a.get(f"/api/v1/reports/{reports['recent']}/recognition").json()
    assert decision["granted"] is True and decision["mark"] == "HR", decision
    assert decision["exam_date"] == today.isoformat()
    old = senior.get(f"/api/v1/reports/{reports['old']}/recognition").json()
    assert old["granted"] is True and old["exam_date"] == "2004-01-19"
    assert old["recognizable_until"] == "2004-07-17"
    assert doctor_b.get(f"/api/v1/reports/{reports['recent']}/recognition").status_code == 404

    # The lookup: only the result still inside its window, for either clinic.
    patient = {"patient_id": str(ds.PatientID)}
    mine = doctor_a.get("/api/v1/recognized-results", params=patient)
    assert mine.status_code == 200, mine.text
    results = mine.json()["results"]
    assert [r["report_id"] for r in results] == [reports["recent"]]
    assert results[0]["recognizable_until"] == decision["recognizable_until"]
    assert results[0]["institution"]["code"] == "CLINIC_A" and results[0]["mark"] == "HR"
    across = doctor_b.get(
        "/api/v1/recognized-results", params={**patient, "issuer": "CLINIC_A", "item": "CT-ANY"}
    ).json()["results"]
    assert [r["decision_id"] for r in across] == [results[0]["decision_id"]]
    assert doctor_b.get("/api/v1/recognized-results", params=patient).json()["results"] == []
    assert (
        doctor_a.get("/api/v1/recognized-results", params={**patient, "item": "MR-X"}).json()[
            "results"
        ]
        == []
    )
    with server.db() as db:
        lookups = db.execute("SELECT COUNT(*) FROM audit_events WHERE action = 'lookup'").fetchone()
    assert lookups is not None and lookups[0] == 4

    # Declines: clinic clinicians, a standard reason, the patient told.
    url = f"/api/v1/recognized-results/{results[0]['decision_id']}/decline"
    assert (
        tech_a.post(url, json={"reason": "emergency", "patient_informed": True}).status_code == 403
    )
    refused = doctor_b.post(url, json={"reason": "emergency"})
    assert refused.status_code == 422 and "patient" in refused.json()["detail"]
    assert doctor_b.post(url, json={"reason": "other", "patient_informed": True}).status_code == 422
    assert (
        doctor_b.post(url, json={"reason": "cheaper", "patient_informed": True}).status_code == 422
    )
    declined = doctor_b.post(
        url, json={"reason": "high_stakes_decision", "patient_informed": True, "note": "术前"}
    )
    assert declined.status_code == 200, declined.text
    assert declined.json()["org"] == "CLINIC_B" and "手术" in declined.json()["reason_label"]
    assert [d["id"] for d in qc.get("/api/v1/recognition/declines").json()] == [
        declined.json()["id"]
    ]
    assert len(doctor_b.get("/api/v1/recognition/declines").json()) == 1
    assert doctor_a.get("/api/v1/recognition/declines").json() == []
    assert senior.get("/api/v1/recognition/declines").status_code == 403
    reasons = doctor_a.get("/api/v1/recognition/decline-reasons").json()
    assert len(reasons) == 7 and reasons[-1]["code"] == "other"
