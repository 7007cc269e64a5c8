"""Object store: where DICOM objects, quarantined input and later reports live.

Keys are ``/``-separated relative paths derived from natural identifiers (UIDs and content
hashes), so writing the same object twice lands in the same place. The local
implementation writes to a temporary file on the same file system, fsyncs it, renames it
into place and fsyncs the directory: after a put returns, the object survives a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import logging
import os
import re
import struct
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from rdc_core.errors import NotFoundError, StorageError
from rdc_core.settings import Settings, get_settings

__all__ = [
    "LocalObjectStore",
    "ObjectStore",
    "StoredObject",
    "get_object_store",
    "put_new_objects",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_STAGING = ".incoming"
_JOURNAL = ".journal"
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
        self._journal: _Journal | None = None  # see put_new_many

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

    def put_new_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Write each ``(key, data)`` durably, with one sync for all of them: the files are
        written in place (not synced), their bytes appended to this process's journal
        segment (:class:`_Journal`), and that segment is fsynced once. The files are synced
        later, in the background, a segment at a time; a segment whose files may not all be
        durable is replayed at start-up (a file missing or different is written again).
        For new keys nobody reads before this returns (an index row refers to them only
        afterwards): a failure or a crash meanwhile leaves at most an unreferenced file."""
        journal = _journal_for(self)
        written: list[Path] = []
        try:
            paths: list[Path] = []
            for key, data in items:
                target = self._path(key)
                _make_dirs_durable(target.parent)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    written.append(target)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
                paths.append(target)
            journal.record([(key, data) for key, data in items], paths)
        except OSError as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise StorageError(f"cannot write objects: {exc.strerror or exc}") from exc

    def open_journal(self) -> None:
        """Replay what processes that died left in the journal (see :class:`_Journal`); a
        process serving writes calls this when it starts, before it answers anyone."""
        try:
            _journal_for(self)
        except OSError as exc:
            raise StorageError(f"cannot open the journal of {self.root}: {exc}") from exc

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
        journal = _journals.get(self.root.resolve())
        if journal is not None:
            journal.forget(key)  # a replay must not write it again
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
            parts = path.relative_to(self.root).parts
            if path.is_file() and _STAGING not in parts and _JOURNAL not in parts:
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


_pool_lock = threading.Lock()
_pool: list[ThreadPoolExecutor] = []


def _sync_pool() -> ThreadPoolExecutor:
    """Threads for blocking writes that should overlap (fsyncs, S3 PUTs)."""
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(max_workers=32, thread_name_prefix="rdc-sync"))
        return _pool[0]


def put_new_objects(store: ObjectStore, items: Sequence[tuple[str, bytes]]) -> None:
    """Write new small objects durably, together: the local store syncs them at once
    (:meth:`LocalObjectStore.put_new_many`); another store (S3: each PUT is durable when it
    returns) writes them concurrently. Raises StorageError; on failure none of them may
    be relied upon."""
    if isinstance(store, LocalObjectStore):
        store.put_new_many(items)
        return
    if len(items) == 1:
        store.put_bytes(*items[0])
        return
    futures = [_sync_pool().submit(store.put_bytes, key, data) for key, data in items]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            if isinstance(error, StorageError):
                raise error
            raise StorageError(f"cannot write objects: {error}") from error


# --------------------------------------------------------------------------------------
# The journal of the local store's batched writes

_RECORD = struct.Struct(">cHII")  # kind (O: object, D: deleted), key length, data length, CRC
_SEGMENT_SECONDS = 1.0  # a segment older than this is synced and retired in the background
_SEGMENT_BYTES = 64 << 20


