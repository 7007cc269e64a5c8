"""Group commit: units share transactions, but each succeeds or fails on its own."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from rdc_core.db import execute_direct_many, on_rollback, read_session
from rdc_core.errors import DatabaseUnavailableError
from rdc_core.group_commit import ATTEMPTS, GroupCommitter


def _setup(database: str) -> None:
    from rdc_core.db import session_scope

    with session_scope() as session:
        session.execute(text("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))


def test_failing_unit_is_rolled_back_alone(database: str) -> None:
    _setup(database)
    committer = GroupCommitter()
    undone: list[int] = []
    barrier = threading.Barrier(12)
    outcomes: dict[int, object] = {}

    def unit(k: int) -> None:
        def work(session):  # type: ignore[no-untyped-def]
            on_rollback(session, lambda: undone.append(k))
            session.execute(text("INSERT INTO t VALUES (:k, 'x')"), {"k": k})
            if k == 6:
                # A failing statement: PostgreSQL refuses everything after it in the
                # transaction until it is rolled back to the unit's savepoint.
                session.execute(text("INSERT INTO no_such_table VALUES (1)"))
            if k % 4 == 0:
                raise ValueError(f"unit {k} fails")
            return k * 10

        barrier.wait()
        try:
            outcomes[k] = committer.run(work)
        except Exception as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=unit, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    with read_session() as session:
        stored = {row[0] for row in session.execute(text("SELECT k FROM t"))}
    assert stored == {k for k in range(12) if k % 4 and k != 6}
    assert sorted(undone) == [0, 4, 6, 8]
    assert all(outcomes[k] == k * 10 for k in stored)
    assert all(isinstance(outcomes[k], ValueError) for k in (0, 4, 8))
    assert "no_such_table" in str(outcomes[6])


def _lose_transaction(session) -> None:  # type: ignore[no-untyped-def]
    """Make the database end the whole transaction, as a full disk or a lost connection do."""
    if session.get_bind().dialect.name == "sqlite":
        pages = session.execute(text("PRAGMA page_count")).scalar()
        session.execute(text(f"PRAGMA max_page_count={pages}"))
        # SQLite answers "database or disk is full" and rolls the transaction back.
        session.execute(text("INSERT INTO t VALUES (100, :v)"), {"v": "x" * 100_000})
    else:
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))


def test_a_lost_transaction_fails_every_unit_of_its_batch(database: str) -> None:
    _setup(database)
    committer = GroupCommitter()
    outcomes: dict[int, object] = {}
    leading, release = threading.Event(), threading.Event()

    def blocker(session):  # type: ignore[no-untyped-def]
        leading.set()
        release.wait(30)

    def unit(k: int) -> None:
        def work(session):  # type: ignore[no-untyped-def]
            session.execute(text("INSERT INTO t VALUES (:k, 'x')"), {"k": k})
            if k == 2:
                _lose_transaction(session)
            return k

        try:
            outcomes[k] = committer.run(work)
        except Exception as exc:
            outcomes[k] = exc

    first = threading.Thread(target=committer.run, args=(blocker,))
    first.start()
    assert leading.wait(30)
    # Units 1, 2, 3 queue in this order behind the blocker and then share one transaction.
    threads = []
    for k in (1, 2, 3):
        threads.append(threading.Thread(target=unit, args=(k,)))
        threads[-1].start()
        deadline = time.monotonic() + 30
        while committer.waiting < k and time.monotonic() < deadline:
            time.sleep(0.01)
    assert committer.waiting == 3
    release.set()
    for t in (first, *threads):
        t.join(30)

    # Unit 1 ran before the loss and unit 3 after it: neither may be told it was stored.
    assert all(isinstance(outcomes[k], DatabaseUnavailableError) for k in (1, 2, 3)), outcomes
    with read_session() as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar() == 0

    def after(session):  # type: ignore[no-untyped-def]
        if session.get_bind().dialect.name == "sqlite":
            session.execute(text("PRAGMA max_page_count=1073741823"))
        session.execute(text("INSERT INTO t VALUES (4, 'x')"))
        return 4

    assert committer.run(after) == 4  # the committer goes on


# --- the writer under load: blocked waits, batches that grow, nothing acknowledged lost ------


def _hold_the_writer(database: str):  # type: ignore[no-untyped-def]
    """Take the database's writer from outside the committer: the SQLite writer lock file (as
    another process's transaction would), or on PostgreSQL an exclusive lock of table t.
    Returns the function that lets it go."""
    from rdc_core.db import get_engine

    if database.startswith("sqlite"):
        import fcntl
        import os

        fd = os.open(f"{get_engine(database).url.database}.writer-lock", os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)

        def let_go() -> None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

        return let_go
    conn = get_engine(database).connect()
    conn.execute(text("LOCK TABLE t IN EXCLUSIVE MODE"))

    def let_go_pg() -> None:
        conn.rollback()
        conn.close()

    return let_go_pg


def test_writers_waiting_for_the_lock_share_one_transaction(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Units queued while the writer is held elsewhere go into one transaction; a failure of
    that transaction's commit fails every unit of it (none is told it was stored) and undoes
    each; then the committer goes on."""
    _setup(database)
    commit = Session.commit

    def commit_or_fail(self: Session) -> None:
        # The injected failure: the COMMIT of a transaction a unit marked fails (as a full
        # disk or an I/O error would), after every unit of it ran.
        if self.info.get("fail_commit"):
            raise OperationalError("COMMIT", {}, Exception("disk I/O error (injected)"))
        commit(self)

    monkeypatch.setattr(Session, "commit", commit_or_fail)
    committer = GroupCommitter()
    writers = 16

    def run_all(fail_commit: bool) -> dict[int, object]:
        outcomes: dict[int, object] = {}
        undone: list[int] = []
        entered: list[int] = []

        def unit(k: int) -> None:
            def work(session):  # type: ignore[no-untyped-def]
                entered.append(k)
                on_rollback(session, lambda: undone.append(k))
                session.execute(text("INSERT INTO t VALUES (:k, 'x')"), {"k": k})
                if fail_commit and k % 100 in (0, 5):  # the first unit, and one queued
                    session.info["fail_commit"] = True
                return session.info.setdefault("transaction", object())

            try:
                outcomes[k] = committer.run(work)
            except Exception as exc:
                outcomes[k] = exc

        let_go = _hold_the_writer(database)
        base = 100 if fail_commit else 0
        threads = [threading.Thread(target=unit, args=(base + k,)) for k in range(writers)]
        deadline = time.monotonic() + 60

        def wait_until(condition) -> None:  # type: ignore[no-untyped-def]
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert condition()

        try:
            if database.startswith("sqlite"):
                # The leader waits (blocked) for the lock before it takes any unit: all queue.
                for t in threads:
                    t.start()
                wait_until(lambda: committer.waiting == writers)
            else:
                # The first unit goes alone and waits on the locked table; the rest queue.
                threads[0].start()
                wait_until(lambda: len(entered) == 1)
                for t in threads[1:]:
                    t.start()
                wait_until(lambda: committer.waiting == writers - 1)
        finally:
            let_go()
        for t in threads:
            t.join(60)
        assert len(outcomes) == writers
        if fail_commit:
            assert all(isinstance(o, DatabaseUnavailableError) for o in outcomes.values()), outcomes
            assert sorted(undone) == sorted(outcomes)
        return outcomes

    outcomes = run_all(fail_commit=False)
    transactions = [o for o in outcomes.values() if not isinstance(o, Exception)]
    assert len(transactions) == writers
    # On SQLite the leader took the lock first and then all 16 units; on PostgreSQL the
    # first unit went alone and the 15 queued behind it shared the next transaction.
    shared = writers if database.startswith("sqlite") else writers - 1
    assert max(transactions.count(t) for t in transactions) == shared

    run_all(fail_commit=True)
    with read_session() as session:
        stored = {row[0] for row in session.execute(text("SELECT k FROM t"))}
    assert stored == set(range(writers))


