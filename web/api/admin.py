"""Administration (admins; QC may read): clinics and AE titles, users, routing rules, SLA
targets; and the audit trail search for QC. Thin routes over worklist.admin."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from rdc_core.db import session_scope
from web.params import Offset, UtcDateTime
from web.security import CurrentPrincipal
from worklist.admin import (
    AuditFilter,
    audit_events,
    create_clinic,
    create_user,
    get_routing_rules,
    get_sla_targets,
    iter_audit_events,
    list_clinics,
    list_users,
    put_routing_rules,
    put_sla_targets,
    require_audit_access,
    reset_password,
    update_clinic,
    update_user,
    verify_audit_chain,
)
from worklist.admin.schemas import (
    AuditEventOut,
    AuditVerifyOut,
    ClinicIn,
    ClinicOut,
    ClinicPatch,
    PasswordIn,
    RoutingRuleIn,
    RoutingRulesOut,
    SlaTargetIn,
    SlaTargetsOut,
    UserIn,
    UserOut,
    UserPatch,
)
from worklist.schemas import Page

router = APIRouter(prefix="/api/v1", tags=["administration"])


# --- clinics -------------------------------------------------------------------------------


@router.get("/clinics", response_model=list[ClinicOut])
def clinics(principal: CurrentPrincipal, include_lead: bool = False) -> list[ClinicOut]:
    """The member clinics with their AE titles (admins, QC)."""
    with session_scope() as session:
        return list_clinics(session, principal=principal, include_lead=include_lead)


@router.post("/clinics", response_model=ClinicOut, status_code=201)
def clinic_create(body: ClinicIn, principal: CurrentPrincipal) -> ClinicOut:
    """Register a clinic; 409 when the code exists (edit it with PATCH)."""
    with session_scope() as session:
        return create_clinic(session, principal=principal, data=body)


@router.patch("/clinics/{code}", response_model=ClinicOut)
def clinic_update(code: str, body: ClinicPatch, principal: CurrentPrincipal) -> ClinicOut:
    """Rename, disable (``{"active": false}``) or enable a clinic, or replace its AE titles."""
    with session_scope() as session:
        return update_clinic(session, principal=principal, code=code, patch=body)


# --- users ---------------------------------------------------------------------------------


@router.get("/users", response_model=list[UserOut])
def users(principal: CurrentPrincipal, org: str | None = None) -> list[UserOut]:
    """Every user, or those of organisation ``org`` (admins, QC)."""
    with session_scope() as session:
        return list_users(session, principal=principal, org_code=org)


@router.post("/users", response_model=UserOut, status_code=201)
def user_create(body: UserIn, principal: CurrentPrincipal) -> UserOut:
    """Create a user; 409 when the username exists."""
    with session_scope() as session:
        return create_user(session, principal=principal, data=body)


@router.patch("/users/{username}", response_model=UserOut)
def user_update(username: str, body: UserPatch, principal: CurrentPrincipal) -> UserOut:
    """Change display name, role, level, pools, qualifications or the active flag."""
    with session_scope() as session:
        return update_user(session, principal=principal, username=username, patch=body)


@router.post("/users/{username}/password", status_code=204)
def user_password(username: str, body: PasswordIn, principal: CurrentPrincipal) -> Response:
    """Reset a user's password."""
    with session_scope() as session:
        reset_password(session, principal=principal, username=username, password=body.password)
    return Response(status_code=204)


# --- routing rules and SLA targets ---------------------------------------------------------


@router.get("/routing-rules", response_model=RoutingRulesOut)
def routing_rules(principal: CurrentPrincipal) -> RoutingRulesOut:
    """The routing rules, in the order they are tried (first match wins)."""
    with session_scope() as session:
        return get_routing_rules(session, principal=principal)


@router.put("/routing-rules", response_model=RoutingRulesOut)
def routing_rules_put(body: list[RoutingRuleIn], principal: CurrentPrincipal) -> RoutingRulesOut:
    """Replace the routing rules (list order is precedence); exams that become READY from
    now on are routed by them, without a restart."""
    with session_scope() as session:
        return put_routing_rules(session, principal=principal, rules=body)


@router.get("/sla-targets", response_model=SlaTargetsOut)
def sla_targets(principal: CurrentPrincipal) -> SlaTargetsOut:
    """The turnaround target of every discipline and priority."""
    with session_scope() as session:
        return get_sla_targets(session, principal=principal)


