"""Migration 0010 (intake contract) carries real data.

A deployment is built and used by the code of commit febbf14 (before the intake contract),
run from a `git archive` of that commit: studies arrive by C-STORE, a malformed object is
quarantined, a report is signed with the critical flag (critical alert, recognition
decision, HR catalogue), delivered to the clinic's portal and queued for a push. Then this
tree's ``rdc serve`` starts on the same database and store (and migrates it), and every ID
a client held still resolves: exams, work item, reports (and they still verify),
recognition decision, critical alert, deliveries, instances through DICOMweb with the same
bytes. Runs on SQLite and, on the production pass, on PostgreSQL and S3.
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from alembic.script import ScriptDirectory
from pydicom.uid import CTImageStorage
from pynetdicom import AE, _config

from rdc_core.migrate import alembic_config
from tests.helpers import (
    RdcServer,
    free_port,
    read_object,
    report_exam,
    seed_alliance,
    storescu,
    worklist_items,
)

OLD_COMMIT = "febbf14"  # main before the intake contract (schema 0007)
REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["rdc_core", "worklist", "dicom_gateway", "ecg_service", "lab_results", "web"]
CATALOG = """\
code,discipline,name_zh,name_en,scope_mark,valid_days,min_grade,modality
CT-ANY,imaging,CT检查,CT examination,HR,180,乙,CT
"""
ACCREDITATIONS = """\
accreditations:
  - {org: CLINIC_A, discipline: imaging, valid_from: 2000-01-01, valid_to: 2099-12-31}