class _Journal:
    """Append-only segment files below ``<store>/.journal``: the durable copy of the objects
    :meth:`LocalObjectStore.put_new_many` wrote without syncing each file (a new file is
    durable only after an fsync of it and of its directory, ~10 times the cost of appending
    to an open file and syncing that).

    Each process appends to its own segment, held under an exclusive ``flock``. A
    background thread retires a segment once it is ``_SEGMENT_SECONDS`` old: new writes go
    to a fresh segment, the file system is synced (``syncfs``; the files of the old segment
    are then durable) and the old segment is removed. A segment nobody holds (its process
    died) is replayed: every object it records is compared with its file and written again,
    durably, when missing or different; objects deleted later (a ``D`` record) are
    removed; then the segment is removed. That runs when a process first writes to the
    store, and at every retirement."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.directory = root / _JOURNAL
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._size = 0
        self._keys: set[str] = set()
        _make_dirs_durable(self.directory)
        self.replay_orphans()
        thread = threading.Thread(target=self._retire_forever, name="rdc-journal", daemon=True)
        thread.start()

    def _open_segment(self) -> int:
        path = self.directory / f"{os.getpid()}-{uuid.uuid4().hex}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _fsync_path(self.directory)  # the segment's entry: once per segment
        self._fd, self._path, self._opened, self._size = fd, path, time.monotonic(), 0
        self._keys = set()
        return fd

    def record(self, items: Sequence[tuple[str, bytes]], paths: Sequence[Path]) -> None:
        """Append the objects (written to ``paths``) and sync: durable when this returns."""
        chunks: list[bytes] = []
        for key, data in items:
            encoded = key.encode()
            crc = zlib.crc32(data, zlib.crc32(encoded))
            chunks += (_RECORD.pack(b"O", len(encoded), len(data), crc), encoded, data)
        blob = b"".join(chunks)
        with self._lock:
            fd = self._fd if self._fd is not None else self._open_segment()
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            self._size += len(blob)
            self._keys.update(key for key, _ in items)
            os.fdatasync(fd)

    def forget(self, key: str) -> None:
        """``key`` is deleted: record it, so that a replay does not write it again."""
        with self._lock:
            if self._fd is None or key not in self._keys:
                return
            encoded = key.encode()
            os.write(self._fd, _RECORD.pack(b"D", len(encoded), 0, zlib.crc32(encoded)) + encoded)
            self._keys.discard(key)

    def _retire_forever(self) -> None:
        while True:
            time.sleep(_SEGMENT_SECONDS / 2)
            try:
                self.retire()
            except Exception:
                log.exception("object store journal: retiring a segment failed")

    def retire(self, *, force: bool = False) -> None:
        """Sync the files of the current segment and remove it (once it is old enough)."""
        with self._lock:
            fd, path = self._fd, self._path
            old = time.monotonic() - self._opened >= _SEGMENT_SECONDS
            if fd is None or path is None or not (force or old or self._size > _SEGMENT_BYTES):
                return
            self._fd = self._path = None  # the next write opens a new segment
        _sync_file_system(self.root)
        path.unlink()
        os.close(fd)
        self.replay_orphans()

    def replay_orphans(self) -> None:
        for segment in sorted(self.directory.glob("*.seg")):
            try:
                fd = os.open(segment, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's segment
                if not segment.exists():
                    continue  # replayed by another process meanwhile
                with os.fdopen(os.dup(fd), "rb") as f:
                    content = f.read()
                replayed = _replay(LocalObjectStore(self.root), content)
                log.warning("object store journal %s replayed: %d objects", segment.name, replayed)
                segment.unlink()
            finally:
                os.close(fd)


def _replay(store: LocalObjectStore, content: bytes) -> int:
    """Apply a segment's records (up to a torn tail); returns how many objects were written."""
    latest: dict[str, bytes | None] = {}
    at = 0
    while at + _RECORD.size <= len(content):
        kind, key_length, data_length, crc = _RECORD.unpack_from(content, at)
        start = at + _RECORD.size
        end = start + key_length + data_length
        if end > len(content):
            break
        encoded = content[start : start + key_length]
        data = content[start + key_length : end]
        if zlib.crc32(data, zlib.crc32(encoded)) != crc or kind not in (b"O", b"D"):
            break
        latest[encoded.decode()] = data if kind == b"O" else None
        at = end
    written = 0
    for key, recorded in latest.items():
        if recorded is None:
            store.delete(key)
            continue
        try:
            with store.open(key) as f:
                if f.read() == recorded:
                    continue
        except NotFoundError:
            pass
        store.put_bytes(key, recorded)
        written += 1
    return written


_journals: dict[Path, _Journal] = {}
_journals_lock = threading.Lock()


def _journal_for(store: LocalObjectStore) -> _Journal:
    cached: _Journal | None = getattr(store, "_journal", None)
    if cached is not None:
        return cached
    root = store.root.resolve()
    journal = _journals.get(root)
    if journal is None:
        with _journals_lock:
            journal = _journals.get(root)
            if journal is None:
                journal = _journals[root] = _Journal(root)
    store._journal = journal
    return journal


def _sync_file_system(path: Path) -> None:
    """Make everything written to the file system holding ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc is not None and _libc.syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syncfs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()


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
