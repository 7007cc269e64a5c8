"""Parsing the shared sample ECGs (DICOM, WFDB, HL7 aECG) and refusing malformed input."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from ecg_service import (
    STANDARD_LEADS,
    EcgFormat,
    EcgFormatError,
    UnsupportedEcgFormat,
    detect_format,
    parse_ecg,
    read_ecg,
)


@pytest.fixture(scope="module")
def ecg_dir(testdata: Path) -> Path:
    return testdata / "ecg"


def _files(*paths: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


def test_dicom_12_lead(ecg_dir: Path) -> None:
    rec = read_ecg(ecg_dir / "dicom" / "waveform_ecg.dcm")
    assert rec.source_format is EcgFormat.DICOM
    assert rec.sampling_rate_hz == 1000.0
    assert rec.leads == STANDARD_LEADS  # "Lead aVR" etc. normalised
    assert rec.signals_uv.shape == (12, 10000)
    assert rec.duration_s == pytest.approx(10.0)
    # Sensitivity 1.25 µV per unit applied: first sample of lead I is 80 units.
    assert rec.lead("I")[0] == pytest.approx(100.0)
    assert rec.patient.patient_id == "642341"
    assert rec.patient.sex == "F"
    assert rec.patient.birth_date == date(1971, 1, 23)
    assert rec.acquired_at is not None and rec.acquired_at.isoformat() == "2013-01-25T10:59:19"
    assert rec.median_beat is not None and rec.median_beat.signals_uv.shape == (12, 1200)
    device = {m.key: m.value for m in rec.device_measurements if m.key}
    assert device == {
        "rr_ms": 982.0,
        "pr_ms": 161.0,
        "qrs_ms": 75.0,
        "qt_ms": 368.0,
        "qtc_ms": 370.0,
        "p_axis_deg": 74.0,
        "qrs_axis_deg": 52.0,
        "t_axis_deg": 57.0,
    }
    assert all("Mortara" in m.source for m in rec.device_measurements)
    assert rec.device_statements == ("RITMO SINUSALE", "ECG NORMALE")


def test_aecg_example(ecg_dir: Path) -> None:
    rec = read_ecg(ecg_dir / "aecg" / "Example_aECG.xml")
    assert rec.source_format is EcgFormat.HL7_AECG
    assert rec.sampling_rate_hz == pytest.approx(500.0)
    assert set(rec.leads) == set(STANDARD_LEADS)
    assert rec.signals_uv.shape == (12, 5000)
    assert rec.patient.patient_id == "SBJ-123"
    assert rec.patient.sex == "M"
    assert rec.patient.birth_date == date(1953, 5, 8)
    assert rec.acquired_at is not None and rec.acquired_at.year == 2002
    assert rec.median_beat is not None and rec.median_beat.signals_uv.shape[0] == 12
    device = {m.key: m.value for m in rec.device_measurements}
    assert device["pr_ms"] == 148.0 and device["qrs_ms"] == 120.0 and device["qt_ms"] == 420.0
    assert device["qrs_axis_deg"] == -61.0
    assert all(m.source.startswith("aECG annotation") for m in rec.device_measurements)
    # Lead III is derived in the file; check the scale was applied (2.5 µV per digit).
    i, ii, iii = rec.lead("I"), rec.lead("II"), rec.lead("III")
    assert np.median(np.abs(ii - i - iii)) < 15.0


def test_aecg_minimum(ecg_dir: Path) -> None:
    rec = read_ecg(ecg_dir / "aecg" / "minimum_aecg.xml")
    assert rec.leads == ("II",)
    assert rec.signals_uv.shape == (1, 13)
    assert rec.lead("II")[:3].tolist() == [-5.0, -5.0, -5.0]


@pytest.mark.parametrize(
    ("header", "signal_files", "fs", "leads", "n"),
    [
        ("100.hea", ["100.dat"], 360.0, ("II", "V5"), 650000),
        ("100-no-len.hea", ["100.dat"], 360.0, ("II", "V5"), 650000),
        (
            "s0010_re.hea",
            ["s0010_re.dat", "s0010_re.xyz"],
            1000.0,
            (*STANDARD_LEADS, "vx", "vy", "vz"),
            38400,
        ),
        ("test01_00s.hea", ["test01_00s.dat"], 500.0, ("ECG 1", "ECG 2", "ECG 3", "ECG 4"), 4000),
        ("3000003_0003.hea", ["3000003_0003.dat"], 125.0, ("II", "V"), 1028),
    ],
)
def test_wfdb_records(ecg_dir, header, signal_files, fs, leads, n) -> None:
    files = _files(*(ecg_dir / "wfdb" / f for f in [*signal_files, header]))
    rec = parse_ecg(files)
    assert rec.source_format is EcgFormat.WFDB
    assert rec.sampling_rate_hz == fs
    assert rec.leads == leads
    assert rec.signals_uv.shape == (len(leads), n)
    assert np.isfinite(rec.signals_uv).all()
    # Units are µV: an ECG's QRS is hundreds to thousands of µV, not ~1 (mV).
    assert 200 < np.ptp(rec.signals_uv[0]) < 20000


def test_wfdb_patient_from_comments(ecg_dir: Path) -> None:
    rec = read_ecg(ecg_dir / "wfdb" / "s0010_re.hea", ecg_dir / "wfdb" / "s0010_re.dat",
                   ecg_dir / "wfdb" / "s0010_re.xyz")  # fmt: skip
    assert rec.patient.sex == "F" and rec.patient.age_years == 81
    mit = read_ecg(ecg_dir / "wfdb" / "100.hea", ecg_dir / "wfdb" / "100.dat")
    assert mit.patient.sex == "M" and mit.patient.age_years == 69


def test_format_from_content_not_name(ecg_dir: Path) -> None:
    dcm = (ecg_dir / "dicom" / "waveform_ecg.dcm").read_bytes()
    xml = (ecg_dir / "aecg" / "minimum_aecg.xml").read_bytes()
    assert detect_format(dcm) is EcgFormat.DICOM
    assert detect_format(xml) is EcgFormat.HL7_AECG
    assert detect_format((ecg_dir / "wfdb" / "100.hea").read_bytes()) is EcgFormat.WFDB
    # Misleading names change nothing.
    assert parse_ecg([("ecg.xml", dcm)]).source_format is EcgFormat.DICOM
    assert parse_ecg([("upload.dcm", xml)]).source_format is EcgFormat.HL7_AECG
    assert parse_ecg(dcm).source_format is EcgFormat.DICOM


def test_wfdb_signal_file_missing(ecg_dir: Path) -> None:
    with pytest.raises(EcgFormatError, match=r"WFDB: signal file s0010_re.xyz .*not uploaded"):
        parse_ecg(_files(ecg_dir / "wfdb" / "s0010_re.hea", ecg_dir / "wfdb" / "s0010_re.dat"))
    with pytest.raises(EcgFormatError, match=r"WFDB: signal file 100\.dat"):
        parse_ecg(_files(ecg_dir / "wfdb" / "100.hea"))


def test_wfdb_truncated_signal(ecg_dir: Path) -> None:
    data = (ecg_dir / "wfdb" / "test01_00s.dat").read_bytes()[:1001]
    with pytest.raises(EcgFormatError, match="WFDB"):
        parse_ecg([("test01_00s.hea", (ecg_dir / "wfdb" / "test01_00s.hea").read_bytes()),
                   ("test01_00s.dat", data)])  # fmt: skip


def test_every_malformed_file_in_testdata(ecg_dir: Path) -> None:
    files = sorted((ecg_dir / "aecg" / "malformed").iterdir())
    assert files, "no malformed samples found"
    for path in files:
        with pytest.raises(EcgFormatError) as err:
            read_ecg(path)
        assert str(err.value).startswith("aECG: "), (path.name, str(err.value))
    with pytest.raises(EcgFormatError, match=r"^aECG: no <series> with waveforms$"):
        read_ecg(ecg_dir / "aecg" / "malformed" / "empty.xml")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: re.sub(r"<digits>.*?</digits>", "<digits> </digits>", s, flags=re.S),
         r"^aECG: no <digits> for lead II$"),
        (lambda s: s.replace("-2 -2 -2", "-2 x -2"), r"^aECG: lead II digits are not numbers$"),
        (lambda s: re.sub(r"<increment[^>]*/>", "", s), r"no <increment>"),
        (lambda s: s.replace('unit="uV"/>\n\t\t\t\t\t\t\t\t<digits', 'unit="furlong"/><digits')
         .replace('<scale value="2.5" unit="uV"/>', '<scale value="2.5" unit="furlong"/>'),
         r"unknown signal unit 'furlong' for lead II"),
        (lambda s: re.sub(r"<sequenceSet>.*</sequenceSet>", "", s, flags=re.S),
         r"has no <sequenceSet>"),
        (lambda s: s[: len(s) // 2], r"^aECG: not well-formed XML"),
        (lambda s: '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]>' + s.split("?>", 1)[-1]
         if s.startswith("<?xml") else '<!DOCTYPE x [<!ENTITY a "b">]>' + s,
         r"document type declarations are not accepted"),
    ],
)  # fmt: skip
def test_malformed_aecg_variants(ecg_dir: Path, edit, message) -> None:
    text = (ecg_dir / "aecg" / "minimum_aecg.xml").read_text("utf-8")
    broken = edit(text)
    assert broken != text
    with pytest.raises(EcgFormatError, match=message):
        parse_ecg(broken.encode("utf-8"))


def test_aecg_leads_of_different_length(ecg_dir: Path) -> None:
    text = (ecg_dir / "aecg" / "Example_aECG.xml").read_text("utf-8")
    # Drop the last sample of the first lead (lead I).
    start = text.index("<digits>")
    end = text.index("</digits>", start)
    digits = text[start + 8 : end].split()
    text = text[: start + 8] + " ".join(digits[:-1]) + text[end:]
    with pytest.raises(EcgFormatError, match=r"RHYTHM leads differ in length \(lead I"):
        parse_ecg(text.encode())


def test_dicom_without_waveform(testdata: Path) -> None:
    with pytest.raises(EcgFormatError, match=r"^DICOM: no Waveform Sequence"):
        read_ecg(testdata / "dicom" / "CT_small.dcm")


def test_dicom_truncated_waveform(ecg_dir: Path) -> None:
    data = (ecg_dir / "dicom" / "waveform_ecg.dcm").read_bytes()
    with pytest.raises(EcgFormatError, match=r"^DICOM: "):
        parse_ecg(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"empty upload"),
        (b"%PDF-1.7\n...", r"^PDF: a report without a waveform"),
        (b"<?xml version='1.0'?><RestingECG></RestingECG>", r"GE MUSE XML is not supported"),
        (b"\x00\x01hello world, not an ECG at all" * 10, r"unrecognised ECG file"),
    ],
)
def test_unsupported_inputs(data: bytes, message: str) -> None:
    with pytest.raises(UnsupportedEcgFormat if data else EcgFormatError, match=message):
        parse_ecg(data)


def test_several_files_without_header(ecg_dir: Path) -> None:
    dat = (ecg_dir / "wfdb" / "100.dat").read_bytes()[:5000]
    with pytest.raises(EcgFormatError, match="none is a WFDB header"):
        parse_ecg([("a.dat", dat), ("b.dat", dat)])


@pytest.mark.parametrize(
    ("sop_class", "unit"),
    [
        ("1.2.840.10008.5.1.4.1.1.9.1.2", "uV"),  # General ECG
        ("1.2.840.10008.5.1.4.1.1.9.1.3", "mV"),  # Ambulatory ECG, sensitivity in mV
    ],
)
def test_dicom_general_and_ambulatory(ecg_dir: Path, sop_class, unit) -> None:
    import io

    import pydicom

    ds = pydicom.dcmread(ecg_dir / "dicom" / "waveform_ecg.dcm")
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    for group in ds.WaveformSequence:
        for ch in group.ChannelDefinitionSequence:
            ch.ChannelSensitivityUnitsSequence[0].CodeValue = unit
            if unit == "mV":
                ch.ChannelSensitivity = "0.00125"
    buf = io.BytesIO()
    ds.save_as(buf)
    rec = parse_ecg(buf.getvalue())
    assert rec.leads == STANDARD_LEADS
    # 80 units x 1.25 µV, or x 0.00125 mV = 100 µV either way.
    assert rec.lead("I")[0] == pytest.approx(100.0)


def test_dicom_unknown_unit_is_refused(ecg_dir: Path) -> None:
    import io

    import pydicom

    ds = pydicom.dcmread(ecg_dir / "dicom" / "waveform_ecg.dcm")
    ds.WaveformSequence[0].ChannelDefinitionSequence[3].ChannelSensitivityUnitsSequence[
        0
    ].CodeValue = "mmHg"
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(EcgFormatError, match=r"^DICOM: unknown signal unit 'mmHg' for lead aVR$"):
        parse_ecg(buf.getvalue())


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("Lead I (Einthoven)", "I"),
        ("Lead aVR", "aVR"),
        ("MDC_ECG_LEAD_AVF", "aVF"),
        ("avl", "aVL"),
        ("v1", "V1"),
        ("Lead V6", "V6"),
        ("MLII", "II"),
        ("ECG 1", "ECG 1"),
        ("vx", "vx"),
    ],
)
def test_lead_names_normalised(raw: str, name: str) -> None:
    from ecg_service import normalise_lead_name

    assert normalise_lead_name(raw) == name


def test_record_from_dataset_in_memory(ecg_dir: Path) -> None:
    import pydicom

    from ecg_service import record_from_dicom

    ds = pydicom.dcmread(ecg_dir / "dicom" / "waveform_ecg.dcm")
    rec = record_from_dicom(ds)
    assert rec.leads == STANDARD_LEADS and rec.natural_key == ds.SOPInstanceUID
    del ds.WaveformSequence
    with pytest.raises(EcgFormatError, match="no Waveform Sequence"):
        record_from_dicom(ds)