"""


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The product's packages as of OLD_COMMIT."""
    root = tmp_path_factory.mktemp("old-tree")
    archive = root / "old.tar"
    subprocess.run(
        ["git", "-C", str(REPO), "archive", "-o", str(archive), OLD_COMMIT, *PACKAGES],
        check=True,
        capture_output=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture
def envs(
    rdc_env: dict[str, str], old_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    # `python -m` puts the working directory first on sys.path: run outside the checkout.
    monkeypatch.chdir(tmp_path)
    old = {**rdc_env, "PYTHONPATH": str(old_tree)}
    new = {**rdc_env, "PYTHONPATH": str(REPO)}
    yield old, new


def _store_truncated(port: int, path: Path) -> int:
    """C-STORE the file's bytes as they are (pydicom would not re-encode a truncated file)."""
    meta = pydicom.dcmread(path, stop_before_pixels=True)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="CLINIC_A_CT")
        ae.add_requested_context(meta.SOPClassUID, [meta.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", port, ae_title="RDC")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return int(status.Status)


def _build_old_deployment(server: RdcServer, testdata: Path, dcmtk: Path) -> dict[str, Any]:
    """Use the old code as clinics and readers do; returns every ID a client holds."""
    files = [testdata / "dicom" / "CT_small.dcm", testdata / "dicom" / "MR_small.dcm"]
    sent = storescu(dcmtk, files, port=server.dicom_port, calling_ae="CLINIC_A_CT")
    assert all(r.returncode == 0 for r in sent), [r.stderr for r in sent]
    assert _store_truncated(server.dicom_port, testdata / "dicom/malformed/MR_truncated.dcm")
    held: dict[str, Any] = {"sent": {}}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        held["sent"][ds.SOPInstanceUID] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, path)

    admin = server.client("admin", "pw-admin-123")
    csv, yaml = {"content-type": "text/csv"}, {"content-type": "application/yaml"}
    assert admin.post("/api/v1/recognition/catalog", content=CATALOG, headers=csv).is_success
    assert admin.post(
        "/api/v1/recognition/accreditations", content=ACCREDITATIONS, headers=yaml
    ).is_success
    endpoint = admin.post(  # a push that cannot be delivered yet: it stays queued
        "/api/v1/delivery-endpoints",
        json={
            "clinic": "CLINIC_A",
            "channel": "hl7",
            "host": "127.0.0.1",
            "port": free_port(),
            "receiving_application": "HIS",
            "receiving_facility": "CLINIC_A",
        },
    )
    assert endpoint.status_code == 200, endpoint.text

    senior = server.client("senior", "pw-senior-123")
    items = worklist_items(senior, count=2)
    held["items"] = {i["id"]: i["exam_id"] for i in items}
    ct = next(i for i in items if i["modality"] == "CT")
    report = report_exam(
        senior,
        exam_id=ct["exam_id"],
        item_id=ct["id"],
        report={
            "findings": "右肺结节",
            "impression": "疑似肺栓塞 Suspected PE",
            "quality_grade": "甲",
            "critical": True,
        },
    )
    assert report["status"] == "final", report
    held["report_id"] = report["id"]
    held["exam_id"] = ct["exam_id"]
    held["recognition"] = senior.get(f"/api/v1/reports/{report['id']}/recognition").json()
    assert held["recognition"]["granted"], held["recognition"]
    alerts = senior.get("/api/v1/critical-alerts").json()["items"]
    assert len(alerts) == 1
    held["alert_id"] = alerts[0]["id"]
    tech_a = server.client("tech_a", "pw-tech_a-123")
    pdf = tech_a.get(f"/api/v1/reports/{report['id']}/pdf")  # the portal delivery
    assert pdf.status_code == 200
    held["pdf"] = pdf.content
    held["deliveries"] = sorted(
        (d["id"], d["channel"])
        for d in admin.get(f"/api/v1/reports/{report['id']}/deliveries").json()
    )
    assert {c for _, c in held["deliveries"]} == {"portal", "hl7"}
    held["exam"] = senior.get(f"/api/v1/exams/{ct['exam_id']}").json()
    with server.db() as db:
        held["instances"] = {
            r[0]: (r[1], r[2], r[3])
            for r in db.execute("SELECT id, sop_instance_uid, storage_key, sha256 FROM instances")
        }
        held["quarantine"] = db.execute("SELECT id, storage_key FROM quarantine").fetchall()
    assert len(held["instances"]) == 2 and len(held["quarantine"]) == 1
    for client in (admin, senior, tech_a):
        client.close()
    return held


def test_migration_keeps_every_id_object_and_signature(
    envs: tuple[dict[str, str], dict[str, str]], tmp_path: Path, testdata: Path, dcmtk: Path
) -> None:
    old_env, new_env = envs
    seed_alliance(old_env)
    with RdcServer(old_env, tmp_path / "old.log", mllp=False) as old:
        with old.db() as db:
            assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0007"
        held = _build_old_deployment(old, testdata, dcmtk)

    with RdcServer(new_env, tmp_path / "new.log") as new:  # migrates at start
        with new.db() as db:
            head = ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == head
            exams = db.execute(
                "SELECT id, natural_key, key_kind, study_instance_uid FROM exams"
            ).fetchall()
            artifacts = {
                r[0]: (r[1], r[2], r[3], r[4])
                for r in db.execute("SELECT id, kind, ref, storage_key, sha256 FROM artifacts")
            }
            quarantine = db.execute("SELECT id, storage_key, artifact_ref FROM quarantine")
            quarantined = quarantine.fetchall()
        assert len(exams) == 2
        assert all(key == uid and kind == "study_uid" for _, key, kind, uid in exams)
        # every instance has its artifact, with the same ID, key and hash
        assert artifacts == {
            i: ("instance", sop, key, sha) for i, (sop, key, sha) in held["instances"].items()
        }
        assert [(q[0], q[1]) for q in quarantined] == [tuple(q) for q in held["quarantine"]]
        for _, key, _ in quarantined:
            assert read_object(new_env, key)  # the quarantined bytes are still there

        senior = new.client("senior", "pw-senior-123")
        tech_a = new.client("tech_a", "pw-tech_a-123")
        admin = new.client("admin", "pw-admin-123")
        report_id, exam_id = held["report_id"], held["exam_id"]
        # the report still verifies, and is the same document
        verified = senior.get(f"/api/v1/reports/{report_id}/verify")
        assert verified.status_code == 200 and verified.json()["valid"], verified.text
        assert tech_a.get(f"/api/v1/reports/{report_id}/pdf").content == held["pdf"]
        upload = senior.post("/api/v1/verify", content=held["pdf"])
        assert upload.status_code == 200 and upload.json()["valid"], upload.text
        # every ID a client holds still resolves to the same thing
        # Every field a client held is unchanged; later migrations may add fields.
        exam_now = senior.get(f"/api/v1/exams/{exam_id}").json()
        assert {k: exam_now.get(k) for k in held["exam"]} == held["exam"]
        assert senior.get(f"/api/v1/reports/{report_id}/recognition").json() == held["recognition"]
        alert = senior.get(f"/api/v1/critical-alerts/{held['alert_id']}")
        assert alert.status_code == 200 and alert.json()["exam_id"] == exam_id
        deliveries = admin.get(f"/api/v1/reports/{report_id}/deliveries").json()
        assert sorted((d["id"], d["channel"]) for d in deliveries) == held["deliveries"]
        listed = {i["id"]: i["exam_id"] for i in senior.get("/api/v1/worklist").json()["items"]}
        done = set(held["items"]) - set(listed)
        assert {i: held["items"][i] for i in listed} == {
            i: e for i, e in held["items"].items() if i not in done
        }
        # every instance through DICOMweb with the bytes sent, and in the store under its key
        for sop, (study, series, path) in held["sent"].items():
            url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
            got = tech_a.get(url, headers={"accept": 'multipart/related; type="application/dicom"'})
            assert got.status_code == 200, got.text
            sent = pydicom.dcmread(path)
            assert sent.PixelData in got.content
        for _, key, _ in held["instances"].values():
            assert read_object(new_env, key)

        # and the new code goes on ingesting into the migrated database
        again = storescu(
            dcmtk,
            [testdata / "dicom" / "CT_small.dcm", testdata / "dicom" / "emri_small.dcm"],
            port=new.dicom_port,
            calling_ae="CLINIC_A_CT",
        )
        assert all(r.returncode == 0 for r in again)
        with new.db() as db:
            assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 3
            assert db.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 3
        for client in (admin, senior, tech_a):
            client.close()
    assert CTImageStorage  # the SOP class of the study reported above
