"""Mutual recognition of results: the decision at signing (DESIGN §5), the lookup of a
patient's still-valid recognised results, and clinicians' declines.

A result carries the mark only if its item is in the current catalogue, the performing
institution's accreditation (for the item or its whole discipline) was valid on the exam
date, the image grade meets the item's minimum, and a qualified reader signed the report.
Every decision is recorded with its reasons, granted or not. Recognition covers the
examination data and images, never the reader's conclusion.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from rdc_core.db import insert_ignore, stable_id
from rdc_core.errors import InvalidInputError, NotFoundError
from rdc_core.settings import get_settings
from worklist.access import Principal, require_roles
from worklist.audit import record_access
from worklist.models import (
    Exam,
    Organization,
    QualityGrade,
    ReaderLevel,
    Report,
    ReportStatus,
    Role,
    User,
)
from worklist.patients.links import same_person_clause
from worklist.patients.national_id import shown_patient_id
from worklist.patients.service import resolve_patient_refs
from worklist.queries import visible_exam
from worklist.recognition.catalog import catalog_items, current_catalog
from worklist.recognition.models import (
    Accreditation,
    CatalogItem,
    DeclineReason,
    RecognitionDecision,
    RecognitionDecline,
)

__all__ = [
    "COVERS_TEXT",
    "DECLINE_REASON_LABELS",
    "decline_result",
    "evaluate_report",
    "exam_local_date",
    "list_declines",
    "recognition_for_report",
    "recognized_results",
    "visible_recognition",
]

COVERS = "data_and_images"
COVERS_TEXT = (
    "互认范围为检查检验数据和图像，不包括诊断结论 / "
    "Recognition covers the examination data and images, not the reader's conclusion"
)
DECLINE_REASON_LABELS: dict[DeclineReason, tuple[str, str]] = {
    DeclineReason.CONDITION_CHANGED: (
        "病情变化或结果与临床表现不符",
        "Condition changed, or the result is inconsistent with the clinical picture",
    ),
    DeclineReason.FAST_CHANGING: ("指标变化快，需复查", "Fast-changing value"),
    DeclineReason.HIGH_STAKES: (
        "涉及手术、输血等重大医疗决策",
        "High-stakes decision (e.g. surgery, transfusion)",
    ),
    DeclineReason.EMERGENCY: ("急诊、急救需要", "Emergency"),
    DeclineReason.FORENSIC: ("司法鉴定、伤残鉴定等", "Forensic or disability appraisal"),
    DeclineReason.PATIENT_REQUEST: ("患者主动要求", "Patient's request"),
    DeclineReason.OTHER: ("其他", "Other"),
}
# 甲 > 乙 > 丙 > 废.
_GRADE_RANK = {QualityGrade.A: 3, QualityGrade.B: 2, QualityGrade.C: 1, QualityGrade.REJECT: 0}
_LOOKUP_ROLES = frozenset(Role)  # clinic users and every kind of lead-hospital staff
_DECLINE_LISTERS = frozenset({Role.QC, Role.ADMIN, Role.CLINICIAN, Role.TECHNICIAN})


def _reason(code: str, passed: bool, zh: str, en: str) -> dict[str, Any]:
    return {"code": code, "passed": passed, "text": f"{zh} / {en}", "text_zh": zh, "text_en": en}


def exam_local_date(exam: Exam) -> date:
    """The day the exam was done, in the clinics' time zone (performed, else first received)."""
    at = exam.performed_at or exam.first_received_at
    return at.astimezone(get_settings().zone).date()


def _scope_text(mark: str, note: str) -> str:
    if mark == "HR":
        return f"{get_settings().alliance_name} 医联体内互认 / recognised within the alliance"
    if mark == "全国HR":
        return "全国互认 / recognised nationwide"
    if mark.endswith("HR"):
        return f"{mark[:-2]} 省内互认 / recognised within the province ({mark[:-2]})"
    return note


def _exam_modalities(exam: Exam) -> set[str]:
    return {m.upper() for m in re.split(r"[\\,\s]+", f"{exam.modality}\\{exam.modalities}") if m}


