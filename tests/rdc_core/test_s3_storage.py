"""The S3 object store against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rdc_core.errors import NotFoundError, StorageError
from rdc_core.s3_storage import S3ObjectStore
from tests.helpers import S3Server

pytestmark = pytest.mark.production  # needs PostgreSQL/S3/Redis: the production pass


def _store(s3: S3Server, bucket: str, tmp_path: Path, **overrides: object) -> S3ObjectStore:
    options: dict = dict(
        endpoint=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        bucket=bucket,
        secure=False,
        region="us-east-1",
        spool_dir=tmp_path / "spool",
    )
    options.update(overrides)
    return S3ObjectStore(**options)


def test_put_once_open_list_delete(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = _store(s3_server, s3_bucket, tmp_path)
    source = tmp_path / "a.dcm"
    source.write_bytes(b"DICM" * 1000)
    assert store.put_once("dicom/1/2/3.dcm", source) is True
    assert source.exists()
    # Keys are content-addressed: a second put writes the same bytes again, and S3 cannot
    # say whether the object existed without another round trip, so "may have created".
    spooled = tmp_path / "b.dcm"
    spooled.write_bytes(b"DICM" * 1000)
    assert store.put_once("dicom/1/2/3.dcm", spooled, move=True) is True
    assert not spooled.exists()
    with store.open("dicom/1/2/3.dcm") as f:
        assert f.read() == b"DICM" * 1000
    assert store.exists("dicom/1/2/3.dcm")
    assert list(store.iter_keys("dicom")) == ["dicom/1/2/3.dcm"]
    store.delete("dicom/1/2/3.dcm")
    store.delete("dicom/1/2/3.dcm")
    assert not store.exists("dicom/1/2/3.dcm")
    with pytest.raises(NotFoundError):
        store.open("dicom/1/2/3.dcm")


def test_large_object_is_uploaded_in_parts_and_read_as_a_stream(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store(s3_server, s3_bucket, tmp_path)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(40 * 1024 * 1024))  # 3 parts of 16 MB
    stored = store.put_file("big/object", source)
    digest = hashlib.sha256()
    with store.open("big/object") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == stored.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


def test_wrong_credentials_and_unreachable_server_raise_storage_error(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    with pytest.raises(StorageError, match=r"InvalidAccessKeyId|SignatureDoesNotMatch|Access"):
        _store(s3_server, s3_bucket, tmp_path, access_key="nobody").check()
    nowhere = _store(s3_server, s3_bucket, tmp_path, endpoint="127.0.0.1:9", first_backoff=0.01)
    with pytest.raises(StorageError):
        nowhere.check()
