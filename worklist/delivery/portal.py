"""Clinics fetching their reports: the list of submitted versions, downloads of the signed
PDF and JSON document, the FHIR R4 DiagnosticReport, and the clinic's acknowledgement.

Clinic users see only their own organisation's exams (another clinic's report answers
404) and only submitted versions, never drafts. Every fetch is audited. The first fetch
of a final version by a clinic user is recorded as a portal delivery and sets the exam's
``delivered_at`` stage once; later fetches change neither.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, and_, case, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from rdc_core.db import insert_ignore, stable_id
from rdc_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from worklist.access import Principal
from worklist.audit import record_access
from worklist.critical_values.models import Notification
from worklist.delivery.fhir import diagnostic_report
from worklist.delivery.models import DeliveryChannel, DeliveryState, ReportDelivery
from worklist.delivery.schemas import AcknowledgementOut, RecognitionOut, ReportVersionOut
from worklist.delivery.service import PORTAL_TARGET, mark_exam_delivered
from worklist.models import Exam, Organization, Patient, Report, ReportStatus
from worklist.patients.national_id import shown_patient_id
from worklist.queries import visible_exam

__all__ = [
    "Artifact",
    "acknowledge_report",
    "fetch_report_artifact",
    "fetch_report_fhir",
    "list_reports",
    "visible_report",
]

MAX_PAGE = 500
_SUBMITTED = (ReportStatus.PRELIMINARY, ReportStatus.FINAL)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class Artifact:
    """A downloadable form of a report version."""

    content: bytes
    media_type: str
    filename: str


def visible_report(
    session: Session, *, principal: Principal, report_id: str
) -> tuple[Report, Exam]:
    """A submitted report version the principal may see, with its exam (404 otherwise)."""
    report = session.get(Report, report_id)
    if report is None or report.status not in _SUBMITTED:
        raise NotFoundError(f"no report {report_id}")
    try:
        exam = visible_exam(session, principal=principal, exam_id=report.exam_id)
    except NotFoundError:
        raise NotFoundError(f"no report {report_id}") from None
    return report, exam


def _filename(report: Report, exam: Exam, ext: str) -> str:
    base = _UNSAFE.sub("_", exam.accession_number or exam.id[:8]).strip("_") or "report"
    return f"report-{base}-v{report.version}.{ext}"


def _fetched(
    session: Session,
    *,
    principal: Principal,
    report: Report,
    exam: Exam,
    fmt: str,
    now: datetime,
) -> None:
    record_access(
        session,
        principal,
        action="download",
        object_type="report",
        object_id=report.id,
        detail={"format": fmt, "exam_id": exam.id, "version": report.version},
    )
    if not principal.is_clinic_user or report.status is not ReportStatus.FINAL:
        return
    _portal_delivery(session, principal=principal, report=report, exam=exam, fmt=fmt, now=now)


def _portal_delivery(
    session: Session, *, principal: Principal, report: Report, exam: Exam, fmt: str, now: datetime
) -> None:
    """The version's portal delivery row (created once, by its first fetch or its
    acknowledgement) and the exam's first delivery stage."""
    insert_ignore(
        session,
        ReportDelivery.__table__,
        {
            "id": stable_id("report_delivery", report.id, PORTAL_TARGET),
            "report_id": report.id,
            "exam_id": exam.id,
            "org_id": exam.org_id,
            "target": PORTAL_TARGET,
            "endpoint_id": None,
            "channel": DeliveryChannel.PORTAL.value,
            "state": DeliveryState.DELIVERED.value,
            "attempts": 0,
            "created_at": now,
            "delivered_at": now,
            "detail": {"user": principal.username, "format": fmt},
        },
        conflict=(),  # the ID derives from (report_id, target): a clash on either is this row
    )
    mark_exam_delivered(session, exam_id=exam.id, now=now)


def fetch_report_artifact(
    session: Session,
    *,
    principal: Principal,
    report_id: str,
    kind: Literal["pdf", "document"],
    now: datetime,
) -> Artifact:
    """The signed PDF or the signed JSON document of a report version (audited; a clinic's
    first fetch of a final version counts as its delivery)."""
    from worklist.signing.service import get_signed_artifact

    report, exam = visible_report(session, principal=principal, report_id=report_id)
    content = get_signed_artifact(session, report_id=report.id, kind=kind)
    _fetched(session, principal=principal, report=report, exam=exam, fmt=kind, now=now)
    if kind == "pdf":
        return Artifact(content, "application/pdf", _filename(report, exam, "pdf"))
    return Artifact(content, "application/json", _filename(report, exam, "json"))