def _match(items: list[CatalogItem], exam: Exam, report: Report) -> CatalogItem | None:
    """The catalogue item covering ``exam``: the most specific match, then the lowest code."""
    modalities = _exam_modalities(exam)
    body_part = (exam.body_part or "").upper()
    # Lab results carry their test codes in the report's structured data until the lab
    # result model links them to the exam.
    tests = {str(c) for c in (report.structured or {}).get("test_codes", []) or []}
    best: tuple[int, CatalogItem] | None = None
    for item in items:
        if item.discipline != exam.discipline:
            continue
        if item.modality and item.modality not in modalities:
            continue
        if item.body_part and item.body_part != body_part:
            continue
        if item.test_codes and not tests.intersection(item.test_codes):
            continue
        rank = bool(item.modality) + 2 * bool(item.body_part) + 2 * bool(item.test_codes)
        if best is None or rank > best[0]:
            best = (rank, item)
    return best[1] if best else None


def _accreditation_reason(
    session: Session, exam: Exam, item: CatalogItem, exam_date: date
) -> dict[str, Any]:
    rows = list(
        session.execute(
            select(Accreditation).where(
                Accreditation.org_id == exam.org_id,
                Accreditation.discipline == item.discipline,
                Accreditation.item_code.in_((item.code, "")),
            )
        ).scalars()
    )
    clinic = exam.organization.code
    valid = [a for a in rows if a.valid_from <= exam_date <= a.valid_to]
    if valid:
        # An item's own accreditation says more than the discipline's.
        acc = sorted(valid, key=lambda a: (a.item_code == "", -a.valid_to.toordinal()))[0]
        what_zh = f"项目 {item.code}" if acc.item_code else f"{item.discipline.value} 专业"
        what_en = (
            f"item {item.code}" if acc.item_code else f"the {item.discipline.value} discipline"
        )
        window = f"{acc.valid_from.isoformat()}–{acc.valid_to.isoformat()}"
        note = f" ({acc.note})" if acc.note else ""
        return _reason(
            "accredited",
            True,
            f"{clinic} 的{what_zh}质控合格，有效期 {window}{note}",
            f"{clinic} is QC-accredited for {what_en}, valid {window}{note}",
        )
    day = exam_date.isoformat()
    if any(a.valid_to < exam_date for a in rows) and not any(
        a.valid_from > exam_date for a in rows
    ):
        last = max(a.valid_to for a in rows).isoformat()
        return _reason(
            "accreditation_expired",
            False,
            f"{clinic} 的质控合格已于 {last} 到期，检查日期 {day}",
            f"{clinic}'s QC accreditation expired on {last}; the exam was done on {day}",
        )
    if rows:
        first = min(a.valid_from for a in rows if a.valid_from > exam_date).isoformat()
        return _reason(
            "accreditation_not_yet_valid",
            False,
            f"{clinic} 的质控合格自 {first} 起有效，检查日期 {day} 在此之前",
            f"{clinic}'s QC accreditation starts on {first}, after the exam date {day}",
        )
    return _reason(
        "not_accredited",
        False,
        f"{clinic} 没有项目 {item.code} 或 {item.discipline.value} 专业的质控合格记录",
        f"{clinic} holds no QC accreditation for item {item.code} or its discipline",
    )


def _grade_reason(report: Report, item: CatalogItem) -> dict[str, Any] | None:
    if item.min_grade is None:
        return None
    grade = report.quality_grade
    need = item.min_grade.value
    if grade is None:
        return _reason(
            "grade_missing",
            False,
            f"未评定图像质量，要求 {need} 级及以上",
            f"image quality not graded; grade {need} or better is required",
        )
    if _GRADE_RANK[grade] < _GRADE_RANK[item.min_grade]:
        return _reason(
            "grade_below_minimum",
            False,
            f"图像质量 {grade.value} 级，低于要求的 {need} 级",
            f"image grade {grade.value} is below the required {need}",
        )
    return _reason(
        "grade_meets_minimum",
        True,
        f"图像质量 {grade.value} 级，达到 {need} 级要求",
        f"image grade {grade.value} meets the required {need}",
    )


