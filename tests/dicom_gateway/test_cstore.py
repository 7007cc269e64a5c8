"""C-ECHO and C-STORE against a running ``rdc serve``, driven by dcmtk and pynetdicom."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from tests.helpers import RdcServer, echo_rejection, echoscu, same_dataset, storescu, wait_for

VALID_EXCLUDED = {"DICOMDIR"}


def valid_files(testdata: Path) -> list[Path]:
    root = testdata / "dicom"
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and "malformed" not in p.parts and p.name not in VALID_EXCLUDED
    )


def all_ok(results: list[subprocess.CompletedProcess[str]]) -> None:
    for result in results:
        assert result.returncode == 0, result.stderr
        assert "Store Failed" not in result.stderr, result.stderr


def stored_copies(server: RdcServer, sop_uid: str) -> list[Path]:
    """Every stored object for this SOP instance (the instance of record and kept conflicts),
    read through the deployment's store into local files."""
    with server.db() as db:
        keys = [
            r[0]
            for r in db.execute(
                "SELECT storage_key FROM instances WHERE sop_instance_uid=? "
                "UNION ALL SELECT storage_key FROM instance_conflicts WHERE sop_instance_uid=?",
                (sop_uid, sop_uid),
            )
        ]
    return [server.object_file(k) for k in keys]


def test_echo_and_every_sample_file_stored_indexed_grouped_and_queued(
    server: RdcServer, dcmtk: Path, testdata: Path, alliance: dict[str, str]
) -> None:
    echo = echoscu(dcmtk, server.dicom_port, "CLINIC_A_CT")
    assert echo.returncode == 0, echo.stderr

    files = valid_files(testdata)
    assert len(files) == 53
    all_ok(storescu(dcmtk, files, port=server.dicom_port, calling_ae="CLINIC_A_CT"))

    # Every file is kept: its dataset is retrievable from the store exactly as sent.
    expected_exams: dict[str, set[str]] = defaultdict(set)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        copies = stored_copies(server, ds.SOPInstanceUID)
        assert copies, f"{path.name} not indexed"
        assert any(same_dataset(path, copy) for copy in copies), f"{path.name} changed in store"
        expected_exams[ds.get("StudyInstanceUID", f"no-study:{ds.SOPInstanceUID}")].add(
            ds.SOPInstanceUID
        )

    # Grouped into exams by study; instances listed under the right exam in the API.
    reader = server.client("reader", alliance["reader"])
    exams = reader.get("/api/v1/exams", params={"limit": 500}).json()
    assert exams["total"] == len(expected_exams) == 19
    by_study = {e["study_instance_uid"]: e for e in exams["items"]}
    with server.db() as db:
        for study_uid, sop_uids in expected_exams.items():
            if study_uid.startswith("no-study:"):
                sop = study_uid.split(":", 1)[1]
                study_uid = db.execute(
                    "SELECT e.study_instance_uid FROM exams e JOIN instances i ON i.exam_id=e.id "
                    "WHERE i.sop_instance_uid=?",
                    (sop,),
                ).fetchone()[0]
            detail = reader.get(f"/api/v1/exams/{by_study[study_uid]['id']}").json()
            assert {i["sop_instance_uid"] for i in detail["instances"]} == sop_uids
            assert detail["clinic_code"] == "CLINIC_A"

    # The six MR_small encodings share one SOP Instance UID: one instance of record, the
    # differing copies kept and the exam flagged.
    mr = pydicom.dcmread(testdata / "dicom" / "MR_small.dcm", stop_before_pixels=True)
    assert by_study[mr.StudyInstanceUID]["has_conflicts"] is True

    # After the stable age every exam is READY and on the worklist, most urgent first.
    def queued() -> dict | None:
        page = reader.get("/api/v1/worklist", params={"limit": 500}).json()
        return page if page["total"] == len(expected_exams) else None

    page = wait_for(queued, timeout=30, what="all exams on the worklist")
    assert {i["study_instance_uid"] for i in page["items"]} == set(by_study)
    keys = [(i["priority"] != "emergency", i["due_at"]) for i in page["items"]]
    assert keys == sorted(keys)
    states = {
        e["state"] for e in reader.get("/api/v1/exams", params={"limit": 500}).json()["items"]
    }
    assert states == {"READY"}


@pytest.mark.task_free  # exams are made as the instances are stored
def test_dicomdir_study_grouped_into_its_studies(
    server: RdcServer, dcmtk: Path, testdata: Path, alliance: dict[str, str]
) -> None:
    folder = testdata / "dicom" / "study_dicomdir"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    all_ok(storescu(dcmtk, files, port=server.dicom_port, calling_ae="CLINIC_B_MR"))
    reader = server.client("reader", alliance["reader"])
    exams = reader.get("/api/v1/exams", params={"limit": 100}).json()
    # PROVENANCE.md: 2 patients, 6 studies, 31 instances.
    assert exams["total"] == 6
    assert sum(e["instance_count"] for e in exams["items"]) == 31
    assert len({e["patient"]["patient_id"] for e in exams["items"]}) == 2


