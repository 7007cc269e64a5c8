"""Two gateways on one index receive the same studies at once.

Two ``rdc serve --role dicom`` processes share the database (on the production pass:
PostgreSQL, where their transactions lock the same exam, patient and artifact rows), and
several associations on each send every instance of the same studies in orders of their
own: new exams and patients created by both at once, exams amended (a second modality),
the same SOP instances indexed by both. Every C-STORE must succeed (a lost deadlock is run
again, not answered with a failure) and every instance be indexed once, its object kept.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from tests.helpers import (
    IndexConnection,
    RdcServer,
    free_port,
    same_dataset,
    storescu,
    wait_for,
)

STUDIES = 6
PER_STUDY = 8
SENDERS_PER_GATEWAY = 6
HOLDS = 6  # times the exam rows are held while the gateways' batches queue up behind them


def _instances(testdata: Path) -> list[Dataset]:
    """Six new studies of three patients (two each), eight instances a study, the last two
    of another modality (they amend the exam)."""
    template = pydicom.dcmread(testdata / "dicom" / "CT_small.dcm")
    made: list[Dataset] = []
    for study in range(STUDIES):
        study_uid, series_uid = generate_uid(), generate_uid()
        for n in range(PER_STUDY):
            ds = copy.deepcopy(template)
            ds.PatientID = f"RACE-{study // 2}"
            ds.PatientName = f"Race^Patient{study // 2}"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = n + 1
            ds.Modality = "CT" if n < PER_STUDY - 2 else "MR"
            made.append(ds)
    return made


def _alive(thread: threading.Thread) -> bool:
    return thread.is_alive()


def _waiting_on_locks(db: IndexConnection) -> int:
    """PostgreSQL sessions other than this one waiting for a row lock (asked afresh: within
    a transaction pg_stat_activity keeps answering from the snapshot it first took)."""
    db.conn.execute(text("SELECT pg_stat_clear_snapshot()"))
    return int(
        db.conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    )


def _hold_exams(db: IndexConnection) -> None:
    """Lock every exam row in the connection's transaction, never waiting (so the test is
    never part of a deadlock itself): tried again until no gateway holds one."""
    while True:
        try:
            db.conn.execute(text("SELECT id FROM exams FOR UPDATE NOWAIT"))
            return
        except OperationalError:
            db.conn.rollback()
            time.sleep(0.005)


@pytest.fixture
def gateways(
    rdc_env: dict[str, str], alliance: dict[str, str], tmp_path: Path
) -> Iterator[tuple[RdcServer, RdcServer]]:
    second_env = {
        **rdc_env,
        "RDC_HTTP_PORT": str(free_port()),
        "RDC_DICOM_PORT": str(free_port()),
        "RDC_MLLP_PORT": str(free_port()),
    }
    with (
        RdcServer(rdc_env, tmp_path / "first.log", "--role", "dicom") as first,
        RdcServer(second_env, tmp_path / "second.log", "--role", "dicom") as second,
    ):
        yield first, second


def test_overlapping_studies_sent_to_two_gateways_at_once_are_each_indexed_once(
    gateways: tuple[RdcServer, RdcServer], testdata: Path, dcmtk: Path, tmp_path: Path
) -> None:
    instances = _instances(testdata)
    ports = [server.dicom_port for server in gateways]
    first = gateways[0]
    # The instances as files, sent by dcmtk's storescu (one association each) in an order
    # of its own. (Not by pynetdicom's requestor in threads of this process: it sometimes
    # loses an answer that arrives within microseconds of its request, to a race between
    # its reactor thread and the sending thread.)
    folder = tmp_path / "sent"
    folder.mkdir()
    files = []
    for n, ds in enumerate(instances):
        files.append(folder / f"{n:03d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    # Every other study is indexed before the race (its exam then exists to be locked); the
    # others are created by both gateways at once.
    (primed,) = storescu(
        dcmtk, files[:: 2 * PER_STUDY], port=ports[0], calling_ae="CLINIC_A_CT", options=["-v"]
    )
    assert primed.stderr.count("Received Store Response (Success)") == STUDIES // 2, primed.stderr
    senders = len(ports) * SENDERS_PER_GATEWAY
    answers: list[str] = ["" for _ in range(senders)]

    def send(k: int) -> None:
        order = list(files)
        random.Random(k).shuffle(order)
        (result,) = storescu(
            dcmtk, order, port=ports[k % len(ports)], calling_ae="CLINIC_A_CT", options=["-v"]
        )
        answers[k] = f"exit {result.returncode}\n{result.stderr}"

    threads = [threading.Thread(target=send, args=(k,)) for k in range(senders)]
    with first.db() as db:
        postgres = db.dialect == "postgresql"
        for hold in range(HOLDS if postgres else 0):
            # Hold the primed exams' rows: each gateway's writer waits on one, the units of
            # its other associations queue behind it, and on release both gateways write
            # batches of several exams in the orders they arrived in.
            _hold_exams(db)
            if hold == 0:
                for thread in threads:
                    thread.start()
            wait_for(
                lambda: _waiting_on_locks(db) >= len(ports) or not any(map(_alive, threads)),
                timeout=60,
                what="both gateways waiting on the held exams",
            )
            time.sleep(0.5)  # pacing, not measured: let the other associations queue
            db.conn.commit()
        if not postgres:
            for thread in threads:
                thread.start()
    for thread in threads:
        thread.join()
    for answer in answers:
        assert answer.startswith("exit 0\n"), answer
        # storescu -v logs the status of every answer: each instance was stored.
        assert answer.count("Received Store Response (Success)") == len(instances), answer
        assert "Store Failed" not in answer and "Warning" not in answer, answer
    with first.db() as db:
        rows = db.execute("SELECT sop_instance_uid, storage_key, exam_id FROM instances").fetchall()
        artifacts = db.execute("SELECT count(*) FROM artifacts WHERE kind='instance'").fetchone()
        exams = db.execute(
            "SELECT study_instance_uid, instance_count, modalities, has_conflicts FROM exams"
        ).fetchall()
        conflicts = db.execute("SELECT count(*) FROM instance_conflicts").fetchone()
        patients = db.execute("SELECT count(*) FROM patients").fetchone()
    assert sorted(row[0] for row in rows) == sorted(str(ds.SOPInstanceUID) for ds in instances)
    # The primed instances were sent again by every association: duplicates, no new rows.
    assert artifacts is not None and artifacts[0] == len(instances)
    assert conflicts is not None and conflicts[0] == 0
    assert patients is not None and patients[0] == STUDIES // 2
    assert {(str(e[0]), e[1], frozenset(e[2].split("\\")), bool(e[3])) for e in exams} == {
        (str(ds.StudyInstanceUID), PER_STUDY, frozenset({"CT", "MR"}), False) for ds in instances
    }
    # The object of every instance is kept (a lost attempt did not remove what the next
    # one, or the other gateway, indexed) and holds the data set sent.
    sent = {str(ds.SOPInstanceUID): ds for ds in instances}
    for sop, key, _exam in rows:
        stored = first.object_file(key)
        original = stored.with_suffix(".sent.dcm")
        sent[sop].save_as(original, enforce_file_format=True)
        assert same_dataset(original, stored), sop
