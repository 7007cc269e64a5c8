"""POST /api/v1/auth/token: OAuth2 password flow."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel

from rdc_core.db import read_session, session_scope
from rdc_core.settings import Settings, get_settings
from web.security import CurrentPrincipal, issue_token
from worklist.audit import record_access
from worklist.directory import authenticate, describe_principal
from worklist.schemas import Me

router = APIRouter(prefix="/api/v1", tags=["auth"])


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    role: str
    org_id: str


@router.post("/auth/token", response_model=Token)
def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Token:
    """Exchange username and password for a bearer token."""
    with session_scope() as session:
        principal = authenticate(session, username=form.username, password=form.password)
        record_access(
            session, principal, action="login", object_type="user", object_id=principal.user_id
        )
    token, expires_in = issue_token(principal, settings)
    return Token(
        access_token=token,
        expires_in=expires_in,
        role=principal.role.value,
        org_id=principal.org_id,
    )


@router.get("/me", response_model=Me)
def me(principal: CurrentPrincipal) -> Me:
    """Who the token belongs to."""
    with read_session() as session:
        return describe_principal(session, principal=principal)
