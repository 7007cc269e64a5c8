"""The alliance patient index over its real interfaces: CTs carrying a national ID in the
Other Patient IDs Sequence, sent by two clinics (dcmtk's storescu for one, a pynetdicom SCU
for the other), become one person; a bad check digit links nothing; look-alikes are only
proposed; an administrator links and unlinks over HTTP; priors and recognised results follow
the person, and the patient page shows it in a real browser."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pydicom
import pytest
from playwright.sync_api import Browser, expect, sync_playwright
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.helpers import RdcServer, c_store, report_exam, storescu, wait_for, worklist_items

NATIONAL = "CN-NATIONAL"
NID = "11010519491231002X"
BAD_NID = "110105194912310021"
MASKED = "110105********002X"
CARD = "110105198001011238"  # a valid 居民身份证号 a clinic uses as its own patient ID
CARD_MASKED = "110105********1238"
CHROMIUM = "/usr/bin/chromium"
CATALOG = """\
code,discipline,name_zh,name_en,scope_mark,valid_days,min_grade,modality
CT-ANY,imaging,CT检查,CT examination,HR,180,乙,CT
"""
ACCREDITATIONS = """\
accreditations:
  - {org: CLINIC_A, discipline: imaging, valid_from: 2000-01-01, valid_to: 2099-12-31}
