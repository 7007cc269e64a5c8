"""Critical values (危急值): the register, read-back acknowledgement, contacts, duty list,
and the portal notifications of every kind."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from rdc_core.db import session_scope, utcnow
from web.params import Offset, UtcDateTime
from web.security import CurrentPrincipal
from worklist.critical_values.contacts import (
    add_duty,
    get_contact,
    list_duty,
    remove_duty,
    set_contact,
)
from worklist.critical_values.notifications import list_notifications, mark_notification_read
from worklist.critical_values.schemas import (
    AcknowledgementIn,
    AlertOut,
    ContactIn,
    ContactOut,
    DutyIn,
    DutyOut,
    NotificationOut,
)
from worklist.critical_values.service import acknowledge_alert, get_alert, list_alerts
from worklist.schemas import Page

router = APIRouter(prefix="/api/v1", tags=["critical-values"])
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such alert, or it belongs to another clinic"}
}
_ACK: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    409: {"description": "acknowledged already, or withdrawn / superseded"},
    422: {"description": "empty read-back, or the wrong channel for the caller"},
}


@router.get("/critical-alerts", response_model=Page[AlertOut])
def critical_alerts(
    principal: CurrentPrincipal,
    state: Annotated[
        str | None, Query(description="open | acknowledged | escalated | superseded | withdrawn")
    ] = None,
    clinic: Annotated[str | None, Query(description="clinic code")] = None,
    since: Annotated[UtcDateTime | None, Query(description="raised at or after, with zone")] = None,
    until: Annotated[UtcDateTime | None, Query(description="raised before, with zone")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[AlertOut]:
    """The critical-value register, newest first: who raised what when, when the clinic was
    notified, who read it back when and how, escalations. A clinic sees its own alerts."""
    with session_scope() as session:
        return list_alerts(
            session,
            principal=principal,
            now=utcnow(),
            state=state,
            clinic=clinic,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )


@router.get("/critical-alerts/{alert_id}", response_model=AlertOut, responses=_NOT_FOUND)
def critical_alert(alert_id: str, principal: CurrentPrincipal) -> AlertOut:
    """One alert of the register; another clinic's answers 404."""
    with session_scope() as session:
        return get_alert(session, principal=principal, alert_id=alert_id, now=utcnow())


@router.post("/critical-alerts/{alert_id}/acknowledge", response_model=AlertOut, responses=_ACK)
def acknowledge(alert_id: str, body: AcknowledgementIn, principal: CurrentPrincipal) -> AlertOut:
    """Acknowledge with a read-back: a clinic user in the portal, or lead-hospital staff
    recording a telephone acknowledgement (``via`` phone, ``receiver_name``). Exactly once."""
    with session_scope() as session:
        return acknowledge_alert(
            session, principal=principal, alert_id=alert_id, data=body, now=utcnow()
        )


@router.get("/critical-contacts/{org_code}", response_model=ContactOut, responses={404: {}})
def critical_contact(org_code: str, principal: CurrentPrincipal) -> ContactOut:
    """A clinic's critical-value contacts (a clinic sees its own)."""
    with session_scope() as session:
        return get_contact(session, principal=principal, org_code=org_code)


@router.put("/critical-contacts/{org_code}", response_model=ContactOut, responses={403: {}})
def put_critical_contact(org_code: str, body: ContactIn, principal: CurrentPrincipal) -> ContactOut:
    """Set a clinic's primary and secondary contact (administrators)."""
    with session_scope() as session:
        return set_contact(session, principal=principal, org_code=org_code, data=body, now=utcnow())


@router.get("/critical-duty", response_model=list[DutyOut])
def critical_duty(principal: CurrentPrincipal) -> list[DutyOut]:
    """The centre's critical-value duty list (lead-hospital staff)."""
    with session_scope() as session:
        return list_duty(session, principal=principal, now=utcnow())


@router.post("/critical-duty", response_model=DutyOut, responses={403: {}})
def post_critical_duty(body: DutyIn, principal: CurrentPrincipal) -> DutyOut:
    """Put a lead-hospital user on the duty list, optionally for a window (administrators)."""
    with session_scope() as session:
        return add_duty(
            session,
            principal=principal,
            username=body.username,
            on_from=body.on_from,
            on_until=body.on_until,
            now=utcnow(),
        )


@router.delete(
    "/critical-duty/{username}", status_code=204, response_class=Response, responses={404: {}}
)
def delete_critical_duty(username: str, principal: CurrentPrincipal) -> Response:
    """Take a user off the duty list (administrators)."""
    with session_scope() as session:
        remove_duty(session, principal=principal, username=username)
    return Response(status_code=204)


@router.get("/notifications", response_model=Page[NotificationOut])
def notifications(
    principal: CurrentPrincipal,
    unread: Annotated[bool, Query(description="only unread ones")] = True,
    kind: Annotated[str | None, Query(description="e.g. critical_value, report_version")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Page[NotificationOut]:
    """My notifications (to me, or to my whole organisation), newest first."""
    with session_scope() as session:
        return list_notifications(
            session,
            principal=principal,
            unread_only=unread,
            kind=kind,
            limit=limit,
            offset=offset,
        )


@router.post(
    "/notifications/{notification_id}/read", response_model=NotificationOut, responses={404: {}}
)
def read_notification(notification_id: str, principal: CurrentPrincipal) -> NotificationOut:
    """Mark one of my notifications read."""
    with session_scope() as session:
        return mark_notification_read(
            session, principal=principal, notification_id=notification_id, now=utcnow()
        )
