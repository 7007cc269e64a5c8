"""The lab result model's read side: orders and their results as the API returns them, the
mapping queue, and the auto-release switch. Services take the session, never commit.

Who sees what: a clinic's users (technician, clinician) only their own clinic's orders; the
lead hospital's readers, senior readers, QC staff and administrators every clinic's. Every
read is audited. An order outside the caller's reach is "not found".
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from lab_results.autoverify import AUTOVERIFIED_MARK
from lab_results.mapping import reason_zh
from lab_results.models import LabMappingQueueEntry, LabObservation, LabOrder, LabSetting
from lab_results.schemas import (
    AutoreleaseSwitchOut,
    LabOrderOut,
    LabOrderSummary,
    LabResultOut,
    LabResultVersionOut,
    MappingQueueEntryOut,
    RuleTraceOut,
)
from rdc_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from rdc_core.settings import Settings, get_settings
from worklist.access import Principal, require_roles
from worklist.audit import record_access
from worklist.models import Exam, Organization, OrgKind, Patient, Role, User
from worklist.patients.national_id import shown_patient_id

__all__ = [
    "AUTORELEASE_KEY",
    "MAX_PAGE",
    "autorelease_enabled",
    "autorelease_switch",
    "get_order",
    "list_mapping_queue",
    "list_orders",
    "set_autorelease",
]

MAX_PAGE = 500
AUTORELEASE_KEY = "autorelease_stopped"
_CLINIC_ROLES = frozenset({Role.TECHNICIAN, Role.CLINICIAN})
_LEAD_ROLES = frozenset({Role.READER, Role.SENIOR_READER, Role.QC, Role.ADMIN})
SUBJECT = "lab_order"
_S = TypeVar("_S", bound=Select[Any])


def _check_reader(principal: Principal) -> None:
    if principal.org_kind is OrgKind.CLINIC:
        require_roles(principal, _CLINIC_ROLES)
    else:
        require_roles(principal, _LEAD_ROLES)


def _scoped(stmt: _S, principal: Principal) -> _S:
    if principal.is_clinic_user:
        return stmt.where(LabOrder.org_id == principal.org_id)
    return stmt


def _base():
    return (
        select(LabOrder, Exam, Patient, Organization)
        .join(Exam, Exam.id == LabOrder.exam_id)
        .join(Patient, Patient.id == LabOrder.patient_ref)
        .join(Organization, Organization.id == LabOrder.org_id)
    )


def _result_counts(session: Session, order_ids: list[str]) -> dict[str, int]:
    if not order_ids:
        return {}
    rows = session.execute(
        select(LabObservation.order_id, func.count())
        .where(LabObservation.order_id.in_(order_ids), LabObservation.current.is_(True))
        .group_by(LabObservation.order_id)
    ).all()
    return {order_id: count for order_id, count in rows}


def _summary_fields(
    order: LabOrder, exam: Exam, patient: Patient, org: Organization, count: int
) -> dict[str, Any]:
    # A national ID (居民身份证号) is shown masked; stored and sent back as received.
    shown = shown_patient_id(patient.issuer, patient.patient_id)
    return {
        "id": order.id,
        "exam_id": order.exam_id,
        "clinic": org.code,
        "patient_id": shown,
        "patient_id_masked": shown != patient.patient_id,
        "issuer": patient.issuer,
        "patient_name": patient.name,
        "natural_key": order.natural_key,
        "placer_number": order.placer_number,
        "filler_number": order.filler_number,
        "service_code": order.service_code,
        "service_text": order.service_text,
        "priority": order.priority,
        "collected_at": order.collected_at,
        "specimen_received_at": order.specimen_received_at,
        "reported_at": order.reported_at,
        "arrived_at": order.arrived_at,
        "version": order.version,
        "verdict": order.verdict,
        "critical": order.critical,
        "released_at": order.released_at,
        "auto_released": order.auto_released,
        "exam_state": exam.state.value,
        "result_count": count,
    }


def list_orders(
    session: Session,
    *,
    principal: Principal,
    patient_id: str | None = None,
    issuer: str | None = None,
    clinic: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[LabOrderSummary]:
    """Orders the principal may see, newest first, filtered by the patient as the clinic
    identified them (``patient_id`` as received, ``issuer``) and the clinic's code (audited;
    a national ID masked in the audit trail as everywhere it is shown)."""
    _check_reader(principal)
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE}")
    if offset < 0:
        raise InvalidInputError("offset must not be negative")
    stmt = _scoped(_base(), principal)
    if patient_id:
        stmt = stmt.where(Patient.patient_id == patient_id)
    if issuer:
        stmt = stmt.where(Patient.issuer == issuer)
    if clinic:
        stmt = stmt.where(Organization.code == clinic)
    rows = session.execute(
        stmt.order_by(LabOrder.arrived_at.desc(), LabOrder.id).limit(limit).offset(offset)
    ).all()
    counts = _result_counts(session, [r[0].id for r in rows])
    record_access(
        session,
        principal,
        action="list",
        object_type=SUBJECT,
        detail={
            "patient_id": shown_patient_id(issuer, patient_id) if patient_id else patient_id,
            "issuer": issuer,
            "clinic": clinic,
            "n": len(rows),
        },
    )
    return [
        LabOrderSummary(**_summary_fields(o, e, p, org, counts.get(o.id, 0)))
        for o, e, p, org in rows
    ]


def _trace(items: list[dict[str, Any]] | None) -> list[RuleTraceOut]:
    return [RuleTraceOut(**item) for item in items or []]


def _result_out(row: LabObservation, history: list[LabObservation]) -> LabResultOut:
    return LabResultOut(
        id=row.id,
        key=row.result_key,
        set_id=row.set_id,
        code=row.code,
        code_system=row.code_system,
        code_text=row.code_text,
        loinc=row.loinc,
        analyte=row.analyte,
        name_zh=row.name_zh,
        name_en=row.name_en,
        value_type=row.value_type,
        value=row.value,
        numeric=row.numeric,
        comparator=row.comparator,
        unit=row.unit,
        unit_ok=row.unit_ok,
        reference_range=row.reference_range,
        flags=list(row.flags or []),
        status=row.status,
        method=row.method,
        performing_lab=row.performing_lab,
        observed_at=row.observed_at,
        version=row.version,
        verdict=row.verdict,
        critical=row.critical,
        autoverification=_trace(row.autoverification),
        rules_version=row.rules_version,
        history=[
            LabResultVersionOut(
                version=h.version,
                value=h.value,
                unit=h.unit,
                flags=list(h.flags or []),
                status=h.status,
                control_id=h.control_id,
                created_at=h.created_at,
                superseded_at=h.superseded_at,
            )
            for h in sorted(history, key=lambda h: h.version)
        ],
    )


def order_out(session: Session, order: LabOrder) -> LabOrderOut:
    """An order with its results (no access check, no audit: for callers that did both)."""
    exam = session.get(Exam, order.exam_id)
    patient = session.get(Patient, order.patient_ref)
    org = session.get(Organization, order.org_id)
    assert exam is not None and patient is not None and org is not None
    rows = (
        session.execute(
            select(LabObservation)
            .where(LabObservation.order_id == order.id)
            .order_by(LabObservation.set_id, LabObservation.result_key, LabObservation.version)
        )
        .scalars()
        .all()
    )
    history: dict[str, list[LabObservation]] = defaultdict(list)
    current: list[LabObservation] = []
    for row in rows:
        if row.current:
            current.append(row)
        else:
            history[row.result_key].append(row)
    current.sort(key=lambda r: (_set_order(r.set_id), r.result_key))
    released_by = session.get(User, order.released_by) if order.released_by else None
    return LabOrderOut(
        **_summary_fields(order, exam, patient, org, len(current)),
        sending_facility=order.sending_facility,
        service_system=order.service_system,
        result_status=order.result_status,
        specimens=list(order.specimens or []),
        hil=dict(order.hil or {}),
        rules_version=order.rules_version,
        critical_version=order.critical_version,
        order_trace=_trace(order.order_trace),
        released_by=released_by.username if released_by else None,
        released_by_name=(released_by.display_name or released_by.username)
        if released_by
        else None,
        report_id=order.report_id,
        autoverified_mark=AUTOVERIFIED_MARK if order.auto_released else None,
        results=[_result_out(r, history.get(r.result_key, [])) for r in current],
    )


def _set_order(set_id: str) -> tuple[int, str]:
    return (int(set_id), "") if set_id.isdigit() else (1 << 30, set_id)


def get_order(session: Session, *, principal: Principal, order_id: str) -> LabOrderOut:
    """One order with its results, each with its auto-verification trace and history
    (audited)."""
    _check_reader(principal)
    order = session.execute(
        _scoped(select(LabOrder).where(LabOrder.id == order_id), principal)
    ).scalar_one_or_none()
    if order is None:
        raise NotFoundError(f"no lab order {order_id}")
    record_access(session, principal, action="view", object_type=SUBJECT, object_id=order.id)
    return order_out(session, order)


# --- administration -----------------------------------------------------------------------


def _require_admin(principal: Principal) -> None:
    require_roles(principal, {Role.ADMIN}, lead_only=True)


def list_mapping_queue(
    session: Session, *, principal: Principal, include_resolved: bool = False
) -> list[MappingQueueEntryOut]:
    """Codes waiting for a mapping, most frequent first (administrators; audited)."""
    _require_admin(principal)
    stmt = select(LabMappingQueueEntry, Organization.code).outerjoin(
        Organization, Organization.id == LabMappingQueueEntry.org_id
    )
    if not include_resolved:
        stmt = stmt.where(LabMappingQueueEntry.resolved_at.is_(None))
    rows = session.execute(
        stmt.order_by(
            LabMappingQueueEntry.occurrences.desc(), LabMappingQueueEntry.last_seen_at.desc()
        ).limit(MAX_PAGE)
    ).all()
    record_access(session, principal, action="list", object_type="lab_mapping_queue")
    return [
        MappingQueueEntryOut(
            id=e.id,
            clinic=code,
            facility=e.facility,
            code_system=e.code_system,
            code=e.code,
            text=e.text,
            unit=e.unit,
            reason=e.reason,
            reason_zh=reason_zh(e.reason),
            occurrences=e.occurrences,
            example_order_id=e.example_order_id,
            first_seen_at=e.first_seen_at,
            last_seen_at=e.last_seen_at,
            resolved_at=e.resolved_at,
            resolved_loinc=e.resolved_loinc,
        )
        for e, code in rows
    ]


def _stop_row(session: Session) -> LabSetting | None:
    return session.get(LabSetting, AUTORELEASE_KEY)


def autorelease_enabled(session: Session, *, settings: Settings | None = None) -> bool:
    """Whether orders that pass auto-verification are released now: the setting is on, a
    signer is configured, and the run-time stop switch is off."""
    settings = settings or get_settings()
    if not settings.lab_autorelease or not settings.lab_autorelease_signer:
        return False
    row = _stop_row(session)
    return not (row is not None and bool((row.value or {}).get("stopped")))


def _switch_out(session: Session, settings: Settings) -> AutoreleaseSwitchOut:
    row = _stop_row(session)
    value = (row.value or {}) if row is not None else {}
    updater = session.get(User, row.updated_by) if row is not None and row.updated_by else None
    return AutoreleaseSwitchOut(
        enabled=autorelease_enabled(session, settings=settings),
        setting_enabled=settings.lab_autorelease,
        stopped=bool(value.get("stopped")),
        signer=settings.lab_autorelease_signer,
        updated_at=row.updated_at if row is not None else None,
        updated_by=updater.username if updater else None,
        reason=str(value.get("reason") or ""),
    )


def autorelease_switch(session: Session, *, principal: Principal) -> AutoreleaseSwitchOut:
    """The auto-release switch as it stands (lead-hospital staff)."""
    if principal.org_kind is not OrgKind.LEAD:
        raise PermissionDeniedError("only the lead hospital sees the auto-release switch")
    return _switch_out(session, get_settings())


def set_autorelease(
    session: Session, *, principal: Principal, enabled: bool, reason: str, now: datetime
) -> AutoreleaseSwitchOut:
    """Stop (``enabled`` false) or resume automatic release (administrators; audited)."""
    _require_admin(principal)
    row = _stop_row(session)
    value = {"stopped": not enabled, "reason": reason[:500]}
    if row is None:
        session.add(
            LabSetting(
                key=AUTORELEASE_KEY, value=value, updated_by=principal.user_id, updated_at=now
            )
        )
    else:
        row.value = value
        row.updated_by = principal.user_id
        row.updated_at = now
    session.flush()
    record_access(
        session,
        principal,
        action="lab.autorelease.resume" if enabled else "lab.autorelease.stop",
        object_type="lab_setting",
        object_id=AUTORELEASE_KEY,
        detail=value,
    )
    return _switch_out(session, get_settings())