def fetch_report_fhir(
    session: Session, *, principal: Principal, report_id: str, base_url: str, now: datetime
) -> dict[str, Any]:
    """The report version as a FHIR R4 DiagnosticReport (audited; counts as a fetch)."""
    from worklist.recognition.service import recognition_for_report
    from worklist.signing.service import get_signed_artifact

    report, exam = visible_report(session, principal=principal, report_id=report_id)
    try:
        pdf: bytes | None = get_signed_artifact(session, report_id=report.id, kind="pdf")
    except NotFoundError:
        pdf = None
    previous = session.get(Report, report.previous_id) if report.previous_id else None
    sections: list[dict[str, Any]] = []
    if pdf is not None:
        # What the signature covers: the discipline sections of the signed document.
        signed = json.loads(get_signed_artifact(session, report_id=report.id, kind="document"))
        sections = list((signed.get("document") or {}).get("sections") or [])
    resource = diagnostic_report(
        report=report,
        exam=exam,
        previous=previous,
        pdf=pdf,
        pdf_url=f"{base_url.rstrip('/')}/api/v1/reports/{report.id}/pdf",
        pdf_title=_filename(report, exam, "pdf"),
        recognition=recognition_for_report(session, report_id=report.id),
        sections=sections,
    )
    _fetched(session, principal=principal, report=report, exam=exam, fmt="fhir", now=now)
    return resource


def acknowledge_report(
    session: Session, *, principal: Principal, report_id: str, now: datetime
) -> AcknowledgementOut:
    """The clinic confirms it received this final version: the version's own portal
    delivery gets its acknowledged time once (and its delivered time, if no fetch recorded
    it yet); the exam's ``acknowledged`` stage is set by the first acknowledgement of any
    version. The version's report-version notifications are marked read. Clinic users only."""
    if not principal.is_clinic_user:
        raise PermissionDeniedError("only the clinic acknowledges its reports")
    report, exam = visible_report(session, principal=principal, report_id=report_id)
    if report.status is not ReportStatus.FINAL:
        raise InvalidInputError("only a final report can be acknowledged")
    _portal_delivery(session, principal=principal, report=report, exam=exam, fmt="ack", now=now)
    session.execute(
        update(Exam)
        .where(Exam.id == exam.id, Exam.acknowledged_at.is_(None))
        .values(acknowledged_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(ReportDelivery)
        .where(
            ReportDelivery.report_id == report.id,
            ReportDelivery.target == PORTAL_TARGET,
            ReportDelivery.acknowledged_at.is_(None),
        )
        .values(acknowledged_at=now)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Notification)
        .where(
            Notification.org_id == exam.org_id,
            Notification.subject_type == "report",
            Notification.subject_id == report.id,
            Notification.read_at.is_(None),
        )
        .values(read_at=now)
        .execution_options(synchronize_session=False)
    )
    delivered_at, acknowledged_at = session.execute(
        select(ReportDelivery.delivered_at, ReportDelivery.acknowledged_at).where(
            ReportDelivery.report_id == report.id, ReportDelivery.target == PORTAL_TARGET
        )
    ).one()
    record_access(
        session,
        principal,
        action="acknowledge",
        object_type="report",
        object_id=report.id,
        detail={"exam_id": exam.id, "version": report.version},
    )
    assert acknowledged_at is not None
    return AcknowledgementOut(
        report_id=report.id,
        exam_id=exam.id,
        version=report.version,
        delivered_at=delivered_at,
        acknowledged_at=acknowledged_at,
    )


def _newer_version_exists() -> Any:
    newer = aliased(Report)
    return exists().where(
        and_(
            newer.exam_id == Report.exam_id,
            newer.version > Report.version,
            newer.status.in_(_SUBMITTED),
        )
    )


