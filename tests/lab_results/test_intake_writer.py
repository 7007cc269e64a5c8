"""The lab intake's batches in-process, on this pass's database and object store: the index
rows of messages that arrived together written in one transaction straight on a driver
connection (no ORM session), the bytes in the rows (the intake writes no object), keys
taken inside one batch, a row that fails alone, a broken connection replaced, and the
positive ACK text made from its cached parts."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from lab_results.envelope import _ack_text, ack_message, read_envelope
from lab_results.intake import Acknowledgement, LabIntake, intake_idle_seconds
from lab_results.models import LabMessage, LabMessageStatus
from lab_results.processing import WaitingMessage
from lab_results.tasks import _waiting, process_batch, waiting_statement
from rdc_core.db import get_engine, read_session, session_scope
from rdc_core.errors import StorageError
from rdc_core.settings import get_settings
from rdc_core.storage import ObjectStore, get_object_store
from worklist.directory import add_organization
from worklist.models import OrgKind

FACILITY = "WRITER_LAB"
ZONE = ZoneInfo("Asia/Shanghai")


def oru(control_id: str, *, patient: str = "P-1", facility: str = FACILITY) -> bytes:
    return (
        f"MSH|^~\\&|LIS|{facility}|RDC|LEAD|20261205090000+0800||ORU^R01^ORU_R01|{control_id}"
        f"|P|2.5.1\rPID|1||{patient}^^^{facility}^MR||WANG^WU||19700101|M\r"
        "OBR|1|PL-1|F-1|BMP^Basic panel^L|R||20261205070000+0800\r"
        "OBX|1|NM|2823-3^^LN||4.1|mmol/L||N|||F\r"
    ).encode()


class Intake:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.accepted: list[str] = []
        self.intake = LabIntake(store=store, zone=ZONE, on_accepted=self.accepted.append)

    def send(self, raw: bytes) -> Acknowledgement:
        return self.intake.receive(raw, channel="mllp")

    def rows(self) -> dict[str, tuple[str, str, bytes, bytes | None]]:
        """Control ID -> (row ID, object key, stored ACK, the bytes held in the row)."""
        with read_session() as session:
            found = session.execute(
                select(
                    LabMessage.control_id,
                    LabMessage.id,
                    LabMessage.object_key,
                    LabMessage.ack,
                    LabMessage.raw,
                )
            )
            return {r.control_id: (r.id, r.object_key, bytes(r.ack), r.raw) for r in found}

    def objects(self) -> set[str]:
        return set(self.store.iter_keys("hl7/"))


@pytest.fixture
def lab(database: str) -> Iterator[Intake]:
    with session_scope() as session:
        add_organization(
            session,
            code="CLINIC_W",
            name="Clinic W",
            kind=OrgKind.CLINIC,
            hl7_facilities=[FACILITY],
        )
    yield Intake(get_object_store())


def test_keys_taken_within_one_batch(lab: Intake) -> None:
    """One batch: new messages, the same message three times (bytes as sent, then with LF
    for CR), and one key with two different contents. One row per key, holding the bytes
    as received; the copies get the first copy's ACK byte for byte; the other content is
    refused; the intake writes no object (processing does)."""
    same = oru("SAME-1")
    messages = [
        oru("NEW-1"),
        same,
        oru("NEW-2"),
        same,
        same.replace(b"\r", b"\n"),
        oru("REUSED-1", patient="P-1"),
        oru("REUSED-1", patient="P-2"),
    ]
    answers = lab.intake.receive_many(messages, channel="mllp")
    codes = [a.code for a in answers]
    assert codes[0] == codes[2] == "AA"
    assert codes[1] == codes[3] == codes[4] == "AA"
    assert answers[1].ack == answers[3].ack == answers[4].ack
    assert sorted(answers[i].outcome for i in (1, 3, 4)) == ["accepted", "duplicate", "duplicate"]
    reused = sorted(answers[5:], key=lambda a: a.code)
    assert [a.code for a in reused] == ["AA", "AE"]
    assert "control ID reused" in reused[1].reason

    rows = lab.rows()
    assert set(rows) == {"NEW-1", "NEW-2", "SAME-1", "REUSED-1"}
    assert rows["SAME-1"][2] == answers[1].ack  # the ACK stored is the one answered
    assert rows["SAME-1"][3] == same and rows["NEW-2"][3] == messages[2]
    assert rows["REUSED-1"][3] in (messages[5], messages[6])
    assert sorted(lab.accepted) == sorted(row[0] for row in rows.values())
    assert lab.objects() == set()


def _fail_one_insert(dialect: str) -> list[str]:
    if dialect == "sqlite":
        return [
            "CREATE TRIGGER fail_bad BEFORE INSERT ON lab_messages "
            "WHEN NEW.control_id = 'BAD-1' BEGIN SELECT RAISE(ABORT, 'bad row'); END"
        ]
    return [
        "CREATE FUNCTION fail_bad() RETURNS trigger AS $$ BEGIN "
        "IF NEW.control_id = 'BAD-1' THEN RAISE EXCEPTION 'bad row'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER fail_bad BEFORE INSERT ON lab_messages "
        "FOR EACH ROW EXECUTE FUNCTION fail_bad()",
    ]


def test_a_failing_row_fails_only_its_message(lab: Intake) -> None:
    with session_scope() as session:
        for statement in _fail_one_insert(get_engine().dialect.name):
            session.execute(text(statement))
    batch = [oru("GOOD-1"), oru("BAD-1"), oru("GOOD-2")]
    answers = lab.intake.receive_many(batch, channel="mllp")
    assert [a.code for a in answers] == ["AA", "AE", "AA"]
    assert "index unavailable" in answers[1].reason
    rows = lab.rows()
    assert set(rows) == {"GOOD-1", "GOOD-2"}
    assert rows["GOOD-2"][3] == batch[2]
    assert len(lab.accepted) == 2


def test_a_broken_connection_is_replaced(lab: Intake) -> None:
    assert lab.send(oru("BEFORE-1")).code == "AA"
    held = lab.intake._writer._free[-1]  # the connection the last batch used, kept
    engine = get_engine()
    if engine.dialect.name == "sqlite":
        held.driver_connection.close()
    else:
        with engine.connect() as conn:  # the server ends the writer's session
            pid = held.driver_connection.info.backend_pid
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    assert lab.send(oru("AFTER-1")).code == "AA"
    assert set(lab.rows()) == {"BEFORE-1", "AFTER-1"}


def test_the_hot_path_opens_no_orm_session(lab: Intake, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the sender is known, accepting messages (4 threads) opens no ORM session: the
    index rows go straight to a driver connection."""
    assert lab.send(oru("WARM-1")).code == "AA"  # the sender is now cached
    opened = []
    real_init = Session.__init__

    def counting(self: Session, *args: Any, **kwargs: Any) -> None:
        opened.append(threading.current_thread().name)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Session, "__init__", counting)
    codes: list[str] = []

    def sender(n: int) -> None:
        for k in range(10):
            codes.append(lab.send(oru(f"HOT-{n}-{k}")).code)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    monkeypatch.undo()
    assert codes == ["AA"] * 40
    assert opened == []
    with read_session() as session:
        assert session.execute(select(func.count()).select_from(LabMessage)).scalar_one() == 41


