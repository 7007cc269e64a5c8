"""Group commit: units share transactions, but each succeeds or fails on its own."""

from __future__ import annotations

import threading
import time

from sqlalchemy import text

from rdc_core.db import on_rollback, read_session
from rdc_core.errors import DatabaseUnavailableError
from rdc_core.group_commit import GroupCommitter


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
        while len(committer._pending) < k and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(committer._pending) == 3
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
