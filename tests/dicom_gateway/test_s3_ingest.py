"""C-STORE into an S3-backed deployment: success only after the PUT, failure when S3 is down."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from tests.helpers import RdcServer, S3Server, same_dataset

pytestmark = pytest.mark.production  # needs PostgreSQL/S3/Redis: the production pass


def _send(server: RdcServer, path: Path) -> int:
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="CLINIC_A_CT")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="RDC")
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def test_s3_backed_ingest_and_outage(
    rdc_env: dict[str, str],
    alliance: dict[str, str],
    s3_server: S3Server,
    s3_bucket: str,
    testdata: Path,
    tmp_path: Path,
) -> None:
    env = {**rdc_env, **s3_server.env(s3_bucket)}
    server = RdcServer(env, tmp_path / "serve.log")
    server.start()
    try:
        ct = testdata / "dicom" / "CT_small.dcm"
        assert _send(server, ct) == 0x0000
        with server.db() as db:
            (key,) = db.execute("SELECT storage_key FROM instances").fetchone()
        client = s3_server.client()
        # Under dicom/ (the audit trail's checkpoints may be stored beside it meanwhile).
        listed = client.list_objects(s3_bucket, prefix="dicom/", recursive=True)
        assert [o.object_name for o in listed] == [key]
        with tempfile.NamedTemporaryFile(suffix=".dcm") as copy:
            client.fget_object(s3_bucket, key, copy.name)
            assert same_dataset(ct, Path(copy.name))
        # Nothing left behind locally (the listener's own receiving directory stays, with
        # the lock file that says it is in use: dicom_gateway.spool).
        spool = server.data_dir / "spool"
        assert [p for p in spool.rglob("*") if not p.is_dir() and p.name != ".owner"] == []

        # S3 goes away: the sender is told to retry, and nothing is indexed.
        mr = testdata / "dicom" / "MR_small.dcm"
        s3_server.stop()
        try:
            assert _send(server, mr) == 0xA700  # Refused: Out of Resources
            with server.db() as db:
                assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 1
        finally:
            s3_server.start()
        assert _send(server, mr) == 0x0000  # the retry goes through
        with server.db() as db:
            assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 2
        assert len(list(client.list_objects(s3_bucket, prefix="dicom/", recursive=True))) == 2
    finally:
        server.stop()
