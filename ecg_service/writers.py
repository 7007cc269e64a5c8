"""Write an :class:`EcgRecord` as a WFDB record (header + format-16 signal file), e.g. a
synthetic ECG for the demo or for tests that upload it like any acquisition box would."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from ecg_service.record import EcgRecord

__all__ = ["wfdb_files"]


def wfdb_files(record: EcgRecord, *, name: str) -> list[tuple[str, bytes]]:
    """``[(name.hea, bytes), (name.dat, bytes)]``: the record at 1 µV resolution (format
    16, gain 1000/mV), with the patient's sex and age as header comments."""
    import wfdb

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name):
        raise ValueError(f"WFDB record name {name!r} must be letters, digits, _ or -")
    comments = []
    if record.patient.sex:
        comments.append(f"sex: {record.patient.sex}")
    if record.patient.age_years is not None:
        comments.append(f"age: {record.patient.age_years}")
    signals_mv = np.asarray(record.signals_uv, dtype=np.float64).T / 1000.0
    with tempfile.TemporaryDirectory(prefix="rdc-wfdb-out-") as tmp:
        wfdb.wrsamp(
            name,
            fs=float(record.sampling_rate_hz),
            units=["mV"] * len(record.leads),
            sig_name=list(record.leads),
            p_signal=np.clip(signals_mv, -32.7, 32.7),
            fmt=["16"] * len(record.leads),
            adc_gain=[1000.0] * len(record.leads),
            baseline=[0] * len(record.leads),
            comments=comments,
            write_dir=tmp,
        )
        return [
            (f"{name}{ext}", (Path(tmp) / f"{name}{ext}").read_bytes()) for ext in (".hea", ".dat")
        ]