def test_positive_acks_from_cached_parts_match_the_full_text(testdata: Path) -> None:
    from datetime import datetime

    now = datetime(2026, 12, 5, 10, 30, 15, tzinfo=ZONE)
    checked = 0
    for path in sorted((testdata / "hl7").rglob("*.hl7")):
        try:
            env = read_envelope(path.read_bytes())
        except Exception:
            continue
        for code in ("AA", "CA"):
            for _ in range(2):  # made, then from the cache
                assert ack_message(env, code=code, now=now, control_id="C1") == _ack_text(
                    env, code=code, now=now, control_id="C1"
                )
        checked += 1
    assert checked >= 8


def test_processing_moves_the_bytes_to_the_object_store(lab: Intake) -> None:
    """The intake keeps a message's bytes in its index row; processing writes them to the
    object store, durably, and only then empties the row. While the store fails (local
    store: a file where its folder goes), processing fails and the bytes stay in the row,
    the message still waiting; once the store is back, it is processed."""
    raw = oru("MOVE-1")
    assert lab.send(raw).code == "AA"
    row_id, key, _, held = lab.rows()["MOVE-1"]
    assert held == raw and lab.objects() == set()
    settings = get_settings()
    waiting = [WaitingMessage(id=row_id, object_key=key, raw=held)]
    if settings.storage_backend == "local":
        blocker = settings.objects_dir / "hl7"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("a file where the store needs a directory")
        try:
            with pytest.raises(StorageError):
                process_batch(waiting, settings)
        finally:
            blocker.unlink()
        assert lab.rows()["MOVE-1"][3] == raw
        with read_session() as session:
            message = session.get(LabMessage, row_id)
            assert message is not None and message.status is LabMessageStatus.RECEIVED
    outcomes = process_batch(waiting, settings)
    assert [o.status for o in outcomes] == ["processed"]
    assert lab.rows()["MOVE-1"][3] is None  # emptied: the object store has the bytes
    assert lab.objects() == {key}
    with lab.store.open(key) as stored:
        assert stored.read() == raw
    # A run that finds the message processed already changes nothing.
    assert [o.status for o in process_batch(waiting, settings)] == ["skipped"]