def test_resending_a_study_duplicates_nothing(
    server: RdcServer, dcmtk: Path, testdata: Path, alliance: dict[str, str]
) -> None:
    folder = testdata / "dicom" / "study_dicomdir" / "98892001"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    all_ok(storescu(dcmtk, files, port=server.dicom_port, calling_ae="CLINIC_A_CT"))
    reader = server.client("reader", alliance["reader"])
    wait_for(lambda: reader.get("/api/v1/worklist").json()["total"] == 1, what="work item")

    def counts() -> tuple[int, ...]:
        with server.db() as db:
            return tuple(
                db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("instances", "exams", "work_items", "patients", "instance_conflicts")
            )

    def exam_row() -> tuple[object, ...]:
        with server.db() as db:
            return tuple(
                db.execute("SELECT instance_count, last_received_at, state FROM exams").fetchone()
            )

    before, exam_before = counts(), exam_row()
    objects_before = server.objects("dicom")
    all_ok(storescu(dcmtk, files, port=server.dicom_port, calling_ae="CLINIC_A_CT"))
    assert counts() == before == (len(files), 1, 1, 1, 0)
    # A re-sent copy leaves the exam as it was: not counted, not "received" again.
    assert exam_row() == exam_before
    assert server.objects("dicom") == objects_before
    assert reader.get("/api/v1/worklist").json()["total"] == 1


@pytest.mark.task_free  # the QC refresh task would empty the queue counted here
def test_images_of_a_known_exam_queue_no_qc_refresh_and_a_rescan_is_received_again(
    server: RdcServer, dcmtk: Path, testdata: Path, tmp_path: Path
) -> None:
    folder = testdata / "dicom" / "study_dicomdir" / "98892001"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    all_ok(storescu(dcmtk, files[:2], port=server.dicom_port, calling_ae="CLINIC_A_CT"))

    def exam_and_queue() -> tuple[object, ...]:
        with server.db() as db:
            count, state = db.execute("SELECT instance_count, state FROM exams").fetchone()
            queued = db.execute("SELECT count(*) FROM qc_fact_queue").fetchone()[0]
        return count, state, queued

    _, _, queued = exam_and_queue()
    # More images of the exam: counted, but no fact of the QC figures changes, so no
    # refresh is queued for each of them (it was one per instance).
    all_ok(storescu(dcmtk, files[2:], port=server.dicom_port, calling_ae="CLINIC_A_CT"))
    assert exam_and_queue() == (len(files), "RECEIVING", queued)
    # The exam is sent back for a re-scan; a new image makes it received again, and that
    # change of state is queued for the QC facts.
    with server.db() as db:
        db.execute("UPDATE exams SET state = 'RESCAN_REQUESTED'")
    _, _, queued = exam_and_queue()
    rescanned = pydicom.dcmread(files[0])
    rescanned.SOPInstanceUID = rescanned.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    rescanned.save_as(tmp_path / "rescan.dcm")
    all_ok(
        storescu(dcmtk, [tmp_path / "rescan.dcm"], port=server.dicom_port, calling_ae="CLINIC_A_CT")
    )
    assert exam_and_queue() == (len(files) + 1, "RECEIVING", queued + 1)


@pytest.mark.task_free  # what is stored, not what a task does with it
def test_unknown_calling_ae_is_rejected(server: RdcServer, dcmtk: Path) -> None:
    assert echo_rejection(dcmtk, server.dicom_port, "STRANGER") == [
        "Result: Rejected Permanent, Source: Service User",
        "Reason: Calling AE Title Not Recognized",
    ]
    assert echoscu(dcmtk, server.dicom_port, "CLINIC_A_CT").returncode == 0


@pytest.mark.task_free  # what is stored, not what a task does with it
@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_malformed_dataset_fails_is_quarantined_and_service_goes_on(
    server: RdcServer, testdata: Path, name: str
) -> None:
    path = testdata / "dicom" / "malformed" / name
    sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
    try:
        ae = AE(ae_title="CLINIC_A_CT")
        ae.add_requested_context(
            sop_class, [pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID]
        )
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert status.Status == 0xC000  # Cannot understand

    with server.db() as db:
        rows = db.execute("SELECT storage_key, reason, calling_ae FROM quarantine").fetchall()
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 0
    assert len(rows) == 1
    assert "truncated" in rows[0]["reason"]
    assert rows[0]["calling_ae"] == "CLINIC_A_CT"
    kept = server.object_file(rows[0]["storage_key"])
    assert kept.read_bytes()[132:].endswith(path.read_bytes()[-200:])
    assert server.objects("dicom") == []

    # The next association works and stores a valid instance.
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")).Status == 0
    assoc.release()
    with server.db() as db:
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 1


@pytest.mark.task_free  # what is stored, not what a task does with it
def test_study_of_another_clinic_is_refused(server: RdcServer, testdata: Path) -> None:
    ds = pydicom.dcmread(testdata / "dicom" / "MR_small.dcm")
    for calling, expected in (("CLINIC_A_CT", 0x0000), ("CLINIC_B_MR", 0x0124)):
        ae = AE(ae_title=calling)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
        assert assoc.send_c_store(ds).Status == expected
        assoc.release()
    with server.db() as db:
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 1
