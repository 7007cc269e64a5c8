"""Signing a report version (called from :mod:`worklist.finalization` and, for a
resident's preliminary report, from :func:`worklist.reports.submit_report`).

Two artefacts are produced and stored before the transaction commits:

- the **signed document**: the canonical JSON of everything the report states and covers
  (content, version and amendment, exam and patient identifiers, the SHA-256 of every
  object of the exam, the recognition decision, author, verifier, signer, time), signed
  with the signer's key; the file is itself canonical JSON, so any changed byte is
  detected. Canonical means RFC 8785 (JCS) since format ``rdc-signed-report/2``, which
  any language's JCS library reproduces; ``/1`` used Python's sorted ``json.dumps`` and
  is still verified;
- the **PDF**: the printable report rendered from that document and PAdES-signed with the
  same key and certificate (the CA chain embedded) and the same signing time.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import rfc8785
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from rdc_core.db import insert_ignore, on_rollback
from rdc_core.errors import ConflictError, NotFoundError
from rdc_core.settings import get_settings
from rdc_core.storage import ObjectStore, get_object_store
from worklist.access import Principal
from worklist.artifact_details import signed_objects
from worklist.models import (
    Artifact,
    Exam,
    Organization,
    OrgKind,
    Report,
    ReportCounter,
    ReportStatus,
    User,
)
from worklist.signing.models import SignedArtifact, SigningStage
from worklist.signing.pdf import KeyImage, key_image_renderer, render_report_pdf
from worklist.signing.pki import Signer, signature_algorithm, signer_for
from worklist.signing.sections import ReportSection, report_sections

__all__ = [
    "DOCUMENT_FORMAT",
    "LEGACY_SIGNED_FORMAT",
    "PRELIMINARY_NOTICE",
    "SIGNED_FORMAT",
    "build_document",
    "canonical_bytes",
    "get_signed_artifact",
    "legacy_canonical_bytes",
    "sign_final_report",
    "sign_preliminary_report",
    "sign_report",
    "signature_summary",
]

log = logging.getLogger(__name__)

DOCUMENT_FORMAT = "rdc-report/1"
SIGNED_FORMAT = "rdc-signed-report/2"
# The first format's canonical form was Python-specific; its files still verify.
LEGACY_SIGNED_FORMAT = "rdc-signed-report/1"
PRELIMINARY_NOTICE = "以正式报告为准 / Subject to the final report"
_CMS_BYTES = 16 * 1024


def canonical_bytes(value: Any) -> bytes:
    """RFC 8785 (JSON Canonicalization Scheme) UTF-8 bytes: what is signed. ValueError
    for what JCS cannot express (NaN, infinities, integers beyond ±(2^53-1))."""
    return bytes(rfc8785.dumps(value))


def legacy_canonical_bytes(value: Any) -> bytes:
    """The canonical form of ``rdc-signed-report/1`` (sorted keys, no spaces, UTF-8, as
    Python's json writes them); only for verifying documents signed in that format."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _person(user: User | None, **extra: Any) -> dict[str, Any] | None:
    if user is None:
        return None
    return {
        "username": user.username,
        "name": user.display_name or user.username,
        "level": user.level.value if user.level else None,
        **extra,
    }


def _report_number(session: Session, *, report: Report, now: datetime) -> str:
    """The exam's report number: an earlier version's, else the next of the year (in the
    configured zone). The counter row is advanced by one UPDATE ... RETURNING, which holds
    the row until the signer's transaction ends, so two replicas never hand out one number."""
    if report.previous_id:
        previous = session.get(Report, report.previous_id)
        if previous is not None and previous.report_number:
            return previous.report_number
    year = now.astimezone(get_settings().zone).year
    insert_ignore(session, ReportCounter.__table__, {"year": year, "last": 0}, conflict=["year"])
    value = session.execute(
        update(ReportCounter)
        .where(ReportCounter.year == year)
        .values(last=ReportCounter.last + 1)
        .returning(ReportCounter.last)
    ).scalar_one()
    return f"RDC-{year}-{value:06d}"


def build_document(
    session: Session,
    *,
    report: Report,
    exam: Exam,
    signer_user: User,
    signer: Signer,
    recognition: dict[str, Any] | None,
    stage: SigningStage,
    now: datetime,
    sections: Sequence[ReportSection] = (),
) -> dict[str, Any]:
    """The canonical content of a signature (plain JSON values only). ``sections``: the
    discipline's report sections (:mod:`worklist.signing.sections`), under ``"sections"``
    when there are any."""
    settings = get_settings()
    # What the ingesters list (DICOM: SOP Instance UID and SHA-256 of every instance).
    objects = signed_objects(session, exam_id=exam.id)
    centre = session.execute(
        select(Organization.name).where(Organization.kind == OrgKind.LEAD).limit(1)
    ).scalar_one_or_none()
    patient = exam.patient
    cert = signer.certificate
    document = {
        "format": DOCUMENT_FORMAT,
        "stage": stage.value,
        "issuer": {"alliance": settings.alliance_name, "centre": centre},
        "report": {
            "id": report.id,
            "number": report.report_number,
            "exam_id": exam.id,
            "version": report.version,
            "status": report.status.value,
            "template_code": report.template_code,
            "findings": report.findings,
            "impression": report.impression,
            "recommendation": report.recommendation,
            "structured": report.structured or {},
            "quality_grade": report.quality_grade.value if report.quality_grade else None,
            "quality_reason": report.quality_reason,
            "critical": bool(report.critical),
            "key_images": list(report.key_images or []),
            "amendment": (
                {
                    "kind": report.amendment_kind.value,
                    "reason": report.amendment_reason,
                    "previous_id": report.previous_id,
                }
                if report.amendment_kind
                else None
            ),
            "previous_id": report.previous_id,
            "notice": PRELIMINARY_NOTICE if stage is SigningStage.PRELIMINARY else None,
        },
        "exam": {
            "id": exam.id,
            "study_instance_uid": exam.study_instance_uid,
            "accession_number": exam.accession_number,
            "discipline": exam.discipline.value,
            "modality": exam.modality,
            "modalities": exam.modalities,
            "body_part": exam.body_part,
            "description": exam.description,
            "performed_at": _iso(exam.performed_at),
            "referring_physician": exam.referring_physician,
            "clinic": {"code": exam.organization.code, "name": exam.organization.name},
        },
        "patient": {
            "issuer": patient.issuer,
            "patient_id": patient.patient_id,
            "name": patient.name,
            "sex": patient.sex,
            "birth_date": patient.birth_date,
        },
        "objects": objects,
        "recognition": recognition,
        "author": _person(report.author, submitted_at=_iso(report.submitted_at)),
        "verifier": _person(report.verifier, verified_at=_iso(report.verified_at)),
        "signer": {
            **(_person(signer_user) or {}),
            "certificate_serial": format(cert.serial_number, "x"),
            "certificate_issuer": cert.issuer.rfc4514_string(),
        },
        "signed_at": now.isoformat(),
    }
    if sections:
        document["sections"] = [section.as_document() for section in sections]
    # Through JSON once: dates and other values in the recognition dict become the strings
    # a verifier will see, so the signed bytes re-compute exactly from the file.
    result: dict[str, Any] = json.loads(json.dumps(document, default=str))
    return result


def _key_images(session: Session, store: ObjectStore, report: Report) -> list[KeyImage]:
    marked = list(report.key_images or [])
    if not marked:
        return []
    keys = dict(
        session.execute(
            select(Artifact.ref, Artifact.storage_key).where(
                Artifact.exam_id == report.exam_id,
                Artifact.ref.in_([m["sop_instance_uid"] for m in marked]),
            )
        ).all()
    )
    renderer = key_image_renderer()
    images = []
    for mark in marked:
        uid, frame = str(mark["sop_instance_uid"]), int(mark.get("frame") or 1)
        data = None
        if renderer is not None and uid in keys:
            try:
                data = renderer(keys[uid], frame)
            except Exception:  # a frame that cannot be drawn is printed as a reference
                log.warning("key image %s frame %d could not be rendered", uid, frame)
        images.append(KeyImage(uid, frame, data))
    return images


def _sign_pdf(pdf: bytes, signer: Signer, *, name: str, reason: str, at: datetime) -> bytes:
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import signers
    from pyhanko.sign.fields import SigSeedSubFilter

    class _SignerAt(signers.PdfSigner):
        # pyHanko stamps its own clock into the signingTime attribute; the PDF must carry
        # the same signing time as the JSON document (verifiers validate at that time).
        def init_signing_session(self, pdf_out: Any, existing_fields_only: bool = False) -> Any:
            session = super().init_signing_session(
                pdf_out, existing_fields_only=existing_fields_only
            )
            session.system_time = at
            return session

    writer = IncrementalPdfFileWriter(io.BytesIO(pdf), strict=False)
    meta = signers.PdfSignatureMetadata(
        field_name="RDCSignature",
        md_algorithm="sha256",
        subfilter=SigSeedSubFilter.PADES,
        reason=reason,
        name=name,
        location=get_settings().alliance_name,
    )
    # A fixed reservation for the CMS container (two certificates and one signature fit
    # in well under 8 KiB): pyHanko otherwise signs twice, once only to measure the size.
    out = _SignerAt(meta, signer.pdf_signer()).sign_pdf(writer, bytes_reserved=_CMS_BYTES)
    return bytes(out.getbuffer())


def _signed_file(document: dict[str, Any], signer: Signer) -> bytes:
    pem = serialization.Encoding.PEM
    signature = signer.sign(canonical_bytes(document))
    envelope = {
        "format": SIGNED_FORMAT,
        "document": document,
        "signature": {
            "algorithm": signature_algorithm(signer.certificate),
            "value": base64.b64encode(signature).decode("ascii"),
            "certificate": signer.certificate.public_bytes(pem).decode("ascii"),
            "chain": [c.public_bytes(pem).decode("ascii") for c in signer.chain],
        },
    }
    return canonical_bytes(envelope)


def sign_report(
    session: Session,
    *,
    report: Report,
    exam: Exam,
    signer: Principal,
    recognition: dict[str, Any] | None,
    stage: SigningStage,
    now: datetime,
) -> SignedArtifact:
    """Build, sign and store both artefacts of ``report`` at ``stage``; the caller commits.
    The objects are written first and removed again if the transaction rolls back."""
    if session.get(SignedArtifact, (report.id, stage)) is not None:
        raise ConflictError(f"report {report.id} is already signed ({stage.value})")
    if not report.report_number:
        report.report_number = _report_number(session, report=report, now=now)
    user = session.get(User, signer.user_id)
    if user is None:
        raise NotFoundError(f"no user {signer.username}")
    key_signer = signer_for(session, user=user, now=now)
    sections = report_sections(session, exam=exam, report=report)
    document = build_document(
        session,
        report=report,
        exam=exam,
        signer_user=user,
        signer=key_signer,
        recognition=recognition,
        stage=stage,
        now=now,
        sections=sections,
    )
    signed_json = _signed_file(document, key_signer)
    store = get_object_store()
    pdf = render_report_pdf(
        document,
        key_images=_key_images(session, store, report),
        zone=get_settings().zone,
        notice=PRELIMINARY_NOTICE if stage is SigningStage.PRELIMINARY else None,
        figures={s.key: s.figure.png for s in sections if s.figure is not None},
    )
    signed_pdf = _sign_pdf(
        pdf,
        key_signer,
        name=document["signer"]["name"],
        reason=(
            "初步报告 Preliminary report"
            if stage is SigningStage.PRELIMINARY
            else "正式报告 Final report"
        ),
        at=now,
    )
    base = f"reports/{report.id}/{stage.value}"
    json_key, pdf_key = f"{base}.json", f"{base}.pdf"
    # Store first, then index; a rollback removes what was stored.
    on_rollback(session, lambda: store.delete(json_key))
    store.put_bytes(json_key, signed_json)
    on_rollback(session, lambda: store.delete(pdf_key))
    store.put_bytes(pdf_key, signed_pdf)
    row = SignedArtifact(
        report_id=report.id,
        stage=stage,
        document_key=json_key,
        document_sha256=hashlib.sha256(signed_json).hexdigest(),
        pdf_key=pdf_key,
        pdf_sha256=hashlib.sha256(signed_pdf).hexdigest(),
        signer_id=user.id,
        signer_username=user.username,
        signer_name=user.display_name or user.username,
        certificate_serial=document["signer"]["certificate_serial"],
        certificate_issuer=document["signer"]["certificate_issuer"][:500],
        signed_at=now,
    )
    session.add(row)
    session.flush()
    return row


def sign_final_report(
    session: Session,
    *,
    report: Report,
    exam: Exam,
    signer: Principal,
    recognition: dict[str, Any] | None,
    now: datetime,
) -> None:
    """Sign ``report`` (just made final) as ``signer``: canonical JSON document and PAdES PDF."""
    sign_report(
        session,
        report=report,
        exam=exam,
        signer=signer,
        recognition=recognition,
        stage=SigningStage.FINAL,
        now=now,
    )


def sign_preliminary_report(
    session: Session, *, report: Report, exam: Exam, signer: Principal, now: datetime
) -> None:
    """Sign a resident's preliminary report as the resident; its PDF carries the notice
    以正式报告为准 and no recognition mark (recognition is decided on the final report)."""
    sign_report(
        session,
        report=report,
        exam=exam,
        signer=signer,
        recognition=None,
        stage=SigningStage.PRELIMINARY,
        now=now,
    )


def _latest_artifact(session: Session, report_id: str) -> SignedArtifact | None:
    rows = {
        row.stage: row
        for row in session.execute(
            select(SignedArtifact).where(SignedArtifact.report_id == report_id)
        ).scalars()
    }
    return rows.get(SigningStage.FINAL) or rows.get(SigningStage.PRELIMINARY)


def get_signed_artifact(
    session: Session, *, report_id: str, kind: Literal["pdf", "document"]
) -> bytes:
    """The signed PDF or the signed JSON document of a report version (the final
    signature when there is one, else the preliminary one). NotFoundError if unsigned.
    The caller authorises and audits the access."""
    row = _latest_artifact(session, report_id)
    if row is None:
        raise NotFoundError(f"report {report_id} is not signed")
    key = row.pdf_key if kind == "pdf" else row.document_key
    with get_object_store().open(key) as stream:
        return stream.read()


def signature_summary(session: Session, *, report_id: str) -> dict[str, Any] | None:
    """Who signed the report version, when, with which certificate (None if unsigned)."""
    row = _latest_artifact(session, report_id)
    if row is None:
        return None
    report = session.get(Report, report_id)
    return {
        "stage": row.stage.value,
        "signer": row.signer_username,
        "signer_name": row.signer_name,
        "signed_at": row.signed_at.isoformat(),
        "certificate_serial": row.certificate_serial,
        "certificate_issuer": row.certificate_issuer,
        "document_sha256": row.document_sha256,
        "pdf_sha256": row.pdf_sha256,
        "final": row.stage is SigningStage.FINAL
        and report is not None
        and report.status is ReportStatus.FINAL,
    }
