"""The audit trail is hash-chained: any edited record is detected."""

from __future__ import annotations

from sqlalchemy import text

from rdc_core.db import session_scope
from worklist.audit import record_event, verify_chain


def test_chain_verifies_and_detects_tampering(database: str) -> None:
    with session_scope() as session:
        for i in range(5):
            record_event(
                session,
                actor="user:reader",
                action="view",
                object_type="exam",
                object_id=f"exam-{i}",
                detail={"n": i},
            )
    with session_scope() as session:
        assert verify_chain(session) == (True, None)
        session.execute(text("UPDATE audit_events SET actor='user:nobody' WHERE seq=3"))
    with session_scope() as session:
        assert verify_chain(session) == (False, 3)