def _reader_reason(session: Session, signer: Principal, exam: Exam) -> dict[str, Any]:
    senior = signer.role is Role.SENIOR_READER or signer.level in (
        ReaderLevel.ATTENDING,
        ReaderLevel.CHIEF,
    )
    name = signer.username
    if not senior:
        level = signer.level.value if signer.level else signer.role.value
        return _reason(
            "reader_not_qualified",
            False,
            f"签发医师 {name}（{level}）不具备主治及以上资格",
            f"signed by {name} ({level}), not an attending or chief reader",
        )
    user = session.get(User, signer.user_id)
    qualifications = (user.qualifications if user else None) or []
    if qualifications:
        modalities = _exam_modalities(exam)
        fits = any(
            q.get("discipline") == exam.discipline.value
            and (not q.get("modality") or q["modality"].upper() in modalities)
            for q in qualifications
        )
        if not fits:
            what = f"{exam.discipline.value} {exam.modality}".strip()
            return _reason(
                "reader_not_qualified_for_exam",
                False,
                f"签发医师 {name} 的执业范围不含 {what}",
                f"signer {name} is not qualified for {what}",
            )
    level = signer.level.value if signer.level else signer.role.value
    return _reason(
        "reader_qualified",
        True,
        f"由具备资格的医师 {name}（{level}）签发",
        f"signed by qualified reader {name} ({level})",
    )


def evaluate_report(
    session: Session,
    *,
    report: Report,
    exam: Exam,
    signer: Principal,
    now: datetime,
    preview: bool = False,
) -> dict[str, Any] | None:
    """Decide and record whether the final report version's result carries the mark.

    Returns the decision as JSON-able data for the signed document and the PDF: always a
    dict (a result outside the catalogue is a recorded "not_in_catalogue" decision), with
    ``granted``, the item, ``mark`` (None unless granted), ``scope``, ``catalog_version``,
    ``recognizable_until`` (exam date + validity days) and the ``reasons`` it rests on.

    ``preview``: the decision ``signer`` would get by making the report final now, for the
    signing dialog; nothing is recorded.
    """
    exam_date = exam_local_date(exam)
    catalog = current_catalog(session)
    item = (
        _match(catalog_items(session, version=catalog.version), exam, report) if catalog else None
    )
    reasons: list[dict[str, Any]] = []
    if item is None:
        what = f"{exam.discipline.value} {exam.modality} {exam.body_part}".strip()
        reasons.append(
            _reason(
                "not_in_catalogue",
                False,
                f"{what} 不在互认项目目录中"
                + (f"（第 {catalog.version} 版）" if catalog else "（尚未加载目录）"),
                f"{what} is not in the catalogue of recognised items"
                + (f" (version {catalog.version})" if catalog else " (no catalogue loaded)"),
            )
        )
    else:
        assert catalog is not None
        reasons.append(
            _reason(
                "in_catalogue",
                True,
                f"项目 {item.code} {item.name_zh} 在互认目录第 {catalog.version} 版中",
                f"item {item.code} {item.name_en or item.name_zh} is in catalogue "
                f"version {catalog.version}",
            )
        )
        reasons.append(_accreditation_reason(session, exam, item, exam_date))
        grade = _grade_reason(report, item)
        if grade is not None:
            reasons.append(grade)
    reasons.append(_reader_reason(session, signer, exam))
    if report.status is not ReportStatus.FINAL and not preview:
        reasons.append(
            _reason("report_not_final", False, "报告尚未签发", "the report is not final")
        )
    granted = item is not None and all(r["passed"] for r in reasons)
    until = exam_date + timedelta(days=item.valid_days) if granted and item else None
    decision_id = stable_id("recognition_decision", report.id)
    org = exam.organization
    result: dict[str, Any] = {
        "decision_id": decision_id,
        "report_id": report.id,
        "report_version": report.version,
        "exam_id": exam.id,
        "granted": granted,
        "item_code": item.code if item else None,
        "item_name": item.name_zh if item else None,
        "item_name_en": (item.name_en or None) if item else None,
        "discipline": exam.discipline.value,
        "mark": item.scope_mark if granted and item else None,
        "scope": _scope_text(item.scope_mark, item.scope_note) if item else None,
        "scope_note": item.scope_note if item else "",
        "catalog_version": catalog.version if catalog else None,
        "valid_days": item.valid_days if item else None,
        "min_grade": item.min_grade.value if item and item.min_grade else None,
        "quality_grade": report.quality_grade.value if report.quality_grade else None,
        "exam_date": exam_date.isoformat(),
        "recognizable_until": until.isoformat() if until else None,
        "institution": {"code": org.code, "name": org.name},
        "signer": signer.username,
        "covers": COVERS,
        "covers_text": COVERS_TEXT,
        "reasons": reasons,
        "decided_at": now.isoformat(),
    }
    if preview:
        return result
    decision = session.get(RecognitionDecision, decision_id)
    if decision is None:
        decision = RecognitionDecision(id=decision_id, report_id=report.id)
        session.add(decision)
    decision.exam_id = exam.id
    decision.patient_ref = exam.patient_ref
    decision.org_id = exam.org_id
    decision.granted = granted
    decision.item_code = result["item_code"]
    decision.catalog_version = result["catalog_version"]
    decision.mark = result["mark"]
    decision.exam_date = exam_date
    decision.valid_until = until
    decision.reasons = reasons
    decision.result = result
    decision.signer_id = signer.user_id
    decision.decided_at = now
    session.flush()
    return result


