"""C-FIND, C-MOVE and C-GET against a running ``rdc serve``, driven by dcmtk's findscu,
movescu and getscu and a pynetdicom Storage SCP as the move destination.

Clinic A has one patient with two studies (three series); clinic B has a patient of its
own, whose study has a signed report (retrieved as the push-back's encapsulated PDF).
Every query and retrieve is scoped to the calling clinic: B never finds or moves A's
data, even by its UIDs. C-CANCEL stops a C-FIND and a C-MOVE with status Cancel.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_FIND_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND
from pynetdicom.dsutils import decode, encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_gateway.report_push import report_instance_uids
from tests.dicom_gateway.test_pdu_fuzz import _associate_rq, _p_data
from tests.helpers import (
    Deployments,
    RdcServer,
    alliance_passwords,
    c_store,
    free_port,
    rdc_cli,
    report_exam,
    worklist_items,
)
from tests.worklist.conftest import Reading, reading  # noqa: F401  (fixture)
from tests.worklist.test_delivery import STUDY, finalize

_A_PATIENT = "DOE^JOHN=山田^太郎"
_B_REFERRING = "Li^Ming=李^明"


@dataclass
class Study:
    uid: str
    date: str
    series: dict[str, list[str]]  # series UID -> SOP instance UIDs


@dataclass
class Deployment:
    server: RdcServer
    dcmtk: Path
    workdir: Path
    a_studies: list[Study]
    b_study: Study
    received: list[Dataset]  # what the move destination received
    destination_port: int
    b_report_id: str  # the signed report of clinic B's study
    b_report_pdf: bytes  # its signed PDF as the API serves it
    # Set by a test: the move destination holds its first C-STORE until this is set.
    hold: list[threading.Event] = field(default_factory=list)


def _make(
    template: Dataset, *, patient: str, pid: str, study: Study, series: str, sop: str, n: int
) -> Dataset:
    ds = template.copy()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = patient
    ds.PatientID = pid
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study.uid
    ds.StudyDate = study.date
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{study.date}"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = list(study.series).index(series) + 1
    ds.InstanceNumber = n
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _study(date: str, shape: list[int]) -> Study:
    return Study(
        generate_uid(),
        date,
        {generate_uid(): [generate_uid() for _ in range(count)] for count in shape},
    )


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments, testdata: Path, dcmtk: Path
) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("qr")
    received: list[Dataset] = []
    destination_port = free_port()
    hold: list[threading.Event] = []

    def on_store(event: evt.Event) -> int:
        if hold:
            assert hold.pop().wait(60), "the test never let the held C-STORE go"
        received.append(event.dataset)
        return 0x0000

    scp = AE(ae_title="A_PACS")
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    scp.add_supported_context(EncapsulatedPDFStorage, [ExplicitVRLittleEndian])
    server_scp = scp.start_server(
        ("127.0.0.1", destination_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        with deployments.env(workdir) as env:
            passwords = alliance_passwords()
            rdc_cli(
                env,
                "clinic",
                "add",
                "--code",
                "CLINIC_B",
                "--update",
                "--dicom-destination",
                f"B_PACS@127.0.0.1:{destination_port}",
            )
            rdc_cli(
                env,
                "clinic",
                "add",
                "--code",
                "CLINIC_A",
                "--name",
                "Clinic A",
                "--update",
                "--dicom-destination",
                f"A_PACS@127.0.0.1:{destination_port}",
                "--dicom-destination",
                "A_VIEWER@127.0.0.1:1",
            )
            server = RdcServer(env, workdir / "serve.log")
            server.start()
            try:
                template = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
                a_studies = [_study("20240105", [2, 1]), _study("20240320", [1])]
                b_study = _study("20240110", [1])
                for studies, patient, pid, ae in (
                    (a_studies, _A_PATIENT, "PA1", "CLINIC_A_CT"),
                    ([b_study], "ROE^JANE", "PB1", "CLINIC_B_MR"),
                ):
                    for study in studies:
                        for series, sops in study.series.items():
                            for n, sop in enumerate(sops, 1):
                                ds = _make(
                                    template,
                                    patient=patient,
                                    pid=pid,
                                    study=study,
                                    series=series,
                                    sop=sop,
                                    n=n,
                                )
                                if pid == "PB1":
                                    ds.ReferringPhysicianName = _B_REFERRING
                                assert c_store(server.dicom_port, ds, calling_ae=ae) == 0
                report_id, pdf = _sign_b_study(server, passwords, b_study)
                yield Deployment(
                    server,
                    dcmtk,
                    workdir,
                    a_studies,
                    b_study,
                    received,
                    destination_port,
                    report_id,
                    pdf,
                    hold,
                )
            finally:
                server.stop()
    finally:
        server_scp.shutdown()


def _sign_b_study(
    server: RdcServer, passwords: dict[str, str], b_study: Study
) -> tuple[str, bytes]:
    """Sign clinic B's study as the senior reader; its report ID and signed PDF."""
    senior = server.client("senior", passwords["senior"])
    items = worklist_items(senior, count=3)
    item = next(i for i in items if i["study_instance_uid"] == b_study.uid)
    signed = report_exam(
        senior,
        exam_id=str(item["exam_id"]),
        item_id=item["id"],
        report={"findings": "双肺纹理清晰", "impression": "未见异常", "quality_grade": "甲"},
    )
    assert signed["status"] == "final", signed
    pdf = senior.get(f"/api/v1/reports/{signed['id']}/pdf")
    assert pdf.status_code == 200, pdf.text
    return str(signed["id"]), pdf.content


