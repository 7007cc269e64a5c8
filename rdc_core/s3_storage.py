"""Object store on S3 (MinIO, SeaweedFS, AWS): the production counterpart of the local store.

Path-style addressing, region configurable. Every call is retried with bounded exponential
backoff on transient failures (connection refused or reset, timeouts, 5xx, SlowDown), so a
short outage costs the sender a little latency; a lasting one raises StorageError and the
DICOM listener answers "out of resources" so the modality retries later. Large objects are
uploaded in parts by the client; reads stream.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error

from rdc_core.errors import NotFoundError, StorageError
from rdc_core.storage import StoredObject

__all__ = ["S3ObjectStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_PART_SIZE = 16 * 1024 * 1024
_TRANSIENT_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "OperationAborted",
}
_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NotFound"}


class _Stream:
    """A streaming object body that returns its connection to the pool when closed."""

    def __init__(self, response: Any) -> None:
        self._response = response

    def read(self, size: int = -1) -> bytes:
        return bytes(self._response.read(None if size < 0 else size))

    def close(self) -> None:
        self._response.close()
        self._response.release_conn()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3ObjectStore:
    """Objects in one S3 bucket; keys are the same as in the local store."""

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool,
        region: str,
        spool_dir: Path,
        attempts: int = 4,
        first_backoff: float = 0.1,
    ) -> None:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=60.0),
            retries=False,  # retried here, with our own bound
            maxsize=32,
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self.bucket = bucket
        self._spool = spool_dir
        self._attempts = attempts
        self._first_backoff = first_backoff
        self._bucket_ready = False

    @property
    def spool_dir(self) -> Path:
        return self._spool

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        delay = self._first_backoff
        for attempt in range(1, self._attempts + 1):
            try:
                return operation()
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    raise NotFoundError(f"no object: {what}") from exc
                if exc.code not in _TRANSIENT_CODES or attempt == self._attempts:
                    raise StorageError(f"S3 {what} failed: {exc.code}: {exc.message}") from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt == self._attempts:
                    raise StorageError(f"S3 {what} failed: {exc}") from exc
            log.warning(
                "S3 %s failed (attempt %d of %d); retrying in %.1fs",
                what,
                attempt,
                self._attempts,
                delay,
            )
            time.sleep(delay)
            delay *= 3
        raise AssertionError("unreachable")

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return

        def ensure() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    # Another thread's first write created it meanwhile (an ECG record's
                    # header and signal files are written side by side).
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        self._call(f"create bucket {self.bucket}", ensure)
        self._bucket_ready = True

    def put_file(self, key: str, source: Path) -> StoredObject:
        self._ensure_bucket()
        digest = hashlib.sha256()
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        size = source.stat().st_size
        self._call(
            f"put {key}",
            lambda: self._client.fput_object(self.bucket, key, str(source), part_size=_PART_SIZE),
        )
        return StoredObject(key=key, size=size, sha256=digest.hexdigest())

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        import io

        self._ensure_bucket()
        self._call(
            f"put {key}",
            lambda: self._client.put_object(self.bucket, key, io.BytesIO(data), len(data)),
        )
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def put_once(self, key: str, source: Path, *, move: bool = False) -> bool:
        # S3 acknowledges a PUT only once the object is stored, so success here means the
        # object survives what the server promises to survive. Keys are derived from the
        # content, so a PUT over an existing object writes the same bytes: asking first
        # (a HEAD) would cost a round trip per object on the C-STORE path and still race
        # with other writers. Hence "may have created" (see ObjectStore.put_once).
        self._ensure_bucket()
        self._call(
            f"put {key}",
            lambda: self._client.fput_object(self.bucket, key, str(source), part_size=_PART_SIZE),
        )
        if move:
            source.unlink(missing_ok=True)
        return True

    def open(self, key: str) -> BinaryIO:
        self._ensure_bucket()
        response = self._call(f"get {key}", lambda: self._client.get_object(self.bucket, key))
        return _Stream(response)  # type: ignore[return-value]

    def exists(self, key: str) -> bool:
        self._ensure_bucket()
        try:
            self._call(f"stat {key}", lambda: self._client.stat_object(self.bucket, key))
        except NotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        self._ensure_bucket()
        self._call(f"delete {key}", lambda: self._client.remove_object(self.bucket, key))

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        self._ensure_bucket()
        objects = self._call(
            f"list {prefix}",
            lambda: list(self._client.list_objects(self.bucket, prefix=prefix, recursive=True)),
        )
        for obj in sorted(objects, key=lambda o: o.object_name or ""):
            if obj.object_name and not obj.is_dir:
                yield obj.object_name

    def check(self) -> None:
        self._bucket_ready = False
        self._ensure_bucket()
