"""The lab intake's batches in-process, on this pass's database and object store: the index
rows of a batch written straight on a driver connection (no ORM session per batch), keys
taken inside one batch, a row that fails alone, a broken connection replaced, and the
positive ACK text made from its cached parts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

import lab_results.intake as intake_module
from lab_results.envelope import _ack_text, ack_message, read_envelope
from lab_results.intake import Acknowledgement, LabIntake
from lab_results.models import LabMessage
from rdc_core.db import get_engine, read_session, session_scope
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

    def rows(self) -> dict[str, tuple[str, str, bytes]]:
        """Control ID -> (row ID, object key, stored ACK)."""
        with read_session() as session:
            found = session.execute(
                select(LabMessage.control_id, LabMessage.id, LabMessage.object_key, LabMessage.ack)
            )
            return {r.control_id: (r.id, r.object_key, bytes(r.ack)) for r in found}

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


def queued_together(lab: Intake, messages: list[bytes]) -> list[Acknowledgement]:
    """Send ``messages`` from a thread each, so that they are kept by one batch: the first
    batch's object write waits until all the others are queued behind it."""
    real = intake_module.put_new_objects
    first = threading.Event()
    release = threading.Event()

    def held(store: ObjectStore, items: Any) -> None:
        if not first.is_set():
            first.set()
            release.wait(30)
        real(store, items)

    answers: list[Acknowledgement | None] = [None] * (len(messages) + 1)

    def send(index: int, raw: bytes) -> None:
        answers[index] = lab.send(raw)

    intake_module.put_new_objects = held
    try:
        opener = threading.Thread(target=send, args=(0, oru("OPENER")))
        opener.start()
        assert first.wait(30)
        threads = [
            threading.Thread(target=send, args=(i + 1, raw)) for i, raw in enumerate(messages)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while len(lab.intake._pending) < len(messages) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(lab.intake._pending) == len(messages)  # all in the next batch
        release.set()
        for thread in [opener, *threads]:
            thread.join(30)
    finally:
        intake_module.put_new_objects = real
        release.set()
    assert answers[0] is not None and answers[0].code == "AA"
    done = answers[1:]
    assert all(a is not None for a in done)
    return [a for a in done if a is not None]


def test_keys_taken_within_one_batch(lab: Intake) -> None:
    """One batch: new messages, the same message three times (bytes as sent, then with LF
    for CR), and one key with two different contents. One row per key; the copies get the
    first copy's ACK byte for byte; the other content is refused; no object is left over."""
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
    answers = queued_together(lab, messages)
    codes = [a.code for a in answers]
    assert codes[0] == codes[2] == "AA"
    assert codes[1] == codes[3] == codes[4] == "AA"
    assert answers[1].ack == answers[3].ack == answers[4].ack
    assert sorted(answers[i].outcome for i in (1, 3, 4)) == ["accepted", "duplicate", "duplicate"]
    reused = sorted(answers[5:], key=lambda a: a.code)
    assert [a.code for a in reused] == ["AA", "AE"]
    assert "control ID reused" in reused[1].reason

    rows = lab.rows()
    assert set(rows) == {"OPENER", "NEW-1", "NEW-2", "SAME-1", "REUSED-1"}
    assert rows["SAME-1"][2] == answers[1].ack  # the ACK stored is the one answered
    assert sorted(lab.accepted) == sorted(row[0] for row in rows.values())
    assert lab.objects() == {row[1] for row in rows.values()}  # duplicates' removed


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
    answers = queued_together(lab, [oru("GOOD-1"), oru("BAD-1"), oru("GOOD-2")])
    assert [a.code for a in answers] == ["AA", "AE", "AA"]
    assert "index unavailable" in answers[1].reason
    rows = lab.rows()
    assert set(rows) == {"OPENER", "GOOD-1", "GOOD-2"}
    assert lab.objects() == {row[1] for row in rows.values()}  # the failed one's removed
    assert len(lab.accepted) == 3


def test_a_broken_connection_is_replaced(lab: Intake) -> None:
    assert lab.send(oru("BEFORE-1")).code == "AA"
    held = lab.intake._writer._held
    assert held is not None
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
