"""Read DICOM waveform, WFDB, HL7 aECG and SCP-ECG files into one :class:`EcgRecord`.

The format is told from the content, never from the file name. Anything that cannot be read
raises :class:`EcgFormatError` (or :class:`UnsupportedEcgFormat`) naming the problem.

Parser choice: DICOM through pydicom's waveform support, WFDB through ``wfdb`` (MIT), HL7 aECG
through our own reader on the standard library's XML parser (about 150 lines: the subset a
rhythm series, a representative beat and the global annotations need, with errors that name
the lead and element). ``ecgdatakit`` (Apache-2.0) reads more formats but is a 49 MB wheel
with a 64 MB neural-network model we do not use, and its errors are not ours to name;
SCP-ECG through our own reader too (:mod:`ecg_service.scp`).
"""

from __future__ import annotations

import io
import re
import struct
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any

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
from ecg_service.scp import parse_scp

__all__ = ["EcgFiles", "detect_format", "parse_ecg", "read_ecg", "record_from_dicom"]

EcgFiles = bytes | Mapping[str, bytes] | Sequence[tuple[str, bytes]]
"""One file's bytes, or named files (a WFDB header and its signal files)."""

_WFDB_RECORD_LINE = re.compile(
    rb"^\s*([A-Za-z0-9_.\-]+)(?:/\d+)?\s+(\d+)(?:\s+([0-9.eE+\-]+)(?:/[0-9.eE+\-]+)?(?:\(\S*\))?)?"
)
_AECG_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.\-]*:)?AnnotatedECG[\s>/]")
_UNIT_TO_UV = {"uv": 1.0, "µv": 1.0, "μv": 1.0, "mv": 1000.0, "v": 1e6, "nv": 1e-3}


def _named(files: EcgFiles) -> list[tuple[str, bytes]]:
    if isinstance(files, bytes | bytearray | memoryview):
        return [("", bytes(files))]
    if isinstance(files, Mapping):
        return [(str(k), bytes(v)) for k, v in files.items()]
    return [(str(name), bytes(data)) for name, data in files]


def _wfdb_header_line(data: bytes) -> re.Match[bytes] | None:
    if b"\x00" in data[:4096]:
        return None
    for line in data[:4096].splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        return _WFDB_RECORD_LINE.match(stripped)
    return None


def _looks_like_scp(data: bytes) -> bool:
    if len(data) < 22:
        return False
    (total,) = struct.unpack_from("<I", data, 2)
    (section_id,) = struct.unpack_from("<H", data, 8)
    # Section 0's header carries "SCPECG" in its reserved bytes: a truncated file is still
    # told as SCP-ECG (and refused as truncated, not as unknown).
    return section_id == 0 and (total == len(data) or data[16:22] == b"SCPECG")


