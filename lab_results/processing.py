"""Processing an accepted lab message into the result model (the task after the ACK).

The intake has stored the raw message and answered AA/CA; this step, run by the task
``lab_results.process_message`` (enqueued after the commit, and swept up again by a periodic
task should the enqueue have been lost), does the rest in one transaction per message:

1. parse the stored bytes (:func:`lab_results.parse.parse_message`);
2. for each order: register the exam (discipline ``lab``, natural key
   ``filler@facility``, else ``placer@facility``) through the hub's intake contract, so a
   re-sent or corrected order upserts the same exam;
3. :func:`lab_results.evaluate.evaluate_order`: the order's next version (a correction,
   OBX-11 ``C``, makes a new version of the result, the earlier one kept), the mapping to
   the catalogue (unmapped codes go to the mapping queue), auto-verification with delta
   checks against the same person's earlier results from every clinic (patient index);
4. write the order and its results with each result's rule trace;
5. a critical result opens the critical-value loop at once (before any physician review),
   with its analyte, value and limit;
6. an order that passed is released and signed automatically (自动审核) under the
   configured lab physician (``RDC_LAB_AUTORELEASE_SIGNER``) unless the stop switch is on;
   the others enter the lab worklist;
7. the message is marked processed (or failed, with the reason) and, in enhanced mode with
   MSH-16 asking for it, the application acknowledgement is recorded.

Idempotent: the message row is locked and only a ``received`` message is processed; an
order's artifact ID derives from the message and the order's position, so a repeated run
finds its artifact indexed and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from lab_results.autoverify import (
    AUTOVERIFIED_MARK,
    AutoverificationResult,
    CriticalFinding,
    PriorResult,
    RuleSet,
    autoverify,
    load_rules,
)
from lab_results.corrections import OrderVersion, apply_correction, result_key
from lab_results.envelope import ErrorCode, ack_message, new_control_id, read_envelope
from lab_results.evaluate import OrderEvaluation, evaluate_order
from lab_results.intake import message_bytes
from lab_results.mapping import Mapped, MappedResult, Unmapped, load_catalogue, map_order
from lab_results.models import (
    LabCodeMapping,
    LabMappingQueueEntry,
    LabMessage,
    LabMessageStatus,
    LabObservation,
    LabOrder,
)
from lab_results.parse import LabMessage as LabMessageModel
from lab_results.parse import LabParseError, Observation, Order, parse_message
from lab_results.parse import Patient as HL7Patient
from lab_results.service import autorelease_enabled
from rdc_core.db import insert_ignore, stable_id
from rdc_core.errors import StorageError
from rdc_core.settings import Settings
from rdc_core.storage import ObjectStore, StoredObject, put_new_objects
from worklist.critical_values.service import raise_for_report
from worklist.directory import OrgRef, principal_for_user
from worklist.finalization import finalize_report
from worklist.intake import (
    ArtifactIn,
    ExamIn,
    PatientIn,
    PendingObject,
    RecordOutcome,
    register_artifact,
)
from worklist.models import (
    AmendmentKind,
    Discipline,
    Exam,
    ExamKeyKind,
    ExamState,
    Organization,
    OrgKind,
    Priority,
    Report,
    ReportStatus,
    Role,
    User,
    WorkItem,
    WorkItemState,
)
from worklist.patients import OtherIdentifier
from worklist.patients.links import same_person_clause
from worklist.readiness import due_time, requeue_exam, route_exam

__all__ = [
    "PreparedMessage",
    "ProcessOutcome",
    "WaitingMessage",
    "prepare_messages",
    "process_message",
    "process_prepared",
    "reverify_for_code",
    "rule_set",
]

log = logging.getLogger(__name__)

_PRIOR_LOOKBACK = timedelta(days=400)  # the rule set applies each analyte's own window
_MAX_KEY = 128


@dataclass
class ProcessOutcome:
    """What processing one message did."""

    message_id: str
    status: str  # processed, failed, skipped (not in state received)
    orders: list[str] = field(default_factory=list)  # order (= exam) IDs
    released: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    error: str = ""


@lru_cache(maxsize=4)
def _rules(path: Path | None, critical: Path | None) -> RuleSet:
    return load_rules(path, critical_limits=critical)


def rule_set(settings: Settings) -> RuleSet:
    """The configured auto-verification rule set with its critical limits."""
    return _rules(settings.lab_rules_path, settings.lab_critical_limits_path)


def _priority(order: Order) -> Priority | None:
    code = order.priority.strip().upper()[:1]
    if code in ("S", "C"):  # stat, callback
        return Priority.EMERGENCY
    if code in ("A", "T"):  # ASAP, timing critical
        return Priority.URGENT
    if code == "R":
        return Priority.ROUTINE
    return None


def _natural_key(order: Order, facility: str) -> str:
    number = order.filler_number or order.placer_number
    kind = "F" if order.filler_number else "P"
    return f"{kind}:{number}@{facility}"[:_MAX_KEY]


def _patient_in(patient: HL7Patient) -> PatientIn:
    first = next((i for i in patient.identifiers if i.value), None)
    name = patient.ideographic_name or next((n for n in patient.names if not n.is_empty), None)
    display = "^".join(p for p in (name.family, name.given) if p) if name else ""
    others = tuple(
        OtherIdentifier(issuer=i.assigning_authority, value=i.value, type_code=i.type_code)
        for i in patient.identifiers
        if i is not first and i.value
    )
    return PatientIn(
        patient_id=(first.value if first else "")[:64],
        issuer=(first.assigning_authority[:64] or None) if first else None,
        name=display[:200],
        birth_date=patient.birth_date.strftime("%Y%m%d") if patient.birth_date else None,
        sex=patient.sex[:16] or None,
        original={"pid3": [i.model_dump() for i in patient.identifiers]},
        other_ids=others,
    )


def _local_mappings(session: Session) -> dict[tuple[str, str], str]:
    rows = session.execute(
        select(LabCodeMapping.facility, LabCodeMapping.local_code, LabCodeMapping.loinc)
    ).all()
    return {(facility, code): loinc for facility, code, loinc in rows}


def _priors(
    session: Session, *, patient_ref: str, order_id: str, now: datetime
) -> list[PriorResult]:
    # The person's results from every clinic of the alliance: the patient index links the
    # clinics' identifiers of one person (worklist.patients), so a delta check also sees the
    # value another clinic's lab sent last week.
    rows = session.execute(
        select(
            LabObservation.analyte,
            LabObservation.numeric,
            LabObservation.unit,
            LabObservation.observed_at,
            LabObservation.created_at,
        ).where(
            same_person_clause(LabObservation.patient_ref, [patient_ref]),
            LabObservation.order_id != order_id,
            LabObservation.current.is_(True),
            LabObservation.analyte.is_not(None),
            LabObservation.numeric.is_not(None),
            LabObservation.created_at >= now - _PRIOR_LOOKBACK,
        )
    ).all()
    return [
        PriorResult(analyte=a, value=v, unit=u, observed_at=observed or created)
        for a, v, u, observed, created in rows
        if a is not None and v is not None
    ]


def _queue_unmapped(
    session: Session, *, unmapped: list[Unmapped], org_id: str, order_id: str, now: datetime
) -> None:
    for item in unmapped:
        entry_id = stable_id("lab_unmapped", item.facility, item.system, item.code)
        inserted = insert_ignore(
            session,
            LabMappingQueueEntry.__table__,
            {
                "id": entry_id,
                "org_id": org_id,
                "facility": item.facility[:255],
                "code_system": item.system[:64],
                "code": item.code[:64],
                "text": item.text[:255],
                "unit": item.unit[:64],
                "reason": item.reason,
                "occurrences": 1,
                "example_order_id": order_id,
                "first_seen_at": now,
                "last_seen_at": now,
                "resolved_at": None,
                "resolved_loinc": None,
            },
            conflict=["id"],
        )
        if not inserted:
            session.execute(
                update(LabMappingQueueEntry)
                .where(LabMappingQueueEntry.id == entry_id)
                .values(
                    occurrences=LabMappingQueueEntry.occurrences + 1,
                    last_seen_at=now,
                    example_order_id=order_id,
                )
                .execution_options(synchronize_session=False)
            )


def _hil(order: Order) -> dict[str, float | None]:
    hil = order.hil
    for specimen in order.specimens:
        hil = specimen.hil.merged(hil)
    return hil.model_dump()


def _specimens(order: Order) -> list[dict[str, Any]]:
    return [
        {
            "specimen_id": s.specimen_id,
            "type": s.type.display if s.type else "",
            "type_code": s.type.identifier if s.type else "",
            "collected_at": s.collected_at.isoformat() if s.collected_at else None,
            "received_at": s.received_at.isoformat() if s.received_at else None,
            "condition": [c.identifier or c.display for c in s.condition],
            "hil": s.hil.model_dump(),
        }
        for s in order.specimens
    ]


def _method(obs: Observation) -> str:
    return obs.method.display[:255] if obs.method else ""


def _lab(obs: Observation) -> str:
    if obs.performing_lab is None:
        return ""
    return (obs.performing_lab.name or obs.performing_lab.identifier)[:255]


def _trace_json(items: list[Any]) -> list[dict[str, Any]]:
    return [item.model_dump() for item in items]


def _write_results(
    session: Session,
    *,
    order_row: LabOrder,
    evaluation: OrderEvaluation,
    control_id: str,
    collected_at: datetime | None,
    now: datetime,
) -> dict[str, LabObservation]:
    """Insert the new result versions, mark the replaced ones history, and refresh every
    current result's verdict and trace; returns the current results by key."""
    version = evaluation.version
    verification = evaluation.verification
    mapped_by_key: dict[str, MappedResult] = {}
    verdicts: dict[str, Any] = {}
    for mapped, verdict in zip(evaluation.mapped.results, verification.results, strict=True):
        key = result_key(mapped.observation)
        mapped_by_key[key] = mapped
        verdicts[key] = verdict
    existing = {
        row.result_key: row
        for row in session.execute(
            select(LabObservation).where(
                LabObservation.order_id == order_row.id, LabObservation.current.is_(True)
            )
        ).scalars()
    }
    changed = {c.key for c in version.changes}
    for key in changed:
        old = existing.get(key)
        if old is not None:
            old.current = False
            old.superseded_at = now
    session.flush()
    current: dict[str, LabObservation] = {}
    for obs in version.results:
        key = result_key(obs)
        mapped = mapped_by_key[key]
        verdict = verdicts[key]
        row = existing.get(key)
        if key in changed or row is None:
            number = (row.version + 1) if row is not None else 1
            row = LabObservation(
                id=stable_id("lab_observation", order_row.id, key, str(number)),
                order_id=order_row.id,
                patient_ref=order_row.patient_ref,
                result_key=key[:255],
                version=number,
                order_version=version.version,
                current=True,
                control_id=control_id[:199],
                created_at=now,
            )
            session.add(row)
        entry = mapped.mapping.entry if isinstance(mapped.mapping, Mapped) else None
        row.set_id = obs.set_id[:16]
        row.sub_id = obs.sub_id[:32]
        row.code = obs.code.identifier[:64]
        row.code_system = (obs.code.system if obs.code.code else obs.code.alt_system)[:64]
        row.code_text = obs.code.display[:255]
        row.loinc = entry.loinc if entry else None
        row.analyte = entry.analyte if entry else None
        row.name_zh = entry.name_zh[:128] if entry else ""
        row.name_en = (entry.long_common_name if entry else obs.code.display)[:255]
        row.value_type = obs.value_type[:8]
        row.value = obs.value
        row.numeric = obs.numeric
        row.comparator = obs.comparator[:4]
        row.unit = obs.unit[:64]
        row.unit_ok = bool(mapped.mapping.unit_ok) if isinstance(mapped.mapping, Mapped) else True
        row.reference_range = obs.reference_range[:128]
        row.flags = list(obs.flags)
        row.status = obs.status[:4]
        row.method = _method(obs)
        row.performing_lab = _lab(obs)
        row.observed_at = obs.observed_at or collected_at
        row.verdict = verdict.verdict
        row.rules_version = verification.rules_version
        row.autoverification = _trace_json(verdict.trace)
        row.critical = verdict.verdict == "critical"
        current[key] = row
    # Results the new version deleted (OBX-11 D) stay only as history.
    session.flush()
    return current


