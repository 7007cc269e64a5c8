"""The ECG centre's intake against a running ``rdc serve`` (one deployment for the module):
a DICOM 12-lead ECG sent with dcmtk's storescu and by STOW, WFDB and HL7 aECG files
uploaded over HTTP, malformed input refused with nothing created, clinic isolation, the
trace image, the pre-screen putting a suspected critical ECG first on the reading worklist,
and ``rdc import`` of WFDB / aECG files.

On the production pass (RDC_TEST_DATABASE=postgresql) the deployment runs on PostgreSQL, S3
and Celery (the analysis of a C-STOREd ECG then runs in ``rdc worker``)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from PIL import Image

from ecg_service import MEASUREMENT_KEYS, synthesize_ecg
from ecg_service.writers import wfdb_files
from tests.ecg_service.scp_writer import scp_bytes
from tests.helpers import (
    Deployments,
    RdcClient,
    RdcServer,
    alliance_passwords,
    rdc_cli,
    storescu,
    wait_for,
)

Files = list[tuple[str, tuple[str, bytes]]]


@dataclass
class Deployment:
    server: RdcServer
    passwords: dict[str, str]
    ecg: Path  # the shared ECG test data
    dcmtk: Path

    def client(self, username: str) -> RdcClient:
        return self.server.client(username, self.passwords[username])


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments, testdata: Path, dcmtk: Path
) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("ecg")
    with deployments.env(workdir) as env, RdcServer(env, workdir / "serve.log") as server:
        yield Deployment(server, alliance_passwords(), testdata / "ecg", dcmtk)


def _files(folder: Path, *names: str) -> Files:
    return [("file", (name, (folder / name).read_bytes())) for name in names]


def _ecg(client: httpx.Client, exam_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/ecg/{exam_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def _state(deployment: Deployment) -> tuple[int, int, list[str]]:
    """Exams indexed, worklist items, stored ECG objects."""
    with deployment.server.db() as db:
        row = db.execute("SELECT COUNT(*) FROM exams").fetchone()
        assert row is not None
    reader = deployment.client("reader")
    total = reader.get("/api/v1/worklist").json()["total"]
    return int(row[0]), int(total), sorted(deployment.server.objects("ecg"))


def test_dicom_ecg_sent_by_c_store_is_measured(deployment: Deployment) -> None:
    results = storescu(
        deployment.dcmtk,
        [deployment.ecg / "dicom" / "waveform_ecg.dcm"],
        port=deployment.server.dicom_port,
        calling_ae="CLINIC_A_CT",
    )
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    reader = deployment.client("reader")
    with deployment.server.db() as db:
        row = db.execute(
            "SELECT e.id, e.discipline FROM exams e JOIN instances i ON i.exam_id = e.id "
            "WHERE i.sop_class_uid = '1.2.840.10008.5.1.4.1.1.9.1.1'"
        ).fetchone()
    assert row is not None and row[1] == "ecg"
    exam_id = row[0]

    def measured() -> dict[str, Any] | None:
        response = reader.get(f"/api/v1/ecg/{exam_id}")
        return response.json() if response.status_code == 200 else None

    ecg = wait_for(measured, timeout=90, what="the C-STOREd ECG to be measured")
    assert ecg["source_format"] == "dicom"
    assert ecg["sampling_rate_hz"] == 1000
    assert ecg["leads"][:3] == ["I", "II", "III"] and len(ecg["leads"]) == 12
    assert ecg["duration_s"] == pytest.approx(10.0)
    assert set(ecg["measurements"]) == set(MEASUREMENT_KEYS)
    assert 50 <= ecg["measurements"]["heart_rate_bpm"] <= 70
    assert 120 <= ecg["measurements"]["pr_ms"] <= 200
    assert ecg["unreliable"] is False
    # The cart's own measurements, beside ours, each with its source.
    device = {m["key"]: m for m in ecg["device_measurements"] if m["key"]}
    assert device["pr_ms"]["value"] == 161 and "Mortara" in device["pr_ms"]["source"]
    assert {q["status"] for q in ecg["quality"]} <= {"ok", "flat", "noisy", "lead_off"}
    # On the reading worklist as an ECG.
    items = wait_for(
        lambda: [
            i for i in reader.get("/api/v1/worklist").json()["items"] if i["exam_id"] == exam_id
        ],
        timeout=60,
        what="the DICOM ECG on the worklist",
    )
    assert items[0]["discipline"] == "ecg"


def test_wfdb_and_aecg_uploads(deployment: Deployment) -> None:
    tech = deployment.client("tech_a")
    wfdb = deployment.ecg / "wfdb"
    upload = _files(wfdb, "s0010_re.hea", "s0010_re.dat", "s0010_re.xyz")
    response = tech.post("/api/v1/ecg", files=upload, data={"patient_id": "PTB-0010"})
    assert response.status_code == 201, response.text
    exam_id = response.json()["exam_id"]
    ecg = _ecg(tech, exam_id)
    assert ecg["source_format"] == "wfdb" and ecg["sampling_rate_hz"] == 1000
    assert ecg["leads"][:12] == [
        "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
    ]  # fmt: skip
    assert ecg["duration_s"] == pytest.approx(38.4)
    assert list(ecg["measurements"]) == list(MEASUREMENT_KEYS)
    assert ecg["measurements"]["qrs_ms"] is not None
    assert ecg["clinic_code"] == "CLINIC_A" and ecg["exam_state"] == "READY"
    exam = tech.get(f"/api/v1/exams/{exam_id}").json()
    assert exam["discipline"] == "ecg" and exam["patient"]["patient_id"] == "PTB-0010"
    assert exam["patient"]["sex"] == "F"  # from the header's comments
    # The same record again: the same exam, nothing new.
    before = _state(deployment)
    again = tech.post("/api/v1/ecg", files=upload, data={"patient_id": "PTB-0010"})
    assert again.status_code == 200 and again.json() == {"exam_id": exam_id, "duplicate": True}
    assert _state(deployment) == before

    # 360 Hz: measured, and flagged unreliable.
    mitbih = tech.post(
        "/api/v1/ecg", files=_files(wfdb, "100.hea", "100.dat"), data={"patient_id": "MIT-100"}
    )
    assert mitbih.status_code == 201, mitbih.text
    low = _ecg(tech, mitbih.json()["exam_id"])
    assert low["sampling_rate_hz"] == 360 and low["unreliable"] is True
    assert "500 Hz" in low["unreliable_reason"]
    assert low["measurements"]["heart_rate_bpm"] == pytest.approx(75, abs=5)
    assert low["measurements"]["qrs_axis_deg"] is None
    assert low["missing_reasons"]["qrs_axis_deg"]

    # HL7 aECG by lead-hospital staff for a clinic: the patient as the file names them.
    reader = deployment.client("reader")
    aecg = reader.post(
        "/api/v1/ecg",
        files=_files(deployment.ecg / "aecg", "Example_aECG.xml"),
        data={"clinic": "CLINIC_A"},
    )
    assert aecg.status_code == 201, aecg.text
    aecg_id = aecg.json()["exam_id"]
    measured = _ecg(reader, aecg_id)
    assert measured["source_format"] == "hl7_aecg" and measured["sampling_rate_hz"] == 500
    assert measured["clinic_code"] == "CLINIC_A"
    sources = {m["source"] for m in measured["device_measurements"]}
    assert sources and all(s.startswith("aECG annotation") for s in sources)
    assert reader.get(f"/api/v1/exams/{aecg_id}").json()["patient"]["patient_id"] == "SBJ-123"


def test_malformed_uploads_are_refused_and_nothing_is_created(deployment: Deployment) -> None:
    tech = deployment.client("tech_a")
    wfdb = deployment.ecg / "wfdb"
    before = _state(deployment)
    cases: list[tuple[Files, dict[str, str], str]] = [
        (_files(deployment.ecg / "aecg" / "malformed", "empty.xml"), {}, "aECG: no <series>"),
        (_files(wfdb, "s0010_re.hea"), {"patient_id": "X"}, "s0010_re.dat"),
        ([("file", ("junk.bin", b"\x00\x01 not an ECG" * 40))], {}, "unrecognised ECG file"),
        ([("file", ("report.pdf", b"%PDF-1.7\n..."))], {}, "PDF"),
        (_files(wfdb, "3000003_0003.hea", "3000003_0003.dat"), {}, "patient_id"),
        (_files(wfdb, "100.hea", "100.dat"), {"patient_id": "P", "sex": "X"}, "sex"),
    ]
    for files, data, named in cases:
        response = tech.post("/api/v1/ecg", files=files, data=data)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert named in response.json()["detail"], response.json()
    # No file at all; lead staff who name no clinic.
    assert tech.post("/api/v1/ecg", data={"patient_id": "P"}).status_code == 422
    reader = deployment.client("reader")
    unnamed = reader.post("/api/v1/ecg", files=_files(deployment.ecg / "aecg", "Example_aECG.xml"))
    assert unnamed.status_code == 422 and "clinic" in unnamed.json()["detail"]
    assert _state(deployment) == before


def test_a_clinic_sees_only_its_own_ecgs(deployment: Deployment) -> None:
    tech_a, tech_b = deployment.client("tech_a"), deployment.client("tech_b")
    response = tech_a.post(
        "/api/v1/ecg",
        files=_files(deployment.ecg / "wfdb", "test01_00s.hea", "test01_00s.dat"),
        data={
            "patient_id": "A-77",
            "patient_name": "Li^Lei",
            "sex": "M",
            "birth_date": "1960-02-03",
        },
    )
    assert response.status_code == 201, response.text
    exam_id = response.json()["exam_id"]
    assert tech_a.get(f"/api/v1/ecg/{exam_id}").status_code == 200
    assert tech_a.get(f"/api/v1/ecg/{exam_id}/trace.png").status_code == 200
    for path in (f"/api/v1/ecg/{exam_id}", f"/api/v1/ecg/{exam_id}/trace.png"):
        assert tech_b.get(path).status_code == 404
    # Clinic B may not file an upload under clinic A, nor claim A's record as its own.
    files = _files(deployment.ecg / "wfdb", "test01_00s.hea", "test01_00s.dat")
    named_a = tech_b.post(
        "/api/v1/ecg", files=files, data={"clinic": "CLINIC_A", "patient_id": "B"}
    )
    assert named_a.status_code == 403
    assert tech_b.post("/api/v1/ecg", files=files, data={"patient_id": "B"}).status_code == 403
    # The reads were audited.
    with deployment.server.db() as db:
        actions = {
            a
            for (a,) in db.execute(
                "SELECT action FROM audit_events WHERE object_id = ? AND object_type = 'ecg'",
                (exam_id,),
            )
        }
    assert {"view", "view_trace"} <= actions


def test_trace_png_and_svg(deployment: Deployment) -> None:
    tech = deployment.client("tech_a")
    response = tech.post(
        "/api/v1/ecg",
        files=_files(deployment.ecg / "aecg", "Example_aECG.xml"),
    )
    assert response.status_code in (200, 201), response.text  # uploaded above by the reader
    exam_id = response.json()["exam_id"]
    png = tech.get(f"/api/v1/ecg/{exam_id}/trace.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.format == "PNG"
    # 250 mm of paper at 5 px/mm, 3 rows + the rhythm strip: about 1.3k x 0.8k pixels.
    assert 1000 <= image.width <= 2000 and 500 <= image.height <= 1500, image.size
    # A red grid and black traces: enough ink for 12 leads and a rhythm strip, not a blot.
    histogram = image.convert("RGB").convert("L").histogram()
    ink, paper = sum(histogram[:64]), sum(histogram[128:])
    assert 5000 < ink < 0.2 * image.width * image.height and paper > 0.5 * sum(histogram)
    tall = Image.open(io.BytesIO(tech.get(f"/api/v1/ecg/{exam_id}/trace.png?layout=12x1").content))
    assert tall.height > image.height
    svg = tech.get(
        f"/api/v1/ecg/{exam_id}/trace.svg", params={"layout": "6x2", "speed": 50, "gain": 20}
    )
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content[:500] and b"50 mm/s" in svg.content
    assert tech.get(f"/api/v1/ecg/{exam_id}/trace.png?speed=30").status_code == 422
    assert tech.get(f"/api/v1/ecg/{exam_id}/trace.png?layout=2x6").status_code == 422


def test_suspected_critical_ecg_is_first_on_the_worklist(deployment: Deployment) -> None:
    tech = deployment.client("tech_a")
    normal, _ = synthesize_ecg(heart_rate_bpm=72, seed=11)
    long_qt, _ = synthesize_ecg(heart_rate_bpm=70, qt_ms=540, seed=12)
    ids = []
    for name, record in (("normal", normal), ("longqt", long_qt)):
        files = [("file", f) for f in wfdb_files(record, name=name)]
        response = tech.post("/api/v1/ecg", files=files, data={"patient_id": f"SYN-{name}"})
        assert response.status_code == 201, response.text
        ids.append(response.json()["exam_id"])
    normal_id, long_qt_id = ids
    reader = deployment.client("reader")
    items = reader.get("/api/v1/worklist").json()["items"]
    assert len(items) >= 3 and normal_id in [i["exam_id"] for i in items]
    first = items[0]
    assert first["exam_id"] == long_qt_id, [(i["exam_id"], i["triage_reason"]) for i in items]
    assert "QTc" in first["triage_reason"] and first["priority"] == "emergency"
    assert all(i["triage_reason"] is None for i in items if i["exam_id"] == normal_id)
    ecg = _ecg(reader, long_qt_id)
    assert ecg["measurements"]["qtc_bazett_ms"] >= 550
    assert {"rule": "CV-QTC-550", "critical": True}.items() <= ecg["prescreen"][0].items()
    # Triage only: nothing is reported, signed or released.
    exam = reader.get(f"/api/v1/exams/{long_qt_id}").json()
    assert exam["state"] == "READY" and exam["report_status"] is None
    assert exam["triage_reason"] == first["triage_reason"]


def test_rdc_import_takes_wfdb_aecg_and_scp(deployment: Deployment, tmp_path: Path) -> None:
    folder = tmp_path / "cart"
    folder.mkdir()
    for name in ("3000003_0003.hea", "3000003_0003.dat"):
        (folder / name).write_bytes((deployment.ecg / "wfdb" / name).read_bytes())
    (folder / "minimum.xml").write_bytes(
        (deployment.ecg / "aecg" / "minimum_aecg.xml").read_bytes()
    )
    record, _ = synthesize_ecg(seed=31)
    (folder / "cart.scp").write_bytes(scp_bytes(record, patient_id="SCP-CLI-1", huffman=True))
    result = rdc_cli(deployment.server.env, "import", "--clinic", "CLINIC_B", str(folder))
    assert "3 stored" in result.stderr, result.stderr
    tech_b = deployment.client("tech_b")
    exams = tech_b.get("/api/v1/exams", params={"modality": "ECG"}).json()["items"]
    assert len(exams) == 3 and {e["discipline"] for e in exams} == {"ecg"}
    measured = [_ecg(tech_b, e["id"]) for e in exams]
    assert {m["source_format"] for m in measured} == {"wfdb", "hl7_aecg", "scp_ecg"}
    again = rdc_cli(deployment.server.env, "import", "--clinic", "CLINIC_B", str(folder))
    assert "3 duplicate" in again.stderr, again.stderr


def test_dicom_ecg_sent_by_stow_is_measured(deployment: Deployment) -> None:
    ds = pydicom.dcmread(deployment.ecg / "dicom" / "waveform_ecg.dcm")
    study = f"2.25.{uuid.uuid4().int}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.1.1"
    ds.PatientID = "STOW-1"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    boundary = f"ecg-{uuid.uuid4().hex}"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    tech = deployment.client("tech_a")
    response = tech.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    with deployment.server.db() as db:
        row = db.execute(
            "SELECT exam_id FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,)
        ).fetchone()
    assert row is not None
    measured = wait_for(
        lambda: (r := tech.get(f"/api/v1/ecg/{row[0]}")).status_code == 200 and r.json(),
        timeout=90,
        what="the STOWed ECG to be measured",
    )
    assert measured["source_format"] == "dicom" and measured["clinic_code"] == "CLINIC_A"
    assert measured["measurements"]["qrs_ms"] is not None


def test_scp_ecg_upload_is_measured_and_a_bad_crc_refused(deployment: Deployment) -> None:
    record, _ = synthesize_ecg(heart_rate_bpm=66, seed=21)
    data = scp_bytes(
        record,
        patient_id="SCP-HTTP-1",
        huffman=True,
        second_difference=True,
        measurements={"rr_ms": 909, "p_ms": 100, "qrs_on": 260, "qrs_ms": 90, "qt_ms": 400,
                      "qrs_axis": 50},
    )  # fmt: skip
    tech = deployment.client("tech_a")
    before = _state(deployment)
    broken = bytearray(data)
    broken[-3] ^= 0x01
    bad = tech.post("/api/v1/ecg", files=[("file", ("ecg.scp", bytes(broken)))])
    assert bad.status_code == 422 and "SCP-ECG: record CRC mismatch" in bad.json()["detail"]
    assert _state(deployment) == before
    response = tech.post("/api/v1/ecg", files=[("file", ("ecg.scp", data))])
    assert response.status_code == 201, response.text
    exam_id = response.json()["exam_id"]
    ecg = _ecg(tech, exam_id)
    assert ecg["source_format"] == "scp_ecg" and ecg["sampling_rate_hz"] == 500
    assert len(ecg["leads"]) == 12 and ecg["duration_s"] == pytest.approx(10.0)
    assert list(ecg["measurements"]) == list(MEASUREMENT_KEYS)
    assert ecg["measurements"]["heart_rate_bpm"] == pytest.approx(66, abs=3)
    assert ecg["measurements"]["qrs_ms"] is not None
    sources = {m["source"] for m in ecg["device_measurements"]}
    assert sources and all(s.startswith("SCP-ECG section 7") for s in sources)
    patient = tech.get(f"/api/v1/exams/{exam_id}").json()["patient"]
    assert patient["patient_id"] == "SCP-HTTP-1" and patient["sex"] == "F"


def test_a_national_id_patient_id_is_shown_masked_and_stored_as_received(
    deployment: Deployment,
) -> None:
    first17 = "11010519800101123"
    total = sum(int(c) * pow(2, 17 - i, 11) for i, c in enumerate(first17))
    raw_id = first17 + "10X98765432"[total % 11]  # GB 11643 check character
    masked = raw_id[:6] + "*" * 8 + raw_id[-4:]
    record, _ = synthesize_ecg(heart_rate_bpm=64, seed=17)
    tech = deployment.client("tech_a")
    files = [("file", f) for f in wfdb_files(record, name="natid")]
    response = tech.post("/api/v1/ecg", files=files, data={"patient_id": raw_id})
    assert response.status_code == 201, response.text
    exam_id = response.json()["exam_id"]
    exam = tech.get(f"/api/v1/exams/{exam_id}")
    assert exam.json()["patient"]["patient_id"] == masked
    svg = tech.get(f"/api/v1/ecg/{exam_id}/trace.svg")
    assert svg.status_code == 200 and f"ID {masked}" in svg.text
    for shown in (exam, svg, tech.get(f"/api/v1/ecg/{exam_id}")):
        assert raw_id not in shown.text
    with deployment.server.db() as db:
        (stored_id,) = db.execute(
            "SELECT p.patient_id FROM patients p JOIN exams e ON e.patient_ref = p.id"
            " WHERE e.id = ?",
            (exam_id,),
        ).fetchone()
    assert stored_id == raw_id
