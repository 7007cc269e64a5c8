"""SCP-ECG (EN 1064 / ISO 11073-91064) reader: our own, on ``struct`` and numpy.

What is read: the record and section CRCs (CRC-CCITT, refused when wrong), section 0
(pointers), section 1 (patient ID, names, sex, birth date, acquisition date and time, the
acquiring device), section 2 (the default Huffman table, or the file's own tables with table
switches), section 3 (lead definitions), section 4 (QRS subtraction zones), section 5 (the
device's reference beat), section 6 (rhythm data: AVM, sample time interval, first/second
difference encoding, uncompressed or Huffman coded) and section 7 (the device's global
measurements).

Reference beat subtraction (section 4) is undone by adding the section 5 beat back over each
type-0 QRS's subtraction zone. What is refused with a reason (422): bimodal compression, a
reference beat at another sampling rate than the rhythm, leads that do not cover the same
samples.

Why our own: ``ecgdatakit`` (Apache-2.0) reads SCP but is a 49 MB wheel with a neural-network
model we never load; the subset above is ~520 lines with errors that name the section.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time

import numpy as np

from ecg_service.record import (
    DeviceMeasurement,
    EcgFormat,
    EcgFormatError,
    EcgRecord,
    PatientIdentity,
    RecordedBeat,
    UnsupportedEcgFormat,
    normalise_lead_name,
)

__all__ = ["DEFAULT_HUFFMAN", "SCP_LEAD_NAMES", "crc_ccitt", "parse_scp"]

_FMT = EcgFormat.SCP_ECG

# Section 3 lead identification codes (EN 1064 table 11 / ISO 11073-91064 annex).
SCP_LEAD_NAMES: dict[int, str] = {
    1: "I", 2: "II", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6", 9: "V7",
    10: "V2R", 11: "V3R", 12: "V4R", 13: "V5R", 14: "V6R", 15: "V7R", 16: "X", 17: "Y", 18: "Z",
    19: "CC5", 20: "CM5", 21: "LA", 22: "RA", 23: "LL", 61: "III", 62: "aVR", 63: "aVL",
    64: "aVF", 65: "-aVR", 66: "V8", 67: "V9", 68: "V8R", 69: "V9R",
}  # fmt: skip
LEAD_CODES: dict[str, int] = {name: code for code, name in SCP_LEAD_NAMES.items()}

# A Huffman code structure (section 2): (prefix bits, total bits, mode, value, code), the
# code's first transmitted bit most significant; mode 1 = a value (total - prefix bits of
# original value follow, added to ``value``), mode 0 = switch to table ``value``.
_Code = tuple[int, int, int, int, int]

# The default Huffman table (EN 1064 table 5): 0 -> "0", +-k (k = 1..8) -> k ones, a 0 and
# the sign; 10-bit escapes carry the original value in 8 or 16 bits.
DEFAULT_HUFFMAN: tuple[_Code, ...] = (
    (1, 1, 1, 0, 0b0),
    *((k + 2, k + 2, 1, k, int("1" * k + "00", 2)) for k in range(1, 9)),
    *((k + 2, k + 2, 1, -k, int("1" * k + "01", 2)) for k in range(1, 9)),
    (10, 18, 1, 0, 0b1111111110),
    (10, 26, 1, 0, 0b1111111111),
)
_NOT_COMPUTED = 29999


def crc_ccitt(data: bytes) -> int:
    """CRC-CCITT as SCP-ECG uses it (polynomial 0x1021, initial value 0xFFFF)."""
    return binascii.crc_hqx(data, 0xFFFF)


def _err(message: str) -> EcgFormatError:
    return EcgFormatError(f"SCP-ECG: {message}", fmt=_FMT)


def _refuse(message: str) -> UnsupportedEcgFormat:
    return UnsupportedEcgFormat(f"SCP-ECG: {message}", fmt=_FMT)


@dataclass(frozen=True, slots=True)
class _Section:
    sid: int
    body: bytes  # after the 16-byte section header


def _sections(data: bytes) -> dict[int, _Section]:
    if len(data) < 6:
        raise _err("file too short for a record header")
    (stored_crc, total) = struct.unpack_from("<HI", data, 0)
    if total != len(data):
        raise _err(f"record length field says {total} bytes but the file has {len(data)}")
    if crc_ccitt(data[2:]) != stored_crc:
        raise _err("record CRC mismatch (the file is corrupt or truncated)")
    sec0 = _read_section(data, 6, 0)
    pointers: dict[int, tuple[int, int]] = {}
    body = sec0.body
    for off in range(0, len(body) - 9, 10):
        sid, length, index = struct.unpack_from("<HII", body, off)
        if length:
            pointers[sid] = (length, index)
    sections = {0: sec0}
    for sid, (length, index) in sorted(pointers.items()):
        if sid == 0:
            continue
        start = index - 1  # 1-based byte position
        if start < 0 or start + length > len(data):
            raise _err(f"section {sid} pointer lies outside the file")
        sec = _read_section(data, start, sid)
        if len(sec.body) + 16 != length:
            raise _err(f"section {sid} length differs from its pointer")
        sections[sid] = sec
    return sections


def _read_section(data: bytes, start: int, expect: int) -> _Section:
    if start + 16 > len(data):
        raise _err(f"section {expect} header lies outside the file")
    crc, sid, length = struct.unpack_from("<HHI", data, start)
    if sid != expect:
        raise _err(f"section at byte {start + 1} is {sid}, expected {expect}")
    if length < 16 or start + length > len(data):
        raise _err(f"section {sid} length {length} runs past the end of the file")
    if crc_ccitt(data[start + 2 : start + length]) != crc:
        raise _err(f"section {sid} CRC mismatch")
    return _Section(sid, data[start + 16 : start + length])


# --- section 1: patient and acquisition ----------------------------------------------------


@dataclass(slots=True)
class _Header:
    patient: PatientIdentity
    acquired_at: datetime | None
    device: str | None
    natural_key: str | None


def _string(value: bytes) -> str | None:
    raw = value.split(b"\x00", 1)[0]
    for enc in ("utf-8", "latin-1"):
        try:
            text = raw.decode(enc).strip()
            break
        except UnicodeDecodeError:
            continue
    return text or None


def _section1(body: bytes) -> _Header:
    tags: dict[int, bytes] = {}
    off = 0
    while off + 3 <= len(body):
        tag, length = struct.unpack_from("<BH", body, off)
        off += 3
        if tag == 255:
            break
        if off + length > len(body):
            raise _err(f"section 1 tag {tag} runs past the end of the section")
        tags.setdefault(tag, body[off : off + length])
        off += length
    last, first = _string(tags.get(0, b"")), _string(tags.get(1, b""))
    name = "^".join(p for p in (last, first) if p) or None
    sex = {1: "M", 2: "F"}.get(tags[8][0]) if tags.get(8) else None
    birth = _date(tags.get(5))
    age = None
    if len(tags.get(4, b"")) >= 3:
        value, unit = struct.unpack_from("<HB", tags[4], 0)
        age = value if unit == 1 and value else None
    acquired = None
    acq_date = _date(tags.get(25))
    if acq_date is not None:
        t = tags.get(26, b"")
        try:
            clock = time(t[0], t[1], t[2]) if len(t) >= 3 else time()
        except ValueError:
            clock = time()
        acquired = datetime.combine(acq_date, clock)
    device = _device(tags.get(14, b""))
    key = None
    if len(tags.get(14, b"")) >= 6 and acquired is not None:
        dev_id = struct.unpack_from("<HHH", tags[14], 0)
        key = f"scp:{dev_id[0]}.{dev_id[1]}.{dev_id[2]}:{acquired.isoformat()}"
    patient = PatientIdentity(
        patient_id=_string(tags.get(2, b"")), name=name, sex=sex, birth_date=birth, age_years=age
    )
    return _Header(patient=patient, acquired_at=acquired, device=device, natural_key=key)


def _date(value: bytes | None) -> date | None:
    if not value or len(value) < 4:
        return None
    year, month, day = struct.unpack_from("<HBB", value, 0)
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _device(value: bytes) -> str | None:
    """Tag 14: fixed part (36 bytes), then length-prefixed analysing program revision and
    NUL-terminated serial number, system software, SCP software and manufacturer name."""
    if len(value) < 36:
        return None
    model = _string(value[8:14])
    off = 35
    strings: list[str | None] = []
    rev_len = value[off]
    off += 1 + rev_len
    for _ in range(4):
        end = value.find(b"\x00", off)
        end = len(value) if end < 0 else end
        strings.append(_string(value[off:end]))
        off = end + 1
    manufacturer = strings[3] if len(strings) == 4 else None
    parts = [p for p in (manufacturer, model) if p]
    return " ".join(parts) or None


# --- sections 2, 3, 5, 6: the waveform ----------------------------------------------------


def _leads(body: bytes) -> tuple[list[tuple[int, int, int]], int]:
    if len(body) < 2:
        raise _err("section 3 is too short")
    count, flags = body[0], body[1]
    if len(body) < 2 + 9 * count:
        raise _err(f"section 3 declares {count} leads but is too short for them")
    leads = [struct.unpack_from("<IIB", body, 2 + 9 * i) for i in range(count)]
    if not leads:
        raise _err("section 3 defines no leads")
    return leads, flags


@dataclass(frozen=True, slots=True)
class _Table:
    codes: dict[tuple[int, int], tuple[int, int, int]]  # (prefix, code) -> (total, mode, value)
    max_prefix: int


def _table(codes: Sequence[_Code]) -> _Table:
    return _Table(
        codes={(p, c): (t, m, v) for p, t, m, v, c in codes},
        max_prefix=max(p for p, _, _, _, _ in codes),
    )


_DEFAULT_TABLES = (_table(DEFAULT_HUFFMAN),)


def _huffman_tables(sections: dict[int, _Section]) -> tuple[_Table, ...] | None:
    """None when the data is not Huffman coded (no section 2)."""
    sec2 = sections.get(2)
    if sec2 is None:
        return None
    body = sec2.body
    if len(body) < 2:
        raise _err("section 2 is too short")
    (count,) = struct.unpack_from("<H", body, 0)
    if count == 19999:
        return _DEFAULT_TABLES
    if count == 0:
        raise _err("section 2 declares no Huffman table")
    pos = 2
    tables = []
    for t in range(count):
        if pos + 2 > len(body):
            raise _err(f"section 2 ends inside Huffman table {t + 1}")
        (n_codes,) = struct.unpack_from("<H", body, pos)
        pos += 2
        if n_codes == 0 or pos + 9 * n_codes > len(body):
            raise _err(f"section 2 Huffman table {t + 1} is empty or truncated")
        codes: list[_Code] = []
        for _ in range(n_codes):
            prefix, total, mode, value, stored = struct.unpack_from("<BBBhI", body, pos)
            pos += 9
            if not 1 <= prefix <= 32 or total < prefix:
                raise _err(f"section 2 Huffman table {t + 1}: bad code length {prefix}/{total}")
            # the base code is stored bit-reversed: its first transmitted bit is the LSB
            code = int(format(stored & ((1 << prefix) - 1), f"0{prefix}b")[::-1], 2)
            codes.append((prefix, total, mode, value, code))
        tables.append(_table(codes))
    return tuple(tables)


def _huffman_decode(data: bytes, count: int, tables: tuple[_Table, ...], lead: str) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    n_bits = len(bits)
    out = [0] * count
    table = tables[0]
    pos = n = 0
    while n < count:
        code = length = 0
        entry = None
        while entry is None:
            if pos >= n_bits:
                raise _err(f"lead {lead}: Huffman data ends after {n} of {count} samples")
            code = (code << 1) | bits[pos]
            pos += 1
            length += 1
            entry = table.codes.get((length, code))
            if entry is None and length >= table.max_prefix:
                raise _err(f"lead {lead}: invalid Huffman code at bit {pos}")
        total, mode, value = entry
        if mode == 0:
            if not 1 <= value <= len(tables):
                raise _err(f"lead {lead}: switch to unknown Huffman table {value}")
            table = tables[value - 1]
            continue
        extra = total - length
        if extra:
            if pos + extra > n_bits:
                raise _err(f"lead {lead}: Huffman data ends after {n} of {count} samples")
            raw = 0
            for bit in bits[pos : pos + extra]:
                raw = (raw << 1) | bit
            if raw >= 1 << (extra - 1):
                raw -= 1 << extra
            value += raw
            pos += extra
        out[n] = value
        n += 1
    return np.array(out, dtype=np.int64)


def _lead_data(
    body: bytes,
    offset: int,
    lengths: list[int],
    counts: list[int],
    names: list[str],
    huffman: tuple[_Table, ...] | None,
) -> list[np.ndarray]:
    rows = []
    for length, count, name in zip(lengths, counts, names, strict=True):
        chunk = body[offset : offset + length]
        if len(chunk) != length:
            raise _err(f"lead {name}: data runs past the end of its section")
        offset += length
        if huffman is not None:
            rows.append(_huffman_decode(chunk, count, huffman, name))
        else:
            if length < 2 * count:
                raise _err(f"lead {name}: {length // 2} samples stored, {count} expected")
            rows.append(np.frombuffer(chunk, dtype="<i2", count=count).astype(np.int64))
    return rows


def _undifference(values: np.ndarray, encoding: int) -> np.ndarray:
    if encoding == 0:
        return values
    if encoding == 1:
        return np.cumsum(values)
    if len(values) < 2:
        return values
    # x[n] = d[n] + 2 x[n-1] - x[n-2] (x[0] = d[0], x[1] = d[1]): the first differences
    # x[n] - x[n-1] are d[1] - d[0] plus the running sum of d[2..n].
    steps = values[1:].copy()
    steps[0] -= values[0]
    return np.concatenate(([values[0]], values[0] + np.cumsum(np.cumsum(steps))))


def _waveform(
    body: bytes,
    sid: int,
    names: list[str],
    counts: list[int],
    huffman: tuple[_Table, ...] | None,
) -> tuple[float, np.ndarray]:
    head = 6 + 2 * len(names)
    if len(body) < head:
        raise _err(f"section {sid} is too short for its header")
    avm, interval, encoding, flag = struct.unpack_from("<HHBB", body, 0)
    if sid == 6 and flag:
        raise _refuse("bimodal compression is not supported")
    if encoding not in (0, 1, 2):
        raise _err(f"section {sid} difference encoding {encoding} is unknown")
    if avm == 0 or interval == 0:
        raise _err(f"section {sid} amplitude multiplier or sample interval is zero")
    lengths = list(struct.unpack_from(f"<{len(names)}H", body, 6))
    rows = _lead_data(body, head, lengths, counts, names, huffman)
    uv = np.vstack([_undifference(r, encoding) for r in rows]).astype(np.float64) * avm / 1000.0
    return 1e6 / interval, uv


def _measurements(body: bytes, device: str | None) -> list[DeviceMeasurement]:
    if len(body) < 6:
        return []
    n_types = body[0]
    rr, _pp = struct.unpack_from("<HH", body, 2)
    source = f"SCP-ECG section 7 ({device})" if device else "SCP-ECG section 7"
    out: list[DeviceMeasurement] = []

    def add(label: str, value: int, unit: str, key: str) -> None:
        if value not in (_NOT_COMPUTED, 0xFFFF) and not (unit == "deg" and value == 999):
            out.append(DeviceMeasurement(label, float(value), unit, source, key))

    add("RR interval", rr, "ms", "rr_ms")
    if rr and rr != _NOT_COMPUTED:
        hr = float(round(60000 / rr))
        out.append(DeviceMeasurement("Heart rate", hr, "/min", source, "heart_rate_bpm"))
    if n_types >= 1 and len(body) >= 22:
        p_on, p_off, q_on, q_off, t_off = struct.unpack_from("<5H", body, 6)
        p_ax, qrs_ax, t_ax = struct.unpack_from("<3h", body, 16)
        if _NOT_COMPUTED not in (p_on, p_off):
            add("P duration", p_off - p_on, "ms", "p_ms")
        if _NOT_COMPUTED not in (p_on, q_on):
            add("PR interval", q_on - p_on, "ms", "pr_ms")
        if _NOT_COMPUTED not in (q_on, q_off):
            add("QRS duration", q_off - q_on, "ms", "qrs_ms")
        if _NOT_COMPUTED not in (q_on, t_off):
            add("QT interval", t_off - q_on, "ms", "qt_ms")
        add("P axis", p_ax, "deg", "p_axis_deg")
        add("QRS axis", qrs_ax, "deg", "qrs_axis_deg")
        add("T axis", t_ax, "deg", "t_axis_deg")
    return out


@dataclass(frozen=True, slots=True)
class _Subtraction:
    fiducial: int  # 0-based sample of the reference beat's fiducial point
    zones: tuple[tuple[int, int, int], ...]  # type-0 QRS: 0-based start, fiducial, end


def _section4(body: bytes) -> _Subtraction:
    if len(body) < 6:
        raise _err("section 4 is too short")
    _length_ms, fiducial, n_qrs = struct.unpack_from("<HHH", body, 0)
    if len(body) < 6 + 14 * n_qrs:
        raise _err(f"section 4 declares {n_qrs} QRS complexes but is too short for them")
    zones = []
    for k in range(n_qrs):
        beat_type, start, fid, end = struct.unpack_from("<HIII", body, 6 + 14 * k)
        if beat_type == 0:  # only type-0 complexes have the reference beat subtracted
            zones.append((start - 1, fid - 1, end - 1))
    return _Subtraction(fiducial=fiducial - 1, zones=tuple(zones))


def _add_reference_beat(signals: np.ndarray, beat: np.ndarray, sub: _Subtraction) -> None:
    """Undo reference beat subtraction: add the beat back over each type-0 QRS's zone."""
    for k, (start, fid, end) in enumerate(sub.zones):
        idx = np.arange(start, end + 1)
        ref = idx - fid + sub.fiducial
        if (
            len(idx) == 0
            or idx[0] < 0
            or idx[-1] >= signals.shape[1]
            or ref[0] < 0
            or ref[-1] >= beat.shape[1]
        ):
            raise _err(f"section 4 subtraction zone {k + 1} lies outside the rhythm or the beat")
        signals[:, idx] += beat[:, ref]


