"""The audit trail for quality control: search events by user, patient, exam, action and
time, export them, and check the hash chain."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Select, String, and_, cast, func, or_, select
from sqlalchemy.orm import Session

from rdc_core.db import utcnow
from rdc_core.errors import InvalidInputError
from worklist.access import Principal, require_roles
from worklist.admin.schemas import AuditEventOut, AuditVerifyOut
from worklist.audit import AuditEvent, record_access, record_event, verify_chain
from worklist.models import Exam, Patient, Report, Role, WorkItem

__all__ = [
    "AuditFilter",
    "audit_events",
    "iter_audit_events",
    "require_audit_access",
    "verify_audit_chain",
]

_AUDIT_ROLES = frozenset({Role.QC, Role.ADMIN})
# A patient's or an exam's events are found by the IDs of what they hold; more exams than this
# (one patient) are searched by their newest ones.
_MAX_EXAMS = 200


class AuditFilter:
    """The search criteria; every one given must match."""

    def __init__(
        self,
        *,
        user: str | None = None,
        patient: str | None = None,
        exam: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> None:
        for name, value in (("from", since), ("to", until)):
            if value is not None and value.tzinfo is None:
                raise InvalidInputError(f"{name} needs a time zone, e.g. 2026-01-01T08:00:00+08:00")
        self.user = (user or "").strip() or None
        self.patient = (patient or "").strip() or None
        self.exam = (exam or "").strip() or None
        self.action = (action or "").strip() or None
        self.since = since
        self.until = until

    def as_detail(self) -> dict[str, Any]:
        return {
            k: v.isoformat() if isinstance(v, datetime) else v
            for k, v in (
                ("user", self.user),
                ("patient", self.patient),
                ("exam", self.exam),
                ("action", self.action),
                ("from", self.since),
                ("to", self.until),
            )
            if v is not None
        }


def _mentions(ids: list[str]) -> list[Any]:
    """Events about these objects, or listing them in their detail (e.g. a worklist page)."""
    if not ids:
        return []
    return [AuditEvent.object_id.in_(ids), *(_detail_names(i) for i in ids[:50])]


def _detail_names(value: str) -> Any:
    # Audit searches name what they searched for: they are not events about it.
    return and_(
        AuditEvent.object_type != "audit_events",
        cast(AuditEvent.detail, String).contains(f'"{value}"'),
    )


def _exam_related(session: Session, exam_ids: list[str]) -> list[str]:
    if not exam_ids:
        return []
    reports = session.execute(select(Report.id).where(Report.exam_id.in_(exam_ids))).scalars()
    items = session.execute(select(WorkItem.id).where(WorkItem.exam_id.in_(exam_ids))).scalars()
    return [*exam_ids, *reports, *items]


def _query(session: Session, f: AuditFilter) -> Select[Any]:
    stmt = select(AuditEvent)
    if f.user:
        user = f.user.removeprefix("user:")
        stmt = stmt.where(
            or_(
                AuditEvent.actor == f"user:{user}",
                AuditEvent.actor == f.user,
                AuditEvent.actor.like(f"{f.user}:%"),  # cli matches cli:<login name>
            )
        )
    if f.action:
        stmt = stmt.where(
            AuditEvent.action.like(f.action.replace("*", "%"))
            if "*" in f.action
            else AuditEvent.action == f.action
        )
    if f.since is not None:
        stmt = stmt.where(AuditEvent.at >= f.since)
    if f.until is not None:
        stmt = stmt.where(AuditEvent.at < f.until)
    if f.exam:
        exam_ids = list(
            session.execute(
                select(Exam.id).where(
                    or_(
                        Exam.id == f.exam,
                        Exam.natural_key == f.exam,  # Study Instance UID, order number
                        Exam.accession_number == f.exam,
                    )
                )
            ).scalars()
        ) or [f.exam]
        stmt = stmt.where(or_(*_mentions(_exam_related(session, exam_ids))))
    if f.patient:
        patients = list(
            session.execute(
                select(Patient.id).where(
                    or_(Patient.id == f.patient, Patient.patient_id == f.patient)
                )
            ).scalars()
        )
        exam_ids = list(
            session.execute(
                select(Exam.id)
                .where(Exam.patient_ref.in_(patients))
                .order_by(Exam.created_at.desc())
                .limit(_MAX_EXAMS)
            ).scalars()
        )
        ids = [*patients, *_exam_related(session, exam_ids)]
        conditions = _mentions(ids)
        # Look-ups name the patient by their ID within the issuer.
        conditions.append(_detail_names(f.patient))
        stmt = stmt.where(or_(*conditions))
    return stmt


def require_audit_access(principal: Principal | None) -> None:
    """QC staff and administrators of the lead hospital read the audit trail (``None``: the
    command line, a local operator)."""
    if principal is not None:
        require_roles(principal, _AUDIT_ROLES, lead_only=True)


def _record(session: Session, principal: Principal | None, action: str, f: AuditFilter) -> None:
    if principal is None:
        record_event(
            session,
            actor="cli",
            action=action,
            object_type="audit_events",
            object_id="*",
            detail=f.as_detail(),
        )
    else:
        record_access(
            session, principal, action=action, object_type="audit_events", detail=f.as_detail()
        )


def audit_events(
    session: Session,
    *,
    principal: Principal | None,
    criteria: AuditFilter,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditEventOut], int]:
    """One page of matching events, newest first, and their total. The search is audited."""
    require_audit_access(principal)
    stmt = _query(session, criteria)
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    rows = session.execute(
        stmt.order_by(AuditEvent.seq.desc()).limit(limit).offset(offset)
    ).scalars()
    items = [AuditEventOut.model_validate(r, from_attributes=True) for r in rows]
    _record(session, principal, "audit.search", criteria)
    return items, total


def iter_audit_events(
    session: Session, *, principal: Principal | None, criteria: AuditFilter
) -> Iterator[AuditEventOut]:
    """Every matching event, oldest first, fetched in batches (for the CSV export). The
    export is audited before the first row."""
    require_audit_access(principal)
    _record(session, principal, "audit.export", criteria)
    stmt = _query(session, criteria).order_by(AuditEvent.seq)
    last = 0
    while True:
        batch = list(session.execute(stmt.where(AuditEvent.seq > last).limit(1000)).scalars())
        if not batch:
            return
        for row in batch:
            yield AuditEventOut.model_validate(row, from_attributes=True)
        last = batch[-1].seq


def verify_audit_chain(session: Session, *, principal: Principal | None) -> AuditVerifyOut:
    """Recompute the hash chain: intact, or the first record that was changed or removed."""
    require_audit_access(principal)
    intact, bad = verify_chain(session)
    count = session.execute(select(func.count()).select_from(AuditEvent)).scalar_one()
    return AuditVerifyOut(intact=intact, first_bad_seq=bad, events=count, checked_at=utcnow())