def _findings_text(findings: list[CriticalFinding]) -> str:
    """One line per critical result: analyte, value and every limit it crossed (a numeric
    limit and the sender's LL/HH flag of one result are named together)."""
    grouped: dict[tuple[str, str, str], list[CriticalFinding]] = {}
    for finding in findings:
        grouped.setdefault((finding.code, finding.value, finding.unit), []).append(finding)
    parts = []
    for same in grouped.values():
        first = same[0]
        name = first.name_zh or first.analyte or first.code
        value = f"{first.value} {first.unit}".strip()
        limits = sorted({f.limit for f in same}, key=lambda limit: limit.startswith("flag"))
        parts.append(f"{name} ({first.analyte}) {value}，危急值界限 limit {' / '.join(limits)}")
    return "；".join(parts)


def _responsible_user(session: Session, settings: Settings) -> User | None:
    """The lab physician auto-released orders are signed under (the setting), else any
    active reader of the lead hospital (who then raises critical alerts)."""
    if settings.lab_autorelease_signer:
        user = session.execute(
            select(User).where(User.username == settings.lab_autorelease_signer)
        ).scalar_one_or_none()
        if user is not None and user.active:
            return user
    return session.execute(
        select(User)
        .join(Organization, Organization.id == User.org_id)
        .where(
            Organization.kind == OrgKind.LEAD,
            User.active.is_(True),
            User.role.in_([Role.SENIOR_READER, Role.READER, Role.ADMIN]),
        )
        .order_by(User.role, User.created_at)
        .limit(1)
    ).scalar_one_or_none()


