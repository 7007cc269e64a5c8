"""Object store: where DICOM objects, quarantined input and later reports live.

Keys are ``/``-separated relative paths derived from natural identifiers (UIDs), so writing
the same object twice lands in the same place. The local implementation writes to a
temporary file in the target directory, fsyncs it, renames it into place and fsyncs the
directory: after :meth:`ObjectStore.put_file` returns, the object survives a crash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from rdc_core.errors import NotFoundError, StorageError
from rdc_core.settings import Settings, get_settings

__all__ = ["LocalObjectStore", "ObjectStore", "StoredObject", "get_object_store"]

_CHUNK = 1 << 20
_STAGING = ".incoming"
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What the store wrote: its key, size and SHA-256 of the bytes."""

    key: str
    size: int
    sha256: str


class ObjectStore(Protocol):
    """The interface every object store implements (local directory now, S3 later)."""

    def put_file(self, key: str, source: Path) -> StoredObject:
        """Copy the file at ``source`` to ``key`` durably; returns size and hash."""
        ...

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Write ``data`` to ``key`` durably."""
        ...

    def put_file_addressed(
        self, source: Path, key_for: Callable[[str], str]
    ) -> tuple[StoredObject, bool]:
        """Write ``source`` durably under ``key_for(sha256 of its bytes)``.

        One pass over the data. Returns the object and whether the key was new (a key
        derived from the content that already exists held the same bytes).
        """
        ...

    def adopt_file(self, source: Path, key: str) -> bool:
        """Move the file at ``source`` (written by us, in :attr:`spool_dir`) to ``key``
        durably; returns whether the key was new. Cheaper than a copy."""
        ...

    @property
    def spool_dir(self) -> Path:
        """Where incoming data should be written so that :meth:`adopt_file` is cheap."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object; raises NotFoundError."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; missing objects are ignored (deletes are retried)."""
        ...

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key below ``prefix``."""
        ...

    def check(self) -> None:
        """Raise StorageError when the store cannot be written."""
        ...


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalObjectStore:
    """Objects as files below one directory, written atomically and fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, source: Path) -> StoredObject:
        with open(source, "rb") as src:
            return self._put(src, lambda _sha: key)[0]

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self._put(io.BytesIO(data), lambda _sha: key)[0]

    def put_file_addressed(
        self, source: Path, key_for: Callable[[str], str]
    ) -> tuple[StoredObject, bool]:
        with open(source, "rb") as src:
            return self._put(src, key_for)

    def _put(self, src: BinaryIO, key_for: Callable[[str], str]) -> tuple[StoredObject, bool]:
        # Stage in a hidden folder on the same file system, fsync, then rename into place
        # and fsync the directory: readers see the whole object or nothing, and after return
        # the object survives a crash. One pass over the data computes the hash as well.
        digest = hashlib.sha256()
        size = 0
        tmp_name: str | None = None
        key = "<unknown>"
        try:
            staging = self.root / _STAGING
            _make_dirs_durable(staging)
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=staging)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            key = key_for(sha256)
            target = self._path(key)
            _make_dirs_durable(target.parent)
            created = not target.exists()
            os.replace(tmp_name, target)
            tmp_name = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write object {key}: {exc.strerror or exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return StoredObject(key=key, size=size, sha256=sha256), created

    @property
    def spool_dir(self) -> Path:
        return self.root / _STAGING

    def adopt_file(self, source: Path, key: str) -> bool:
        target = self._path(key)
        try:
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _make_dirs_durable(target.parent)
            created = not target.exists()
            try:
                os.replace(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                created = self.put_file_addressed(source, lambda _sha: key)[1]
                source.unlink()
                return created
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write object {key}: {exc.strerror or exc}") from exc
        return created

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise NotFoundError(f"no object {key}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read object {key}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete object {key}: {exc.strerror or exc}") from exc

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and _STAGING not in path.parts and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".tmp-check-", dir=self.root)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise StorageError(f"object store {self.root} is not writable: {exc}") from exc


def _make_dirs_durable(path: Path) -> None:
    # A new directory's entry lives in its parent: fsync the parents of what mkdir created,
    # or a crash could lose the directory holding an acknowledged object.
    if path.is_dir():
        return
    missing = [path, *(p for p in path.parents if not p.exists())]
    path.mkdir(parents=True, exist_ok=True)
    for created in sorted(missing, key=lambda p: len(p.parts)):
        _fsync_dir(created.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def get_object_store(settings: Settings | None = None) -> ObjectStore:
    """The configured object store."""
    settings = settings or get_settings()
    return LocalObjectStore(settings.objects_dir)
