"""Append-only, hash-chained audit trail of access to patient data and of changes.

Each record stores the hash of its predecessor; :func:`verify_chain` recomputes the chain
so that an edited or deleted record is detected.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, String, select, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from rdc_core.db import Base, utcnow
from worklist.access import Principal

__all__ = ["AuditEvent", "record_access", "record_event", "verify_chain"]

_GENESIS = "0" * 64


class AuditEvent(Base):
    """One audited action."""

    __tablename__ = "audit_events"

    # INTEGER on SQLite so the column is the rowid and autoincrements.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(100))
    org_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(100))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


def _digest(
    prev_hash: str,
    at: datetime,
    actor: str,
    org_id: str | None,
    action: str,
    object_type: str,
    object_id: str,
    detail: dict[str, Any],
) -> str:
    canonical = json.dumps(
        [prev_hash, at.isoformat(), actor, org_id, action, object_type, object_id, detail],
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record_event(
    session: Session,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    org_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an audit record in the caller's transaction."""
    if session.get_bind().dialect.name == "postgresql":
        # Serialise appenders so the chain stays linear; released at commit.
        session.execute(text("SELECT pg_advisory_xact_lock(726381)"))
    prev = (
        session.execute(
            select(AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
        ).scalar_one_or_none()
        or _GENESIS
    )
    at = utcnow()
    detail = detail or {}
    event = AuditEvent(
        at=at,
        actor=actor,
        org_id=org_id,
        action=action,
        object_type=object_type,
        object_id=object_id,
        detail=detail,
        prev_hash=prev,
        hash=_digest(prev, at, actor, org_id, action, object_type, object_id, detail),
    )
    session.add(event)
    session.flush()
    return event


def record_access(
    session: Session,
    principal: Principal,
    *,
    action: str,
    object_type: str,
    object_id: str = "*",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append the record of ``principal`` doing ``action`` on an object (or a listing)."""
    return record_event(
        session,
        actor=principal.actor,
        org_id=principal.org_id,
        action=action,
        object_type=object_type,
        object_id=object_id,
        detail=detail,
    )


def verify_chain(session: Session) -> tuple[bool, int | None]:
    """Recompute the chain; returns (intact, first bad sequence number or None)."""
    prev = _GENESIS
    for event in session.execute(select(AuditEvent).order_by(AuditEvent.seq)).scalars():
        expected = _digest(
            prev,
            event.at,
            event.actor,
            event.org_id,
            event.action,
            event.object_type,
            event.object_id,
            event.detail,
        )
        if event.prev_hash != prev or event.hash != expected:
            return False, event.seq
        prev = event.hash
    return True, None
