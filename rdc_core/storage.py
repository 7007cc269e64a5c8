"""Object store: where DICOM objects, quarantined input and later reports live.

Keys are ``/``-separated relative paths derived from natural identifiers (UIDs and content
hashes), so writing the same object twice lands in the same place. The local
implementation writes to a temporary file on the same file system, fsyncs it, renames it
into place and fsyncs the directory: after a put returns, the object survives a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
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

    @property
    def spool_dir(self) -> Path:
        """Where to write incoming data so that ``put_once(..., move=True)`` is cheap."""
        ...

    def put_file(self, key: str, source: Path) -> StoredObject:
        """Copy the file at ``source`` to ``key`` durably (replacing any object there)."""
        ...

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Write ``data`` to ``key`` durably (replacing any object there)."""
        ...

    def put_once(self, key: str, source: Path, *, move: bool = False) -> bool:
        """Store the file at ``source`` under ``key`` durably unless ``key`` already exists.

        For keys derived from the content: an existing object is the same object and
        stays (or is written again with the same bytes). With ``move`` the file (ours, in
        :attr:`spool_dir`) is moved, not copied, and is gone afterwards either way.
        Returns False when the object certainly existed before this call, True when this
        call may have created it: a store that cannot tell without another round trip
        (S3) returns True, so callers that undo a write must first check that nothing
        else refers to the object.
        """
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

    @property
    def spool_dir(self) -> Path:
        return self.root / _STAGING

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, source: Path) -> StoredObject:
        with open(source, "rb") as src:
            return self._write(key, src)

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self._write(key, io.BytesIO(data))

    def put_once(self, key: str, source: Path, *, move: bool = False) -> bool:
        target = self._path(key)
        try:
            if target.exists():
                if move:
                    source.unlink()
                return False
            if not move:
                self.put_file(key, source)
                return True
            os.chmod(source, 0o600)  # the caller's spool file may have the umask's mode
            _fsync_path(source)
            _make_dirs_durable(target.parent)
            os.replace(source, target)
            _fsync_path(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write object {key}: {exc.strerror or exc}") from exc
        return True

    def _write(self, key: str, src: BinaryIO) -> StoredObject:
        # Stage on the same file system, fsync, rename into place, fsync the directory:
        # readers see the whole object or nothing, and after return it survives a crash.
        target = self._path(key)
        digest = hashlib.sha256()
        size = 0
        tmp_name: str | None = None
        try:
            _make_dirs_durable(self.spool_dir)
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.spool_dir)
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            _make_dirs_durable(target.parent)
            os.replace(tmp_name, target)
            tmp_name = None
            _fsync_path(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write object {key}: {exc.strerror or exc}") from exc
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

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
            if path.is_file() and _STAGING not in path.relative_to(self.root).parts:
                yield path.relative_to(self.root).as_posix()

    def check(self) -> None:
        try:
            _make_dirs_durable(self.spool_dir)
            fd, name = tempfile.mkstemp(prefix=".tmp-check-", dir=self.spool_dir)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise StorageError(f"object store {self.root} is not writable: {exc}") from exc


def _make_dirs_durable(path: Path) -> None:
    # A new directory's entry lives in its parent: fsync the parents of what mkdir created,
    # or a crash could lose the directory holding an acknowledged object. Every directory is
    # made readable by the owner only (0700): the objects are patient data, wherever
    # RDC_STORAGE_URL puts them.
    if path.is_dir():
        return
    missing = [path, *(p for p in path.parents if not p.exists())]
    for created in sorted(missing, key=lambda p: len(p.parts)):
        with contextlib.suppress(FileExistsError):  # made by another writer meanwhile
            created.mkdir(mode=0o700)
        _fsync_path(created.parent)


def _fsync_path(path: Path) -> None:
    """fsync the file or directory at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def get_object_store(settings: Settings | None = None) -> ObjectStore:
    """The configured object store (``RDC_STORAGE_BACKEND``: local or s3)."""
    settings = settings or get_settings()
    if settings.storage_backend == "s3":
        from rdc_core.s3_storage import S3ObjectStore

        assert settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key
        return S3ObjectStore(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key.get_secret_value(),
            bucket=settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
            spool_dir=(settings.data_dir / "spool").resolve(),
        )
    return LocalObjectStore(settings.objects_dir)
