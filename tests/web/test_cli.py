"""The ``rdc`` command line: directory management, bulk import, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.helpers import IndexConnection, RdcServer, index_db, rdc_cli, wait_for


def _db(env: dict[str, str]) -> IndexConnection:
    return index_db(env)


def test_org_clinic_and_user_commands(rdc_env: dict[str, str]) -> None:
    rdc_cli(rdc_env, "db", "upgrade")
    rdc_cli(rdc_env, "org", "add", "--code", "LEAD", "--name", "牵头医院", "--kind", "lead")
    second_lead = rdc_cli(
        rdc_env, "org", "add", "--code", "LEAD2", "--name", "X", "--kind", "lead", check=False
    )
    assert second_lead.returncode != 0 and "one per deployment" in second_lead.stderr
    rdc_cli(
        rdc_env,
        "clinic",
        "add",
        "--code",
        "C1",
        "--name",
        "卫生院",
        "--ae",
        "C1_CT",
        "--ae",
        "C1_US",
    )
    taken = rdc_cli(
        rdc_env, "clinic", "add", "--code", "C2", "--name", "Other", "--ae", "C1_CT", check=False
    )
    assert taken.returncode != 0 and "already belongs" in taken.stderr
    bad_ae = rdc_cli(
        rdc_env, "clinic", "add", "--code", "C3", "--name", "Bad", "--ae", "A\\B", check=False
    )
    assert bad_ae.returncode != 0 and "invalid AE title" in bad_ae.stderr

    rdc_cli(
        rdc_env,
        "user",
        "add",
        "--username",
        "dr_li",
        "--role",
        "reader",
        "--org",
        "LEAD",
        "--level",
        "attending",
        "--pool",
        "ct-chest",
        "--qualify",
        "imaging:ct",
        "--qualify",
        "ecg",
        "--password-stdin",
        input="s3cret-pass\n",
    )
    bad_discipline = rdc_cli(
        rdc_env,
        "user",
        "add",
        "--username",
        "dr_li",
        "--role",
        "reader",
        "--org",
        "LEAD",
        "--qualify",
        "dentistry",
        "--password-stdin",
        input="s3cret-pass\n",
        check=False,
    )
    assert bad_discipline.returncode != 0 and "unknown discipline" in bad_discipline.stderr
    wrong_org = rdc_cli(
        rdc_env,
        "user",
        "add",
        "--username",
        "dr_x",
        "--role",
        "reader",
        "--org",
        "C1",
        "--password-stdin",
        input="s3cret-pass\n",
        check=False,
    )
    assert wrong_org.returncode != 0 and "lead hospital" in wrong_org.stderr

    with _db(rdc_env) as db:
        assert sorted(r[0] for r in db.execute("SELECT ae_title FROM ae_titles")) == [
            "C1_CT",
            "C1_US",
        ]
        username, role, level, password_hash, pools, qualifications = db.execute(
            "SELECT username, role, level, password_hash, pools, qualifications FROM users"
        ).fetchone()
        kinds = dict(db.execute("SELECT code, kind FROM organizations"))
    assert (username, role, level) == ("dr_li", "reader", "attending")
    assert (json.loads(pools) if isinstance(pools, str) else pools) == ["ct-chest"]
    quals = json.loads(qualifications) if isinstance(qualifications, str) else qualifications
    assert quals == [{"discipline": "imaging", "modality": "CT"}, {"discipline": "ecg"}]
    assert password_hash.startswith("$2") and "s3cret" not in password_hash
    assert kinds == {"LEAD": "lead", "C1": "clinic"}


def test_import_dicomdir_through_the_ingest_service(
    rdc_env: dict[str, str], alliance: dict[str, str], testdata: Path, tmp_path: Path
) -> None:
    dicomdir = testdata / "dicom" / "study_dicomdir" / "DICOMDIR"
    result = rdc_cli(rdc_env, "import", "--clinic", "CLINIC_B", str(dicomdir))
    assert "31 stored" in result.stderr
    again = rdc_cli(rdc_env, "import", "--clinic", "CLINIC_B", str(dicomdir.parent))
    assert "0 stored, 31 duplicate" in again.stderr

    mixed = rdc_cli(
        rdc_env,
        "import",
        "--clinic",
        "CLINIC_B",
        str(testdata / "dicom" / "malformed"),
        str(testdata / "dicom" / "CT_small.dcm"),
        check=False,
    )
    # JPEG-lossy.dcm is a readable object with a bad codestream: kept (readers decide);
    # the seven unreadable, truncated or inconsistent files are refused with a reason each,
    # the import goes on past them and exits 1.
    assert mixed.returncode == 1, mixed.stderr
    assert "2 stored, 0 duplicate, 0 conflict, 7 refused" in mixed.stderr
    assert "truncated" in mixed.stderr and mixed.stderr.count("refused ") == 7

    # another clinic's study is refused with its reason; the files after it still import
    fresh = tmp_path / "fresh.dcm"
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(fresh, enforce_file_format=True)
    other = rdc_cli(
        rdc_env,
        "import",
        "--clinic",
        "CLINIC_A",
        str(testdata / "dicom" / "CT_small.dcm"),
        str(fresh),
        check=False,
    )
    assert other.returncode == 1, other.stderr
    assert "1 stored, 0 duplicate, 0 conflict, 1 refused" in other.stderr
    assert "another organisation" in " ".join(other.stderr.split())
    unknown = rdc_cli(rdc_env, "import", "--clinic", "NOPE", str(fresh), check=False)
    assert unknown.returncode != 0 and "NOPE" in unknown.stderr

    with _db(rdc_env) as db:
        assert db.execute("SELECT count(*) FROM exams").fetchone()[0] == 9
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 34

    server = RdcServer(rdc_env, tmp_path / "serve.log")
    server.start()
    try:
        # The same data set arriving by C-STORE (with our file meta, not the file's) is a
        # duplicate of the imported one, not a conflicting copy.
        one = next(
            p
            for p in (testdata / "dicom" / "study_dicomdir").rglob("*")
            if p.is_file() and p.name != "DICOMDIR"
        )
        ds = pydicom.dcmread(one)
        ae = AE(ae_title="CLINIC_B_MR")
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        with _db(rdc_env) as db:
            assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 34
            assert db.execute("SELECT count(*) FROM instance_conflicts").fetchone()[0] == 0

        reader = server.client("reader", alliance["reader"])
        wait_for(
            lambda: reader.get("/api/v1/worklist").json()["total"] == 9,
            what="imported exams queued",
        )
    finally:
        server.stop()


def test_demo_fills_the_worklist_and_is_idempotent(rdc_env: dict[str, str], tmp_path: Path) -> None:
    first = rdc_cli(rdc_env, "demo")
    assert "10 new instances stored" in first.stderr  # 7 current + 3 of a reported prior
    second = rdc_cli(rdc_env, "demo")
    assert "0 new instances stored" in second.stderr

    server = RdcServer(rdc_env, tmp_path / "serve.log")
    server.start()
    try:
        reader = server.client("reader", "rdc-demo")
        page = wait_for(
            lambda: (p := reader.get("/api/v1/worklist").json())["total"] == 9 and p,
            what="demo worklist",
        )
        # 4 imaging exams, 3 ECGs and 2 held lab orders (the third, all normal, was released
        # automatically); the ECG with a long QTc is first, with the reason.
        first, second = page["items"][:2]
        assert first["discipline"] == "ecg" and "QTc" in first["triage_reason"]
        assert "孙" in first["patient_name"]
        assert sum(i["discipline"] == "ecg" for i in page["items"]) == 3
        assert sum(i["discipline"] == "lab" for i in page["items"]) == 2
        assert second["priority"] == "emergency" and second["triage_reason"] is None
        assert "王" in second["patient_name"]
        # The patient's earlier exam is already signed and shows as a prior.
        priors = reader.get(f"/api/v1/exams/{second['exam_id']}/priors").json()
        assert [p["report_status"] for p in priors] == ["final"]
        report = reader.get(f"/api/v1/exams/{priors[0]['id']}/report").json()
        assert report["status"] == "final" and "nodule" in report["impression"]
        clinic = server.client("tech_b", "rdc-demo").get("/api/v1/exams").json()
        assert {e["clinic_code"] for e in clinic["items"]} == {"CLINIC_B"}
    finally:
        server.stop()


@pytest.mark.task_free  # the exam is made as the instance is stored
def test_readme_storescu_line_sends_a_study(
    server: RdcServer, alliance: dict[str, str], testdata: Path, dcmtk: Path, tmp_path: Path
) -> None:
    """The README's ready dcmtk lines (C-ECHO, then a folder sent recursively with the demo's
    AE titles) work as printed, with only the port and the folder filled in."""
    import shlex
    import shutil
    import subprocess

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    lines = [
        line.split("#")[0].strip()
        for line in readme.splitlines()
        if line.startswith(("echoscu -aet", "storescu -aet"))
    ]
    assert [line.split()[0] for line in lines] == ["echoscu", "storescu"], lines
    study = tmp_path / "study" / "series"
    study.mkdir(parents=True)
    shutil.copy(testdata / "dicom" / "CT_small.dcm", study / "image.dcm")
    for line in lines:
        args = shlex.split(line.replace("11112", str(server.dicom_port)))
        args = [str(tmp_path / "study") if a == "path/to/study/" else a for a in args]
        args[0] = str(dcmtk / args[0])
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (line, result.stderr)
    with server.client("tech_a", alliance["tech_a"]) as tech:
        exams = tech.get("/api/v1/exams").json()
    assert exams["total"] == 1 and exams["items"][0]["instance_count"] == 1


def test_every_rdc_process_loads_the_disciplines_report_sections_and_dicom_details() -> None:
    """`rdc worker` and `rdc beat` sign too (an auto-released lab order, a late ECG): they must
    register the same report sections and artifact details as `rdc serve`, or a report signed
    there silently lacks its results. Checked in a fresh interpreter, as a worker starts."""
    import subprocess
    import sys

    probe = (
        "from web.cli import _register_tasks; _register_tasks()\n"
        "from worklist.signing.sections import section_provider\n"
        "from worklist.artifact_details import artifact_details\n"
        "print(sorted(d for d in ('lab', 'ecg') if section_provider(d)),"
        " [d.kind for d in artifact_details()])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert out.strip() == "['ecg', 'lab'] ['instance']", out
