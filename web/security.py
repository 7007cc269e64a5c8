"""Bearer tokens (JWT, HS256) and the dependencies that turn them into a Principal."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

import jwt
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from rdc_core.db import read_session, session_scope, utcnow
from rdc_core.errors import (
    AuthenticationError,
    PermissionDeniedError,
    RDCError,
    TooManyAttemptsError,
)
from rdc_core.settings import Settings, get_settings
from worklist.access import Principal
from worklist.accounts import (
    LOGIN_ADDRESS,
    LOGIN_USER,
    SIGNING,
    check_user_password,
    release_attempt,
    reserve_attempt,
)
from worklist.audit import record_access, record_event
from worklist.directory import authenticate, principal_for_user
from worklist.models import User

__all__ = [
    "SESSION_COOKIE",
    "CurrentPrincipal",
    "SigningRefusedError",
    "audited",
    "client_address",
    "confirm_signing",
    "issue_token",
    "password_login",
    "principal_from_request",
    "refuse_foreign_origin",
]

_ALGORITHM = "HS256"
# The web UI keeps the same token in an HttpOnly, SameSite=Strict cookie. Requests that
# change state with it must also carry X-Requested-With (set by the UI's fetch calls), which
# a cross-site form cannot send: the cookie alone never authorises a write.
SESSION_COOKIE = "rdc_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


def issue_token(principal: Principal, settings: Settings) -> tuple[str, int]:
    """A signed access token for ``principal`` and its lifetime in seconds."""
    lifetime = timedelta(minutes=settings.access_token_minutes)
    now = utcnow()
    claims = {
        "sub": principal.user_id,
        "iat": now,
        "exp": now + lifetime,
        "gen": principal.token_generation,
    }
    return jwt.encode(claims, settings.token_secret(), algorithm=_ALGORITHM), int(
        lifetime.total_seconds()
    )


def _principal(
    request: Request,
    bearer: Annotated[str | None, Depends(oauth2_scheme)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Principal:
    token = bearer
    if not token:
        token = request.cookies.get(SESSION_COOKIE)
        if (
            token
            and request.method not in _SAFE_METHODS
            and request.headers.get("x-requested-with") != "rdc"
        ):
            raise AuthenticationError("a cookie-authorised change needs X-Requested-With: rdc")
    if not token:
        raise AuthenticationError("a bearer token is required")
    try:
        claims = jwt.decode(
            token,
            settings.token_secret(),
            algorithms=[_ALGORITHM],
            options={"require": ["exp", "sub"]},
        )
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from exc
    with read_session() as session:
        user = session.execute(select(User).where(User.id == claims["sub"])).scalar_one_or_none()
        if user is None or not user.active or not user.organization.active:
            raise AuthenticationError("the token's user no longer exists or is disabled")
        if claims.get("gen", 0) != (user.token_generation or 0):
            raise AuthenticationError(
                "the token was revoked (logout, password reset or disabled user)"
            )
        principal = principal_for_user(user)
    request.state.principal = principal  # who was refused, for the audit of a 403
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def principal_from_request(request: Request, settings: Settings) -> Principal:
    """The principal of a request's bearer token or session cookie (for the UI's pages,
    which redirect to the login page instead of answering 401)."""
    return _principal(request, None, settings)


def client_address(request: Request) -> str:
    """The caller's address: behind a proxy listed in RDC_FORWARDED_ALLOW_IPS, uvicorn has
    already replaced the proxy's address with the one in X-Forwarded-For."""
    return request.client.host if request.client else "unknown"