def detect_format(data: bytes) -> EcgFormat:
    """The ECG format of one file, from its content. Raises :class:`UnsupportedEcgFormat`."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return EcgFormat.DICOM
    head = data[:65536]
    if _AECG_ROOT.search(head):
        return EcgFormat.HL7_AECG
    if _looks_like_scp(data):
        return EcgFormat.SCP_ECG
    if _wfdb_header_line(data) is not None:
        return EcgFormat.WFDB
    if head.startswith(b"%PDF"):
        raise UnsupportedEcgFormat("PDF: a report without a waveform cannot be measured")
    for marker, name in (
        (b"<RestingECG", "GE MUSE XML"),
        (b"<restingecgdata", "Philips Sierra XML"),
    ):
        if marker in head:
            raise UnsupportedEcgFormat(
                f"{name} is not supported (send DICOM, WFDB, HL7 aECG or SCP-ECG)"
            )
    raise UnsupportedEcgFormat(
        "unrecognised ECG file: not DICOM waveform, WFDB, HL7 aECG or SCP-ECG"
    )


def parse_ecg(files: EcgFiles) -> EcgRecord:
    """Parse one ECG (a single file, or a WFDB header with its signal files)."""
    named = _named(files)
    if not named or all(not data for _, data in named):
        raise EcgFormatError("empty upload: no ECG file")
    # A WFDB upload is several files: the header decides.
    headers = [(n, d) for n, d in named if d and _wfdb_header_line(d) is not None]
    if len(named) > 1:
        if not headers:
            kinds = []
            for _, data in named:
                try:
                    kinds.append(detect_format(data))
                except EcgFormatError:
                    continue
            if len(kinds) == 1:
                name, data = next((n, d) for n, d in named if _safe_detect(d) == kinds[0])
                return _parse_single(name, data)
            raise EcgFormatError(
                "several files uploaded but none is a WFDB header (.hea); send one ECG file,"
                " or a WFDB header with its signal files"
            )
        if len(headers) > 1:
            raise EcgFormatError("WFDB: more than one header file uploaded; send one record")
        return _parse_wfdb(headers[0], named)
    name, data = named[0]
    return _parse_single(name, data)


def _safe_detect(data: bytes) -> EcgFormat | None:
    try:
        return detect_format(data)
    except EcgFormatError:
        return None


def _parse_single(name: str, data: bytes) -> EcgRecord:
    fmt = detect_format(data)
    if fmt is EcgFormat.DICOM:
        return _parse_dicom(data)
    if fmt is EcgFormat.HL7_AECG:
        return _parse_aecg(data)
    if fmt is EcgFormat.WFDB:
        return _parse_wfdb((name or "record.hea", data), [(name or "record.hea", data)])
    return parse_scp(data)


def read_ecg(*paths: str | Path) -> EcgRecord:
    """Parse files from disk (for a WFDB record pass the header and its signal files)."""
    return parse_ecg([(Path(p).name, Path(p).read_bytes()) for p in paths])


def _to_uv_factor(unit: str | None, *, fmt: str, lead: str) -> float:
    key = (unit or "").strip().lower()
    if key not in _UNIT_TO_UV:
        raise EcgFormatError(f"{fmt}: unknown signal unit {unit!r} for lead {lead}")
    return _UNIT_TO_UV[key]


def _check_signals(signals: np.ndarray, leads: list[str], fmt: str, fs: float) -> None:
    if not leads:
        raise EcgFormatError(f"{fmt}: no ECG channels")
    if signals.shape[1] < 2:
        raise EcgFormatError(f"{fmt}: the waveform has fewer than 2 samples")
    if not (np.isfinite(fs) and fs > 0):
        raise EcgFormatError(f"{fmt}: sampling rate {fs!r} is not a positive number")
    if len(set(leads)) != len(leads):
        dup = sorted({lead for lead in leads if leads.count(lead) > 1})
        raise EcgFormatError(f"{fmt}: lead {dup[0]} appears twice")


# --- DICOM -----------------------------------------------------------------------------------

_DICOM_MEASUREMENT_KEYS = (
    ("qtc", "qtc_ms"),
    ("rr interval", "rr_ms"),
    ("pp interval", None),
    ("pr interval", "pr_ms"),
    ("qrs duration", "qrs_ms"),
    ("qt interval", "qt_ms"),
    ("p duration", "p_ms"),
    ("qrs axis", "qrs_axis_deg"),
    ("p axis", "p_axis_deg"),
    ("t axis", "t_axis_deg"),
    ("ventricular rate", "heart_rate_bpm"),
    ("heart rate", "heart_rate_bpm"),
)


def _measurement_key(label: str) -> str | None:
    low = label.lower()
    for needle, key in _DICOM_MEASUREMENT_KEYS:
        if needle in low:
            return key
    return None


def _parse_dicom(data: bytes) -> EcgRecord:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, struct.error, OSError) as exc:
        raise EcgFormatError(f"DICOM: unreadable data set ({exc})", fmt=EcgFormat.DICOM) from exc
    return record_from_dicom(ds)


def record_from_dicom(ds: Any) -> EcgRecord:
    """An :class:`EcgRecord` from a pydicom ``Dataset`` already in memory (the C-STORE
    path), with the same checks and errors as :func:`parse_ecg`."""
    groups = ds.get("WaveformSequence")
    if not groups:
        raise EcgFormatError(
            "DICOM: no Waveform Sequence (not an ECG waveform object)", fmt=EcgFormat.DICOM
        )
    labels = [str(g.get("MultiplexGroupLabel", "")).upper() for g in groups]
    rhythm_idx = next((i for i, lab in enumerate(labels) if "RHYTHM" in lab), None)
    if rhythm_idx is None:
        candidates = [i for i, lab in enumerate(labels) if "MEDIAN" not in lab]
        if not candidates:
            raise EcgFormatError("DICOM: only a median beat, no rhythm waveform")
        rhythm_idx = max(candidates, key=lambda i: int(groups[i].NumberOfWaveformSamples))
    fs, leads, signals = _dicom_group(ds, rhythm_idx)
    median = None
    median_idx = next((i for i, lab in enumerate(labels) if "MEDIAN" in lab), None)
    if median_idx is not None:
        mfs, mleads, msignals = _dicom_group(ds, median_idx)
        median = RecordedBeat(sampling_rate_hz=mfs, leads=tuple(mleads), signals_uv=msignals)
    device = " ".join(
        str(ds.get(k, "")).strip() for k in ("Manufacturer", "ManufacturerModelName")
    ).strip()
    source = f"DICOM waveform annotation ({device})" if device else "DICOM waveform annotation"
    measurements: list[DeviceMeasurement] = []
    statements: list[str] = []
    for item in ds.get("WaveformAnnotationSequence", []):
        text = item.get("UnformattedTextValue")
        if text:
            statements.append(str(text).strip())
            continue
        names = item.get("ConceptNameCodeSequence")
        if "NumericValue" not in item or not names:
            continue
        label = str(names[0].get("CodeMeaning", names[0].get("CodeValue", ""))).strip()
        try:
            value = float(item.NumericValue)
        except (TypeError, ValueError):
            continue
        units = item.get("MeasurementUnitsCodeSequence")
        unit = str(units[0].get("CodeValue", "")) if units else ""
        measurements.append(
            DeviceMeasurement(
                label=label, value=value, unit=unit, source=source, key=_measurement_key(label)
            )
        )
    patient = PatientIdentity(
        patient_id=_text(ds.get("PatientID")),
        name=_text(ds.get("PatientName")),
        sex=_sex(_text(ds.get("PatientSex"))),
        birth_date=_date(_text(ds.get("PatientBirthDate"))),
        age_years=_dicom_age(_text(ds.get("PatientAge"))),
    )
    acquired = _datetime(_text(ds.get("AcquisitionDateTime"))) or _datetime(
        (_text(ds.get("ContentDate")) or "") + (_text(ds.get("ContentTime")) or "")
    )
    return EcgRecord(
        source_format=EcgFormat.DICOM,
        sampling_rate_hz=fs,
        leads=tuple(leads),
        signals_uv=signals,
        patient=patient,
        acquired_at=acquired,
        device=device or None,
        device_measurements=tuple(measurements),
        device_statements=tuple(statements),
        median_beat=median,
        natural_key=_text(ds.get("SOPInstanceUID")),
    )


def _dicom_group(ds: Any, index: int) -> tuple[float, list[str], np.ndarray]:
    group = ds.WaveformSequence[index]
    label = str(group.get("MultiplexGroupLabel", index))
    from pydicom.waveforms.numpy_handler import multiplex_array

    try:
        raw = multiplex_array(ds, index, as_raw=True)
    except (ValueError, NotImplementedError, AttributeError, KeyError) as exc:
        raise EcgFormatError(f"DICOM: waveform group {label!r} cannot be decoded ({exc})") from exc
    fs = float(group.get("SamplingFrequency", 0) or 0)
    channels = group.get("ChannelDefinitionSequence", [])
    if len(channels) != raw.shape[1]:
        raise EcgFormatError(f"DICOM: waveform group {label!r} channel definitions do not match")
    leads: list[str] = []
    rows: list[np.ndarray] = []
    for n, ch in enumerate(channels):
        source = ch.get("ChannelSourceSequence")
        name = ""
        if source:
            name = str(source[0].get("CodeMeaning", "") or source[0].get("CodeValue", ""))
        name = normalise_lead_name(name or str(ch.get("ChannelLabel", f"channel {n + 1}")))
        sens = float(ch.get("ChannelSensitivity", 1) or 1)
        corr = float(ch.get("ChannelSensitivityCorrectionFactor", 1) or 1)
        base = float(ch.get("ChannelBaseline", 0) or 0)
        units = ch.get("ChannelSensitivityUnitsSequence")
        unit = str(units[0].get("CodeValue", "uV")) if units else "uV"
        factor = _to_uv_factor(unit, fmt="DICOM", lead=name)
        rows.append((raw[:, n].astype(np.float64) * sens * corr + base) * factor)
        leads.append(name)
    signals = np.vstack(rows)
    _check_signals(signals, leads, "DICOM", fs)
    return fs, leads, signals


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _sex(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip().upper()
    if v in {"M", "MALE", "男"}:
        return "M"
    if v in {"F", "FEMALE", "女"}:
        return "F"
    return "O"


def _date(value: str | None) -> date | None:
    if not value:
        return None
    try:
        return datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _datetime(value: str | None) -> datetime | None:
    if not value:
        return None
    digits = value.split("+")[0].split("-")[0]
    main, _, frac = digits.partition(".")
    for fmt_ in ("%Y%m%d%H%M%S", "%Y%m%d%H%M", "%Y%m%d"):
        try:
            dt = datetime.strptime(main, fmt_)
        except ValueError:
            continue
        if frac and fmt_ == "%Y%m%d%H%M%S":
            dt = dt.replace(microsecond=int((frac + "000000")[:6]))
        return dt
    return None


def _dicom_age(value: str | None) -> int | None:
    if value and len(value) == 4 and value[:3].isdigit() and value[3] == "Y":
        return int(value[:3])
    return None


# --- WFDB ------------------------------------------------------------------------------------


def _parse_wfdb(header: tuple[str, bytes], files: list[tuple[str, bytes]]) -> EcgRecord:
    import wfdb

    _, header_bytes = header
    match = _wfdb_header_line(header_bytes)
    assert match is not None
    record_name = match.group(1).decode("ascii", "replace")
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        text = header_bytes.decode("latin-1")
    needed: list[str] = []
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    n_sig = int(match.group(2))
    if n_sig < 1:
        raise EcgFormatError("WFDB: the header names no signals", fmt=EcgFormat.WFDB)
    if len(lines) < 1 + n_sig:
        raise EcgFormatError(
            f"WFDB: header declares {n_sig} signals but has {len(lines) - 1} signal lines",
            fmt=EcgFormat.WFDB,
        )
    for line in lines[1 : 1 + n_sig]:
        fname = line.split()[0]
        if fname not in needed:
            needed.append(fname)
    by_name = {Path(n).name: d for n, d in files}
    for fname in needed:
        if Path(fname).name != fname or fname in {".", ".."}:
            raise EcgFormatError(f"WFDB: signal file name {fname!r} is not a plain file name")
        if fname not in by_name:
            raise EcgFormatError(
                f"WFDB: signal file {fname} named by the header was not uploaded",
                fmt=EcgFormat.WFDB,
            )
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", record_name):
        raise EcgFormatError(f"WFDB: record name {record_name!r} is not a plain name")
    with tempfile.TemporaryDirectory(prefix="rdc-wfdb-") as tmp:
        (Path(tmp) / f"{record_name}.hea").write_bytes(header_bytes)
        for fname in needed:
            (Path(tmp) / fname).write_bytes(by_name[fname])
        try:
            rec = wfdb.rdrecord(str(Path(tmp) / record_name), physical=True)
        except Exception as exc:  # wfdb raises bare ValueError/IndexError/etc. on bad files
            raise EcgFormatError(f"WFDB: record {record_name} cannot be read ({exc})") from exc
    if rec.p_signal is None:
        raise EcgFormatError(f"WFDB: record {record_name} has no signal", fmt=EcgFormat.WFDB)
    leads: list[str] = []
    rows: list[np.ndarray] = []
    for i, name in enumerate(rec.sig_name):
        lead = normalise_lead_name(str(name))
        factor = _to_uv_factor(rec.units[i] if rec.units else "mV", fmt="WFDB", lead=lead)
        row = np.asarray(rec.p_signal[:, i], dtype=np.float64) * factor
        if np.isnan(row).any():
            row = np.nan_to_num(row, nan=0.0)
        leads.append(lead)
        rows.append(row)
    signals = np.vstack(rows)
    _check_signals(signals, leads, "WFDB", float(rec.fs))
    acquired = None
    if rec.base_date is not None and rec.base_time is not None:
        acquired = datetime.combine(rec.base_date, rec.base_time)
    return EcgRecord(
        source_format=EcgFormat.WFDB,
        sampling_rate_hz=float(rec.fs),
        leads=tuple(leads),
        signals_uv=signals,
        patient=_wfdb_patient(rec.comments or []),
        acquired_at=acquired,
        natural_key=record_name,
    )


def _wfdb_patient(comments: list[str]) -> PatientIdentity:
    sex = age = None
    for comment in comments:
        for key, value in re.findall(
            r"(\w+)\s*[:=]\s*([^,:]+?)(?=\s*(?:,|$|\s\w+\s*[:=]))", comment
        ):
            k = key.lower()
            if k in {"sex", "gender"}:
                sex = _sex(value)
            elif k == "age" and value.strip().isdigit():
                age = int(value.strip())
        if sex is None:
            m = re.match(r"^\s*(\d{1,3})\s+([MF])\b", comment)  # MIT-BIH: "69 M 1085 1629 x1"
            if m:
                age, sex = int(m.group(1)), m.group(2)
    return PatientIdentity(sex=sex, age_years=age)


# --- HL7 aECG --------------------------------------------------------------------------------

_V3 = "{urn:hl7-org:v3}"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_AECG_MEASUREMENTS = {
    "MDC_ECG_HEART_RATE": "heart_rate_bpm",
    "MDC_ECG_TIME_PD_RR": "rr_ms",
    "MDC_ECG_TIME_PD_PP": None,
    "MDC_ECG_TIME_PD_P": "p_ms",
    "MDC_ECG_TIME_PD_PR": "pr_ms",
    "MDC_ECG_TIME_PD_QRS": "qrs_ms",
    "MDC_ECG_TIME_PD_QT": "qt_ms",
    "MDC_ECG_TIME_PD_QTc": "qtc_ms",
    "MDC_ECG_TIME_PD_QTcB": "qtc_bazett_ms",
    "MDC_ECG_TIME_PD_QTcF": "qtc_fridericia_ms",
    "MDC_ECG_ANGLE_P_FRONT": "p_axis_deg",
    "MDC_ECG_ANGLE_QRS_FRONT": "qrs_axis_deg",
    "MDC_ECG_ANGLE_T_FRONT": "t_axis_deg",
}


def _q(path: str) -> str:
    return "/".join(f"{_V3}{part}" if part not in {".", ".."} else part for part in path.split("/"))


def _parse_aecg(data: bytes) -> EcgRecord:
    head = data[:4096]
    if b"<!DOCTYPE" in head or b"<!ENTITY" in data:
        raise EcgFormatError("aECG: document type declarations are not accepted")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise EcgFormatError(f"aECG: not well-formed XML ({exc})", fmt=EcgFormat.HL7_AECG) from exc
    if root.tag != f"{_V3}AnnotatedECG":
        raise EcgFormatError(
            f"aECG: root element is {root.tag!r}, not urn:hl7-org:v3 AnnotatedECG",
            fmt=EcgFormat.HL7_AECG,
        )
    series_list = root.findall(_q("component/series"))
    if not series_list:
        raise EcgFormatError("aECG: no <series> with waveforms", fmt=EcgFormat.HL7_AECG)
    rhythm = next((s for s in series_list if _code(s) == "RHYTHM"), series_list[0])
    fs, leads, signals = _aecg_series(rhythm, "RHYTHM")
    median = None
    for derived in rhythm.iter(f"{_V3}derivedSeries"):
        if _code(derived) == "REPRESENTATIVE_BEAT":
            try:
                mfs, mleads, msig = _aecg_series(derived, "REPRESENTATIVE_BEAT")
            except EcgFormatError:
                break  # the rhythm is what we measure; a broken device beat is left out
            median = RecordedBeat(sampling_rate_hz=mfs, leads=tuple(mleads), signals_uv=msig)
            break
    device = _aecg_device(rhythm)
    doc_id = root.find(f"{_V3}id")
    measurements: list[DeviceMeasurement] = []
    statements: list[str] = []
    for container in [rhythm, *rhythm.iter(f"{_V3}derivedSeries")]:
        series_code = _code(container) or "series"
        for aset in container.findall(_q("subjectOf/annotationSet")):
            for ann in aset.findall(_q("component/annotation")):
                code = _code(ann)
                value = ann.find(f"{_V3}value")
                if code is None or value is None:
                    continue
                if code in _AECG_MEASUREMENTS and value.get(_XSI_TYPE, "").endswith("PQ"):
                    try:
                        number = float(value.get("value", ""))
                    except ValueError:
                        continue
                    src = f"aECG annotation ({series_code}"
                    src += f", {device})" if device else ")"
                    measurements.append(
                        DeviceMeasurement(
                            label=code,
                            value=number,
                            unit=value.get("unit", ""),
                            source=src,
                            key=_AECG_MEASUREMENTS[code],
                        )
                    )
                elif value.get("displayName"):
                    statements.append(str(value.get("displayName")))
    return EcgRecord(
        source_format=EcgFormat.HL7_AECG,
        sampling_rate_hz=fs,
        leads=tuple(leads),
        signals_uv=signals,
        patient=_aecg_patient(root),
        acquired_at=_aecg_time(root, rhythm),
        device=device,
        device_measurements=tuple(measurements),
        device_statements=tuple(dict.fromkeys(statements)),
        median_beat=median,
        natural_key=doc_id.get("root") if doc_id is not None else None,
    )


def _code(element: ET.Element) -> str | None:
    code = element.find(f"{_V3}code")
    return code.get("code") if code is not None else None


def _aecg_series(series: ET.Element, label: str) -> tuple[float, list[str], np.ndarray]:
    seq_set = series.find(_q("component/sequenceSet"))
    if seq_set is None:
        raise EcgFormatError(f"aECG: {label} series has no <sequenceSet>")
    fs: float | None = None
    leads: list[str] = []
    rows: list[np.ndarray] = []
    for seq in seq_set.findall(_q("component/sequence")):
        code = _code(seq) or ""
        value = seq.find(f"{_V3}value")
        if code.startswith("TIME_"):
            inc = value.find(f"{_V3}increment") if value is not None else None
            if inc is None:
                raise EcgFormatError(f"aECG: {label} time sequence has no <increment>")
            try:
                step = float(inc.get("value", ""))
            except ValueError as exc:
                raise EcgFormatError(f"aECG: {label} time increment is not a number") from exc
            unit = (inc.get("unit") or "s").lower()
            step_s = step / 1000.0 if unit == "ms" else step
            if step_s <= 0:
                raise EcgFormatError(f"aECG: {label} time increment {step} is not positive")
            fs = 1.0 / step_s
            continue
        lead = normalise_lead_name(code)
        if value is None:
            raise EcgFormatError(f"aECG: no <value> for lead {lead}")
        digits = value.find(f"{_V3}digits")
        if digits is None or not (digits.text or "").strip():
            raise EcgFormatError(f"aECG: no <digits> for lead {lead}")
        try:
            numbers = np.array((digits.text or "").split(), dtype=np.float64)
        except ValueError as exc:
            raise EcgFormatError(f"aECG: lead {lead} digits are not numbers") from exc
        origin = value.find(f"{_V3}origin")
        scale = value.find(f"{_V3}scale")
        if scale is None:
            raise EcgFormatError(f"aECG: no <scale> for lead {lead}")
        try:
            scale_v = float(scale.get("value", ""))
            origin_v = float(origin.get("value", "0")) if origin is not None else 0.0
        except ValueError as exc:
            raise EcgFormatError(f"aECG: lead {lead} scale or origin is not a number") from exc
        factor = _to_uv_factor(scale.get("unit", "uV"), fmt="aECG", lead=lead)
        if origin is not None:
            origin_v *= _to_uv_factor(origin.get("unit", "uV"), fmt="aECG", lead=lead)
        rows.append(numbers * scale_v * factor + origin_v)
        leads.append(lead)
    if fs is None:
        raise EcgFormatError(f"aECG: {label} series has no time sequence (sampling rate unknown)")
    if not rows:
        raise EcgFormatError(f"aECG: {label} series has no lead <sequence>")
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        short = leads[int(np.argmin([len(r) for r in rows]))]
        raise EcgFormatError(f"aECG: {label} leads differ in length (lead {short} is shorter)")
    signals = np.vstack(rows)
    _check_signals(signals, leads, "aECG", fs)
    return fs, leads, signals


def _aecg_device(series: ET.Element) -> str | None:
    dev = series.find(_q("author/seriesAuthor"))
    if dev is None:
        return None
    parts = [
        (e.text or "").strip()
        for e in (
            dev.find(_q("manufacturerOrganization/name")),
            dev.find(_q("manufacturedSeriesDevice/manufacturerModelName")),
        )
        if e is not None
    ]
    return " ".join(p for p in parts if p) or None


def _aecg_patient(root: ET.Element) -> PatientIdentity:
    subject = next(root.iter(f"{_V3}trialSubject"), None)
    if subject is None:
        return PatientIdentity()
    sid = subject.find(f"{_V3}id")
    person = subject.find(f"{_V3}subjectDemographicPerson")
    name = sex = birth = None
    if person is not None:
        name_el = person.find(f"{_V3}name")
        name = (name_el.text or "").strip() or None if name_el is not None else None
        gender = person.find(f"{_V3}administrativeGenderCode")
        sex = _sex(gender.get("code")) if gender is not None else None
        birth_el = person.find(f"{_V3}birthTime")
        birth = _date(birth_el.get("value")) if birth_el is not None else None
    return PatientIdentity(
        patient_id=(sid.get("extension") or sid.get("root")) if sid is not None else None,
        name=name,
        sex=sex,
        birth_date=birth,
    )


def _aecg_time(root: ET.Element, series: ET.Element) -> datetime | None:
    for el in (
        root.find(_q("effectiveTime/center")),
        root.find(_q("effectiveTime/low")),
        series.find(_q("effectiveTime/low")),
    ):
        if el is not None and el.get("value"):
            return _datetime(el.get("value"))
    return None