_WRITER = """
import os, sys, threading
from sqlalchemy import text
from rdc_core.group_commit import ATTEMPTS, GroupCommitter

base, per_thread, threads = map(int, sys.argv[1:4])
committer = GroupCommitter()
out = threading.Lock()

def work_for(k):
    def work(session):
        session.execute(text("INSERT INTO t VALUES (:k, 'x')"), {"k": k})
        return session.info.setdefault("transaction", os.urandom(8).hex())
    return work

def writer(n):
    for i in range(per_thread):
        k = base + n * per_thread + i
        transaction = committer.run(work_for(k))
        with out:  # acknowledged: printed only after the commit returned
            print(f"ack {k} {transaction}", flush=True)

pool = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
"""


def test_processes_writing_at_once_lose_nothing_acknowledged_when_one_is_killed(
    database: str,
) -> None:
    """Two processes of eight writer threads each commit through their group committers at
    once (on SQLite they share the writer lock); one is killed with SIGKILL mid-stream. Every
    unit either process acknowledged is in the database, the survivor finishes (the dead
    process's lock went with it), and under this load transactions carry several units."""
    import signal
    import subprocess
    import sys

    _setup(database)
    per_thread, threads = 40, 8
    started = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(base), str(per_thread), str(threads)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for base in (0, 100_000)
    ]
    victim, survivor = started
    assert victim.stdout is not None and survivor.stdout is not None
    acked: list[str] = []
    for line in victim.stdout:
        acked.append(line)
        if len(acked) == 30:
            victim.send_signal(signal.SIGKILL)
            break
    acked += victim.stdout.readlines()
    victim.wait(60)
    survived = survivor.stdout.readlines()
    assert survivor.wait(120) == 0
    assert len(survived) == per_thread * threads

    acks = [line.split() for line in acked + survived]
    with read_session() as session:
        stored = {row[0] for row in session.execute(text("SELECT k FROM t"))}
    assert {int(k) for _, k, _ in acks} <= stored
    assert len(stored) < 2 * per_thread * threads  # the victim really died mid-stream
    by_transaction: dict[str, int] = {}
    for _, _, transaction in acks:
        by_transaction[transaction] = by_transaction.get(transaction, 0) + 1
    assert max(by_transaction.values()) > 1


