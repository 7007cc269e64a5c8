"""A test-only SCP-ECG writer (EN 1064): uncompressed or default-Huffman rhythm data, written
straight from the standard's layout so the reader in ``ecg_service.scp`` is checked against an
independent encoder, not against itself."""

from __future__ import annotations

import struct
from datetime import date, datetime

import numpy as np

from ecg_service.record import EcgRecord

_LEAD_CODES = {
    "I": 1, "II": 2, "V1": 3, "V2": 4, "V3": 5, "V4": 6, "V5": 7, "V6": 8,
    "III": 61, "aVR": 62, "aVL": 63, "aVF": 64,
}  # fmt: skip


def _crc(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        x = ((crc >> 8) ^ byte) & 0xFF
        x ^= x >> 4
        crc = ((crc << 8) ^ (x << 12) ^ (x << 5) ^ x) & 0xFFFF
    return crc


def _section(sid: int, body: bytes, reserved: bytes = b"\x00" * 6) -> bytes:
    if len(body) % 2:
        body += b"\x00"  # sections have an even length
    rest = struct.pack("<HIBB", sid, 16 + len(body), 20, 20) + reserved + body
    return struct.pack("<H", _crc(rest)) + rest


def _tag(tag: int, value: bytes) -> bytes:
    return struct.pack("<BH", tag, len(value)) + value


def _huffman(values: np.ndarray) -> bytes:
    bits: list[str] = []
    for v in values.tolist():
        if v == 0:
            bits.append("0")
        elif -8 <= v <= 8:
            bits.append("1" * abs(v) + "0" + ("1" if v < 0 else "0"))
        elif -128 <= v <= 127:
            bits.append("1111111110" + format(v & 0xFF, "08b"))
        else:
            bits.append("1111111111" + format(v & 0xFFFF, "016b"))
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return int(text, 2).to_bytes(len(text) // 8, "big") if text else b""


def _reversed(code: int, bits: int) -> int:
    return int(format(code, f"0{bits}b")[::-1], 2)


def _default_table_explicit() -> bytes:
    """Section 2 with one table: the default table's 19 code structures spelled out (base codes
    stored bit-reversed, as the standard lays them out)."""
    rows = [(1, 1, 1, 0, 0b0)]
    for k in range(1, 9):
        rows.append((k + 2, k + 2, 1, k, int("1" * k + "00", 2)))
        rows.append((k + 2, k + 2, 1, -k, int("1" * k + "01", 2)))
    rows += [(10, 18, 1, 0, 0b1111111110), (10, 26, 1, 0, 0b1111111111)]
    return struct.pack("<HH", 1, len(rows)) + b"".join(
        struct.pack("<BBBhI", p, t, m, v, _reversed(c, p)) for p, t, m, v, c in rows
    )


def _waveform_section(
    q: np.ndarray, avm_nv: int, interval: int, huffman: bool, second: bool, flag: int
) -> bytes:
    chunks = []
    for row in q:
        enc = row.copy()
        if second:
            enc[2:] = row[2:] - 2 * row[1:-1] + row[:-2]
        chunks.append(_huffman(enc) if huffman else enc.astype("<i2").tobytes())
    return (
        struct.pack("<HHBB", avm_nv, interval, 2 if second else 0, flag)
        + b"".join(struct.pack("<H", len(c)) for c in chunks)
        + b"".join(chunks)
    )


def scp_bytes(
    record: EcgRecord,
    *,
    patient_id: str = "SCP-0001",
    last_name: str = "Wang",
    first_name: str = "Fang",
    sex: int = 2,
    birth: date = date(1961, 3, 14),
    acquired: datetime = datetime(2026, 11, 30, 8, 15, 42),
    avm_nv: int = 5000,
    huffman: bool = False,
    custom_table: bool = False,
    second_difference: bool = False,
    measurements: dict[str, int] | None = None,
    reference_beat_subtraction: bool = False,
) -> bytes:
    """``record`` as one SCP-ECG file (the record's standard leads, quantised to ``avm_nv``)."""
    leads = [lead for lead in record.leads if lead in _LEAD_CODES]
    n = record.n_samples
    fs = record.sampling_rate_hz
    device = (
        struct.pack("<HHHBB", 1, 2, 77, 0, 255)
        + b"RDC-T\x00"
        + bytes([20, 0, 0, 0, 50])
        + b"\x00" * 16
        + bytes([1])
        + b"\x00"  # analysing program revision (length 1: "")
        + b"SN123\x00SYS1\x00SCP1\x00RDC Test Cart\x00"
    )
    sec1 = b"".join(
        [
            _tag(2, patient_id.encode() + b"\x00"),
            _tag(0, last_name.encode() + b"\x00"),
            _tag(1, first_name.encode() + b"\x00"),
            _tag(5, struct.pack("<HBB", birth.year, birth.month, birth.day)),
            _tag(8, bytes([sex])),
            _tag(14, device),
            _tag(25, struct.pack("<HBB", acquired.year, acquired.month, acquired.day)),
            _tag(26, bytes([acquired.hour, acquired.minute, acquired.second])),
            _tag(255, b""),
        ]
    )
    flags = 0x04 | (len(leads) << 3) | (0x01 if reference_beat_subtraction else 0)
    sec3 = bytes([len(leads), flags & 0xFF]) + b"".join(
        struct.pack("<IIB", 1, n, _LEAD_CODES[lead]) for lead in leads
    )
    q = np.rint(np.vstack([record.lead(lead) for lead in leads]) * 1000.0 / avm_nv).astype(np.int64)
    interval = round(1e6 / fs)
    bodies: dict[int, bytes] = {1: sec1, 3: sec3}
    if reference_beat_subtraction:
        # A 600 ms reference beat (fiducial at its sample 101) subtracted over four type-0
        # QRS zones; a type-1 QRS is listed but left alone, as the standard says.
        beat = q[:, 1000:1300].copy()
        qrs = [(0, 500), (0, 1500), (1, 2500), (0, 3500), (0, 4500)]
        for beat_type, fid in qrs:
            if beat_type == 0:
                q[:, fid - 1 - 60 : fid - 1 + 81] -= beat[:, 100 - 60 : 100 + 81]
        bodies[4] = (
            struct.pack("<HHH", 600, 101, len(qrs))
            + b"".join(struct.pack("<HIII", t, f - 60, f, f + 80) for t, f in qrs)
            + b"".join(struct.pack("<II", f - 60, f + 80) for _, f in qrs)
        )
        bodies[5] = _waveform_section(beat, avm_nv, interval, huffman, second_difference, 0)
    bodies[6] = _waveform_section(q, avm_nv, interval, huffman, second_difference, 0)
    if huffman:
        bodies[2] = _default_table_explicit() if custom_table else struct.pack("<H", 19999)
    if measurements is not None:
        m = measurements
        bodies[7] = (
            bytes([1, 0])
            + struct.pack("<HH", m["rr_ms"], m["rr_ms"])
            + struct.pack("<5H", 100, 100 + m["p_ms"], m["qrs_on"], m["qrs_on"] + m["qrs_ms"],
                          m["qrs_on"] + m["qt_ms"])
            + struct.pack("<3h", 60, m["qrs_axis"], 999)
        )  # fmt: skip
    sections = {sid: _section(sid, body) for sid, body in sorted(bodies.items())}
    sec0_len = 16 + 10 * 12
    pos = 6 + sec0_len + 1  # 1-based index of the first section after section 0
    pointers = [struct.pack("<HII", 0, sec0_len, 7)]
    for sid in range(1, 12):
        if sid in sections:
            pointers.append(struct.pack("<HII", sid, len(sections[sid]), pos))
            pos += len(sections[sid])
        else:
            pointers.append(struct.pack("<HII", sid, 0, 0))
    sec0 = _section(0, b"".join(pointers), b"SCPECG")
    body = sec0 + b"".join(sections[sid] for sid in sorted(sections))
    rest = struct.pack("<I", 6 + len(body)) + body
    return struct.pack("<H", _crc(rest)) + rest
