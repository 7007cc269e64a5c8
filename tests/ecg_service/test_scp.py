"""SCP-ECG reader against the test-only writer (synthetic records, no shared sample exists)."""

from __future__ import annotations

import struct
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from ecg_service import synthesize_ecg
from ecg_service.parsers import detect_format, parse_ecg
from ecg_service.record import EcgFormat, EcgFormatError, EcgRecord, UnsupportedEcgFormat
from ecg_service.scp import crc_ccitt
from tests.ecg_service.scp_writer import scp_bytes

_MEAS = {"rr_ms": 857, "p_ms": 100, "qrs_on": 260, "qrs_ms": 92, "qt_ms": 384, "qrs_axis": 48}


@pytest.fixture(scope="module")
def synthetic() -> EcgRecord:
    return synthesize_ecg(heart_rate_bpm=70, seed=3)[0]


def test_crc_ccitt_check_value() -> None:
    assert crc_ccitt(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE check value


@pytest.mark.parametrize(
    ("huffman", "second_difference", "custom_table"),
    [(False, False, False), (True, False, False), (True, True, False), (True, True, True)],
)
def test_round_trip(
    synthetic: EcgRecord, huffman: bool, second_difference: bool, custom_table: bool
) -> None:
    data = scp_bytes(
        synthetic,
        huffman=huffman,
        second_difference=second_difference,
        custom_table=custom_table,
        measurements=_MEAS,
    )
    assert detect_format(data) is EcgFormat.SCP_ECG
    rec = parse_ecg(data)
    assert rec.source_format is EcgFormat.SCP_ECG
    assert rec.sampling_rate_hz == 500.0
    assert set(rec.leads) == set(synthetic.leads) and len(rec.leads) == 12
    expected = np.vstack([synthetic.lead(lead) for lead in rec.leads])
    assert rec.signals_uv.shape == expected.shape
    assert np.abs(rec.signals_uv - expected).max() <= 2.5 + 1e-9  # AVM 5 µV: half a step
    assert rec.patient.patient_id == "SCP-0001"
    assert rec.patient.name == "Wang^Fang"
    assert rec.patient.sex == "F"
    assert rec.patient.birth_date == date(1961, 3, 14)
    assert rec.acquired_at == datetime(2026, 11, 30, 8, 15, 42)
    assert rec.device == "RDC Test Cart RDC-T"
    got = {m.key: m.value for m in rec.device_measurements}
    assert got == {
        "rr_ms": 857,
        "heart_rate_bpm": 70,
        "p_ms": 100,
        "pr_ms": 160,
        "qrs_ms": 92,
        "qt_ms": 384,
        "p_axis_deg": 60,
        "qrs_axis_deg": 48,
    }  # T axis 999 = undefined, left out
    assert all(m.source.startswith("SCP-ECG section 7") for m in rec.device_measurements)


def test_huffman_is_smaller_and_identical(synthetic: EcgRecord) -> None:
    plain = scp_bytes(synthetic, second_difference=True)
    coded = scp_bytes(synthetic, huffman=True, second_difference=True)
    assert len(coded) < len(plain) * 0.6
    assert np.array_equal(parse_ecg(plain).signals_uv, parse_ecg(coded).signals_uv)


def test_bad_record_crc(synthetic: EcgRecord) -> None:
    data = bytearray(scp_bytes(synthetic))
    data[-10] ^= 0x40
    with pytest.raises(EcgFormatError, match=r"^SCP-ECG: record CRC mismatch"):
        parse_ecg(bytes(data))


def test_bad_section_crc(synthetic: EcgRecord) -> None:
    data = bytearray(scp_bytes(synthetic))
    data[-10] ^= 0x40
    data[0:2] = struct.pack("<H", crc_ccitt(bytes(data[2:])))  # record CRC fixed up
    with pytest.raises(EcgFormatError, match=r"^SCP-ECG: section 6 CRC mismatch"):
        parse_ecg(bytes(data))


def test_truncated_file(synthetic: EcgRecord) -> None:
    data = scp_bytes(synthetic)[:5000]
    assert detect_format(data) is EcgFormat.SCP_ECG
    with pytest.raises(EcgFormatError, match=r"^SCP-ECG: record length field says \d+ bytes"):
        parse_ecg(data)


@pytest.mark.parametrize("huffman", [False, True])
def test_reference_beat_subtraction_is_undone(synthetic: EcgRecord, huffman: bool) -> None:
    data = scp_bytes(
        synthetic, reference_beat_subtraction=True, huffman=huffman, second_difference=huffman
    )
    rec = parse_ecg(data)
    expected = np.vstack([synthetic.lead(lead) for lead in rec.leads])
    assert np.abs(rec.signals_uv - expected).max() <= 2.5 + 1e-9
    assert rec.median_beat is not None and rec.median_beat.signals_uv.shape == (12, 300)
    assert np.abs(rec.median_beat.signals_uv - expected[:, 1000:1300]).max() <= 2.5 + 1e-9
    # Without section 3's "subtraction used" flag the residual stays: the zones differ.
    flags = 0x04 | (12 << 3)
    residual = parse_ecg(_patch_section(data, 3, 1, bytes([flags & 0xFF])))
    assert np.abs(residual.signals_uv - expected).max() > 50
    assert np.abs(residual.signals_uv[:, 2400:2600] - expected[:, 2400:2600]).max() <= 2.6


def _patch_section(data: bytes, sid: int, offset: int, value: bytes) -> bytes:
    """Change bytes inside section ``sid`` body and fix both CRCs."""
    buf = bytearray(data)
    pos = 6
    sec0_len = struct.unpack_from("<I", buf, pos + 4)[0]
    for off in range(pos + 16, pos + sec0_len, 10):
        s, length, index = struct.unpack_from("<HII", buf, off)
        if s == sid:
            start = index - 1
            buf[start + 16 + offset : start + 16 + offset + len(value)] = value
            section_crc = crc_ccitt(bytes(buf[start + 2 : start + length]))
            buf[start : start + 2] = struct.pack("<H", section_crc)
            buf[0:2] = struct.pack("<H", crc_ccitt(bytes(buf[2:])))
            return bytes(buf)
    raise AssertionError(f"no section {sid}")


def test_bimodal_refused_and_broken_huffman_tables(synthetic: EcgRecord) -> None:
    bimodal = _patch_section(scp_bytes(synthetic), 6, 5, b"\x01")
    with pytest.raises(UnsupportedEcgFormat, match="bimodal compression"):
        parse_ecg(bimodal)
    custom = scp_bytes(synthetic, huffman=True, custom_table=True)
    switch = _patch_section(custom, 2, 4 + 2, b"\x00\x07\x00")  # code "0": switch to table 7
    with pytest.raises(EcgFormatError, match="switch to unknown Huffman table 7"):
        parse_ecg(switch)
    no_zero = _patch_section(custom, 2, 4, bytes([2, 2]))  # code "0" now needs 2 bits
    with pytest.raises(EcgFormatError, match="invalid Huffman code"):
        parse_ecg(no_zero)


@pytest.mark.parametrize(
    ("huffman", "custom_table", "subtraction"),
    [(False, False, False), (True, False, False), (True, True, False), (True, False, True)],
)
def test_ecgdatakit_reads_the_writer_s_file(
    synthetic: EcgRecord, huffman: bool, custom_table: bool, subtraction: bool, tmp_path: Path
) -> None:
    """An independent reader (ecgdatakit, Apache-2.0) agrees with ours on the writer's files.

    Not a dependency (its wheel is 49 MB): the test runs where it is installed."""
    parser = pytest.importorskip("ecgdatakit.parsing.parsers.scp_ecg")
    path = tmp_path / "record.scp"
    path.write_bytes(
        scp_bytes(synthetic, huffman=huffman, second_difference=huffman, custom_table=custom_table)
    )
    theirs = parser.SCPECGParser().parse(path)
    ours = parse_ecg(path.read_bytes())
    assert theirs.patient.patient_id == ours.patient.patient_id == "SCP-0001"
    assert [lead.label for lead in theirs.leads] == list(ours.leads)
    for lead in theirs.leads:
        assert lead.sampling_rate == ours.sampling_rate_hz
        samples = lead.to_physical().samples if lead.is_raw else lead.samples
        assert np.allclose(np.asarray(samples, dtype=np.float64), ours.lead(lead.label))


def test_short_lead_data_is_refused(synthetic: EcgRecord) -> None:
    """Section 3 promises more samples than section 6 carries."""
    for huffman, message in ((True, "Huffman data ends after"), (False, "samples stored")):
        data = scp_bytes(synthetic, huffman=huffman)
        for i in range(12):  # every lead's end sample
            end = struct.pack("<I", synthetic.n_samples + 4000)
            data = _patch_section(data, 3, 2 + 9 * i + 4, end)
        with pytest.raises(EcgFormatError, match=rf"^SCP-ECG: lead I: .*{message}"):
            parse_ecg(data)
