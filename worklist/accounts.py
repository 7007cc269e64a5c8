"""Accounts: failed-attempt throttling (logins per username and per client address, signing
passwords per user), token revocation, disabling users.

Failed attempts are rows in the database, not process memory, so every replica counts the
same. An attempt is *reserved* (recorded as a failure) before its password is checked and the
reservation is withdrawn when the password was right: concurrent guesses cannot all pass the
check before the first of them is counted. Counting and reserving happen under a lock per key
(SQLite: the writer lock; PostgreSQL: an advisory lock on the key), and the bcrypt check runs
outside any write transaction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from rdc_core.errors import ConflictError, NotFoundError
from rdc_core.security import verify_password
from rdc_core.settings import get_settings
from worklist.access import Principal, require_roles
from worklist.audit import record_event
from worklist.models import AuthFailure, Role, User

__all__ = [
    "LOGIN_ADDRESS",
    "LOGIN_USER",
    "SIGNING",
    "Attempt",
    "check_user_password",
    "disable_user",
    "release_attempt",
    "reserve_attempt",
    "revoke_tokens",
]

LOGIN_USER = "login_user"
LOGIN_ADDRESS = "login_address"
SIGNING = "signing"
_KEY_LOCK = 726_382  # pg_advisory_xact_lock(class, hashtext(key)); 726_380/1 are taken
_MAX_KEY = 128


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of :func:`reserve_attempt`: the reserved failure rows to withdraw when
    the password proves right, or how long the caller must wait (locked out)."""

    reserved: tuple[int, ...] = ()
    retry_after: int | None = None

    @property
    def locked(self) -> bool:
        return self.retry_after is not None


def _lock_key(session: Session, scope: str, key: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:cls, hashtext(:key))"),
            {"cls": _KEY_LOCK, "key": f"{scope}:{key}"},
        )


def _wait(session: Session, *, scope: str, key: str, now: datetime) -> int | None:
    """Seconds until ``key`` may try again, or None when it is not locked out."""
    settings = get_settings()
    window = timedelta(seconds=settings.auth_lockout_seconds)
    recent = (
        session.execute(
            select(AuthFailure.at)
            .where(
                AuthFailure.scope == scope,
                AuthFailure.key == key,
                AuthFailure.at > now - window,
            )
            .order_by(AuthFailure.at.desc())
            .limit(settings.auth_max_failures)
        )
        .scalars()
        .all()
    )
    if len(recent) < settings.auth_max_failures:
        return None
    # Locked until the oldest of the last max_failures failures leaves the window.
    return max(1, math.ceil((recent[-1] + window - now).total_seconds()))


def reserve_attempt(session: Session, *, keys: list[tuple[str, str]], now: datetime) -> Attempt:
    """Count the recent failures of every ``(scope, key)``; if any is at the limit
    (``RDC_AUTH_MAX_FAILURES`` within ``RDC_AUTH_LOCKOUT_SECONDS``) answer how long to wait
    and record nothing; otherwise record one failure per key (withdrawn by
    :func:`release_attempt` when the password was right)."""
    keys = [(scope, key[:_MAX_KEY]) for scope, key in keys]
    for scope, key in sorted(keys):  # a fixed order: no deadlock between two requests
        _lock_key(session, scope, key)
    waits = [w for scope, key in keys if (w := _wait(session, scope=scope, key=key, now=now))]
    if waits:
        return Attempt(retry_after=max(waits))
    window = timedelta(seconds=get_settings().auth_lockout_seconds)
    session.execute(delete(AuthFailure).where(AuthFailure.at < now - window))
    rows = [AuthFailure(scope=scope, key=key, at=now) for scope, key in keys]
    session.add_all(rows)
    session.flush()
    return Attempt(reserved=tuple(row.id for row in rows))


def release_attempt(session: Session, *, attempt: Attempt) -> None:
    """The password was right: the reserved failures did not happen."""
    if attempt.reserved:
        session.execute(delete(AuthFailure).where(AuthFailure.id.in_(attempt.reserved)))


def check_user_password(session: Session, *, user_id: str, password: str) -> bool:
    """Whether ``password`` is the (active) user's own password (bcrypt)."""
    user = session.get(User, user_id)
    if user is None or not user.active or not password:
        return False
    return verify_password(password, user.password_hash)


def revoke_tokens(session: Session, *, user_id: str) -> None:
    """Every token issued to the user so far stops working (logout, reset, disable)."""
    session.execute(
        update(User)
        .where(User.id == user_id)
        .values(token_generation=func.coalesce(User.token_generation, 0) + 1)
    )


def disable_user(
    session: Session, *, username: str, principal: Principal | None, actor: str = "cli"
) -> User:
    """Disable ``username``: no more logins, every existing token fails at once.
    ``principal`` None is the administrator's shell (``rdc user disable``)."""
    if principal is not None:
        require_roles(principal, {Role.ADMIN}, lead_only=True)
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise NotFoundError(f"no user {username!r}")
    if principal is not None and principal.user_id == user.id:
        raise ConflictError("administrators cannot disable themselves")
    was_active = user.active
    user.active = False
    session.flush()
    revoke_tokens(session, user_id=user.id)
    record_event(
        session,
        actor=principal.actor if principal else actor,
        org_id=principal.org_id if principal else None,
        action="user.disable",
        object_type="user",
        object_id=user.username,
        detail={"username": username, "before": {"active": was_active}, "after": {"active": False}},
    )
    session.refresh(user)
    return user