def recognition_for_report(session: Session, *, report_id: str) -> dict[str, Any] | None:
    """The recorded recognition decision of a report version (None: not final yet)."""
    decision = session.execute(
        select(RecognitionDecision).where(RecognitionDecision.report_id == report_id)
    ).scalar_one_or_none()
    return dict(decision.result) if decision else None


def visible_recognition(
    session: Session, *, principal: Principal, report_id: str
) -> dict[str, Any]:
    """The decision of a report version the principal may see (another clinic's: 404)."""
    report = session.get(Report, report_id)
    if report is None or report.status is not ReportStatus.FINAL:
        raise NotFoundError(f"no final report {report_id}")
    visible_exam(session, principal=principal, exam_id=report.exam_id)
    result = recognition_for_report(session, report_id=report_id)
    if result is None:
        raise NotFoundError(f"report {report_id} has no recognition decision")
    record_access(
        session,
        principal,
        action="view",
        object_type="recognition",
        object_id=result["decision_id"],
    )
    return result


def recognized_results(
    session: Session,
    *,
    principal: Principal,
    patient_id: str,
    issuer: str | None = None,
    item: str | None = None,
    today: date,
) -> dict[str, Any]:
    """The patient's recognised results still valid on ``today``, from any institution of
    the alliance: the patient is matched by (issuer, patient ID) and by every identifier the
    alliance patient index links to the same person. Only the current final version of
    each exam counts. Audited.

    Without ``issuer``, a clinic user means their own clinic's patient IDs: intake records
    the clinic's code as the issuer when the modality sends none.
    """
    require_roles(principal, _LOOKUP_ROLES)
    if not patient_id.strip():
        raise InvalidInputError("patient_id is required")
    if issuer is None:
        org = session.get(Organization, principal.org_id)
        if not principal.is_clinic_user or org is None:
            raise InvalidInputError("give the issuer of the patient ID")
        issuer = org.code
    # The patient's rows at every clinic: the identifier's own, and those the alliance
    # patient index links to the same person.
    patient_refs = resolve_patient_refs(session, issuer=issuer, patient_id=patient_id)
    current = (
        select(Report.exam_id, func.max(Report.version).label("version"))
        .where(Report.status == ReportStatus.FINAL)
        .group_by(Report.exam_id)
        .subquery()
    )
    stmt = (
        select(RecognitionDecision, Report.version, Exam, Organization)
        .join(Report, Report.id == RecognitionDecision.report_id)
        .join(
            current, and_(current.c.exam_id == Report.exam_id, current.c.version == Report.version)
        )
        .join(Exam, Exam.id == RecognitionDecision.exam_id)
        .join(Organization, Organization.id == RecognitionDecision.org_id)
        .where(
            same_person_clause(RecognitionDecision.patient_ref, patient_refs),
            RecognitionDecision.granted.is_(True),
            RecognitionDecision.valid_until >= today,
        )
        .order_by(RecognitionDecision.exam_date.desc(), RecognitionDecision.id)
    )
    if item:
        stmt = stmt.where(RecognitionDecision.item_code == item)
    out = []
    for decision, version, exam, org in session.execute(stmt):
        r = decision.result
        out.append(
            {
                "decision_id": decision.id,
                "report_id": decision.report_id,
                "report_version": version,
                "exam_id": exam.id,
                "item_code": decision.item_code,
                "item_name": r.get("item_name"),
                "item_name_en": r.get("item_name_en"),
                "discipline": exam.discipline.value,
                "modality": exam.modality,
                "body_part": exam.body_part,
                "mark": decision.mark,
                "scope": r.get("scope"),
                "scope_note": r.get("scope_note", ""),
                "catalog_version": decision.catalog_version,
                "exam_date": decision.exam_date.isoformat(),
                "recognizable_until": decision.valid_until.isoformat()
                if decision.valid_until
                else None,
                "institution": {"code": org.code, "name": org.name},
                "covers": COVERS,
            }
        )
    record_access(
        session,
        principal,
        action="lookup",
        object_type="recognized_result",
        detail={
            "issuer": issuer,
            # A national ID is personal information: the audit trail keeps it masked.
            "patient_id": shown_patient_id(issuer, patient_id),
            "item": item,
            "decision_ids": [r["decision_id"] for r in out],
        },
    )
    return {
        "patient_id": patient_id,
        "issuer": issuer,
        "item": item,
        "as_of": today.isoformat(),
        "results": out,
    }


