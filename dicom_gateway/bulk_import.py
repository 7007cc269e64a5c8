"""Finding the DICOM files to import below paths, DICOMDIR media sets included."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pydicom
from pydicom.fileset import FileSet

__all__ = ["iter_dicom_files"]

_DICOMDIR = "DICOMDIR"


def _dicomdir_files(path: Path) -> Iterator[Path]:
    fileset = FileSet(pydicom.dcmread(path))
    for instance in fileset:
        yield Path(instance.path)


def iter_dicom_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every candidate file below ``paths`` once, in a stable order.

    A DICOMDIR contributes the files it references (wherever they are); other files are
    yielded as they are found and judged by the ingest service, which reports what it
    cannot read.
    """
    seen: set[Path] = set()

    def once(candidate: Path) -> Iterator[Path]:
        resolved = candidate.resolve()
        if resolved not in seen:
            seen.add(resolved)
            yield resolved

    for root in paths:
        if root.is_file():
            if root.name.upper() == _DICOMDIR:
                for f in _dicomdir_files(root):
                    yield from once(f)
            else:
                yield from once(root)
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"no such file or directory: {root}")
        for candidate in sorted(root.rglob("*")):
            if not candidate.is_file() or candidate.name.startswith("."):
                continue
            if candidate.name.upper() == _DICOMDIR:
                for f in _dicomdir_files(candidate):
                    yield from once(f)
                continue
            yield from once(candidate)
