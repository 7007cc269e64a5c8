"""Group commit: units share transactions, but each succeeds or fails on its own."""

from __future__ import annotations

import threading

from sqlalchemy import text

from rdc_core.db import on_rollback, read_session
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
