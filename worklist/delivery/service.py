"""Push-back of signed reports to the clinics' own systems, and the clinics' endpoints.

When a report version becomes final, :func:`schedule_report_delivery` (called from
finalization, in the signer's transaction) creates one pending delivery per endpoint of
the exam's clinic, enabled or not (a disabled endpoint's deliveries wait for it), and
tells the clinic's users that a new version is there.
The delivery task then works the queue in three short steps, each its own transaction so
no database lock is held while talking to a peer:

1. :func:`claim_due_deliveries` takes due deliveries with a lease by a conditional UPDATE
   (two workers or replicas never send the same delivery at once);
2. :func:`prepare_push` gathers the report, the signed PDF and the endpoint;
3. :func:`record_attempt` records the outcome: delivered on the peer's acknowledgement,
   otherwise the next attempt after an exponential backoff capped by
   ``delivery_max_backoff_seconds``.

Policy: a push is retried until the peer acknowledges it, without a give-up limit; after
:data:`FAILING_AFTER` failed attempts its state is ``failing`` so it stands out in
``GET /api/v1/deliveries?state=failing`` while retries go on. Disabling an endpoint pauses
its deliveries (versions signed meanwhile are queued too); enabling it again sends them.
The versions of one exam reach an endpoint in order: a later version waits until the
earlier one was delivered.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from rdc_core.db import insert_ignore, stable_id
from rdc_core.errors import InvalidInputError, NotFoundError
from worklist.access import Principal, require_roles
from worklist.audit import record_access, record_event
from worklist.critical_values.notifications import notify
from worklist.delivery.models import (
    DeliveryAttempt,
    DeliveryChannel,
    DeliveryEndpoint,
    DeliveryState,
    ReportDelivery,
)
from worklist.delivery.schemas import (
    DeliveryAttemptOut,
    DeliveryOut,
    EndpointIn,
    EndpointOut,
)
from worklist.delivery.senders import EndpointSpec, ReportPush, display_name
from worklist.directory import get_organization
from worklist.models import Exam, Organization, OrgKind, Report, ReportStatus, Role

__all__ = [
    "BASE_BACKOFF_SECONDS",
    "FAILING_AFTER",
    "PORTAL_TARGET",
    "LeaseLostError",
    "add_endpoint",
    "backoff_seconds",
    "claim_due_deliveries",
    "delivery_history",
    "list_deliveries",
    "list_endpoints",
    "mark_exam_delivered",
    "prepare_push",
    "record_attempt",
    "report_push",
    "schedule_report_delivery",
    "set_endpoint_enabled",
]

BASE_BACKOFF_SECONDS = 10.0
FAILING_AFTER = 5
PORTAL_TARGET = "portal"
_ADMIN_ROLES = frozenset({Role.ADMIN})
_OVERSIGHT_ROLES = frozenset({Role.ADMIN, Role.QC})
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: no backslash, no controls
_HOST_RE = re.compile(r"^[A-Za-z0-9.:\-\[\]]{1,255}$")


# --- scheduling (finalization hook) ----------------------------------------------------------


def schedule_report_delivery(
    session: Session, *, report: Report, exam: Exam, now: datetime
) -> None:
    """Queue push-back of ``report`` to every endpoint of the exam's clinic and tell the
    clinic's users that a new version is available (and which version it replaces).

    A disabled endpoint's delivery is queued as well: the claim skips it until the endpoint
    is enabled again, so a version signed during a PACS outage is not lost.
    Idempotent: (report, endpoint) is unique, so running twice queues nothing new.
    """
    endpoints = (
        session.execute(select(DeliveryEndpoint).where(DeliveryEndpoint.org_id == exam.org_id))
        .scalars()
        .all()
    )
    queued = []
    for endpoint in endpoints:
        created = insert_ignore(
            session,
            ReportDelivery.__table__,
            {
                "id": stable_id("report_delivery", report.id, endpoint.id),
                "report_id": report.id,
                "exam_id": exam.id,
                "org_id": exam.org_id,
                "target": endpoint.id,
                "endpoint_id": endpoint.id,
                "channel": endpoint.channel.value,
                "state": DeliveryState.PENDING.value,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
                "detail": {},
            },
            conflict=(),  # the ID derives from (report_id, target): a clash on either is this row
        )
        if created:
            queued.append(endpoint.name)
    if queued:
        record_event(
            session,
            actor="system:delivery",
            action="schedule_delivery",
            object_type="report",
            object_id=report.id,
            org_id=exam.org_id,
            detail={"endpoints": queued},
        )
    _notify_new_version(session, report=report, exam=exam, now=now)


def _notify_new_version(session: Session, *, report: Report, exam: Exam, now: datetime) -> None:
    patient = exam.patient
    what = " ".join(p for p in (exam.modality, exam.body_part, exam.description) if p).strip()
    who = display_name(patient.name or "") or patient.patient_id
    zh = f"新报告可查看：{who} {what} 第{report.version}版"
    en = f"New report available: {who} {what} version {report.version}"
    if report.version > 1:
        kind = report.amendment_kind.value if report.amendment_kind else "amended"
        zh += f"（{_KIND_ZH.get(kind, '修订')}，替代第{report.version - 1}版）"
        en += f" ({kind}, replaces version {report.version - 1})"
    notify(
        session,
        org_id=exam.org_id,
        user_ids=None,
        kind="report_version",
        subject_type="report",
        subject_id=report.id,
        text=(zh, en),
        now=now,
    )


_KIND_ZH = {"amended": "修订", "corrected": "更正", "appended": "补充"}


# --- endpoints ---------------------------------------------------------------------------------


def _endpoint_out(endpoint: DeliveryEndpoint) -> EndpointOut:
    return EndpointOut.model_validate(
        {
            **{c: getattr(endpoint, c) for c in EndpointOut.model_fields if hasattr(endpoint, c)},
            "clinic_code": endpoint.organization.code,
        }
    )


def _audit_config(
    session: Session,
    principal: Principal | None,
    *,
    action: str,
    object_id: str,
    detail: dict[str, Any],
) -> None:
    if principal is None:  # the CLI: whoever has the server's shell
        record_event(
            session,
            actor="cli:rdc",
            action=action,
            object_type="delivery_endpoint",
            object_id=object_id,
            detail=detail,
        )
    else:
        record_access(
            session,
            principal,
            action=action,
            object_type="delivery_endpoint",
            object_id=object_id,
            detail=detail,
        )


def add_endpoint(
    session: Session, *, principal: Principal | None, data: EndpointIn, now: datetime
) -> EndpointOut:
    """Create or update a clinic's push-back endpoint (admins; ``principal`` None: the CLI).

    The same clinic and name update the endpoint in place."""
    if principal is not None:
        require_roles(principal, _ADMIN_ROLES, lead_only=True)
    org = get_organization(session, code=data.clinic)
    if org.kind is not OrgKind.CLINIC:
        raise InvalidInputError(f"{data.clinic} is not a clinic")
    if not _HOST_RE.match(data.host):
        raise InvalidInputError(f"invalid host {data.host!r}")
    if data.channel is DeliveryChannel.DICOM:
        if not data.ae_title or not _AE_RE.match(data.ae_title) or not data.ae_title.strip():
            raise InvalidInputError("a DICOM endpoint needs the clinic's AE title (1-16 chars)")
        default_name = f"dicom:{data.ae_title.strip()}@{data.host}:{data.port}"
    elif data.channel is DeliveryChannel.HL7:
        default_name = f"hl7:{data.receiving_application or ''}@{data.host}:{data.port}"
    else:
        raise InvalidInputError("the channel of an endpoint is dicom or hl7")
    name = (data.name or default_name).strip()[:100]
    endpoint_id = stable_id("delivery_endpoint", org.id, name)
    endpoint = session.get(DeliveryEndpoint, endpoint_id)
    if endpoint is None:
        endpoint = DeliveryEndpoint(id=endpoint_id, org_id=org.id, name=name, created_at=now)
        session.add(endpoint)
    endpoint.channel = data.channel
    endpoint.host = data.host
    endpoint.port = data.port
    endpoint.ae_title = data.ae_title.strip() if data.ae_title else None
    endpoint.receiving_application = data.receiving_application
    endpoint.receiving_facility = data.receiving_facility
    endpoint.pdf_mode = data.pdf_mode
    endpoint.enabled = data.enabled
    endpoint.tls = data.tls
    endpoint.updated_at = now
    session.flush()
    session.refresh(endpoint)
    _audit_config(
        session,
        principal,
        action="configure",
        object_id=endpoint.id,
        detail=data.model_dump(mode="json"),
    )
    return _endpoint_out(endpoint)


def list_endpoints(
    session: Session, *, principal: Principal | None, clinic: str | None = None
) -> list[EndpointOut]:
    """Every push-back endpoint (admins and QC), optionally of one clinic."""
    if principal is not None:
        require_roles(principal, _OVERSIGHT_ROLES, lead_only=True)
    stmt = select(DeliveryEndpoint).join(Organization, Organization.id == DeliveryEndpoint.org_id)
    if clinic:
        stmt = stmt.where(Organization.code == clinic)
    rows = session.execute(stmt.order_by(Organization.code, DeliveryEndpoint.name)).scalars()
    return [_endpoint_out(e) for e in rows]


def set_endpoint_enabled(
    session: Session,
    *,
    principal: Principal | None,
    endpoint: str,
    enabled: bool,
    now: datetime,
    clinic: str | None = None,
) -> EndpointOut:
    """Enable or disable an endpoint, named by ID or by name (with ``clinic``).

    Enabling makes the deliveries that waited for the endpoint due at once (the versions
    signed while it was disabled, and retries that were backing off)."""
    if principal is not None:
        require_roles(principal, _ADMIN_ROLES, lead_only=True)
    row = session.get(DeliveryEndpoint, endpoint)
    if row is None:
        stmt = select(DeliveryEndpoint).where(DeliveryEndpoint.name == endpoint)
        if clinic:
            stmt = stmt.join(Organization, Organization.id == DeliveryEndpoint.org_id).where(
                Organization.code == clinic
            )
        matches = session.execute(stmt).scalars().all()
        if len(matches) > 1:
            raise InvalidInputError(f"several clinics have an endpoint {endpoint!r}; --clinic")
        row = matches[0] if matches else None
    if row is None:
        raise NotFoundError(f"no delivery endpoint {endpoint!r}")
    row.enabled = enabled
    row.updated_at = now
    if enabled:
        session.execute(
            update(ReportDelivery)
            .where(
                ReportDelivery.endpoint_id == row.id,
                ReportDelivery.state != DeliveryState.DELIVERED,
                ReportDelivery.next_attempt_at > now,
            )
            .values(next_attempt_at=now)
            .execution_options(synchronize_session=False)
        )
    session.flush()
    _audit_config(
        session,
        principal,
        action="enable" if enabled else "disable",
        object_id=row.id,
        detail={"name": row.name},
    )
    return _endpoint_out(row)


# --- the push queue ----------------------------------------------------------------------------


def backoff_seconds(attempts: int, *, max_backoff: float) -> float:
    """Wait after the ``attempts``-th failed attempt: 10 s, 20 s, 40 s, ... capped."""
    return float(min(max_backoff, BASE_BACKOFF_SECONDS * 2 ** max(0, attempts - 1)))


def claim_due_deliveries(
    session: Session, *, now: datetime, worker: str, lease_seconds: float, limit: int = 20
) -> list[str]:
    """Lease up to ``limit`` due pushes to ``worker``; returns their IDs.

    Each lease is a conditional UPDATE that succeeds only while the delivery is still
    unleased (or its lease expired), so of two workers exactly one gets each delivery.
    """
    earlier = aliased(ReportDelivery)
    due = and_(
        ReportDelivery.state.in_((DeliveryState.PENDING, DeliveryState.FAILING)),
        ReportDelivery.channel != DeliveryChannel.PORTAL,
        or_(ReportDelivery.next_attempt_at.is_(None), ReportDelivery.next_attempt_at <= now),
        or_(ReportDelivery.lease_expires_at.is_(None), ReportDelivery.lease_expires_at <= now),
        # Versions reach an endpoint in order: a corrected version never arrives before
        # the version it replaces (the receiver would keep the older one as the last word).
        ~exists().where(
            earlier.exam_id == ReportDelivery.exam_id,
            earlier.target == ReportDelivery.target,
            earlier.state != DeliveryState.DELIVERED,
            earlier.created_at < ReportDelivery.created_at,
        ),
    )
    candidates = (
        session.execute(
            select(ReportDelivery.id)
            .join(DeliveryEndpoint, DeliveryEndpoint.id == ReportDelivery.endpoint_id)
            .where(due, DeliveryEndpoint.enabled.is_(True))
            .order_by(ReportDelivery.next_attempt_at, ReportDelivery.id)
            .limit(limit)
        )
        .scalars()
        .all()
    )
    expires = now + timedelta(seconds=lease_seconds)
    claimed = []
    for delivery_id in candidates:
        result = session.execute(
            update(ReportDelivery)
            .where(ReportDelivery.id == delivery_id, due)
            .values(lease_owner=worker, lease_expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        if cast(CursorResult[Any], result).rowcount == 1:
            claimed.append(delivery_id)
    return claimed


class LeaseLostError(NotFoundError):
    """The delivery is no longer leased to this worker (another one took it over)."""

    title = "Lease lost"


def report_push(
    session: Session, *, report: Report, exam: Exam, delivery_id: str = "", attempt: int = 0
) -> ReportPush:
    """Everything a sender puts into its message for the signed report version ``report``
    of ``exam`` (also what a C-GET/C-MOVE of the report's encapsulated PDF sends)."""
    from worklist.recognition.service import recognition_for_report
    from worklist.signing.service import get_signed_artifact

    pdf = get_signed_artifact(session, report_id=report.id, kind="pdf")
    # The coded results of the signed document's discipline sections (an ECG's
    # measurements), for senders that carry them (HL7 OBX NM lines).
    signed = json.loads(get_signed_artifact(session, report_id=report.id, kind="document"))
    observations = [
        dict(item, section=section.get("key"))
        for section in (signed.get("document") or {}).get("sections") or []
        for item in section.get("observations") or []
    ]
    lead = session.execute(
        select(Organization).where(Organization.kind == OrgKind.LEAD).limit(1)
    ).scalar_one_or_none()
    signer = report.verifier or report.author
    return ReportPush(
        delivery_id=delivery_id,
        attempt=attempt,
        report_id=report.id,
        version=report.version,
        status=report.status.value,
        amendment_kind=report.amendment_kind.value if report.amendment_kind else None,
        previous_report_id=report.previous_id,
        exam_id=exam.id,
        # Exams of other intakes have no Study Instance UID: their natural key stands in.
        study_instance_uid=exam.study_instance_uid or exam.natural_key,
        accession_number=exam.accession_number,
        discipline=exam.discipline.value,
        modality=exam.modality,
        body_part=exam.body_part,
        description=exam.description,
        performed_at=exam.performed_at,
        patient_id=exam.patient.patient_id,
        issuer=exam.patient.issuer,
        patient_name=exam.patient.name,
        birth_date=exam.patient.birth_date,
        sex=exam.patient.sex,
        clinic_code=exam.organization.code,
        clinic_name=exam.organization.name,
        sender_code=lead.code if lead else "RDC",
        sender_name=lead.name if lead else "RDC",
        findings=report.findings,
        impression=report.impression,
        recommendation=report.recommendation,
        signer=signer.display_name or signer.username,
        signed_at=report.final_at or report.submitted_at or report.updated_at,
        pdf=pdf,
        recognition=recognition_for_report(session, report_id=report.id),
        extra={"observations": observations} if observations else {},
        referring_physician=exam.referring_physician or "",
    )


def prepare_push(
    session: Session, *, delivery_id: str, worker: str, now: datetime, lease_seconds: float
) -> tuple[ReportPush, EndpointSpec]:
    """Everything a sender needs for a delivery ``worker`` holds: the report version, its
    exam and patient, the signed PDF and the endpoint. Renews the lease for the send
    (a batch's later deliveries wait for the earlier sends); raises LeaseLostError when
    another worker holds the delivery now."""
    renewed = session.execute(
        update(ReportDelivery)
        .where(
            ReportDelivery.id == delivery_id,
            ReportDelivery.lease_owner == worker,
            ReportDelivery.state != DeliveryState.DELIVERED,
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if not cast(CursorResult[Any], renewed).rowcount:
        raise LeaseLostError(f"delivery {delivery_id} is not leased to {worker}")
    delivery = session.get(ReportDelivery, delivery_id, populate_existing=True)
    if delivery is None or delivery.endpoint is None:
        raise NotFoundError(f"delivery {delivery_id} has no endpoint")
    report = session.get(Report, delivery.report_id)
    exam = session.get(Exam, delivery.exam_id)
    if report is None or exam is None:
        raise NotFoundError(f"the report of delivery {delivery_id} is gone")
    push = report_push(
        session, report=report, exam=exam, delivery_id=delivery.id, attempt=delivery.attempts + 1
    )
    endpoint = delivery.endpoint
    spec = EndpointSpec(
        id=endpoint.id,
        name=endpoint.name,
        channel=endpoint.channel.value,
        host=endpoint.host,
        port=endpoint.port,
        ae_title=endpoint.ae_title,
        receiving_application=endpoint.receiving_application,
        receiving_facility=endpoint.receiving_facility,
        tls=endpoint.tls,
        pdf_mode=endpoint.pdf_mode,
    )
    return push, spec


def mark_exam_delivered(session: Session, *, exam_id: str, now: datetime) -> bool:
    """Set the exam's ``delivered_at`` stage if it is not set yet; True when this call did."""
    result = session.execute(
        update(Exam)
        .where(Exam.id == exam_id, Exam.delivered_at.is_(None))
        .values(delivered_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(cast(CursorResult[Any], result).rowcount)


def record_attempt(
    session: Session,
    *,
    delivery_id: str,
    worker: str,
    now: datetime,
    error: str | None,
    detail: dict[str, Any] | None,
    max_backoff: float,
) -> DeliveryState:
    """Record one attempt of ``worker`` and move the delivery on: delivered when ``error`` is
    None (the peer acknowledged), else due again after the backoff. Releases the lease."""
    delivery = session.execute(
        select(ReportDelivery)
        .where(ReportDelivery.id == delivery_id)
        .with_for_update(of=ReportDelivery)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if delivery is None:
        raise NotFoundError(f"no delivery {delivery_id}")
    number = delivery.attempts + 1
    session.add(
        DeliveryAttempt(
            id=stable_id("delivery_attempt", delivery.id, str(number)),
            delivery_id=delivery.id,
            number=number,
            at=now,
            outcome="success" if error is None else "failure",
            error=error[:4000] if error else None,
            detail=detail or {},
            worker=worker[:100],
        )
    )
    delivery.attempts = number
    ours = delivery.lease_owner == worker
    if ours:
        delivery.lease_owner = None
        delivery.lease_expires_at = None
    if error is None:
        delivery.state = DeliveryState.DELIVERED
        delivery.delivered_at = delivery.delivered_at or now
        delivery.acknowledged_at = delivery.acknowledged_at or now
        delivery.next_attempt_at = None
        delivery.last_error = None
        delivery.detail = detail or {}
        report = session.get(Report, delivery.report_id)
        if report is not None and report.status is ReportStatus.FINAL:
            mark_exam_delivered(session, exam_id=delivery.exam_id, now=now)
    elif ours and delivery.state is not DeliveryState.DELIVERED:
        # (A worker whose lease was taken over records its attempt but leaves the
        # schedule to the worker that holds the delivery now.)
        delivery.state = DeliveryState.FAILING if number >= FAILING_AFTER else DeliveryState.PENDING
        delivery.next_attempt_at = now + timedelta(
            seconds=backoff_seconds(number, max_backoff=max_backoff)
        )
        delivery.last_error = error[:4000]
    session.flush()
    record_event(
        session,
        actor=f"system:delivery:{worker}"[:100],
        action="push_report" if error is None else "push_report_failed",
        object_type="report",
        object_id=delivery.report_id,
        org_id=delivery.org_id,
        detail={"delivery": delivery.id, "attempt": number, "channel": delivery.channel.value},
    )
    return delivery.state


# --- what happened -----------------------------------------------------------------------------


def _delivery_out(delivery: ReportDelivery, clinic_code: str) -> DeliveryOut:
    return DeliveryOut.model_validate(
        {
            **{c: getattr(delivery, c) for c in DeliveryOut.model_fields if hasattr(delivery, c)},
            "clinic_code": clinic_code,
            "endpoint_name": delivery.endpoint.name if delivery.endpoint else None,
            "attempt_log": [],
        }
    )


def delivery_history(
    session: Session, *, principal: Principal, report_id: str
) -> list[DeliveryOut]:
    """Every delivery of a report version with its attempts (clinic users: their own)."""
    report = session.get(Report, report_id)
    if report is None or report.status is ReportStatus.DRAFT:
        raise NotFoundError(f"no report {report_id}")
    from worklist.queries import visible_exam

    exam = visible_exam(session, principal=principal, exam_id=report.exam_id)
    deliveries = (
        session.execute(
            select(ReportDelivery)
            .where(ReportDelivery.report_id == report.id)
            .order_by(ReportDelivery.created_at, ReportDelivery.id)
        )
        .scalars()
        .all()
    )
    attempts: dict[str, list[DeliveryAttemptOut]] = {d.id: [] for d in deliveries}
    if deliveries:
        for attempt in session.execute(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(list(attempts)))
            .order_by(DeliveryAttempt.delivery_id, DeliveryAttempt.number)
        ).scalars():
            attempts[attempt.delivery_id].append(DeliveryAttemptOut.model_validate(attempt))
    record_access(
        session, principal, action="view_deliveries", object_type="report", object_id=report.id
    )
    out = []
    for delivery in deliveries:
        item = _delivery_out(delivery, exam.organization.code)
        item.attempt_log = attempts[delivery.id]
        out.append(item)
    return out


def list_deliveries(
    session: Session,
    *,
    principal: Principal,
    state: DeliveryState | None = None,
    clinic: str | None = None,
    channel: DeliveryChannel | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[DeliveryOut], int]:
    """The delivery queue for administrators and QC, oldest due first; with the total."""
    require_roles(principal, _OVERSIGHT_ROLES, lead_only=True)
    if not 1 <= limit <= 500 or offset < 0:
        raise InvalidInputError("limit must be 1..500 and offset not negative")
    stmt = select(ReportDelivery, Organization.code).join(
        Organization, Organization.id == ReportDelivery.org_id
    )
    if state:
        stmt = stmt.where(ReportDelivery.state == state)
    if clinic:
        stmt = stmt.where(Organization.code == clinic)
    if channel:
        stmt = stmt.where(ReportDelivery.channel == channel)
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    rows = session.execute(
        stmt.order_by(ReportDelivery.created_at.desc(), ReportDelivery.id)
        .limit(limit)
        .offset(offset)
    ).all()
    record_access(session, principal, action="list", object_type="delivery")
    return [_delivery_out(d, code) for d, code in rows], int(total)