def test_submitted_units_are_committed_together_by_the_writer_thread(database: str) -> None:
    """submit() returns at once; the committer's writer thread runs every unit waiting into
    one transaction and calls back each unit with its own result or error."""
    _setup(database)
    committer = GroupCommitter()
    decided: dict[int, tuple[object, BaseException | None]] = {}
    all_decided = threading.Event()
    units = 32

    def work_for(k: int):  # type: ignore[no-untyped-def]
        def work(session):  # type: ignore[no-untyped-def]
            session.execute(text("INSERT INTO t VALUES (:k, 'x')"), {"k": k})
            if k == 7:
                raise ValueError("unit 7 fails")
            return session.info.setdefault("transaction", object())

        return work

    def done_for(k: int):  # type: ignore[no-untyped-def]
        def done(result: object, error: BaseException | None) -> None:
            decided[k] = (result, error)
            if len(decided) == units:
                all_decided.set()

        return done

    let_go = _hold_the_writer(database)
    try:
        for k in range(units):
            committer.submit(work_for(k), done_for(k))
        assert not all_decided.is_set()  # nothing is decided while the writer is held
    finally:
        let_go()
    assert all_decided.wait(60)
    assert isinstance(decided[7][1], ValueError)
    transactions = [result for k, (result, _) in decided.items() if k != 7]
    assert all(error is None for k, (_, error) in decided.items() if k != 7)
    assert max(transactions.count(t) for t in transactions) > 1
    with read_session() as session:
        stored = {row[0] for row in session.execute(text("SELECT k FROM t"))}
    assert stored == set(range(units)) - {7}


