"""A refused or failed copy of an object already stored never removes the object of record.

Object keys are derived from the content, so a re-sent copy is written to the very key the
committed instance points at. The undo after a rollback must leave that object alone: on S3
the store cannot tell whether its PUT created the object, so the index decides.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pydicom
import pytest
from sqlalchemy.orm import Session

from dicom_gateway.ingest import IngestResult, ingest_dicom_file
from rdc_core.db import session_scope
from rdc_core.s3_storage import S3ObjectStore
from rdc_core.storage import LocalObjectStore, ObjectStore
from tests.helpers import RdcServer, S3Server, c_store, object_store
from worklist.directory import add_organization, organization_for_ae
from worklist.intake import RecordOutcome
from worklist.models import OrgKind


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.production)])
def server(
    request: pytest.FixtureRequest,
    rdc_env: dict[str, str],
    alliance: dict[str, str],
    tmp_path: Path,
) -> Iterator[RdcServer]:
    """``rdc serve`` on the local store and (production pass) on S3."""
    env = {**rdc_env, "RDC_STORAGE_BACKEND": "local"}
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        env.update(s3.env(request.getfixturevalue("s3_bucket")))
    # What is stored and kept, nothing a background task does: no rdc worker and rdc beat.
    with RdcServer(env, tmp_path / "serve.log", workers=False) as srv:
        yield srv


def test_another_clinics_copy_is_refused_and_the_stored_object_stays(
    server: RdcServer, testdata: Path
) -> None:
    ds = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    assert c_store(server.dicom_port, ds, calling_ae="CLINIC_A_CT") == 0x0000
    with server.db() as db:
        key, size = db.execute("SELECT storage_key, size_bytes FROM instances").fetchone()
    store = object_store(server.env)
    with store.open(key) as f:
        original = f.read()
    assert len(original) == size

    # The same bytes from another clinic go to the same key, then the index refuses them.
    assert c_store(server.dicom_port, ds, calling_ae="CLINIC_B_MR") == 0x0124
    with store.open(key) as f:
        kept = f.read()
    assert hashlib.sha256(kept).digest() == hashlib.sha256(original).digest()
    assert list(store.iter_keys("dicom")) == [key]  # and the refused copy left nothing
    with server.db() as db:
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 1


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.production)])
def empty_store(request: pytest.FixtureRequest, database: str, tmp_path: Path) -> ObjectStore:
    """An empty local store, or (production pass) a fresh bucket on the test S3 server."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    s3: S3Server = request.getfixturevalue("s3_server")
    return S3ObjectStore(
        endpoint=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        bucket=request.getfixturevalue("s3_bucket"),
        secure=False,
        region="us-east-1",
        spool_dir=tmp_path / "spool",
    )


class _Failure(Exception):
    """Stands for anything that makes the index transaction roll back."""


def test_a_resend_that_rolls_back_keeps_the_object_of_record(
    empty_store: ObjectStore, testdata: Path, tmp_path: Path
) -> None:
    with session_scope() as session:
        add_organization(
            session, code="A", name="Clinic A", kind=OrgKind.CLINIC, ae_titles=["A_CT"]
        )

    def ingest(session: Session, name: str) -> IngestResult:
        source = tmp_path / name
        shutil.copyfile(testdata / "dicom" / name, source)
        org = organization_for_ae(session, ae_title="A_CT")
        assert org is not None
        return ingest_dicom_file(
            session,
            store=empty_store,
            source=source,
            calling_ae="A_CT",
            zone=ZoneInfo("Asia/Shanghai"),
            organization=org,
        )

    with session_scope() as session:
        first = ingest(session, "CT_small.dcm")
    assert first.outcome is RecordOutcome.STORED

    # The same file again (same key: same bytes), then the transaction fails. S3 cannot
    # tell whether the PUT created the object; the index says the first copy refers to it.
    with pytest.raises(_Failure), session_scope() as session:
        again = ingest(session, "CT_small.dcm")
        assert (again.outcome, again.storage_key) == (RecordOutcome.DUPLICATE, first.storage_key)
        raise _Failure

    with empty_store.open(first.storage_key) as stored:
        assert stored.read() == (testdata / "dicom" / "CT_small.dcm").read_bytes()

    # A first copy that rolls back leaves nothing behind.
    with pytest.raises(_Failure), session_scope() as session:
        lost = ingest(session, "MR_small.dcm")
        raise _Failure
    assert not empty_store.exists(lost.storage_key)
    assert list(empty_store.iter_keys("dicom")) == [first.storage_key]
