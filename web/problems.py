"""RFC 9457 problem responses for every error the API returns."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rdc_core.db import session_scope
from rdc_core.errors import (
    AuthenticationError,
    ConflictError,
    DatabaseUnavailableError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    RDCError,
    StorageError,
    TooManyAttemptsError,
)
from worklist.audit import record_event

__all__ = ["install_problem_handlers", "problem"]

log = logging.getLogger(__name__)

_STATUS_FOR: list[tuple[type[RDCError], int]] = [
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidInputError, 422),
    (TooManyAttemptsError, 429),
    (StorageError, 503),
    (DatabaseUnavailableError, 503),
]

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _audit_refusal(request: Request, status: int, exc: RDCError) -> None:
    """Every 401 and 403 of the authorisation layer goes to the audit trail, with whoever
    was refused (anonymous for a missing or bad token) and the route."""
    principal = getattr(request.state, "principal", None)
    client = request.client.host if request.client else "unknown"
    try:
        with session_scope() as session:
            record_event(
                session,
                actor=principal.actor if principal else f"anonymous@{client}"[:100],
                org_id=principal.org_id if principal else None,
                action="access_denied" if status == 403 else "authentication_failed",
                object_type="route",
                object_id=f"{request.method} {request.url.path}"[:100],
                detail={"status": status, "reason": str(exc)[:500], "address": client},
            )
    except Exception:  # the refusal stands even when the audit cannot be written
        log.exception("could not audit the refusal of %s %s", request.method, request.url.path)


def install_problem_handlers(app: FastAPI) -> None:
    """Map domain errors, HTTP errors and validation errors to problem responses."""

    @app.exception_handler(RDCError)
    async def _domain_error(request: Request, exc: RDCError) -> JSONResponse:
        status = next((code for cls, code in _STATUS_FOR if isinstance(exc, cls)), 500)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        if isinstance(exc, TooManyAttemptsError):
            headers = {"Retry-After": str(exc.retry_after)}
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        if status in (401, 403) and not getattr(exc, "audited", False):
            await run_in_threadpool(_audit_refusal, request, status, exc)
        extra = {"retry_after": exc.retry_after} if isinstance(exc, TooManyAttemptsError) else {}
        return problem(
            status, str(exc), title=exc.title, instance=request.url.path, headers=headers, **extra
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code,
            str(exc.detail),
            instance=request.url.path,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return problem(
            422, "request parameters are invalid", instance=request.url.path, errors=errors
        )

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request brought (PostgreSQL: a NUL character in
        # text, a number beyond its column's range). Input, not a fault of the service.
        path = request.url.path
        log.warning("%s %s: the database refused a value: %s", request.method, path, exc.orig)
        return problem(
            422,
            "a value in the request cannot be stored or compared "
            "(a NUL character, or a number out of range)",
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return problem(500, "internal error; see the server log", instance=request.url.path)