@pytest.mark.parametrize("bulk_fails", [False, True], ids=["bulk", "bulk-fails"])
def test_a_bulk_writer_writes_a_batch_set_wise(database: str, bulk_fails: bool) -> None:
    """Units naming a bulk writer are offered to it together; those it answers None for, and
    all of them when it raises (its writes rolled back), run their own work."""
    _setup(database)
    committer = GroupCommitter()
    decided: dict[int, tuple[object, BaseException | None]] = {}
    all_decided = threading.Event()
    units = 16
    offered: list[list[int]] = []

    def bulk(session: Session, items: list[int]) -> list[object]:
        offered.append(list(items))
        mine = [k for k in items if k % 2 == 0]
        execute_direct_many(session, _INSERT_T, [{"k": k, "v": "bulk"} for k in mine])
        if bulk_fails:
            raise ValueError("the bulk write fails")
        return [f"bulk {k}" if k % 2 == 0 else None for k in items]

    def work_for(k: int):  # type: ignore[no-untyped-def]
        def work(session):  # type: ignore[no-untyped-def]
            session.execute(text("INSERT INTO t VALUES (:k, 'unit')"), {"k": k})
            return f"unit {k}"

        return work

    def done_for(k: int):  # type: ignore[no-untyped-def]
        def done(result: object, error: BaseException | None) -> None:
            decided[k] = (result, error)
            if len(decided) == units:
                all_decided.set()

        return done

    let_go = _hold_the_writer(database)
    try:
        for k in range(units):
            committer.submit(work_for(k), done_for(k), bulk=(bulk, k))
    finally:
        let_go()
    assert all_decided.wait(60)
    assert max(len(items) for items in offered) > 1
    assert all(error is None for _, error in decided.values())
    by_bulk = set() if bulk_fails else {k for k in range(units) if k % 2 == 0}
    assert {k for k, (result, _) in decided.items() if result == f"bulk {k}"} == by_bulk
    with read_session() as session:
        rows = {k: v for k, v in session.execute(text("SELECT k, v FROM t"))}
    assert rows == {k: "bulk" if k in by_bulk else "unit" for k in range(units)}


_INSERT_T = text("INSERT INTO t (k, v) VALUES (:k, :v)")


class _LostRace(Exception):
    """What a PostgreSQL driver raises for a lost deadlock (SQLite raises none such)."""

    sqlstate = "40P01"