def _run(tool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool), *args], capture_output=True, text=True, timeout=120, check=False
    )


def findscu(d: Deployment, ae: str, model: str, *keys: str) -> list[dict[str, str]]:
    """Matches of a dcmtk findscu query (-P or -S) as {keyword: value}."""
    args = [model, "-aet", ae, "-aec", "RDC", "-v"]
    for key in keys:
        args += ["-k", key]
    result = _run(d.dcmtk / "findscu", *args, "127.0.0.1", str(d.server.dicom_port))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Find Response" in output, output
    matches: list[dict[str, str]] = []
    for block in output.split("Find Response:")[1:]:
        if "(Pending)" not in block.split("\n", 1)[0]:
            continue
        match: dict[str, str] = {}
        for line in block.splitlines():
            found = re.search(
                r"\(([0-9a-f]{4}),([0-9a-f]{4})\) \w\w (?:\[(.*?)\]|\(no value)", line
            )
            if found:
                name = line.rsplit("#", 1)[-1].split()[-1] if "#" in line else ""
                match[name] = (found.group(3) or "").strip("\x00 ")
        matches.append(match)
    return matches


def _uids(matches: list[dict[str, str]], keyword: str) -> set[str]:
    return {m[keyword] for m in matches}


def test_find_patient_root_each_level(deployment: Deployment) -> None:
    d = deployment
    a1, a2 = d.a_studies
    patients = findscu(
        d, "CLINIC_A_CT", "-P", "QueryRetrieveLevel=PATIENT", "PatientName", "PatientID"
    )
    assert [m["PatientID"] for m in patients] == ["PA1"]
    assert patients[0]["PatientName"] == _A_PATIENT
    studies = findscu(
        d, "CLINIC_A_CT", "-P", "QueryRetrieveLevel=STUDY", "PatientID=PA1", "StudyInstanceUID"
    )
    assert _uids(studies, "StudyInstanceUID") == {a1.uid, a2.uid}
    series = findscu(
        d,
        "CLINIC_A_CT",
        "-P",
        "QueryRetrieveLevel=SERIES",
        "PatientID=PA1",
        f"StudyInstanceUID={a1.uid}",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
    )
    assert _uids(series, "SeriesInstanceUID") == set(a1.series)
    images = findscu(
        d,
        "CLINIC_A_CT",
        "-P",
        "QueryRetrieveLevel=IMAGE",
        "PatientID=PA1",
        f"StudyInstanceUID={a1.uid}",
        f"SeriesInstanceUID={next(iter(a1.series))}",
        "SOPInstanceUID",
    )
    assert _uids(images, "SOPInstanceUID") == set(next(iter(a1.series.values())))