def _current_report(session: Session, exam_id: str) -> Report | None:
    return session.execute(
        select(Report).where(Report.exam_id == exam_id).order_by(Report.version.desc()).limit(1)
    ).scalar_one_or_none()


def _raise_critical(
    session: Session,
    *,
    exam: Exam,
    findings: list[CriticalFinding],
    user: User | None,
    now: datetime,
) -> str | None:
    """Open the critical-value loop for ``findings`` at once: a draft report of the exam
    marked critical names each analyte, value and limit, and the hub's alert goes to the
    clinic. The lab physician later completes and signs that report."""
    if user is None:
        log.error("lab exam %s: critical results, but no lead-hospital user to raise them", exam.id)
        return None
    text = _findings_text(findings)
    report = _current_report(session, exam.id)
    if report is None:
        report = Report(
            id=stable_id("report", exam.id, "1"),
            exam_id=exam.id,
            version=1,
            status=ReportStatus.DRAFT,
            author_id=user.id,
            author_level=user.level,
            structured={},
            created_at=now,
            updated_at=now,
            revision=0,
        )
        session.add(report)
    elif report.status is not ReportStatus.DRAFT:
        return None  # a signed report: the physician's amendment carries the alert
    report.critical = True
    report.impression = f"危急值 Critical value: {text}"
    report.structured = {
        **(report.structured or {}),
        "lab_critical": [f.model_dump() for f in findings],
    }
    report.updated_at = now
    report.revision = (report.revision or 0) + 1
    session.flush()
    return raise_for_report(
        session, report=report, exam=exam, signer=principal_for_user(user), now=now
    )


