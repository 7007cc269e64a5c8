"""Sign-in and accounts: POST /api/v1/auth/token (OAuth2 password flow), logout, and
disabling a user."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel

from rdc_core.db import read_session, session_scope
from rdc_core.settings import Settings, get_settings
from web.security import (
    CurrentPrincipal,
    client_address,
    issue_token,
    password_login,
    refuse_foreign_origin,
)
from worklist.accounts import disable_user, revoke_tokens
from worklist.audit import record_access
from worklist.directory import describe_principal
from worklist.schemas import Me

router = APIRouter(prefix="/api/v1", tags=["auth"])


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    role: str
    org_id: str


class UserDisabled(BaseModel):
    username: str
    active: bool


@router.post(
    "/auth/token",
    response_model=Token,
    responses={
        401: {"description": "unknown user or wrong password"},
        403: {"description": "Origin null or another site"},
        429: {"description": "too many failed logins for this username or address"},
    },
)
def login(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Token:
    """Exchange username and password for a bearer token. After RDC_AUTH_MAX_FAILURES
    failures within RDC_AUTH_LOCKOUT_SECONDS, for the username or from the address, 429
    with Retry-After, even for the right password."""
    refuse_foreign_origin(request)
    principal = password_login(
        username=form.username, password=form.password, address=client_address(request)
    )
    token, expires_in = issue_token(principal, settings)
    return Token(
        access_token=token,
        expires_in=expires_in,
        role=principal.role.value,
        org_id=principal.org_id,
    )


@router.post("/auth/logout", status_code=204)
def logout(principal: CurrentPrincipal) -> None:
    """End every session of the caller: all their tokens stop working at once."""
    with session_scope() as session:
        revoke_tokens(session, user_id=principal.user_id)
        record_access(
            session, principal, action="logout", object_type="user", object_id=principal.user_id
        )


@router.post("/users/{username}/disable", response_model=UserDisabled)
def disable(username: str, principal: CurrentPrincipal) -> UserDisabled:
    """An administrator disables a user: no more logins, and every token of theirs fails."""
    with session_scope() as session:
        user = disable_user(session, username=username, principal=principal)
        return UserDisabled(username=user.username, active=user.active)


@router.get("/me", response_model=Me)
def me(principal: CurrentPrincipal) -> Me:
    """Who the token belongs to."""
    with read_session() as session:
        return describe_principal(session, principal=principal)
