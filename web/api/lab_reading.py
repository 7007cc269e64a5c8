"""Lab reading: the lab physician's review of a held order and the signature of its
report (the page is ``/ui/lab/{exam_id}``).

Every change needs the caller's lease on the exam's work item (claimed through
``/api/v1/worklist/{item}/claim`` as for imaging); signing needs the signer's own
``signing_password`` (403 when wrong, 429 while locked after repeated failures).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from lab_results.reading import (
    LabReadingOut,
    amend_lab_report,
    approve_held,
    check_signable,
    get_reading,
    review_result,
    set_comment,
    sign_lab_report,
)
from rdc_core.db import session_scope, utcnow
from web.security import CurrentPrincipal, confirm_signing
from worklist.models import AmendmentKind

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/lab/exams", tags=["lab"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such lab exam, or not yours to see"}
}
_LEASED: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    409: {"description": "not holding the exam's lease, or the report is signed"},
}


class ResultReviewIn(BaseModel):
    """A decision on one result (``rejected`` needs a ``reason``) and/or its comment."""

    decision: Literal["pending", "approved", "rejected"] | None = None
    reason: str | None = Field(default=None, max_length=2000)
    comment: str | None = Field(default=None, max_length=2000)


class CommentIn(BaseModel):
    comment: str = Field(default="", max_length=10_000)


class SignIn(BaseModel):
    signing_password: str | None = Field(default=None, max_length=256)


@router.get("/{exam_id}/reading", response_model=LabReadingOut, responses=_NOT_FOUND)
def reading(exam_id: str, principal: CurrentPrincipal) -> LabReadingOut:
    """The order's results with units, ranges, flags, the rules that held them, each
    analyte's prior values for the same person, the decisions so far and the report."""
    with session_scope() as session:
        return get_reading(session, principal=principal, exam_id=exam_id)


@router.put(
    "/{exam_id}/results/{result_id}/review", response_model=LabReadingOut, responses=_LEASED
)
def review(
    exam_id: str, result_id: str, body: ResultReviewIn, principal: CurrentPrincipal
) -> LabReadingOut:
    """Approve or reject one result, or comment on it."""
    with session_scope() as session:
        return review_result(
            session,
            principal=principal,
            exam_id=exam_id,
            result_id=result_id,
            decision=body.decision,
            reason=body.reason,
            comment=body.comment,
            now=utcnow(),
        )


@router.post("/{exam_id}/approve-held", response_model=LabReadingOut, responses=_LEASED)
def approve(exam_id: str, principal: CurrentPrincipal) -> LabReadingOut:
    """Approve every held result not decided yet."""
    with session_scope() as session:
        return approve_held(session, principal=principal, exam_id=exam_id, now=utcnow())


@router.put("/{exam_id}/comment", response_model=LabReadingOut, responses=_LEASED)
def comment(exam_id: str, body: CommentIn, principal: CurrentPrincipal) -> LabReadingOut:
    """The reviewer's comment on the whole order (printed on the report)."""
    with session_scope() as session:
        return set_comment(
            session, principal=principal, exam_id=exam_id, comment=body.comment, now=utcnow()
        )


@router.post(
    "/{exam_id}/sign",
    response_model=LabReadingOut,
    responses={
        **_LEASED,
        403: {"description": "signing_password missing or wrong (nothing was signed)"},
        422: {"description": "a held result is still undecided"},
        429: {"description": "signing locked after too many wrong passwords (Retry-After)"},
    },
)
def sign(exam_id: str, principal: CurrentPrincipal, body: SignIn | None = None) -> LabReadingOut:
    """Sign the lab report (final for attending and chief physicians). Needs
    ``{"signing_password": …}``."""
    with session_scope() as session:
        check_signable(session, principal=principal, exam_id=exam_id)
    password = body.signing_password if body else None
    confirm_signing(principal, password, action="submit", object_type="exam", object_id=exam_id)
    with session_scope() as session:
        return sign_lab_report(session, principal=principal, exam_id=exam_id, now=utcnow())


class AmendIn(BaseModel):
    """A new signed version of the signed lab report: kind, reason, the order comment
    (``appended``: text added after the signed one) and the signer's password."""

    kind: AmendmentKind = AmendmentKind.AMENDED
    reason: str = Field(min_length=1, max_length=2000)
    comment: str | None = Field(default=None, max_length=10_000)
    signing_password: str | None = Field(default=None, max_length=256)


@router.post(
    "/{exam_id}/amend",
    response_model=LabReadingOut,
    responses={
        **_NOT_FOUND,
        403: {"description": "not an attending/chief reader, or signing_password wrong"},
        409: {"description": "the report is not signed, or was amended meanwhile"},
        429: {"description": "signing locked after too many wrong passwords (Retry-After)"},
    },
)
def amend(exam_id: str, body: AmendIn, principal: CurrentPrincipal) -> LabReadingOut:
    """Amend the signed lab report (a new signed version, the current results with the
    review carried over). Needs ``signing_password``."""
    with session_scope() as session:
        check_signable(session, principal=principal, exam_id=exam_id)
    confirm_signing(
        principal, body.signing_password, action="amend", object_type="exam", object_id=exam_id
    )
    with session_scope() as session:
        return amend_lab_report(
            session,
            principal=principal,
            exam_id=exam_id,
            kind=body.kind,
            reason=body.reason,
            comment=body.comment,
            now=utcnow(),
        )
