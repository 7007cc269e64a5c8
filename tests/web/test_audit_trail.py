"""The audit trail is tamper-evident in fact: the database refuses UPDATE and DELETE, and
``rdc audit verify`` (a subprocess) finds an edited, deleted or re-hashed record and a
truncated trail, however the attacker got round the refusal; ``GET /api/v1/audit/verify``
answers QC and administrators; the periodic verification shows a failure in /readyz and
/metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from tests.helpers import HTTP_TIMEOUT, RdcServer, database_url, index_db, rdc_cli, wait_for
from worklist.audit import GENESIS, AuditEvent, AuditSeal, event_digest, rolled_back_digest

_RECORD = """
import sys
from rdc_core.db import session_scope
from rdc_core.migrate import upgrade_database
from worklist.audit import record_event

upgrade_database()
with session_scope() as session:
    for i in range(int(sys.argv[1])):
        record_event(session, actor="user:reader", action="view", object_type="exam",
                     object_id=f"exam-{i}", detail={"i": i, "患者": "王芳"})
"""


@pytest.fixture
def rdc_env(rdc_env: dict[str, str]) -> dict[str, str]:
    """Every deployment of this module verifies its trail every second (the shipped
    default is daily) and seals every half second."""
    rdc_env["RDC_AUDIT_VERIFY_INTERVAL_SECONDS"] = "1"
    rdc_env["RDC_AUDIT_SEAL_INTERVAL_SECONDS"] = "0.5"
    return rdc_env


@pytest.fixture
def trail(rdc_env: dict[str, str]) -> dict[str, str]:
    """A deployment whose trail holds 12 records."""
    result = subprocess.run(
        [sys.executable, "-c", _RECORD, "12"],
        env=rdc_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return rdc_env


def _verify(env: dict[str, str]) -> tuple[int, dict[str, Any], str]:
    result = rdc_cli(env, "audit", "verify", "--json", check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout), result.stderr


@contextmanager
def attacker(env: dict[str, str]) -> Iterator[Session]:
    """A session with the owner's (superuser's) rights that first gets round the triggers,
    as an attacker would; committed at the end."""
    engine = sqlalchemy.create_engine(database_url(env), poolclass=sqlalchemy.pool.NullPool)
    try:
        with Session(engine) as session:
            for table in ("audit_events", "audit_seals"):
                if engine.dialect.name == "sqlite":
                    for operation in ("update", "delete"):
                        session.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{operation}"))
                else:
                    session.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            yield session
            session.commit()
    finally:
        engine.dispose()


def _rehash_from(session: Session, seq: int) -> None:
    """Recompute every seal from ``seq`` on, as someone who read the source would."""
    session.flush()
    prev = session.scalar(select(AuditSeal.hash).where(AuditSeal.seq == seq - 1)) or GENESIS
    for seal in session.scalars(
        select(AuditSeal).where(AuditSeal.seq >= seq).order_by(AuditSeal.seq)
    ).all():
        event = session.get(AuditEvent, seal.seq)
        if event is None:
            prev = rolled_back_digest(prev, seal.seq)
        else:
            session.refresh(event)
            prev = event_digest(
                prev,
                event.at,
                event.actor,
                event.org_id,
                event.action,
                event.object_type,
                event.object_id,
                event.detail,
            )
        seal.hash = prev
    session.flush()


def test_database_refuses_update_and_delete_of_audit_rows(trail: dict[str, str]) -> None:
    assert _verify(trail)[0] == 0  # seals the records, so audit_seals has rows too
    statements = [
        "UPDATE audit_events SET actor = 'user:nobody' WHERE seq = 3",
        "DELETE FROM audit_events WHERE seq = 12",
        "UPDATE audit_seals SET hash = 'x' WHERE seq = 3",
        "DELETE FROM audit_seals WHERE seq >= 10",
    ]
    with index_db(trail) as db:
        if db.dialect == "postgresql":
            statements += ["TRUNCATE audit_events", "TRUNCATE audit_seals"]
        for statement in statements:
            with pytest.raises(sqlalchemy.exc.DBAPIError, match="append-only"):
                db.execute(statement)
            db.conn.rollback()
        assert db.execute("SELECT count(*) FROM audit_events").fetchone()[0] == 12
        assert db.execute("SELECT actor FROM audit_events WHERE seq = 3").fetchone()[0] == (
            "user:reader"
        )
    assert _verify(trail)[0] == 0


def test_verify_finds_an_edited_record(trail: dict[str, str]) -> None:
    code, report, _ = _verify(trail)
    assert code == 0 and report["intact"] and report["records"] == 12
    with attacker(trail) as session:
        session.execute(text("UPDATE audit_events SET object_id = 'exam-99' WHERE seq = 5"))
    code, report, message = _verify(trail)
    assert code == 1 and not report["intact"]
    assert report["first_bad_seq"] == 5
    assert "seq 5" in message and "changed" in message


def test_verify_finds_a_deleted_record(trail: dict[str, str]) -> None:
    assert _verify(trail)[0] == 0
    with attacker(trail) as session:
        session.execute(text("DELETE FROM audit_events WHERE seq = 7"))
    code, report, message = _verify(trail)
    assert (code, report["first_bad_seq"]) == (1, 7)
    assert "deleted" in message


def test_verify_finds_a_rehashed_chain_and_a_truncated_trail(trail: dict[str, str]) -> None:
    """Re-hashing the chain after an edit, or cutting its end off, leaves the database
    consistent with itself; the signed checkpoints outside it do not agree."""
    checkpoint = rdc_cli(trail, "audit", "checkpoint")
    assert "seq 12" in checkpoint.stderr
    assert _verify(trail)[0] == 0

    with attacker(trail) as session:
        session.execute(text("UPDATE audit_events SET actor = 'user:nobody' WHERE seq = 4"))
        _rehash_from(session, 4)
    code, report, message = _verify(trail)
    assert code == 1 and report["first_bad_seq"] == 12
    assert "checkpoint" in message and "after seq 0 up to 12" in message

    # Put the record back, then remove the last three records and their seals.
    with attacker(trail) as session:
        session.execute(text("UPDATE audit_events SET actor = 'user:reader' WHERE seq = 4"))
        _rehash_from(session, 4)
    assert _verify(trail)[0] == 0
    with attacker(trail) as session:
        session.execute(text("DELETE FROM audit_events WHERE seq > 9"))
        session.execute(text("DELETE FROM audit_seals WHERE seq > 9"))
    code, report, message = _verify(trail)
    assert code == 1 and report["first_bad_seq"] == 10
    assert "truncated" in message and "seq 12" in message


def test_checkpoint_signed_with_another_key_is_refused(trail: dict[str, str]) -> None:
    assert "seq 12" in rdc_cli(trail, "audit", "checkpoint").stderr
    second = subprocess.run(
        [sys.executable, "-c", _RECORD, "2"], env=trail, capture_output=True, timeout=120
    )
    assert second.returncode == 0
    forged = {**trail, "RDC_SECRET_KEY": "someone-else-s-key-0000000000000000000"}
    assert "seq 14" in rdc_cli(forged, "audit", "checkpoint").stderr
    code, report, message = _verify(trail)
    assert (code, report["first_bad_seq"]) == (1, 14)
    assert "not signed with this deployment's key" in message
    assert "nothing written" in rdc_cli(trail, "audit", "checkpoint").stderr


def _audit_gauge(server: RdcServer) -> float | None:
    text_format = httpx.get(f"{server.http}/metrics", timeout=HTTP_TIMEOUT).text
    for family in text_string_to_metric_families(text_format):
        if family.name == "rdc_audit_chain_intact":
            return float(family.samples[0].value)
    return None


def _readyz_audit(server: RdcServer) -> dict[str, Any]:
    response = httpx.get(f"{server.http}/readyz", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200  # a broken trail is shown, it does not stop reading
    detail: dict[str, Any] = response.json()["audit"]
    return detail


def test_verify_api_and_the_periodic_check(
    server: RdcServer, alliance: dict[str, str], rdc_env: dict[str, str]
) -> None:
    rdc_cli(
        rdc_env,
        "user",
        "add",
        "--username",
        "qc",
        "--role",
        "qc",
        "--org",
        "LEAD",
        "--password-stdin",
        input="pw-qc-12345\n",
    )
    admin = server.client("admin", alliance["admin"])
    qc = server.client("qc", "pw-qc-12345")
    assert admin.get("/api/v1/exams").status_code == 200  # an audited read
    for user in ("reader", "tech_a"):
        refused = server.client(user, alliance[user]).get("/api/v1/audit/verify")
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
    answer = qc.get("/api/v1/audit/verify")
    assert answer.status_code == 200, answer.text
    assert answer.json()["intact"] is True and answer.json()["records"] >= 1
    wait_for(lambda: _readyz_audit(server).get("intact") is True, what="readyz: intact")
    wait_for(lambda: _audit_gauge(server) == 1.0, what="rdc_audit_chain_intact 1")

    with index_db(rdc_env) as db:
        seq = db.execute(
            "SELECT max(e.seq) FROM audit_events e JOIN audit_seals s ON s.seq = e.seq"
        ).fetchone()[0]
    with attacker(rdc_env) as session:
        session.execute(text(f"UPDATE audit_events SET actor = 'user:mallory' WHERE seq = {seq}"))

    # The periodic verification finds it, without anyone asking.
    detail = wait_for(
        lambda: (d := _readyz_audit(server)).get("intact") is False and d,
        timeout=60,
        what="readyz: not intact",
    )
    assert detail["first_bad_seq"] == seq and "changed" in detail["reason"]
    wait_for(lambda: _audit_gauge(server) == 0.0, what="rdc_audit_chain_intact 0")
    answer = admin.get("/api/v1/audit/verify").json()
    assert (answer["intact"], answer["first_bad_seq"]) == (False, seq)