def list_reports(
    session: Session,
    *,
    principal: Principal,
    exam_id: str | None = None,
    clinic: str | None = None,
    status: ReportStatus | None = None,
    since: datetime | None = None,
    current_only: bool = True,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[ReportVersionOut], int]:
    """Submitted report versions the principal may see, newest first, with the total.

    ``current_only`` keeps each exam's newest submitted version; without it every version
    is listed and ``current`` marks the newest one. ``since`` must carry a time zone.
    """
    from worklist.recognition.service import recognition_for_report

    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE}")
    if offset < 0:
        raise InvalidInputError("offset must not be negative")
    if status is ReportStatus.DRAFT:
        raise InvalidInputError("drafts are not delivered; status is final or preliminary")
    if since is not None and since.tzinfo is None:
        # A time without zone is ambiguous (a clinic in UTC+8 means local time): refuse it.
        raise InvalidInputError("since needs a time zone, e.g. 2026-01-01T08:00:00+08:00")
    issued = func.coalesce(Report.final_at, Report.submitted_at)
    stmt: Select[Report, Exam] = (
        select(Report, Exam)
        .join(Exam, Exam.id == Report.exam_id)
        .where(Report.status.in_(_SUBMITTED))
    )
    if principal.is_clinic_user:
        stmt = stmt.where(Exam.org_id == principal.org_id)
    if clinic:
        stmt = stmt.join(Organization, Organization.id == Exam.org_id).where(
            Organization.code == clinic
        )
    if exam_id:
        stmt = stmt.where(Report.exam_id == exam_id)
    if status:
        stmt = stmt.where(Report.status == status)
    if since:
        stmt = stmt.where(issued >= since)
    if current_only:
        stmt = stmt.where(~_newer_version_exists())
    total = session.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
    rows = session.execute(
        stmt.order_by(issued.desc(), Report.exam_id, Report.version.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    exam_ids = sorted({exam.id for _, exam in rows})
    newest = dict(
        session.execute(
            select(Report.exam_id, func.max(Report.version))
            .where(Report.exam_id.in_(exam_ids), Report.status.in_(_SUBMITTED))
            .group_by(Report.exam_id)
        ).all()
    )
    fetched = dict(
        session.execute(
            select(ReportDelivery.report_id, ReportDelivery.delivered_at).where(
                ReportDelivery.report_id.in_([r.id for r, _ in rows]),
                ReportDelivery.target == PORTAL_TARGET,
            )
        ).all()
    )
    # Each version has its own delivered / acknowledged times: the first delivery of that
    # version (portal fetch or accepted push) and the clinic's own receipt of it (a HIS
    # accepting a push is delivery, not a person acknowledging the report).
    per_version = {
        rid: (delivered, acknowledged)
        for rid, delivered, acknowledged in session.execute(
            select(
                ReportDelivery.report_id,
                func.min(ReportDelivery.delivered_at),
                func.min(
                    case(
                        (
                            ReportDelivery.target == PORTAL_TARGET,
                            ReportDelivery.acknowledged_at,
                        ),
                        else_=None,
                    )
                ),
            )
            .where(ReportDelivery.report_id.in_([r.id for r, _ in rows]))
            .group_by(ReportDelivery.report_id)
        ).all()
    }
    items = []
    for report, exam in rows:
        patient: Patient = exam.patient
        signer = report.verifier or report.author
        hr = recognition_for_report(session, report_id=report.id) or {}
        items.append(
            ReportVersionOut(
                report_id=report.id,
                exam_id=exam.id,
                version=report.version,
                status=report.status,
                current=newest.get(exam.id) == report.version,
                amendment_kind=report.amendment_kind.value if report.amendment_kind else None,
                amendment_reason=report.amendment_reason,
                previous_id=report.previous_id,
                submitted_at=report.submitted_at,
                final_at=report.final_at,
                signer=signer.display_name or signer.username,
                impression=report.impression,
                critical=report.critical,
                study_instance_uid=exam.study_instance_uid,
                accession_number=exam.accession_number,
                discipline=exam.discipline,
                modality=exam.modality,
                body_part=exam.body_part,
                description=exam.description,
                priority=exam.priority,
                performed_at=exam.performed_at,
                clinic_code=exam.organization.code,
                clinic_name=exam.organization.name,
                patient_id=shown_patient_id(patient.issuer, patient.patient_id),
                patient_issuer=patient.issuer,
                patient_name=patient.name,
                patient_sex=patient.sex,
                patient_birth_date=patient.birth_date,
                hr=RecognitionOut.model_validate(
                    {k: hr.get(k) for k in RecognitionOut.model_fields if hr.get(k) is not None}
                ),
                delivered_at=per_version.get(report.id, (None, None))[0],
                acknowledged_at=per_version.get(report.id, (None, None))[1],
                version_fetched_at=fetched.get(report.id),
                report_number=report.report_number,
                links={
                    "pdf": f"/api/v1/reports/{report.id}/pdf",
                    "document": f"/api/v1/reports/{report.id}/document",
                    "fhir": f"/api/v1/reports/{report.id}/fhir",
                    "deliveries": f"/api/v1/reports/{report.id}/deliveries",
                },
            )
        )
    record_access(
        session,
        principal,
        action="list",
        object_type="report",
        detail={"report_ids": [i.report_id for i in items]},
    )
    return items, int(total)
