"""The audit trail's verification for QC and administrators."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from pydantic import BaseModel

from rdc_core.db import session_scope
from web.security import CurrentPrincipal
from worklist.audit_anchor import authorize_verification
from worklist.audit_tasks import verify_now

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


class AuditVerification(BaseModel):
    intact: bool
    first_bad_seq: int | None = None
    reason: str | None = None
    sealed_through: int
    records: int
    unsealed: int
    checkpoints: int
    last_checkpoint_seq: int | None = None


@router.get(
    "/verify",
    response_model=AuditVerification,
    responses={403: {"description": "only the lead hospital's QC and administrators"}},
)
def verify(principal: CurrentPrincipal) -> AuditVerification:
    """Seal new records and check the whole audit chain against the signed checkpoints:
    ``intact`` false names the first bad or missing sequence number and why."""
    with session_scope() as session:
        authorize_verification(session, principal=principal)
    return AuditVerification(**asdict(verify_now()))