def refuse_foreign_origin(request: Request) -> None:
    """Logins only from this site's own pages (or from clients that send no Origin):
    ``Origin: null`` (a sandboxed frame, a data: URL, a redirect chain) and other sites are
    refused, so no other page can log a browser in."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    if origin == "null" or urlsplit(origin).netloc != request.headers.get("host"):
        address = client_address(request)
        with session_scope() as session:
            record_event(
                session,
                actor=f"anonymous@{address}"[:100],
                action="access_denied",
                object_type="route",
                object_id=f"{request.method} {request.url.path}"[:100],
                detail={"status": 403, "reason": "login from another origin", "origin": origin},
            )
        raise audited(PermissionDeniedError(f"login from origin {origin[:100]!r} is refused"))


def audited(exc: RDCError) -> RDCError:
    """Mark an error whose refusal is already in the audit trail (the problem handler
    records every other 401/403)."""
    exc.audited = True  # type: ignore[attr-defined]
    return exc


def password_login(*, username: str, password: str, address: str) -> Principal:
    """Check a login, throttled per username and per client address; every outcome is
    audited. Raises TooManyAttemptsError while either is locked out (whatever the password),
    AuthenticationError for wrong credentials."""
    now = utcnow()
    keys = [(LOGIN_USER, username), (LOGIN_ADDRESS, address)]
    with session_scope() as session:
        attempt = reserve_attempt(session, keys=keys, now=now)
        if attempt.locked:
            _record_login(session, username, address, "login_locked", attempt.retry_after)
    if attempt.retry_after is not None:
        raise audited(
            TooManyAttemptsError(
                "too many failed logins; try again later", retry_after=attempt.retry_after
            )
        )
    principal: Principal | None = None
    # bcrypt outside any write transaction
    with read_session() as session, contextlib.suppress(AuthenticationError):
        principal = authenticate(session, username=username, password=password)
    with session_scope() as session:
        if principal is None:
            _record_login(session, username, address, "login_failed", None)
        else:
            release_attempt(session, attempt=attempt)
            record_access(
                session,
                principal,
                action="login",
                object_type="user",
                object_id=principal.user_id,
                detail={"address": address},
            )
    if principal is None:
        raise audited(AuthenticationError("unknown user or wrong password"))
    return principal


def _record_login(
    session: Session, username: str, address: str, action: str, retry_after: int | None
) -> None:
    detail: dict[str, Any] = {"username": username[:64], "address": address}
    if retry_after is not None:
        detail["retry_after"] = retry_after
    record_event(
        session,
        actor=f"login:{username[:64]}",
        action=action,
        object_type="user",
        object_id=username[:100],
        detail=detail,
    )


def confirm_signing(
    principal: Principal,
    signing_password: str | None,
    *,
    action: str,
    object_type: str,
    object_id: str,
) -> None:
    """A signature is a deliberate act of its signer: the request must carry the signer's
    own password. Missing or wrong: 403 and an audit record, nothing signed; after
    RDC_AUTH_MAX_FAILURES wrong passwords within RDC_AUTH_LOCKOUT_SECONDS signing is locked
    (429 with Retry-After), whatever the password."""
    now = utcnow()

    def refuse(session: Session, reason: str, retry_after: int | None = None) -> None:
        detail: dict[str, Any] = {"signing_action": action, "reason": reason}
        if retry_after is not None:
            detail["retry_after"] = retry_after
        record_access(
            session,
            principal,
            action="sign_refused",
            object_type=object_type,
            object_id=object_id,
            detail=detail,
        )

    if not signing_password:
        with session_scope() as session:
            refuse(session, "no signing password")
        raise audited(SigningRefusedError("signing needs your password (signing_password)"))
    with session_scope() as session:
        attempt = reserve_attempt(session, keys=[(SIGNING, principal.user_id)], now=now)
        if attempt.retry_after is not None:
            refuse(session, "locked", attempt.retry_after)
    if attempt.retry_after is not None:
        raise audited(
            TooManyAttemptsError(
                "signing is locked after too many wrong passwords; try again later",
                retry_after=attempt.retry_after,
            )
        )
    with read_session() as session:
        right = check_user_password(session, user_id=principal.user_id, password=signing_password)
    with session_scope() as session:
        if right:
            release_attempt(session, attempt=attempt)
        else:
            refuse(session, "wrong signing password")
    if not right:
        raise audited(SigningRefusedError("wrong signing password; nothing was signed"))


class SigningRefusedError(PermissionDeniedError):
    """The signing password was missing or wrong."""

    title = "Signature refused"