def _decline_out(
    decline: RecognitionDecline, decision: RecognitionDecision, username: str, org_code: str
) -> dict[str, Any]:
    zh, en = DECLINE_REASON_LABELS[decline.reason]
    return {
        "id": decline.id,
        "decision_id": decision.id,
        "report_id": decision.report_id,
        "item_code": decision.item_code,
        "item_name": decision.result.get("item_name"),
        "performing_institution": decision.result.get("institution"),
        "reason": decline.reason.value,
        "reason_label": f"{zh} / {en}",
        "reason_zh": zh,
        "reason_en": en,
        "note": decline.note,
        "patient_informed": decline.patient_informed,
        "declined_by": username,
        "org": org_code,
        "declined_at": decline.declined_at.isoformat(),
    }


def decline_result(
    session: Session,
    *,
    principal: Principal,
    decision_id: str,
    reason: str,
    note: str = "",
    patient_informed: bool,
    request_id: str | None = None,
    now: datetime,
) -> dict[str, Any]:
    """A clinic clinician records declining a recognised result: a standard reason (a note
    is required for "other") and that the patient was told. With ``request_id``, a retried
    request records the decline once."""
    require_roles(principal, {Role.CLINICIAN})  # clinicians belong to clinics
    try:
        why = DeclineReason(reason)
    except ValueError:
        raise InvalidInputError(
            f"reason must be one of {', '.join(r.value for r in DeclineReason)}"
        ) from None
    note = (note or "").strip()
    if why is DeclineReason.OTHER and not note:
        raise InvalidInputError("reason 'other' needs a note saying why")
    if patient_informed is not True:
        raise InvalidInputError("the patient must be told that the result is not recognised")
    decision = session.get(RecognitionDecision, decision_id)
    if decision is None or not decision.granted:
        raise NotFoundError(f"no recognised result {decision_id}")
    decline_id = stable_id(
        "recognition_decline", decision.id, principal.user_id, request_id or now.isoformat()
    )
    insert_ignore(
        session,
        RecognitionDecline.__table__,
        {
            "id": decline_id,
            "decision_id": decision.id,
            "org_id": principal.org_id,
            "user_id": principal.user_id,
            "reason": why.value,
            "note": note[:2000],
            "patient_informed": True,
            "declined_at": now,
        },
        conflict=["id"],
    )
    decline = session.get(RecognitionDecline, decline_id, populate_existing=True)
    assert decline is not None
    record_access(
        session,
        principal,
        action="decline_recognition",
        object_type="recognition",
        object_id=decision.id,
        detail={"decline_id": decline_id, "reason": why.value},
    )
    org = session.get(Organization, principal.org_id)
    return _decline_out(decline, decision, principal.username, org.code if org else "")


def list_declines(
    session: Session, *, principal: Principal, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    """Recorded declines, newest first: QC and administrators see all, clinic users their
    own clinic's (audited)."""
    require_roles(principal, _DECLINE_LISTERS)
    if not 1 <= limit <= 500 or offset < 0:
        raise InvalidInputError("limit must be 1..500 and offset not negative")
    stmt = (
        select(RecognitionDecline, RecognitionDecision, User.username, Organization.code)
        .join(RecognitionDecision, RecognitionDecision.id == RecognitionDecline.decision_id)
        .join(User, User.id == RecognitionDecline.user_id)
        .join(Organization, Organization.id == RecognitionDecline.org_id)
        .order_by(RecognitionDecline.declined_at.desc(), RecognitionDecline.id)
        .limit(limit)
        .offset(offset)
    )
    if principal.is_clinic_user:
        stmt = stmt.where(RecognitionDecline.org_id == principal.org_id)
    out = [_decline_out(*row) for row in session.execute(stmt)]
    record_access(
        session,
        principal,
        action="list",
        object_type="recognition_decline",
        detail={"decline_ids": [d["id"] for d in out]},
    )
    return out
