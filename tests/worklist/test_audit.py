"""The audit trail: records are appended without a lock and chained (sealed) apart; the
chain check finds edited, deleted and inserted records and gaps of rolled-back numbers.

The database refuses changes (tests/web/test_audit_trail.py checks that, and the CLI); here
the attacker goes around the triggers, as someone with the owner's rights would."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from sqlalchemy import select, text

from rdc_core.db import get_engine, read_session, session_scope, utcnow
from rdc_core.migrate import alembic_config, upgrade_database
from worklist.audit import (
    AuditEvent,
    AuditSeal,
    audited_read,
    check_chain,
    record_event,
    seal_pending,
    verify_chain,
)


def bypass_triggers(session: Any) -> None:
    """What an attacker with the owner's (or a superuser's) rights does first."""
    if session.get_bind().dialect.name == "sqlite":
        for table in ("audit_events", "audit_seals"):
            for operation in ("update", "delete"):
                session.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{operation}"))
    else:
        for table in ("audit_events", "audit_seals"):
            session.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))


def _record(n: int, *, start: int = 0) -> None:
    with session_scope() as session:
        for i in range(start, start + n):
            record_event(
                session,
                actor="user:reader",
                action="view",
                object_type="exam",
                object_id=f"exam-{i}",
                detail={"n": i, "名": "王芳"},
            )


def _seal(grace: float = 0.0) -> Any:
    with session_scope() as session:
        return seal_pending(session, now=utcnow(), grace_seconds=grace)


def test_chain_verifies_and_detects_tampering(database: str) -> None:
    _record(5)
    with read_session() as session:
        report = check_chain(session)
    assert report.intact and report.sealed_through == 0 and report.unsealed == 5
    assert _seal().sealed == 5
    with read_session() as session:
        assert verify_chain(session) == (True, None)
        assert check_chain(session).records == 5
    with session_scope() as session:
        bypass_triggers(session)
        session.execute(text("UPDATE audit_events SET actor='user:nobody' WHERE seq=3"))
    with read_session() as session:
        report = check_chain(session)
    assert (report.intact, report.first_bad_seq) == (False, 3)
    assert "changed" in (report.reason or "")


def test_deleted_and_inserted_records_are_found(database: str) -> None:
    _record(6)
    _seal()
    with session_scope() as session:
        bypass_triggers(session)
        session.execute(text("DELETE FROM audit_events WHERE seq=4"))
    with read_session() as session:
        report = check_chain(session)
    assert (report.intact, report.first_bad_seq) == (False, 4)
    assert report.reason == "sealed record deleted"

    with session_scope() as session:
        session.execute(text("DELETE FROM audit_seals WHERE seq=4"))  # hide it: the seal too
    with read_session() as session:
        report = check_chain(session)
    assert (report.intact, report.first_bad_seq) == (False, 4)
    assert "missing" in (report.reason or "")


def test_gaps_wait_for_open_transactions_then_seal_as_rolled_back(database: str) -> None:
    """A sequence number taken by a transaction that rolled back leaves a gap (PostgreSQL);
    the sealer waits for it during the grace period, then records it in the chain."""
    _record(2)
    with session_scope() as session:  # seq 3 and 4 "rolled back": the next record is 5
        session.add(
            AuditEvent(
                seq=5,
                at=utcnow(),
                actor="user:reader",
                action="view",
                object_type="exam",
                object_id="exam-5",
                detail={},
            )
        )
    waiting = _seal(grace=300)
    assert (waiting.sealed, waiting.head_seq, waiting.waiting) == (2, 2, True)
    with read_session() as session:
        assert check_chain(session).unsealed == 1

    # Once the record after the gap is older than the grace period, the gap is sealed.
    with session_scope() as session:
        done = seal_pending(session, now=utcnow() + timedelta(seconds=301), grace_seconds=300)
    assert (done.sealed, done.rolled_back, done.head_seq) == (1, 2, 5)
    with read_session() as session:
        kinds = session.execute(select(AuditSeal.seq, AuditSeal.kind)).all()
        assert [k for _, k in sorted(kinds)] == ["event", "event"] + ["rolled_back"] * 2 + ["event"]
        assert verify_chain(session) == (True, None)

    # A record slipped in later under a number sealed as unused is found.
    with session_scope() as session:
        bypass_triggers(session)
        session.add(
            AuditEvent(
                seq=3,
                at=utcnow(),
                actor="user:x",
                action="view",
                object_type="exam",
                object_id="e",
                detail={},
            )
        )
    with read_session() as session:
        report = check_chain(session)
    assert (report.intact, report.first_bad_seq) == (False, 3)


def test_record_rolls_back_with_its_transaction(database: str) -> None:
    _record(1)
    try:
        with session_scope() as session:
            record_event(session, actor="user:a", action="change", object_type="org", object_id="x")
            raise RuntimeError("the change failed")
    except RuntimeError:
        pass
    _record(1, start=1)
    _seal()
    with read_session() as session:
        ids = session.scalars(select(AuditEvent.object_id).order_by(AuditEvent.seq)).all()
        assert ids == ["exam-0", "exam-1"]
        assert verify_chain(session) == (True, None)


# --- the chain of the earlier scheme (hash columns in audit_events) -------------------------


def _legacy_digest(prev: str, at: str, n: int) -> str:
    canonical = json.dumps(
        [prev, at, "user:reader", None, "view", "exam", f"exam-{n}", {"n": n}],
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _legacy_database(url: str, *, tamper: int | None) -> None:
    """A database at migration 0007 with five records chained as the earlier code did,
    with a gap at seq 3 (a rolled-back transaction), optionally one record edited."""
    command.upgrade(alembic_config(url), "0007")
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    prev = "0" * 64
    with engine.begin() as conn:
        for seq in (1, 2, 4, 5, 6):
            at = (utcnow() - timedelta(days=1, seconds=-seq)).replace(microsecond=123456)
            digest = _legacy_digest(prev, at.isoformat(), seq)
            actor = "user:mallory" if seq == tamper else "user:reader"
            conn.execute(
                text(
                    "INSERT INTO audit_events (seq, at, actor, org_id, action, object_type, "
                    "object_id, detail, prev_hash, hash) VALUES (:seq, :at, :actor, NULL, "
                    "'view', 'exam', :oid, :detail, :prev, :hash)"
                ),
                {
                    "seq": seq,
                    "at": at if conn.dialect.name == "postgresql" else at.isoformat(" "),
                    "actor": actor,
                    "oid": f"exam-{seq}",
                    "detail": json.dumps({"n": seq}),
                    "prev": prev,
                    "hash": digest,
                },
            )
            prev = digest
    engine.dispose()


def test_earlier_chain_is_sealed_by_the_migration(database_url: str | None, tmp_path: Path) -> None:
    for tamper in (None, 4):
        url = database_url or f"sqlite:///{tmp_path / f'legacy-{tamper}.db'}"
        if database_url and tamper:
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            with engine.begin() as conn:
                conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
            engine.dispose()
        _legacy_database(url, tamper=tamper)
        upgrade_database(url)
        with read_session(url) as session:
            report = check_chain(session)
            seals = session.execute(select(AuditSeal.seq, AuditSeal.kind).order_by("seq")).all()
        assert [tuple(s) for s in seals] == [
            (1, "event"),
            (2, "event"),
            (3, "rolled_back"),
            (4, "event"),
            (5, "event"),
            (6, "event"),
        ]
        if tamper is None:
            assert report.intact and report.records == 5
        else:
            assert (report.intact, report.first_bad_seq) == (False, 4)
            assert "before migration 0008" in (report.reason or "")
        get_engine(url).dispose()


def test_audited_read_records_once_the_read_succeeded(database: str) -> None:
    """A read's record is committed before the block is left, and not when it fails."""

    def count() -> int:
        with read_session() as session:
            return len(session.scalars(select(AuditEvent.seq)).all())

    with audited_read() as session:
        record_event(session, actor="user:a", action="list", object_type="exam", object_id="*")
        assert count() == 0  # not committed while the read runs
    assert count() == 1
    try:
        with audited_read() as session:
            record_event(session, actor="user:a", action="view", object_type="exam", object_id="x")
            raise LookupError("no such exam")
    except LookupError:
        pass
    assert count() == 1
    _seal()
    with read_session() as session:
        assert verify_chain(session) == (True, None)
