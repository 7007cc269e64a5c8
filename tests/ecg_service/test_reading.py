"""The ECG report section and the console's pure helpers: reader values over the machine's
(with QTc recomputed), the section's table, observations and figure, the section seam's
landscape PDF page, and the DICOM push-back of an ECG exam without a Study Instance UID."""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from pydicom.uid import UID

from dicom_gateway.report_push import encapsulated_pdf
from ecg_service import analyse, read_ecg
from ecg_service.reading import (
    ecg_report_section,
    reported_measurements,
    signal_payload,
    validate_reader_measurements,
)
from lab_results.report_push import build_oru
from worklist.delivery.senders import EndpointSpec, ReportPush
from worklist.signing.pdf import render_report_pdf
from worklist.signing.sections import (
    ReportSection,
    register_section_provider,
    section_provider,
)

MACHINE = {"heart_rate_bpm": 61.0, "rr_ms": 983.0, "qt_ms": 375.0, "qtc_bazett_ms": 379.0}


def test_reader_values_replace_the_machine_and_qtc_follows_qt() -> None:
    reported = reported_measurements(MACHINE, {"qt_ms": 400.0})
    assert reported["qt_ms"] == 400.0
    assert reported["qtc_bazett_ms"] == round(400 / math.sqrt(0.983))
    assert reported["qtc_fridericia_ms"] == round(400 / 0.983 ** (1 / 3))
    # An edited QTc is the reader's, not recomputed; no edits: the machine's values.
    assert (
        reported_measurements(MACHINE, {"qt_ms": 400.0, "qtc_bazett_ms": 390.0})["qtc_bazett_ms"]
        == 390.0
    )
    assert reported_measurements(MACHINE, None)["qtc_bazett_ms"] == 379.0


def test_reader_values_are_checked() -> None:
    assert validate_reader_measurements({"qt_ms": 400.04, "pr_ms": None}) == {"qt_ms": 400.0}
    with pytest.raises(ValueError, match="unknown measurement"):
        validate_reader_measurements({"qtc_ms": 400})
    with pytest.raises(ValueError, match="qrs_ms"):
        validate_reader_measurements({"qrs_ms": 4000})


def test_ecg_section_on_a_landscape_page(testdata: Path) -> None:
    record = read_ecg(testdata / "ecg" / "dicom" / "waveform_ecg.dcm")
    analysis = analyse(record)
    payload = signal_payload(record, analysis, max_rate_hz=500)
    assert payload["sampling_rate_hz"] == 500.0 and len(payload["signals"]) == 12
    assert len(payload["signals"][0]) == 5000 and payload["median"] is not None

    section = ecg_report_section(
        record=record,
        machine=analysis.measurements,
        device=[{"key": "qt_ms", "value": 368, "unit": "ms", "label": "QT", "source": "x"}],
        reader={"qt_ms": 400.0},
        statement_codes=["SR", "NORM"],
    )
    assert section.landscape and section.figure is not None
    # The trace at true size: 250 mm of paper at 25 mm/s plus the calibration margin.
    assert 265 <= section.figure.width_mm <= 272
    assert Image.open(io.BytesIO(section.figure.png)).width > 1500
    assert [row[0] for row in section.table.rows] == [  # type: ignore[union-attr]
        "机测 RDC",
        "设备 Device",
        "医师 Reader",
        "报告 Reported",
    ]
    codes = {o.code: o for o in section.observations}
    assert codes["8634-0"].value == 400.0 and codes["8634-0"].source == "reader"
    assert codes["8867-4"].unit == "/min" and codes["8632-0"].unit == "deg"
    assert section.data["statements"][1]["code"] == "NORM"  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown ECG statement"):
        ecg_report_section(record=None, machine=MACHINE, statement_codes=["NOPE"])

    document = {
        "report": {"id": "r1", "findings": "窦性心律", "impression": "正常心电图"},
        "exam": {"discipline": "ecg", "modality": "ECG"},
        "patient": {"name": "Wang^Fang=王^芳", "patient_id": "P1"},
        "sections": [section.as_document()],
    }
    pdf = render_report_pdf(
        document,
        key_images=[],
        zone=ZoneInfo("Asia/Shanghai"),
        notice=None,
        figures={"ecg": section.figure.png},
    )
    assert pdf.count(b"/MediaBox [ 0 0 595.2756 841.8898 ]") == 1
    assert pdf.count(b"/MediaBox [ 0 0 841.8898 595.2756 ]") == 1
    with pytest.raises(ValueError, match="does not match its hash"):
        render_report_pdf(
            document,
            key_images=[],
            zone=ZoneInfo("UTC"),
            notice=None,
            figures={"ecg": b"\x89PNG other bytes"},
        )


def test_section_provider_registry() -> None:
    def provider(session: object, /, *, exam: object, report: object) -> list[ReportSection]:
        return []

    register_section_provider("lab", provider)
    try:
        assert section_provider("lab") is provider
    finally:
        register_section_provider("lab", None)
    assert section_provider("lab") is None


def _push(**extra: object) -> ReportPush:
    now = datetime(2026, 12, 4, 8, 30, tzinfo=UTC)
    return ReportPush(
        delivery_id="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        attempt=1,
        report_id="r1",
        version=1,
        status="final",
        amendment_kind=None,
        previous_report_id=None,
        exam_id="e1",
        study_instance_uid="sha256:" + "ab" * 32,  # an uploaded WFDB record's natural key
        accession_number=None,
        discipline="ecg",
        modality="ECG",
        body_part="",
        description="12-lead ECG",
        performed_at=now,
        patient_id="642341",
        issuer="CLINIC_A",
        patient_name="Anonymous",
        birth_date=None,
        sex="F",
        clinic_code="CLINIC_A",
        clinic_name="Clinic A",
        sender_code="LEAD",
        sender_name="Lead",
        findings="窦性心律",
        impression="正常心电图",
        recommendation="",
        signer="senior",
        signed_at=now,
        pdf=b"%PDF-1.4 test",
        extra=dict(extra),
    )


def test_dicom_push_of_an_uploaded_ecg_has_a_valid_study_uid() -> None:
    push = _push()
    ds = encapsulated_pdf(push)
    assert UID(ds.StudyInstanceUID).is_valid and ds.StudyInstanceUID.startswith("2.25.")
    assert encapsulated_pdf(push).StudyInstanceUID == ds.StudyInstanceUID  # stable


def test_hl7_push_carries_the_measurements() -> None:
    observations = [
        {"key": "heart_rate_bpm", "system": "http://loinc.org", "code": "8867-4",
         "display": "Heart rate", "value": 61.0, "unit": "/min"},
        {"key": "qt_ms", "system": "http://loinc.org", "code": "8634-0",
         "display": "Q-T Interval", "value": 400.0, "unit": "ms"},
    ]  # fmt: skip
    endpoint = EndpointSpec(id="e", name="his", channel="hl7", host="127.0.0.1", port=1)
    message = build_oru(_push(observations=observations), endpoint, now=datetime.now(UTC))
    obx = [seg.split("|") for seg in message.split("\r") if seg.startswith("OBX")]
    nm = [seg for seg in obx if seg[2] == "NM"]
    assert [(seg[3], seg[5], seg[6]) for seg in nm] == [
        ("8867-4^Heart rate^LN", "61", "/min^^UCUM"),
        ("8634-0^Q-T Interval^LN", "400", "ms^^UCUM"),
    ]
    assert [int(seg[1]) for seg in obx] == list(range(1, len(obx) + 1))
