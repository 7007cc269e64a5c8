"""The SQLite writer gate: one writer at a time across processes, readers never held up."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, text

from rdc_core.db import (
    deferred_sync,
    dispose_engines,
    get_engine,
    insert_ignore,
    new_session,
    session_scope,
    upsert,
)
from rdc_core.errors import DatabaseUnavailableError

_PROBE = """
import fcntl, sys
from sqlalchemy import Column, Integer, MetaData, String, Table, text
from rdc_core.db import read_session
url, lock_path = sys.argv[1], sys.argv[2]
with read_session(url) as session:  # a reader goes ahead while a writer holds the gate
    rows = session.execute(text("SELECT count(*) FROM t")).scalar_one()
with open(lock_path, "a") as lock:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"held {rows}")
    else:
        print(f"free {rows}")
"""


def _probe(url: str, lock_path: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, url, str(lock_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_write_transaction_holds_the_writer_lock_for_other_processes(tmp_path: Path) -> None:
    database = tmp_path / "gate.sqlite3"
    url = f"sqlite:///{database}"
    lock_path = Path(f"{database}.writer-lock")
    try:
        with session_scope(url) as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
            session.execute(text("INSERT INTO t VALUES (1)"))
        assert _probe(url, lock_path) == "free 1"

        writer = new_session(url)
        try:
            writer.execute(text("INSERT INTO t VALUES (2)"))  # BEGIN IMMEDIATE: gate taken
            assert _probe(url, lock_path) == "held 1"  # uncommitted row not seen, lock held
            writer.commit()
        finally:
            writer.close()
        assert _probe(url, lock_path) == "free 2"

        failed = new_session(url)
        try:
            failed.execute(text("INSERT INTO t VALUES (3)"))
            failed.rollback()  # a rollback gives the gate back as well
        finally:
            failed.close()
        assert _probe(url, lock_path) == "free 2"
    finally:
        dispose_engines()


def test_a_deferred_sync_commit_lets_the_writer_lock_go_before_its_disk_sync(
    tmp_path: Path,
) -> None:
    """A session made with defer_sync (the group committer's) commits with
    synchronous=NORMAL: the writer lock is free once COMMIT returned, and the function
    deferred_sync gives makes the commit durable afterwards; every other write transaction
    on the same (pooled) connection commits with synchronous=FULL again."""
    database = tmp_path / "deferred.sqlite3"
    url = f"sqlite:///{database}"
    lock_path = Path(f"{database}.writer-lock")
    try:
        with session_scope(url) as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
            assert session.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL
        writer = new_session(url, defer_sync=True)
        try:
            writer.execute(text("INSERT INTO t VALUES (1)"))
            assert writer.execute(text("PRAGMA synchronous")).scalar_one() == 1  # NORMAL
            writer.commit()
            sync = deferred_sync(writer)
            assert sync is not None
            assert _probe(url, lock_path) == "free 1"  # committed, the gate let go: unsynced
            sync()  # the fdatasync of the WAL the caller waits for before telling anyone
        finally:
            writer.close()
        with session_scope(url) as session:  # the pooled connection used last: the same one
            session.execute(text("INSERT INTO t VALUES (2)"))
            assert session.execute(text("PRAGMA synchronous")).scalar_one() == 2
            assert deferred_sync(session) is None  # durable at COMMIT: nothing to call
    finally:
        dispose_engines()


_HOLDER = """
import fcntl, sys, time
with open(sys.argv[1], "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("holding", flush=True)
    sys.stdin.readline()  # until the test lets go
"""


def test_a_writer_held_up_by_another_process_fails_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rdc_core.db

    database = tmp_path / "held.sqlite3"
    url = f"sqlite:///{database}"
    monkeypatch.setattr(rdc_core.db, "_BUSY_TIMEOUT_SECONDS", 0.5)
    try:
        with session_scope(url) as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, f"{database}.writer-lock"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
            with (
                pytest.raises(DatabaseUnavailableError, match="locked"),
                session_scope(url) as session,
            ):
                session.execute(text("INSERT INTO t VALUES (1)"))
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(timeout=30)
        with session_scope(url) as session:  # the holder is gone: writes go through again
            session.execute(text("INSERT INTO t VALUES (2)"))
        with session_scope(url) as session:
            assert session.execute(text("SELECT n FROM t")).scalars().all() == [2]
    finally:
        dispose_engines()


def test_a_writer_thread_held_up_by_another_fails_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import rdc_core.db

    url = f"sqlite:///{tmp_path / 'threads.sqlite3'}"
    monkeypatch.setattr(rdc_core.db, "_BUSY_TIMEOUT_SECONDS", 0.5)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            with session_scope(url) as session:
                session.execute(text("INSERT INTO t VALUES (2)"))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    try:
        with session_scope(url) as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
        holder = new_session(url)
        try:
            holder.execute(text("INSERT INTO t VALUES (1)"))  # holds the writer gate
            other = threading.Thread(target=write)
            other.start()
            other.join(timeout=30)
            assert isinstance(outcome[0], DatabaseUnavailableError)
            holder.commit()
        finally:
            holder.close()
        write()  # the gate is free again
        assert outcome[1] is None
    finally:
        dispose_engines()


@pytest.mark.parametrize("statement", ["upsert", "insert_ignore"])
def test_a_write_racing_on_a_second_unique_key_lands_once(
    statement: str, database_url: str | None, tmp_path: Path
) -> None:
    """Two transactions writing the same row at once, into a table whose ID derives from a
    second unique key (as patients', exams' and national-ID persons' do). PostgreSQL settles a
    race only on the conflict target: the other unique index raised UniqueViolation in about
    one round in a hundred here. An upsert with ``other_keys`` and an insert_ignore without a
    target (every unique key an arbiter) land every time, on one row."""
    url = database_url or f"sqlite:///{tmp_path / 'race.db'}"
    metadata = MetaData()
    table = Table(
        "write_race",
        metadata,
        Column("id", String(36), primary_key=True),
        Column("natural_key", String(64), unique=True),
        Column("seen", Integer),
    )
    metadata.create_all(get_engine(url))
    errors: list[BaseException] = []
    rounds = 1000
    for number in range(rounds):
        barrier = threading.Barrier(2)

        def write(seen: int, number: int = number, barrier: threading.Barrier = barrier) -> None:
            values = {"id": f"id-{number}", "natural_key": f"key-{number}", "seen": seen}
            try:
                barrier.wait(timeout=30)
                with session_scope(url) as session:
                    if statement == "upsert":
                        row = upsert(
                            session,
                            table,
                            values,
                            conflict=["id"],
                            update=["seen"],
                            returning=["id"],
                            other_keys=True,
                        )
                        assert row.id == values["id"]
                    else:
                        insert_ignore(session, table, values, conflict=())
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(seen,)) for seen in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    with session_scope(url) as session:
        assert session.execute(text("SELECT count(*) FROM write_race")).scalar_one() == rounds
    metadata.drop_all(get_engine(url))
