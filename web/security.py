"""Bearer tokens (JWT, HS256) and the dependencies that turn them into a Principal."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import jwt
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy import select

from rdc_core.db import read_session, utcnow
from rdc_core.errors import AuthenticationError
from rdc_core.settings import Settings, get_settings
from worklist.access import Principal
from worklist.directory import principal_for_user
from worklist.models import User

__all__ = ["SESSION_COOKIE", "CurrentPrincipal", "issue_token", "principal_from_request"]

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
    claims = {"sub": principal.user_id, "iat": now, "exp": now + lifetime}
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
        return principal_for_user(user)


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def principal_from_request(request: Request, settings: Settings) -> Principal:
    """The principal of a request's bearer token or session cookie (for the UI's pages,
    which redirect to the login page instead of answering 401)."""
    return _principal(request, None, settings)