def test_an_intake_waiting_for_the_writer_counts_as_busy(lab: Intake) -> None:
    """Processing in the same process yields the database writer while the intake works
    (``intake_idle_seconds()`` is 0), also while the intake waits for the writer, which
    processing may be holding. Counted from the last acceptance instead, a waiting intake
    looked idle, processing took its big batches, and the intake waited longer still:
    bench/mllp.py measured 3 to 11 messages a second."""
    assert lab.send(oru("FIRST-1")).code == "AA"
    time.sleep(0.05)
    assert intake_idle_seconds() > 0
    answers: list[Acknowledgement] = []
    engine = get_engine()
    with engine.begin() as conn:
        # The writer taken: SQLite's writer gate (taken at BEGIN); on PostgreSQL a lock
        # that makes the intake's INSERT wait.
        if engine.dialect.name == "postgresql":
            conn.execute(text("LOCK TABLE lab_messages IN SHARE MODE"))
        sender = threading.Thread(target=lambda: answers.append(lab.send(oru("WAIT-1"))))
        sender.start()
        time.sleep(0.5)
        assert sender.is_alive()  # waiting for the writer
        assert intake_idle_seconds() == 0.0
    sender.join(30)
    assert [a.code for a in answers] == ["AA"]
    assert intake_idle_seconds() > 0


def test_waiting_messages_are_found_through_their_index_oldest_first(lab: Intake) -> None:
    """Processing finds the messages still to process through the partial index of waiting
    messages (each index an accepted message's INSERT touches is pages synced before its
    ACK: migration 0025 left the table, its key, its ID and that index), oldest first; a
    processed message leaves it. Row IDs are time-ordered (UUIDv7): a new row's ID goes to
    the end of the ID index, not to a random page of it."""
    for n in range(3):
        assert lab.send(oru(f"WAIT-{n}")).code == "AA"
        time.sleep(0.002)  # IDs of different milliseconds
    rows = lab.rows()
    ids = [rows[f"WAIT-{n}"][0] for n in range(3)]
    assert [uuid.UUID(i).version for i in ids] == [7, 7, 7]
    assert ids == sorted(ids)
    mine = set(ids)
    assert [w.id for w in _waiting(None, limit=1000) if w.id in mine] == ids

    settings = get_settings()
    first = WaitingMessage(id=ids[0], object_key=rows["WAIT-0"][1], raw=rows["WAIT-0"][3])
    assert [o.status for o in process_batch([first], settings)] == ["processed"]
    assert [w.id for w in _waiting(None, limit=1000) if w.id in mine] == ids[1:]

    engine = get_engine()
    with engine.connect() as conn:
        compiled = waiting_statement(limit=50).compile(conn)
        if conn.dialect.name == "sqlite":
            params: Any = tuple(compiled.params[k] for k in compiled.positiontup or ())
            explained = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)
            plan = " ".join(str(row[-1]) for row in explained)
        else:
            conn.exec_driver_sql("SET enable_seqscan = off")  # a small table: ask for an index
            explained = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
            plan = " ".join(str(row[0]) for row in explained)
            conn.rollback()
    assert "ix_lab_messages_waiting" in plan, plan