def parse_scp(data: bytes) -> EcgRecord:
    """An :class:`EcgRecord` from one SCP-ECG file (see the module docstring for the subset)."""
    sections = _sections(data)
    if 3 not in sections or 6 not in sections:
        raise _err("no lead definition (section 3) or rhythm data (section 6)")
    lead_defs, flags = _leads(sections[3].body)
    subtraction = _section4(sections[4].body) if flags & 0x01 and 4 in sections else None
    if flags & 0x01 and subtraction is None:
        raise _err("section 3 says reference beat subtraction but there is no section 4")
    starts = {start for start, _, _ in lead_defs}
    ends = {end for _, end, _ in lead_defs}
    if len(starts) != 1 or len(ends) != 1:
        raise _refuse("leads that cover different sample ranges are not supported")
    count = lead_defs[0][1] - lead_defs[0][0] + 1
    if count < 2:
        raise _err("section 3 lead sample range is empty")
    names = [
        normalise_lead_name(SCP_LEAD_NAMES.get(code, f"lead code {code}"))
        for _, _, code in lead_defs
    ]
    if len(set(names)) != len(names):
        raise _err("a lead appears twice in section 3")
    huffman = _huffman_tables(sections)
    fs, signals = _waveform(sections[6].body, 6, names, [count] * len(names), huffman)
    header = (
        _section1(sections[1].body)
        if 1 in sections
        else _Header(PatientIdentity(), None, None, None)
    )
    median = None
    if 5 in sections:
        body5 = sections[5].body
        per = 0
        if 4 in sections and len(body5) >= 4:
            (interval5,) = struct.unpack_from("<H", body5, 2)
            length_ms = struct.unpack_from("<H", sections[4].body, 0)[0]
            per = round(length_ms * 1000 / interval5) if interval5 else 0
        elif huffman is None and len(body5) >= 6 + 2 * len(names):
            lengths = set(struct.unpack_from(f"<{len(names)}H", body5, 6))
            per = lengths.pop() // 2 if len(lengths) == 1 else 0
        if per >= 2:
            mfs, msig = _waveform(body5, 5, names, [per] * len(names), huffman)
            median = RecordedBeat(sampling_rate_hz=mfs, leads=tuple(names), signals_uv=msig)
    if subtraction is not None:
        if median is None:
            raise _err("reference beat subtraction without a reference beat (section 5)")
        if median.sampling_rate_hz != fs:
            raise _refuse("a reference beat sampled at another rate than the rhythm")
        _add_reference_beat(signals, median.signals_uv, subtraction)
    measurements = _measurements(sections[7].body, header.device) if 7 in sections else []
    return EcgRecord(
        source_format=_FMT,
        sampling_rate_hz=fs,
        leads=tuple(names),
        signals_uv=signals,
        patient=header.patient,
        acquired_at=header.acquired_at,
        device=header.device,
        device_measurements=tuple(measurements),
        median_beat=median,
        natural_key=header.natural_key,
    )