def _lose_race(session: Session) -> None:
    """Fail the current statement as a deadlock victim does (SQLSTATE 40P01)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$")
        )
    raise OperationalError("INSERT", {}, _LostRace("deadlock detected"))


@pytest.mark.parametrize("units", [1, 6])
def test_a_unit_that_lost_a_deadlock_runs_again_and_keeps_what_it_relies_on(
    database: str, units: int
) -> None:
    _setup(database)
    committer = GroupCommitter()
    undone: list[int] = []
    attempts: dict[int, int] = {}
    barrier = threading.Barrier(units)
    outcomes: dict[int, object] = {}

    def unit(k: int) -> None:
        def work(session: Session) -> int:
            attempts[k] = attempts.get(k, 0) + 1
            # Would remove the object the unit stored: must not run while it is tried again.
            on_rollback(session, lambda: undone.append(k))
            session.execute(text("INSERT INTO t VALUES (:k, 'x')"), {"k": k})
            if k % 2 == 0 and attempts[k] < 3:
                _lose_race(session)
            return k * 10

        barrier.wait()
        try:
            outcomes[k] = committer.run(work, order=(-k,))
        except Exception as exc:
            outcomes[k] = exc

    threads = [threading.Thread(target=unit, args=(k,)) for k in range(units)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    with read_session() as session:
        stored = sorted(row[0] for row in session.execute(text("SELECT k FROM t")))
    assert stored == list(range(units))
    assert outcomes == {k: k * 10 for k in range(units)}
    assert undone == []
    assert all(attempts[k] == (3 if k % 2 == 0 else 1) for k in range(units))


def test_a_unit_that_keeps_losing_fails_after_its_attempts_and_is_undone(database: str) -> None:
    _setup(database)
    committer = GroupCommitter()
    undone: list[str] = []
    tries = 0

    def work(session: Session) -> None:
        nonlocal tries
        tries += 1
        on_rollback(session, lambda: undone.append("object removed"))
        _lose_race(session)

    with pytest.raises(DatabaseUnavailableError):
        committer.run(work)
    assert tries == ATTEMPTS
    assert undone == ["object removed"]  # once: after the last attempt only


def _lose_the_first_commit(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the first COMMIT of a transaction that inserted into t lose a race: on PostgreSQL
    a deferred trigger raises a serialization failure (SQLSTATE 40001) once, as a commit-time
    check does; SQLite has no such failure, so its COMMIT is made to raise one."""
    from rdc_core.db import session_scope

    if database.startswith("sqlite"):
        commit = Session.commit
        lost: list[bool] = []

        def commit_or_lose(self: Session) -> None:
            if not lost and self.info.get("inserted"):
                lost.append(True)
                self.rollback()
                raise OperationalError("COMMIT", {}, _SerializationFailure("could not serialize"))
            commit(self)

        monkeypatch.setattr(Session, "commit", commit_or_lose)
        return
    with session_scope() as session:
        session.execute(text("CREATE SEQUENCE commits_of_t"))
        session.execute(
            text(
                "CREATE FUNCTION lose_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF nextval('commits_of_t') = 1 THEN RAISE EXCEPTION 'could not serialize'"
                " USING ERRCODE = '40001'; END IF; RETURN NULL; END $$"
            )
        )
        session.execute(
            text(
                "CREATE CONSTRAINT TRIGGER lose_once AFTER INSERT ON t DEFERRABLE INITIALLY"
                " DEFERRED FOR EACH ROW EXECUTE FUNCTION lose_once()"
            )
        )


class _SerializationFailure(Exception):
    sqlstate = "40001"


def test_a_batch_whose_commit_lost_a_race_is_told_its_result_once(
    database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit that loses a serialization check runs the whole batch again; no caller hears
    anything before the retry committed (a C-STORE answer is sent once, after its row is
    durable), and each hears its own result exactly once."""
    _setup(database)
    _lose_the_first_commit(database, monkeypatch)
    committer = GroupCommitter()
    calls: dict[int, list[tuple[object, BaseException | None, int]]] = {}
    runs: dict[int, int] = {}
    units = 8
    all_decided = threading.Event()

    def work_for(k: int):  # type: ignore[no-untyped-def]
        def work(session: Session) -> int:
            runs[k] = runs.get(k, 0) + 1
            session.execute(text("INSERT INTO t VALUES (:k, 'x')"), {"k": k})
            session.info["inserted"] = True
            return k * 10

        return work

    def done_for(k: int):  # type: ignore[no-untyped-def]
        def done(result: object, error: BaseException | None) -> None:
            with read_session() as session:  # told only once the row is committed
                seen = session.execute(text("SELECT count(*) FROM t WHERE k = :k"), {"k": k})
                calls.setdefault(k, []).append((result, error, seen.scalar_one()))
            if len(calls) == units:
                all_decided.set()

        return done

    let_go = _hold_the_writer(database)
    try:
        for k in range(units):
            committer.submit(work_for(k), done_for(k))
    finally:
        let_go()
    assert all_decided.wait(60)
    assert calls == {k: [(k * 10, None, 1)] for k in range(units)}
    assert max(runs.values()) == 2  # the batch did lose its first commit