def _results_text(current: dict[str, LabObservation]) -> str:
    lines = []
    for row in sorted(current.values(), key=lambda r: (len(r.set_id), r.set_id, r.result_key)):
        name = row.name_zh or row.code_text or row.code
        flags = "".join(f for f in row.flags if f and f != "N")
        ref = f" ({row.reference_range})" if row.reference_range else ""
        lines.append(f"{name} {row.value} {row.unit}{ref} {flags}".rstrip())
    return "\n".join(lines)


def _release(
    session: Session,
    *,
    order_row: LabOrder,
    exam: Exam,
    current: dict[str, LabObservation],
    user: User,
    now: datetime,
) -> str:
    """Release the order automatically: a final report signed under ``user``, marked
    自动审核 (a correction of a released order is a corrected version of that report)."""
    previous = _current_report(session, exam.id)
    if previous is not None and previous.status is not ReportStatus.FINAL:
        previous = None  # an unsigned draft is replaced below
    number = previous.version + 1 if previous is not None else 1
    report = session.get(Report, stable_id("report", exam.id, str(number)))
    if report is None:
        report = Report(
            id=stable_id("report", exam.id, str(number)),
            exam_id=exam.id,
            version=number,
            previous_id=previous.id if previous is not None else None,
            created_at=now,
            revision=0,
        )
        session.add(report)
    report.status = ReportStatus.FINAL
    report.author_id = user.id
    report.author_level = user.level
    report.template_code = None
    report.findings = _results_text(current)
    report.impression = f"{AUTOVERIFIED_MARK} Auto-verified: every result passed the rules"
    report.critical = False
    report.structured = {
        "lab": {
            "order_id": order_row.id,
            "version": order_row.version,
            "rules_version": order_row.rules_version,
            "results": [
                {
                    "code": r.code,
                    "loinc": r.loinc,
                    "name_zh": r.name_zh,
                    "value": r.value,
                    "unit": r.unit,
                    "reference_range": r.reference_range,
                    "flags": list(r.flags),
                    "status": r.status,
                }
                for r in current.values()
            ],
        },
        "autoverified": True,
        "mark": AUTOVERIFIED_MARK,
    }
    if previous is not None:
        report.amendment_kind = AmendmentKind.CORRECTED
        report.amendment_reason = "corrected results (OBX-11 C), auto-verified again"
    report.submitted_at = now
    report.final_at = now
    report.updated_at = now
    exam.state = ExamState.FINAL
    exam.final_at = now
    session.execute(
        update(WorkItem)
        .where(WorkItem.exam_id == exam.id, WorkItem.state != WorkItemState.DONE)
        .values(state=WorkItemState.DONE, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    finalize_report(session, report=report, exam=exam, signer=principal_for_user(user), now=now)
    order_row.released_at = now
    order_row.released_by = user.id
    order_row.auto_released = True
    order_row.report_id = report.id
    return report.id


def _hold(session: Session, *, exam: Exam, order_row: LabOrder, now: datetime) -> None:
    """Put the exam on the lab worklist for a lab physician."""
    order_row.released_at = None
    order_row.released_by = None
    order_row.auto_released = False
    if exam.work_item is not None:
        if exam.work_item.state in (WorkItemState.DONE, WorkItemState.CANCELLED):
            requeue_exam(session, exam=exam, now=now)
        return
    exam.state = ExamState.READY
    exam.ready_at = now
    session.flush()
    insert_ignore(
        session,
        WorkItem.__table__,
        {
            "id": stable_id("work_item", exam.id),
            "exam_id": exam.id,
            "state": WorkItemState.OPEN.value,
            "pool": route_exam(session, exam=exam),
            "priority": exam.priority.value,
            "priority_rank": exam.priority.rank,
            "due_at": due_time(session, exam=exam),
            "org_id": exam.org_id,
            "discipline": exam.discipline.value,
            "modality": exam.modality,
            "created_at": now,
        },
        conflict=(),  # the ID derives from exam_id: a clash on either is the same item,
    )


def _process_order(
    session: Session,
    *,
    message: LabMessage,
    index: int,
    order: Order,
    patient: PatientIn,
    sex: str,
    org: OrgRef,
    facility: str,
    settings: Settings,
    outcome: ProcessOutcome,
    now: datetime,
) -> None:
    natural_key = _natural_key(order, facility)
    registration = register_artifact(
        session,
        org=org,
        patient=patient,
        exam=ExamIn(
            discipline=Discipline.LAB,
            natural_key=natural_key,
            key_kind=ExamKeyKind.ORDER,
            accession_number=(order.placer_number or order.filler_number)[:64] or None,
            modality="LAB",
            description=(order.service.display or "")[:200],
            performed_at=order.collected_at,
            priority=_priority(order),
        ),
        artifact=ArtifactIn(
            kind="hl7_order",
            ref=f"{message.id}:{index}",
            object=PendingObject.durable(
                StoredObject(
                    key=message.object_key, size=message.size_bytes, sha256=message.content_sha256
                )
            ),
            source=message.channel,
        ),
        now=now,
    )
    exam_id = registration.exam_id
    outcome.orders.append(exam_id)
    if registration.outcome is RecordOutcome.DUPLICATE:
        return  # this order of this message was processed before
    exam = session.get(Exam, exam_id, populate_existing=True)
    assert exam is not None
    order_row = session.get(LabOrder, exam_id)
    previous = (
        OrderVersion.model_validate(order_row.version_doc)
        if order_row is not None and order_row.version_doc
        else None
    )
    if (
        previous is not None
        and apply_correction(previous, order, control_id=message.control_id) is None
    ):
        return  # the message repeats the stored version: nothing to look up or write
    stop = not autorelease_enabled(session, settings=settings)
    evaluation = evaluate_order(
        order,
        control_id=message.control_id,
        facility=facility,
        catalogue=load_catalogue(),
        rules=rule_set(settings),
        previous=previous,
        local_mappings=_local_mappings(session),
        priors=_priors(session, patient_ref=exam.patient_ref, order_id=exam_id, now=now),
        sex=sex,
        stop_switch=stop,
        received_at=message.received_at,
    )
    if evaluation is None:
        return  # the message repeats the stored version
    if order_row is None:
        order_row = LabOrder(
            id=exam_id,
            exam_id=exam_id,
            org_id=exam.org_id,
            patient_ref=exam.patient_ref,
            natural_key=natural_key,
            arrived_at=message.received_at,
            created_at=now,
        )
        session.add(order_row)
    order_row.sending_facility = facility[:255]
    order_row.placer_number = order.placer_number[:128]
    order_row.filler_number = order.filler_number[:128]
    order_row.service_code = order.service.identifier[:64]
    order_row.service_text = order.service.display[:255]
    order_row.service_system = (order.service.system or order.service.alt_system)[:64]
    order_row.priority = order.priority[:16]
    order_row.result_status = order.result_status[:8]
    order_row.collected_at = order.collected_at or order_row.collected_at
    order_row.specimen_received_at = order.received_at or order_row.specimen_received_at
    order_row.reported_at = order.reported_at or order_row.reported_at
    order_row.specimens = _specimens(order) or list(order_row.specimens or [])
    order_row.hil = _hil(order)
    order_row.message_id = message.id
    _apply_evaluation(
        session,
        exam=exam,
        order_row=order_row,
        evaluation=evaluation,
        control_id=message.control_id,
        collected_at=order.collected_at,
        stop=stop,
        settings=settings,
        outcome=outcome,
        now=now,
    )


def _apply_evaluation(
    session: Session,
    *,
    exam: Exam,
    order_row: LabOrder,
    evaluation: OrderEvaluation,
    control_id: str,
    collected_at: datetime | None,
    stop: bool,
    settings: Settings,
    outcome: ProcessOutcome,
    now: datetime,
    may_release: bool = True,
) -> None:
    """Store an order's evaluation: its version and verdict, the results with their traces,
    the codes still unmapped; then a critical alert, and the release or the lab worklist."""
    exam_id = exam.id
    order_row.version = evaluation.version.version
    order_row.version_doc = evaluation.version.model_dump(mode="json")
    verification: AutoverificationResult = evaluation.verification
    order_row.verdict = verification.verdict
    order_row.rules_version = verification.rules_version
    order_row.critical_version = verification.critical_version
    order_row.order_trace = _trace_json(verification.order_trace)
    order_row.critical = bool(verification.critical_findings)
    order_row.updated_at = now
    session.flush()
    current = _write_results(
        session,
        order_row=order_row,
        evaluation=evaluation,
        control_id=control_id,
        collected_at=collected_at,
        now=now,
    )
    _queue_unmapped(
        session, unmapped=evaluation.unmapped, org_id=exam.org_id, order_id=exam_id, now=now
    )
    user = _responsible_user(session, settings)
    if verification.critical_findings:
        alert = _raise_critical(
            session, exam=exam, findings=verification.critical_findings, user=user, now=now
        )
        if alert:
            outcome.alerts.append(alert)
    signer = user if user is not None and settings.lab_autorelease_signer == user.username else None
    if verification.verdict == "release" and signer is not None and not stop and may_release:
        _release(session, order_row=order_row, exam=exam, current=current, user=signer, now=now)
        outcome.released.append(exam_id)
    else:
        _hold(session, exam=exam, order_row=order_row, now=now)
        outcome.held.append(exam_id)
    session.flush()


def _application_ack(
    raw: bytes, *, code: str, reason: str, now: datetime, settings: Settings
) -> tuple[str, bytes] | None:
    """The application acknowledgement MSH-16 asks for (AL always, ER on error), or None."""
    envelope = read_envelope(raw)
    wanted = envelope.application_ack_type.strip().upper()
    if not envelope.enhanced_mode or wanted not in ("AL", "ER", "SU"):
        return None
    if (wanted == "ER" and code == "AA") or (wanted == "SU" and code != "AA"):
        return None
    text = ack_message(
        envelope,
        code=code,
        now=now.astimezone(settings.zone),
        control_id=new_control_id(),
        reason=reason,
        error=ErrorCode.INTERNAL if code != "AA" else None,
    )
    return code, text.encode(envelope.codec, "replace")


class WaitingMessage(NamedTuple):
    """An accepted message to process: its row's ID, object key and copy of the bytes
    (None once processing wrote them to the object store, or for rows of before 0024)."""

    id: str
    object_key: str
    raw: bytes | None


@dataclass(frozen=True)
class PreparedMessage:
    """A stored message read and parsed, before any database write (so that a batch's
    parsing does not hold the database's writer). ``moved``: its bytes were in its row and
    are now in the object store too, durably (the transaction empties the row's copy)."""

    message_id: str
    raw: bytes
    parsed: LabMessageModel | None
    error: str = ""
    moved: bool = False


def prepare_messages(
    waiting: Sequence[WaitingMessage], *, store: ObjectStore, settings: Settings
) -> list[PreparedMessage]:
    """Read and parse messages (no database work). Bytes still in their rows are written
    to the object store first, durably, with one sync for all of them where the store
    allows (an object a crashed run wrote already is written again). The rule set and the
    catalogue are loaded here too (once per process), not inside the transaction. Raises
    StorageError (an outage: process them later)."""
    rule_set(settings)
    load_catalogue()
    moving = [(w.object_key, w.raw) for w in waiting if w.raw is not None]
    if moving:
        try:
            put_new_objects(store, moving)
        except StorageError:
            for key, data in moving:  # some exist (a crashed run's), or the store failed
                store.put_bytes(key, data)
    prepared = []
    for w in waiting:
        raw = message_bytes(raw=w.raw, object_key=w.object_key, store=store)
        try:
            parsed = parse_message(raw, tz=settings.zone)
        except LabParseError as exc:
            parsed, error = None, exc.reason
        else:
            error = ""
        prepared.append(
            PreparedMessage(
                message_id=w.id, raw=raw, parsed=parsed, error=error, moved=w.raw is not None
            )
        )
    return prepared


def process_message(
    session: Session, *, message_id: str, store: ObjectStore, settings: Settings, now: datetime
) -> ProcessOutcome:
    """Turn the accepted message ``message_id`` into orders and results (see the module);
    the caller commits. A message not in state ``received`` is skipped."""
    message = session.get(LabMessage, message_id)
    if message is None or message.status is not LabMessageStatus.RECEIVED:
        return ProcessOutcome(message_id=message_id, status="skipped")
    waiting = WaitingMessage(id=message.id, object_key=message.object_key, raw=message.raw)
    prepared = prepare_messages([waiting], store=store, settings=settings)[0]
    return process_prepared(session, prepared=prepared, settings=settings, now=now)


def process_prepared(
    session: Session, *, prepared: PreparedMessage, settings: Settings, now: datetime
) -> ProcessOutcome:
    """The database part of :func:`process_message` for a message read and parsed already.
    The message row is locked first (on PostgreSQL a row another worker holds is skipped:
    that worker processes it); a message not in state ``received`` is skipped."""
    message_id = prepared.message_id
    message = session.execute(
        select(LabMessage)
        .where(LabMessage.id == message_id)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if message is None or message.status is not LabMessageStatus.RECEIVED:
        return ProcessOutcome(message_id=message_id, status="skipped")
    if prepared.moved:
        message.raw = None  # the object store has them now, durably
    outcome = ProcessOutcome(message_id=message_id, status="processed")
    raw, parsed = prepared.raw, prepared.parsed
    if parsed is None:
        return _fail(session, message, raw, prepared.error, outcome, settings, now)
    org_row = session.get(Organization, message.org_id)
    assert org_row is not None
    org = OrgRef(id=org_row.id, code=org_row.code, kind=org_row.kind)
    header = parsed.header
    facility = (header.facility_names or [header.sending_application.namespace_id or "?"])[0]
    patient = _patient_in(parsed.patient)
    if not patient.patient_id:
        return _fail(session, message, raw, "no patient identifier (PID-3)", outcome, settings, now)
    orders = [o for o in parsed.orders if o.key]
    if not orders:
        return _fail(session, message, raw, "no order number (OBR-2/OBR-3)", outcome, settings, now)
    for index, order in enumerate(orders):
        _process_order(
            session,
            message=message,
            index=index,
            order=order,
            patient=patient,
            sex=parsed.patient.sex,
            org=org,
            facility=facility,
            settings=settings,
            outcome=outcome,
            now=now,
        )
    message.status = LabMessageStatus.PROCESSED
    message.processed_at = now
    message.exam_id = outcome.orders[0] if outcome.orders else None
    answer = _application_ack(raw, code="AA", reason="", now=now, settings=settings)
    if answer is not None:
        message.app_ack_code, message.app_ack = answer
    session.flush()
    return outcome


def _fail(
    session: Session,
    message: LabMessage,
    raw: bytes,
    reason: str,
    outcome: ProcessOutcome,
    settings: Settings,
    now: datetime,
) -> ProcessOutcome:
    log.warning("lab message %s (%s) not processed: %s", message.id, message.control_id, reason)
    message.status = LabMessageStatus.FAILED
    message.processed_at = now
    message.error = reason[:4000]
    answer = _application_ack(raw, code="AE", reason=reason, now=now, settings=settings)
    if answer is not None:
        message.app_ack_code, message.app_ack = answer
    session.flush()
    outcome.status = "failed"
    outcome.error = reason
    return outcome


# --- re-verification after the administrators map a held code ------------------------------


def _parsed_order(raw: bytes, *, order_key: str, settings: Settings) -> tuple[Order, str] | None:
    """The order ``order_key`` of a stored message, and its patient's sex (PID-8)."""
    try:
        parsed = parse_message(raw, tz=settings.zone)
    except LabParseError:
        return None
    order = next((o for o in parsed.orders if o.key == order_key), None)
    return (order, parsed.patient.sex) if order is not None else None


def reverify_for_code(
    session: Session,
    *,
    facility: str,
    code: str,
    store: ObjectStore,
    settings: Settings,
    now: datetime,
) -> ProcessOutcome:
    """Verify again the orders held with an unmapped result of ``code`` (from ``facility``;
    ``*``: any sender) now that a mapping exists: the stored current version is mapped and
    auto-verified again (no new version), its results updated in place, then released,
    alerted or left on the lab worklist as a new message would be. Orders already released
    or signed are not touched. Idempotent: a second run finds no unmapped result left."""
    outcome = ProcessOutcome(message_id="", status="processed")
    # The IDs first (DISTINCT over the JSON columns of the rows is not possible on PostgreSQL).
    stmt = (
        select(LabOrder.id)
        .join(LabObservation, LabObservation.order_id == LabOrder.id)
        .where(
            LabObservation.current.is_(True),
            LabObservation.loinc.is_(None),
            LabObservation.code == code,
            LabOrder.released_at.is_(None),
        )
        .distinct()
        .order_by(LabOrder.id)
    )
    if facility != "*":
        stmt = stmt.where(LabOrder.sending_facility == facility)
    ids = list(session.execute(stmt).scalars())
    orders = [o for o in (session.get(LabOrder, i) for i in ids) if o is not None]
    if not orders:
        return outcome
    local = _local_mappings(session)
    stop = not autorelease_enabled(session, settings=settings)
    for order_row in orders:
        exam = session.get(Exam, order_row.exam_id)
        message = session.get(LabMessage, order_row.message_id) if order_row.message_id else None
        if exam is None or message is None or not order_row.version_doc:
            continue
        report = _current_report(session, exam.id)
        if report is not None and report.status is not ReportStatus.DRAFT:
            continue  # signed: a correction or an amendment changes it now
        previous = OrderVersion.model_validate(order_row.version_doc)
        raw = message_bytes(raw=message.raw, object_key=message.object_key, store=store)
        found = _parsed_order(raw, order_key=previous.order_key, settings=settings)
        if found is None:
            log.warning("lab order %s: its message no longer parses; not re-verified", exam.id)
            continue
        order, sex = found
        current = order.model_copy(update={"observations": previous.results})
        mapped = map_order(
            current,
            facility=order_row.sending_facility,
            catalogue=load_catalogue(),
            local_mappings=local,
        )
        verification = autoverify(
            mapped,
            _priors(session, patient_ref=order_row.patient_ref, order_id=order_row.id, now=now),
            rule_set(settings),
            stop,
            sex=sex,
        )
        evaluation = OrderEvaluation(
            version=previous.model_copy(update={"changes": []}),
            mapped=mapped,
            verification=verification,
        )
        # A physician who has started reviewing the order keeps it (no auto-release).
        reviewing = report is not None and "lab_review" in (report.structured or {})
        outcome.orders.append(exam.id)
        _apply_evaluation(
            session,
            exam=exam,
            order_row=order_row,
            evaluation=evaluation,
            control_id=previous.control_id,
            collected_at=order.collected_at,
            stop=stop,
            settings=settings,
            outcome=outcome,
            now=now,
            may_release=not reviewing,
        )
    return outcome