def test_find_study_root_matching(deployment: Deployment) -> None:
    d = deployment
    a1, a2 = d.a_studies
    level = "QueryRetrieveLevel=STUDY"

    def studies(*keys: str) -> set[str]:
        return _uids(
            findscu(d, "CLINIC_A_CT", "-S", level, "StudyInstanceUID", *keys), "StudyInstanceUID"
        )

    assert studies() == {a1.uid, a2.uid}
    assert studies("PatientName=doe*") == {a1.uid, a2.uid}  # wildcard, any case
    utf8 = "SpecificCharacterSet=ISO_IR 192"
    assert studies(utf8, "PatientName=*=山田*") == {a1.uid, a2.uid}  # ideographic group
    assert studies(utf8, "PatientName==山田^太郎") == {a1.uid, a2.uid}
    assert studies(utf8, "PatientName=*=李*") == set()
    assert studies("PatientName=ROE*") == set()
    assert studies("StudyDate=20240101-20240131") == {a1.uid}  # date range
    assert studies("StudyDate=20240301-") == {a2.uid}  # open range
    assert studies(f"StudyInstanceUID={a1.uid}\\{a2.uid}") == {a1.uid, a2.uid}  # UID list
    assert studies("AccessionNumber=ACC2024032?") == {a2.uid}
    assert studies("ModalitiesInStudy=MR") == set()
    series = findscu(
        d,
        "CLINIC_A_CT",
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={a1.uid}",
        "SeriesInstanceUID",
        "Modality=CT",
    )
    assert _uids(series, "SeriesInstanceUID") == set(a1.series)
    images = findscu(
        d,
        "CLINIC_A_CT",
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={a2.uid}",
        "SOPInstanceUID",
    )
    assert _uids(images, "SOPInstanceUID") == set(next(iter(a2.series.values())))


def test_find_is_scoped_to_the_calling_clinic(deployment: Deployment) -> None:
    d = deployment
    a1 = d.a_studies[0]
    found = findscu(d, "CLINIC_B_MR", "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID")
    assert _uids(found, "StudyInstanceUID") == {d.b_study.uid}
    assert (
        findscu(d, "CLINIC_B_MR", "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={a1.uid}")
        == []
    )
    assert findscu(d, "CLINIC_B_MR", "-P", "QueryRetrieveLevel=PATIENT", "PatientID=PA1") == []
    # The Study Root model has no PATIENT level: a named failure, not a crash.
    result = _run(
        d.dcmtk / "findscu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_A_CT",
        "-aec",
        "RDC",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "127.0.0.1",
        str(d.server.dicom_port),
    )
    output = result.stdout + result.stderr
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in output, output


def _instances(study: Study) -> set[str]:
    return {sop for sops in study.series.values() for sop in sops}


def test_move_to_registered_destination_and_refusals(deployment: Deployment) -> None:
    d = deployment
    a1 = d.a_studies[0]
    port = str(d.server.dicom_port)
    d.received.clear()
    result = _run(
        d.dcmtk / "movescu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_A_CT",
        "-aec",
        "RDC",
        "-aem",
        "A_PACS",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={a1.uid}",
        "127.0.0.1",
        port,
    )
    assert result.returncode == 0, result.stderr
    assert {ds.SOPInstanceUID for ds in d.received} == _instances(a1)
    output = result.stdout + result.stderr
    assert "Received Final Move Response (Success)" in output, output

    # The sub-operation counts, read with pynetdicom's C-MOVE SCU.
    d.received.clear()
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", d.server.dicom_port, ae_title="RDC")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = a1.uid
    query.SeriesInstanceUID = next(iter(a1.series))
    responses = [
        status
        for status, _ in assoc.send_c_move(
            query, "A_PACS", StudyRootQueryRetrieveInformationModelMove
        )
    ]
    assoc.release()
    assert [int(r.Status) for r in responses] == [0xFF00, 0xFF00, 0x0000]
    assert [int(r.NumberOfRemainingSuboperations) for r in responses[:2]] == [2, 1]
    final = responses[-1]
    assert int(final.NumberOfCompletedSuboperations) == 2
    assert int(final.NumberOfFailedSuboperations) == 0
    assert len(d.received) == 2

    # An unregistered destination: Move destination unknown, nothing sent.
    d.received.clear()
    result = _run(
        d.dcmtk / "movescu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_A_CT",
        "-aec",
        "RDC",
        "-aem",
        "STRANGER",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={a1.uid}",
        "127.0.0.1",
        port,
    )
    output = result.stdout + result.stderr
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in output, output
    assert d.received == []

    # Clinic B naming clinic A's study (and A's destination) moves nothing.
    result = _run(
        d.dcmtk / "movescu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_B_MR",
        "-aec",
        "RDC",
        "-aem",
        "A_PACS",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={a1.uid}",
        "127.0.0.1",
        port,
    )
    assert d.received == []

    # A registered destination that does not answer: the move fails with a named status.
    result = _run(
        d.dcmtk / "movescu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_A_CT",
        "-aec",
        "RDC",
        "-aem",
        "A_VIEWER",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={a1.uid}",
        "127.0.0.1",
        port,
    )
    output = result.stdout + result.stderr
    assert "Final Move Response (Refused: OutOfResourcesSubOperations)" in output, output


