"""ECG records among files on disk (``rdc import``): a WFDB header with the signal files it
names, or one file that is a whole ECG (HL7 aECG, DICOM waveform, SCP-ECG)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ecg_service.parsers import _wfdb_header_line

__all__ = ["EcgFileGroups", "group_ecg_files"]

_HEAD_BYTES = 65536


@dataclass
class EcgFileGroups:
    """The records found (each a list of files, the header first) and the files that are
    no part of one, with the reason."""

    records: list[list[Path]] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(_HEAD_BYTES)


def _signal_files(header: bytes) -> list[str]:
    text = header.decode("utf-8", "replace")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    match = _wfdb_header_line(header)
    count = int(match.group(2)) if match else 0
    names: list[str] = []
    for line in lines[1 : 1 + count]:
        name = line.split()[0]
        if name not in names:
            names.append(name)
    return names


def group_ecg_files(paths: Iterable[Path]) -> EcgFileGroups:
    """Group non-DICOM candidate files into ECG records: each WFDB header with its signal
    files (from the header's folder), every other file on its own (the intake judges it)."""
    files = list(dict.fromkeys(p.resolve() for p in paths))
    groups = EcgFileGroups()
    used: set[Path] = set()
    headers: list[tuple[Path, bytes]] = []
    for path in files:
        head = _head(path)
        if _wfdb_header_line(head) is not None:
            headers.append((path, head))
    for path, head in headers:
        members = [path]
        missing = []
        for name in _signal_files(head):
            signal = (path.parent / name).resolve()
            if signal.parent != path.parent.resolve() or not signal.is_file():
                missing.append(name)
            else:
                members.append(signal)
        used.update(members)
        if missing:
            groups.refused.append(
                (path, f"WFDB: signal file {missing[0]} is not beside the header")
            )
            continue
        groups.records.append(members)
    for path in files:
        if path not in used:
            groups.records.append([path])
    return groups