"""


@pytest.fixture
def pix_server(
    rdc_env: dict[str, str], alliance: dict[str, str], tmp_path: Path
) -> Iterator[RdcServer]:
    rdc_env["RDC_NATIONAL_ID_ISSUER"] = NATIONAL
    with RdcServer(rdc_env, tmp_path / "serve.log") as srv:
        yield srv


def _ct(
    testdata: Path,
    path: Path,
    *,
    patient_id: str,
    name: str,
    birth_date: str,
    sex: str,
    national_id: str | None = None,
    filler: int = 0,
) -> Dataset:
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = datetime.now(ZoneInfo("Asia/Shanghai")).strftime("%Y%m%d")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID, ds.PatientName = patient_id, name
    ds.PatientBirthDate, ds.PatientSex = birth_date, sex
    if national_id is not None:
        item = Dataset()
        item.PatientID, item.IssuerOfPatientID, item.TypeOfPatientID = (
            national_id,
            NATIONAL,
            "TEXT",
        )
        others = []
        for n in range(filler):  # other issuers' IDs before the national one
            other = Dataset()
            other.PatientID, other.IssuerOfPatientID = f"H{n:020d}", f"HOSPITAL-{n:03d}"
            others.append(other)
        ds.OtherPatientIDsSequence = Sequence([*others, item])
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_patient_index_over_http(
    pix_server: RdcServer,
    alliance: dict[str, str],
    testdata: Path,
    dcmtk: Path,
    tmp_path: Path,
) -> None:
    server = pix_server
    admin = server.client("admin", alliance["admin"])
    senior = server.client("senior", alliance["senior"])
    reader = server.client("reader", alliance["reader"])
    tech_a = server.client("tech_a", alliance["tech_a"])
    tech_b = server.client("tech_b", alliance["tech_b"])
    csv, yaml = {"content-type": "text/csv"}, {"content-type": "application/yaml"}
    assert admin.post("/api/v1/recognition/catalog", content=CATALOG, headers=csv).is_success
    assert admin.post(
        "/api/v1/recognition/accreditations", content=ACCREDITATIONS, headers=yaml
    ).is_success

    # Clinic A sends with dcmtk, the national ID's file rewritten with undefined lengths
    # (the header is then read by pydicom, not by the fast walk).
    a1 = _ct(
        testdata,
        tmp_path / "a1.dcm",
        patient_id="A-100",
        name="Zhang^San=张^三",
        birth_date="19491231",
        sex="M",
        national_id=NID,
    )
    undefined = tmp_path / "a1u.dcm"
    subprocess.run(
        [str(dcmtk / "dcmconv"), "-e", str(tmp_path / "a1.dcm"), str(undefined)], check=True
    )
    a2 = _ct(
        testdata,
        tmp_path / "a2.dcm",
        patient_id="A-200",
        name="Li^Si=李^四",
        birth_date="19700101",
        sex="F",
    )
    sent = storescu(
        dcmtk, [undefined, tmp_path / "a2.dcm"], port=server.dicom_port, calling_ae="CLINIC_A_CT"
    )
    assert all(r.returncode == 0 for r in sent), [r.stderr for r in sent]
    # Clinic B sends with pynetdicom: the same national ID (lower-case x, after 30 other
    # issuers' IDs: a sequence over 1 KiB, which the header walk defers), a look-alike of
    # A-200 without one, and a national ID with a bad check digit.
    b1 = _ct(
        testdata,
        tmp_path / "b1.dcm",
        patient_id="B-777",
        name="张^三",
        birth_date="19491231",
        sex="M",
        national_id=NID.lower(),
        filler=30,
    )
    b2 = _ct(
        testdata,
        tmp_path / "b2.dcm",
        patient_id="B-888",
        name="李四",
        birth_date="19700101",
        sex="F",
    )
    b3 = _ct(
        testdata,
        tmp_path / "b3.dcm",
        patient_id="B-999",
        name="Wu^Liu",
        birth_date="19600101",
        sex="M",
        national_id=BAD_NID,
    )
    for ds in (b1, b2, b3):
        assert c_store(server.dicom_port, ds, calling_ae="CLINIC_B_MR") == 0x0000

    items = worklist_items(senior, count=5)
    exams = {item["study_instance_uid"]: item for item in items}
    for ds in (a1, a2):
        item = exams[ds.StudyInstanceUID]
        report_exam(
            senior,
            exam_id=item["exam_id"],
            item_id=item["id"],
            report={"findings": "未见异常", "impression": "未见异常", "quality_grade": "甲"},
        )
    exam_a1, exam_b1 = exams[a1.StudyInstanceUID]["exam_id"], exams[b1.StudyInstanceUID]["exam_id"]

    # One person for the national ID: clinic B looks up its own identifier.
    found = tech_b.get("/api/v1/patients", params={"identifier": "CLINIC_B|B-777"})
    assert found.status_code == 200, found.text
    person = found.json()
    assert person["national_id"] == MASKED and NID not in found.text
    assert {(i["clinic_code"], i["patient_id"]) for i in person["identifiers"]} == {
        ("CLINIC_A", "A-100"),
        ("CLINIC_B", "B-777"),
    }
    assert all(i["national_id"] == MASKED for i in person["identifiers"])
    # A clinic sees its own exams of the person only; the lead hospital sees both clinics'.
    assert [e["id"] for e in person["exams"]] == [exam_b1]
    by_reader = reader.get(f"/api/v1/patients/{person['id']}").json()
    assert {e["id"] for e in by_reader["exams"]} == {exam_a1, exam_b1}
    assert (
        reader.get("/api/v1/patients", params={"identifier": f"{NATIONAL}|{NID}"}).json()["id"]
        == person["id"]
    )
    # A clinic may look up only its own identifiers.
    assert (
        tech_b.get("/api/v1/patients", params={"identifier": "CLINIC_A|A-100"}).status_code == 404
    )
    assert tech_a.get(f"/api/v1/patients/{person['id']}").status_code == 200
    bad_form = reader.get("/api/v1/patients", params={"identifier": "no-separator"})
    assert bad_form.status_code == 422 and "ISSUER|ID" in bad_form.json()["detail"]

    # The bad check digit: refused with a clear error, nothing linked.
    bad = reader.get("/api/v1/patients", params={"identifier": f"{NATIONAL}|{BAD_NID}"})
    assert bad.status_code == 422 and "check digit" in bad.json()["detail"]
    alone = reader.get("/api/v1/patients", params={"identifier": "CLINIC_B|B-999"}).json()
    assert alone["national_id"] is None and len(alone["identifiers"]) == 1

    # Priors follow the person: the reader sees clinic B's CT with clinic A's; clinic A not.
    priors = reader.get(f"/api/v1/exams/{exam_a1}/priors").json()
    assert exam_b1 in {p["id"] for p in priors}
    assert exam_b1 not in {p["id"] for p in tech_a.get(f"/api/v1/exams/{exam_a1}/priors").json()}

    # Recognised results of clinic A are found by clinic B for the linked person...
    def recognised(patient_id: str) -> list[str]:
        response = tech_b.get("/api/v1/recognized-results", params={"patient_id": patient_id})
        assert response.status_code == 200, response.text
        return [r["institution"]["code"] for r in response.json()["results"]]

    assert recognised("B-777") == ["CLINIC_A"]
    by_national_id = tech_b.get(
        "/api/v1/recognized-results", params={"issuer": NATIONAL, "patient_id": NID}
    )
    assert [r["institution"]["code"] for r in by_national_id.json()["results"]] == ["CLINIC_A"]
    assert (
        tech_b.get(
            "/api/v1/recognized-results", params={"issuer": NATIONAL, "patient_id": BAD_NID}
        ).status_code
        == 422
    )
    # ... and not for a look-alike, which is only proposed to the administrator.
    assert recognised("B-888") == []
    assert tech_a.get("/api/v1/patients/candidates").status_code == 403
    assert reader.get("/api/v1/patients/candidates").status_code == 403
    proposed = admin.get("/api/v1/patients/candidates")
    assert proposed.status_code == 200, proposed.text
    assert [sorted(c["identifiers"]) for c in proposed.json()] == [
        ["CLINIC_A|A-200", "CLINIC_B|B-888"]
    ]

    # An administrator links them (with a reason); then unlinks again.
    body = {"identifiers": ["CLINIC_A|A-200", "CLINIC_B|B-888"], "reason": "核对身份证件"}
    assert reader.post("/api/v1/patients/link", json=body).status_code == 403
    no_reason = admin.post("/api/v1/patients/link", json={**body, "reason": ""})
    assert no_reason.status_code == 422
    refused = admin.post(
        "/api/v1/patients/link",
        json={"identifiers": ["CLINIC_B|B-999", f"{NATIONAL}|{BAD_NID}"], "reason": "x"},
    )
    assert refused.status_code == 422 and "check digit" in refused.json()["detail"]
    linked = admin.post("/api/v1/patients/link", json=body)
    assert linked.status_code == 200, linked.text
    assert len(linked.json()["identifiers"]) == 2
    assert recognised("B-888") == ["CLINIC_A"]
    assert admin.get("/api/v1/patients/candidates").json() == []
    unlinked = admin.post(
        "/api/v1/patients/unlink", json={"identifiers": ["CLINIC_B|B-888"], "reason": "误合并"}
    )
    assert unlinked.status_code == 200, unlinked.text
    assert [len(p["identifiers"]) for p in unlinked.json()] == [1]
    assert recognised("B-888") == []
    again = admin.post(
        "/api/v1/patients/unlink", json={"identifiers": ["CLINIC_B|B-888"], "reason": "again"}
    )
    assert again.status_code == 409

    with server.db() as db:
        actions = {
            action: count
            for action, count in db.execute(
                "SELECT action, COUNT(*) FROM audit_events WHERE object_type IN "
                "('person', 'patient', 'person_candidate') GROUP BY action"
            ).fetchall()
        }
        stored = [
            value
            for row in db.execute(
                "SELECT national_id_hash, national_id_enc FROM persons"
            ).fetchall()
            for value in row
            if value
        ]
    assert actions["national_id_refused"] == 1
    assert actions["link"] >= 2 and actions["unlink"] == 1 and actions["lookup"] == 3
    assert stored and not any(NID in value or NID.lower() in value for value in stored)

    # A clinic whose patient ID is the national ID itself (its own issuer, not the national
    # one): shown masked in the worklist, the exam, the patient index; stored as received.
    b4 = _ct(
        testdata,
        tmp_path / "b4.dcm",
        patient_id=CARD,
        name="Zhao^Qi",
        birth_date="19800101",
        sex="M",
    )
    assert c_store(server.dicom_port, b4, calling_ae="CLINIC_B_MR") == 0x0000
    card_item = wait_for(
        lambda: next(
            (
                i
                for i in senior.get("/api/v1/worklist").json()["items"]
                if i["study_instance_uid"] == b4.StudyInstanceUID
            ),
            None,
        ),
        timeout=60,
        what="the exam of the card number's patient on the worklist",
    )
    assert card_item["patient_id"] == CARD_MASKED
    assert CARD not in senior.get("/api/v1/worklist").text
    card_exam = senior.get(f"/api/v1/exams/{card_item['exam_id']}")
    assert card_exam.status_code == 200 and CARD not in card_exam.text
    assert card_exam.json()["patient"]["patient_id"] == CARD_MASKED
    assert card_exam.json()["patient_id_masked"] is True
    assert CARD not in tech_b.get("/api/v1/exams", params={"limit": 50}).text
    card_person = tech_b.get("/api/v1/patients", params={"identifier": f"CLINIC_B|{CARD}"})
    assert card_person.status_code == 200 and CARD not in card_person.text
    assert [i["patient_id"] for i in card_person.json()["identifiers"]] == [CARD_MASKED]
    assert card_exam.json()["person_id"] == card_person.json()["id"]
    assert all(e["identifier"] == f"CLINIC_B|{CARD_MASKED}" for e in card_person.json()["exams"])
    with server.db() as db:
        assert db.execute(
            "SELECT patient_id FROM patients WHERE patient_id = ?", (CARD,)
        ).fetchall() == [(CARD,)]

    # The patient page, in a real browser: identifiers of both clinics, the masked ID.
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser: Browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(locale="zh-CN")
            context.set_default_timeout(20_000)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.http}/ui/patients/{person['id']}")
            expect(page).to_have_url(re.compile(r"/login\?next="))
            page.fill("#username", "reader")
            page.fill("#password", alliance["reader"])
            page.click("#login-form button[type=submit]")
            expect(page).to_have_url(re.compile(rf"/ui/patients/{person['id']}$"))
            expect(page.locator("#national-id")).to_have_text(MASKED)
            expect(page.locator("tr.identifier-row")).to_have_count(2)
            expect(page.locator("tr.exam-row")).to_have_count(2)
            expect(page.locator("tr.identifier-row[data-clinic='CLINIC_B']")).to_contain_text(
                "CLINIC_B|B-777"
            )
            assert NID not in page.content()
            # From the reading page: the patient ID links to the same person's page.
            page.goto(f"{server.http}/ui/read/{exam_a1}")
            page.click("#ei-person a.patient-link")
            expect(page).to_have_url(re.compile(r"/ui/patients\?identifier="))
            expect(page.locator("#national-id")).to_have_text(MASKED)
            expect(page.locator("tr.identifier-row")).to_have_count(2)
            # A masked patient ID: the reading page shows it masked and links to the person.
            page.goto(f"{server.http}/ui/read/{card_item['exam_id']}")
            expect(page.locator("#ei-pid")).to_have_text(CARD_MASKED)
            assert CARD not in page.content()
            page.click("#ei-person a.patient-link")
            expect(page).to_have_url(re.compile(rf"/ui/patients/{card_person.json()['id']}$"))
            expect(page.locator("tr.identifier-row")).to_contain_text(f"CLINIC_B|{CARD_MASKED}")
            assert CARD not in page.content()
            assert errors == []
        finally:
            browser.close()
    for client in (admin, senior, reader, tech_a, tech_b):
        client.close()
