"""The local object store writes whole objects or nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rdc_core.errors import NotFoundError, StorageError
from rdc_core.storage import LocalObjectStore


def test_put_open_delete_roundtrip(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    data = b"\x00DICM" * 100_000
    stored = store.put_bytes("dicom/1.2/3.4/5.6.dcm", data)
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    with store.open("dicom/1.2/3.4/5.6.dcm") as f:
        assert f.read() == data
    assert list(store.iter_keys("dicom")) == ["dicom/1.2/3.4/5.6.dcm"]
    store.delete("dicom/1.2/3.4/5.6.dcm")
    store.delete("dicom/1.2/3.4/5.6.dcm")  # deletes are retried: missing is fine
    with pytest.raises(NotFoundError):
        store.open("dicom/1.2/3.4/5.6.dcm")


def test_failed_write_leaves_no_partial_object(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "dicom").write_text("not a directory")
    with pytest.raises(StorageError):
        store.put_bytes("dicom/a/b.dcm", b"x" * 10)
    assert list(store.iter_keys()) == ["dicom"]  # only the obstacle
    (tmp_path / "objects" / "dicom").unlink()

    class Exploding:
        def read(self, size: int = -1) -> bytes:
            raise OSError(5, "Input/output error")

    with pytest.raises(StorageError):
        store._write("other/c.dcm", Exploding())  # type: ignore[arg-type]
    assert list(store.iter_keys()) == []
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "objects").rglob("*"))


def test_put_once_keeps_the_first_object_and_moves_when_asked(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    first = tmp_path / "first.dcm"
    first.write_bytes(b"first")
    assert store.put_once("dicom/a.dcm", first) is True
    assert first.exists()  # copied

    spooled = store.spool_dir / "rx.dcm"
    spooled.parent.mkdir(parents=True, exist_ok=True)
    spooled.write_bytes(b"second")
    assert store.put_once("dicom/a.dcm", spooled, move=True) is False
    assert not spooled.exists()  # consumed either way
    with store.open("dicom/a.dcm") as f:
        assert f.read() == b"first"

    spooled.write_bytes(b"third")
    assert store.put_once("dicom/b.dcm", spooled, move=True) is True
    assert not spooled.exists()
    assert list(store.iter_keys()) == ["dicom/a.dcm", "dicom/b.dcm"]

    # Moved into a directory that does not exist yet; a spooled file that is gone is an
    # error with its name, not a silent success.
    spooled.write_bytes(b"fourth")
    assert store.put_once("dicom/c/d.dcm", spooled, move=True) is True
    assert not spooled.exists()
    with store.open("dicom/c/d.dcm") as f:
        assert f.read() == b"fourth"
    with pytest.raises(StorageError, match=r"dicom/c/e\.dcm"):
        store.put_once("dicom/c/e.dcm", spooled, move=True)


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/../b", ""])
def test_keys_cannot_escape_the_root(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        LocalObjectStore(tmp_path).put_bytes(key, b"x")


_WRITER = """
import sys, time
from pathlib import Path
from rdc_core.storage import LocalObjectStore
store = LocalObjectStore(Path(sys.argv[1]))
store.put_new_many([(f"hl7/m{n}.hl7", f"message {n}".encode() * 50) for n in range(5)])
store.delete("hl7/m4.hl7")
print("written", flush=True)
time.sleep(600)
"""


def test_objects_written_together_are_replayed_from_the_journal(tmp_path: Path) -> None:
    """put_new_many syncs a journal segment, not each file: a segment left by a process
    that died (kill -9) is replayed by the next one that opens the journal: files lost or
    torn (as by a power cut before the files were synced) are written again, and an object
    deleted after it was written is not brought back."""
    root = tmp_path / "objects"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"written\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    segments = list((root / ".journal").glob("*.seg"))
    assert len(segments) == 1  # not retired yet: the writer died within the second
    (root / "hl7" / "m0.hl7").unlink()
    (root / "hl7" / "m1.hl7").write_bytes(b"mess")  # torn
    store = LocalObjectStore(root)
    store.open_journal()
    for n in range(4):
        with store.open(f"hl7/m{n}.hl7") as f:
            assert f.read() == f"message {n}".encode() * 50
    assert not store.exists("hl7/m4.hl7")
    assert not list((root / ".journal").glob("*.seg"))
    assert sorted(store.iter_keys()) == [f"hl7/m{n}.hl7" for n in range(4)]
