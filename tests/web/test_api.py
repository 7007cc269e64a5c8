"""The HTTP API against a running server: auth, problem responses, organisation scoping."""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.helpers import HTTP_TIMEOUT, RdcServer, free_port, wait_for


def _store(server: RdcServer, calling_ae: str, path: Path) -> None:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()


@pytest.mark.task_free  # answers of rdc serve itself
def test_health_and_token_errors_are_problem_responses(
    server: RdcServer, alliance: dict[str, str]
) -> None:
    assert httpx.get(f"{server.http}/healthz", timeout=HTTP_TIMEOUT).json()["status"] == "ok"

    bad = httpx.post(
        f"{server.http}/api/v1/auth/token",
        data={"username": "reader", "password": "nope"},
        timeout=HTTP_TIMEOUT,
    )
    assert bad.status_code == 401
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["status"] == 401 and bad.json()["title"]

    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        response = httpx.get(f"{server.http}/api/v1/exams", headers=headers, timeout=HTTP_TIMEOUT)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"

    reader = server.client("reader", alliance["reader"])
    invalid = reader.get("/api/v1/exams", params={"limit": 0})
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["loc"] == ["query", "limit"]
    missing = reader.get("/api/v1/exams/does-not-exist")
    assert (
        missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    )


def test_clinic_sees_only_its_own_exams(
    server: RdcServer, alliance: dict[str, str], testdata: Path
) -> None:
    _store(server, "CLINIC_A_CT", testdata / "dicom" / "CT_small.dcm")
    _store(server, "CLINIC_B_MR", testdata / "dicom" / "MR_small.dcm")

    tech_a = server.client("tech_a", alliance["tech_a"])
    tech_b = server.client("tech_b", alliance["tech_b"])
    reader = server.client("reader", alliance["reader"])

    all_exams = reader.get("/api/v1/exams").json()
    assert all_exams["total"] == 2
    exam_of = {e["clinic_code"]: e["id"] for e in all_exams["items"]}

    own = tech_a.get("/api/v1/exams").json()
    assert [e["clinic_code"] for e in own["items"]] == ["CLINIC_A"] and own["total"] == 1
    assert tech_a.get("/api/v1/exams", params={"clinic": "CLINIC_B"}).json()["total"] == 0

    # Another clinic's exam is "not found" (404), so its existence is not disclosed.
    foreign = tech_a.get(f"/api/v1/exams/{exam_of['CLINIC_B']}")
    assert foreign.status_code == 404
    assert tech_b.get(f"/api/v1/exams/{exam_of['CLINIC_B']}").status_code == 200
    detail = tech_a.get(f"/api/v1/exams/{exam_of['CLINIC_A']}").json()
    ct = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm", stop_before_pixels=True)
    assert [i["sop_instance_uid"] for i in detail["instances"]] == [ct.SOPInstanceUID]
    assert detail["patient"]["patient_id"] == ct.PatientID

    # Clinic users have no reading worklist.
    forbidden = tech_a.get("/api/v1/worklist")
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "application/problem+json"

    # Filters: modality and state.
    wait_for(lambda: reader.get("/api/v1/worklist").json()["total"] == 2, what="work items")
    assert reader.get("/api/v1/exams", params={"modality": "MR"}).json()["total"] == 1
    assert reader.get("/api/v1/exams", params={"state": "RECEIVING"}).json()["total"] == 0
    assert (
        reader.get("/api/v1/exams", params={"state": "READY", "clinic": "CLINIC_A"}).json()["total"]
        == 1
    )

    # Every access above is in the audit trail, and the chain verifies.
    with server.db() as db:
        actions = db.execute(
            "SELECT actor, action, object_type, object_id FROM audit_events"
        ).fetchall()
    assert ("user:tech_a", "view", "exam", exam_of["CLINIC_A"]) in [tuple(a) for a in actions]


def test_worklist_orders_by_priority_then_due_time(
    server: RdcServer, alliance: dict[str, str], testdata: Path, tmp_path: Path
) -> None:
    base = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    for index, priority in enumerate(["ROUTINE", "STAT", "HIGH", None]):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.543.{index}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.543.{index}.1"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.543.{index}.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if priority:
            ds.RequestedProcedurePriority = priority
        ae = AE(ae_title="CLINIC_A_CT")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    reader = server.client("reader", alliance["reader"])
    page = wait_for(
        lambda: (p := reader.get("/api/v1/worklist").json())["total"] == 4 and p,
        what="four work items",
    )
    assert [i["priority"] for i in page["items"]] == ["emergency", "urgent", "routine", "routine"]
    routine = [i["due_at"] for i in page["items"][2:]]
    assert routine == sorted(routine)


@pytest.mark.task_free  # answers of rdc serve itself
def test_readiness_and_metrics(
    server: RdcServer,
    alliance: dict[str, str],
    testdata: Path,
    rdc_env: dict[str, str],
    tmp_path: Path,
) -> None:
    ready = httpx.get(f"{server.http}/readyz", timeout=HTTP_TIMEOUT)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "store": "ok", "broker": "ok"}
    assert httpx.get(f"{server.http}/livez", timeout=HTTP_TIMEOUT).status_code == 200

    _store(server, "CLINIC_A_CT", testdata / "dicom" / "CT_small.dcm")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(
            httpx.get(f"{server.http}/metrics", timeout=HTTP_TIMEOUT).text
        )
        for sample in family.samples
    }
    assert samples[("rdc_dicom_instances_total", (("outcome", "stored"),))] == 1
    size = (testdata / "dicom" / "CT_small.dcm").stat().st_size
    received = samples[("rdc_dicom_received_bytes_total", ())]
    assert size - 200 < received < size + 200  # the data set plus our file meta

    # A deployment whose broker is down is alive but not ready.
    env = {
        **rdc_env,
        "RDC_TASK_BACKEND": "celery",
        "RDC_BROKER_URL": "redis://127.0.0.1:9/0",
        "RDC_HTTP_PORT": str(free_port()),
        "RDC_DICOM_PORT": str(free_port()),
        "RDC_MLLP_PORT": str(free_port()),
    }
    broken = RdcServer(env, tmp_path / "broken.log", workers=False)  # they could not connect
    broken.start()
    try:
        response = httpx.get(f"{broken.http}/readyz", timeout=30)
        assert response.status_code == 503
        assert response.json()["checks"]["broker"].startswith("error")
        assert response.json()["checks"]["database"] == "ok"
    finally:
        broken.stop()