def test_a_malformed_move_destination_is_refused_by_the_cli(deployment: Deployment) -> None:
    result = rdc_cli(
        deployment.server.env,
        "clinic",
        "add",
        "--code",
        "CLINIC_A",
        "--name",
        "Clinic A",
        "--update",
        "--dicom-destination",
        "NO_PORT@127.0.0.1",
        check=False,
    )
    assert result.returncode == 1
    assert "is not AE@host:port" in result.stdout + result.stderr
    with deployment.server.db() as db:
        rows = db.execute("SELECT ae_title FROM dicom_move_destinations ORDER BY ae_title")
        assert [r[0] for r in rows] == ["A_PACS", "A_VIEWER", "B_PACS"]


def test_get_on_the_same_association(deployment: Deployment) -> None:
    d = deployment
    a1, a2 = d.a_studies
    out = d.workdir / "get"
    out.mkdir()
    port = str(d.server.dicom_port)
    result = _run(
        d.dcmtk / "getscu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_A_CT",
        "-aec",
        "RDC",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={a1.uid}",
        "127.0.0.1",
        port,
    )
    assert result.returncode == 0, result.stderr
    got = {pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert got == _instances(a1)
    for path in out.iterdir():
        ds = pydicom.dcmread(path)
        assert ds.PatientID == "PA1" and ds.pixel_array.shape == (128, 128)

    # Patient Root, one series; and another clinic gets nothing.
    other = d.workdir / "get-b"
    other.mkdir()
    result = _run(
        d.dcmtk / "getscu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_B_MR",
        "-aec",
        "RDC",
        "-od",
        str(other),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={a2.uid}",
        "127.0.0.1",
        port,
    )
    assert list(other.iterdir()) == []


def test_pynetdicom_find_and_listener_keeps_serving(deployment: Deployment) -> None:
    """pynetdicom as SCU (its own codec) agrees with ours; C-ECHO still works after."""
    d = deployment
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", d.server.dicom_port, ae_title="RDC")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = d.a_studies[0].uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    statuses = []
    found = set()
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        statuses.append(int(status.Status))
        if identifier is not None and int(status.Status) == 0xFF00:
            found.add(identifier.SeriesInstanceUID)
            assert identifier.Modality == "CT"
    assoc.release()
    assert statuses[-1] == 0x0000
    assert found == set(d.a_studies[0].series)


def test_signed_reports_are_found_as_their_pdf_series(reading: Reading) -> None:  # noqa: F811
    """A final report version is the encapsulated-PDF series the push-back sends (same UIDs),
    found at SERIES and IMAGE level by the exam's clinic only."""
    from zoneinfo import ZoneInfo

    from dicom_gateway.query import STUDY_ROOT_FIND, find
    from dicom_gateway.report_push import report_instance_uids
    from rdc_core.db import session_scope
    from worklist.directory import get_organization

    report_id = finalize(reading)
    series_uid, sop_uid = report_instance_uids(report_id)
    zone = ZoneInfo("Asia/Shanghai")

    def query(org: str, level: str, **keys: str) -> list[Dataset]:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        identifier.StudyInstanceUID = STUDY
        identifier.SeriesInstanceUID = ""
        identifier.Modality = ""
        if level == "IMAGE":
            identifier.SOPInstanceUID = ""
            identifier.SOPClassUID = ""
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
        with session_scope() as session:
            org_id = get_organization(session, code=org).id
            return find(
                session, org_id=org_id, sop_class=STUDY_ROOT_FIND, identifier=identifier, zone=zone
            )

    docs = query("C1", "SERIES", Modality="DOC")
    assert [(d.SeriesInstanceUID, d.Modality) for d in docs] == [(series_uid, "DOC")]
    images = query("C1", "IMAGE", SeriesInstanceUID=series_uid)
    assert [(i.SOPInstanceUID, i.SOPClassUID) for i in images] == [
        (sop_uid, "1.2.840.10008.5.1.4.1.1.104.1")
    ]
    assert all(d.Modality != "DOC" for d in query("C1", "SERIES", Modality="MR"))
    assert query("C2", "SERIES", Modality="DOC") == []  # another clinic finds nothing


def _getscu(d: Deployment, ae: str, out: Path, *keys: str) -> list[Dataset]:
    out.mkdir()
    args = ["-S", "-v", "-aet", ae, "-aec", "RDC", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = _run(d.dcmtk / "getscu", *args, "127.0.0.1", str(d.server.dicom_port))
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def test_signed_report_is_found_and_retrieved_as_its_encapsulated_pdf(
    deployment: Deployment,
) -> None:
    """The report's PDF series is found at SERIES and IMAGE level and retrieved by C-GET and
    C-MOVE as the instance the DICOM push-back sends: same UIDs, the signed PDF byte for
    byte, the referring clinician; another clinic neither finds nor retrieves it."""
    d = deployment
    series_uid, sop_uid = report_instance_uids(d.b_report_id)
    series = findscu(
        d,
        "CLINIC_B_MR",
        "-S",
        "QueryRetrieveLevel=SERIES",
        f"StudyInstanceUID={d.b_study.uid}",
        "SeriesInstanceUID",
        "Modality",
    )
    assert {(m["SeriesInstanceUID"], m["Modality"]) for m in series} == {
        (next(iter(d.b_study.series)), "CT"),
        (series_uid, "DOC"),
    }
    images = findscu(
        d,
        "CLINIC_B_MR",
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={d.b_study.uid}",
        f"SeriesInstanceUID={series_uid}",
        "SOPInstanceUID",
        "SOPClassUID",
    )
    assert [m["SOPInstanceUID"] for m in images] == [sop_uid]

    # C-GET of the whole study: the CT instance and the report.
    got = _getscu(
        d,
        "CLINIC_B_MR",
        d.workdir / "get-report",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={d.b_study.uid}",
    )
    assert {ds.SOPInstanceUID for ds in got} == _instances(d.b_study) | {sop_uid}
    pdf = next(ds for ds in got if ds.SOPInstanceUID == sop_uid)
    assert pdf.SOPClassUID == EncapsulatedPDFStorage
    assert pdf.SeriesInstanceUID == series_uid and pdf.Modality == "DOC"
    assert pdf.StudyInstanceUID == d.b_study.uid and pdf.PatientID == "PB1"
    length = int(pdf.EncapsulatedDocumentLength)
    assert bytes(pdf.EncapsulatedDocument)[:length] == d.b_report_pdf
    assert str(pdf.ReferringPhysicianName) == _B_REFERRING
    # The signed PDF names the referring clinician as a person reads the name.
    pdf_path = d.workdir / "report.pdf"
    pdf_path.write_bytes(d.b_report_pdf)
    text = subprocess.run(
        ["pdftotext", "-layout", str(pdf_path), "-"], capture_output=True, text=True, check=True
    ).stdout
    assert "李明 / Li Ming" in text, text

    # C-MOVE of the report instance alone to clinic B's destination.
    d.received.clear()
    result = _run(
        d.dcmtk / "movescu",
        "-S",
        "-v",
        "-aet",
        "CLINIC_B_MR",
        "-aec",
        "RDC",
        "-aem",
        "B_PACS",
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={d.b_study.uid}",
        "-k",
        f"SeriesInstanceUID={series_uid}",
        "-k",
        f"SOPInstanceUID={sop_uid}",
        "127.0.0.1",
        str(d.server.dicom_port),
    )
    output = result.stdout + result.stderr
    assert "Received Final Move Response (Success)" in output, output
    assert [ds.SOPInstanceUID for ds in d.received] == [sop_uid]
    moved = d.received[0]
    assert bytes(moved.EncapsulatedDocument)[:length] == d.b_report_pdf

    # Clinic A, naming B's report by its UIDs, finds and gets nothing.
    assert (
        findscu(
            d,
            "CLINIC_A_CT",
            "-S",
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={d.b_study.uid}",
            f"SeriesInstanceUID={series_uid}",
            "SOPInstanceUID",
        )
        == []
    )
    assert (
        _getscu(
            d,
            "CLINIC_A_CT",
            d.workdir / "get-report-a",
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={d.b_study.uid}",
            f"SeriesInstanceUID={series_uid}",
            f"SOPInstanceUID={sop_uid}",
        )
        == []
    )


def _responses(sock: socket.socket) -> list[Dataset]:
    """Read DIMSE responses until a final (not Pending) one; their command sets."""
    commands: list[Dataset] = []
    command = b""
    while True:
        header = _recv_exact(sock, 6)
        pdu_type, length = struct.unpack(">BxI", header)
        body = _recv_exact(sock, length)
        assert pdu_type == 0x04, f"PDU type {pdu_type} instead of P-DATA"
        offset = 0
        while offset < len(body):
            item_length, _context, control = struct.unpack_from(">IBB", body, offset)
            fragment = body[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if not control & 0x01:
                continue  # an identifier
            command += fragment
            if control & 0x02:
                values = decode(BytesIO(command), True, True)
                command = b""
                commands.append(values)
                if int(values.Status) not in (0xFF00, 0xFF01):
                    return commands


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the listener closed the connection"
        data += chunk
    return data


def _encoded(message: object, context_id: int) -> bytes:
    out = b""
    for pdata in message.encode_msg(context_id, 16_384):  # type: ignore[attr-defined]
        for pc_id, value in pdata.presentation_data_value_list:
            out += _p_data(pc_id, value[0], value[1:])
    return out


def _find_request(message_id: int, *, cancel: bool) -> bytes:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.PatientID = "PA1"
    query.SOPInstanceUID = ""
    primitive = C_FIND()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    primitive.Priority = 0
    primitive.Identifier = BytesIO(encode(query, False, True) or b"")
    request = C_FIND_RQ()
    request.primitive_to_message(primitive)
    data = _encoded(request, 3)
    if cancel:
        cancelling = C_CANCEL()
        cancelling.MessageIDBeingRespondedTo = message_id
        message = C_CANCEL_RQ()
        message.primitive_to_message(cancelling)
        data += _encoded(message, 3)
    return data


def test_c_cancel_stops_a_find(deployment: Deployment) -> None:
    """A C-CANCEL sent with the C-FIND (one write, so it is there before the first answer):
    matching stops with status Cancel (0xFE00) and the association goes on serving."""
    d = deployment
    total = sum(len(_instances(s)) for s in d.a_studies)
    with socket.create_connection(("127.0.0.1", d.server.dicom_port), timeout=60) as sock:
        sock.sendall(_associate_rq("CLINIC_A_CT"))
        header = _recv_exact(sock, 6)
        assert header[0] == 0x02, "association not accepted"
        _recv_exact(sock, struct.unpack(">BxI", header)[1])
        sock.sendall(_find_request(41, cancel=True))
        cancelled = _responses(sock)
        assert int(cancelled[-1].Status) == 0xFE00
        assert int(cancelled[-1].MessageIDBeingRespondedTo) == 41
        assert len(cancelled) - 1 < total  # not every match was sent
        sock.sendall(_find_request(42, cancel=False))
        whole = _responses(sock)
        assert [int(r.Status) for r in whole] == [0xFF00] * total + [0x0000]
        sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
        assert _recv_exact(sock, 1) == b"\x06"


def test_c_cancel_stops_a_move(deployment: Deployment) -> None:
    """C-CANCEL during a C-MOVE: the sub-operation in progress finishes, no further one is
    started, and the final response is Cancel with the counts."""
    d = deployment
    a1 = d.a_studies[0]
    d.received.clear()
    release = threading.Event()
    d.hold.append(release)  # the destination holds the first C-STORE
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", d.server.dicom_port, ae_title="RDC")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = a1.uid
        responses = []
        for status, _identifier in assoc.send_c_move(
            query, "A_PACS", StudyRootQueryRetrieveInformationModelMove, msg_id=77
        ):
            responses.append(status)
            if len(responses) == 1:
                context_id = assoc.accepted_contexts[0].context_id
                assoc.send_c_cancel(77, context_id)
                release.set()  # the cancel is sent: let the first C-STORE finish
    finally:
        release.set()
        assoc.release()
    total = len(_instances(a1))
    assert [int(r.Status) for r in responses] == [0xFF00, 0xFE00]
    final = responses[-1]
    assert int(final.NumberOfCompletedSuboperations) == 1
    assert int(final.NumberOfRemainingSuboperations) == total - 1
    assert int(final.NumberOfFailedSuboperations) == 0
    assert len(d.received) == 1