@router.put("/sla-targets", response_model=SlaTargetsOut)
def sla_targets_put(
    body: list[SlaTargetIn],
    principal: CurrentPrincipal,
    apply_to_ready: Annotated[
        bool, Query(description="also recompute the due time of exams READY already")
    ] = False,
) -> SlaTargetsOut:
    """Set targets (those not given stay). Exams READY already keep their due time unless
    ``apply_to_ready=true``."""
    with session_scope() as session:
        return put_sla_targets(
            session, principal=principal, targets=body, apply_to_ready=apply_to_ready
        )


# --- audit trail ---------------------------------------------------------------------------

_CSV_COLUMNS = ("seq", "at", "actor", "org_id", "action", "object_type", "object_id", "detail")


def _criteria(
    user: str | None,
    patient: str | None,
    exam: str | None,
    action: str | None,
    since: datetime | None,
    until: datetime | None,
) -> AuditFilter:
    return AuditFilter(
        user=user, patient=patient, exam=exam, action=action, since=since, until=until
    )


def _csv(principal: CurrentPrincipal, criteria: AuditFilter) -> StreamingResponse:
    def rows() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        buffer.write("\ufeff")  # Excel opens UTF-8 (Chinese names) only with a BOM
        writer.writerow(_CSV_COLUMNS)
        with session_scope() as session:
            for event in iter_audit_events(session, principal=principal, criteria=criteria):
                writer.writerow(
                    [
                        event.seq,
                        event.at.isoformat(),
                        event.actor,
                        event.org_id or "",
                        event.action,
                        event.object_type,
                        event.object_id,
                        json.dumps(event.detail, ensure_ascii=False, sort_keys=True),
                    ]
                )
                if buffer.tell() > 64_000:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    # Access is checked before the response starts: a 403 is a problem, not a broken stream.
    require_audit_access(principal)
    return StreamingResponse(
        rows(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="audit-events.csv"',
            "Cache-Control": "private, no-store",
        },
    )


_FILTERS = {
    "user": "username (actor)",
    "patient": "patient ID (or internal patient id)",
    "exam": "exam id, Study Instance UID or accession number",
    "action": "action, e.g. view; * matches any text (report.*)",
}


@router.get("/audit/events", response_model=Page[AuditEventOut])
def audit_search(
    principal: CurrentPrincipal,
    user: Annotated[str | None, Query(description=_FILTERS["user"])] = None,
    patient: Annotated[str | None, Query(description=_FILTERS["patient"])] = None,
    exam: Annotated[str | None, Query(description=_FILTERS["exam"])] = None,
    action: Annotated[str | None, Query(description=_FILTERS["action"])] = None,
    since: Annotated[
        UtcDateTime | None, Query(alias="from", description="at or after, with zone")
    ] = None,
    until: Annotated[UtcDateTime | None, Query(alias="to", description="before, with zone")] = None,
    format: Annotated[str, Query(pattern="^(json|csv)$")] = "json",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> Page[AuditEventOut] | StreamingResponse:
    """Audit events, newest first (QC, admins); ``format=csv`` exports every match."""
    criteria = _criteria(user, patient, exam, action, since, until)
    if format == "csv":
        return _csv(principal, criteria)
    with session_scope() as session:
        items, total = audit_events(
            session, principal=principal, criteria=criteria, limit=limit, offset=offset
        )
    return Page[AuditEventOut](items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/audit/events.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}},
)
def audit_export(
    principal: CurrentPrincipal,
    user: Annotated[str | None, Query(description=_FILTERS["user"])] = None,
    patient: Annotated[str | None, Query(description=_FILTERS["patient"])] = None,
    exam: Annotated[str | None, Query(description=_FILTERS["exam"])] = None,
    action: Annotated[str | None, Query(description=_FILTERS["action"])] = None,
    since: Annotated[UtcDateTime | None, Query(alias="from")] = None,
    until: Annotated[UtcDateTime | None, Query(alias="to")] = None,
) -> StreamingResponse:
    """Every matching audit event as CSV (UTF-8 with BOM), oldest first."""
    return _csv(principal, _criteria(user, patient, exam, action, since, until))


@router.get("/audit/chain", response_model=AuditVerifyOut)
def audit_chain(principal: CurrentPrincipal) -> AuditVerifyOut:
    """Whether the audit trail's hash chain is intact (QC, admins)."""
    with session_scope() as session:
        return verify_audit_chain(session, principal=principal)
