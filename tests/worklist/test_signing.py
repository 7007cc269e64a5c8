"""Signing reports in process: the alliance CA, preliminary and final signatures, tamper
detection, the HR mark's place on the PDF, amendments, and production's refusal to sign
without a certificate."""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import date

import pytest
from sqlalchemy import select

from rdc_core.db import session_scope, utcnow
from rdc_core.errors import ConflictError, InvalidInputError
from rdc_core.settings import get_settings, reset_settings
from tests.worklist.conftest import Reading
from worklist.claims import claim_item
from worklist.models import Exam, Report, ReportStatus
from worklist.reports import amend_report, save_draft, submit_report, verify_report
from worklist.schemas import ReportAmendIn, ReportIn
from worklist.signing.models import SignedArtifact, SigningCredential, SigningStage
from worklist.signing.pki import (
    CaExistsError,
    NoCertificateError,
    init_ca,
    issue_certificate,
    revoke_certificate,
)
from worklist.signing.service import get_signed_artifact, sign_final_report, signature_summary
from worklist.signing.verify import verify_file

CT = "1.2.9.1"


def _draft(reading: Reading, who: str, study: str = CT, **fields: object) -> str:
    principal = reading.people[who]
    with session_scope() as session:
        claim_item(
            session,
            principal=principal,
            item_id=reading.items[study],
            now=utcnow(),
            lease_seconds=600,
        )
    data = {"findings": "两肺纹理清晰", "impression": "未见异常", "quality_grade": "甲", **fields}
    with session_scope() as session:
        return save_draft(
            session,
            principal=principal,
            exam_id=reading.exams[study],
            data=ReportIn(**data),
            now=utcnow(),
        ).id


def _submit(reading: Reading, who: str, study: str = CT) -> str:
    with session_scope() as session:
        return submit_report(
            session, principal=reading.people[who], exam_id=reading.exams[study], now=utcnow()
        ).id


def _artifacts(report_id: str) -> tuple[bytes, bytes]:
    with session_scope() as session:
        return (
            get_signed_artifact(session, report_id=report_id, kind="pdf"),
            get_signed_artifact(session, report_id=report_id, kind="document"),
        )


def _verify(data: bytes) -> object:
    with session_scope() as session:
        return verify_file(data, session=session)


def _pdf_text(pdf: bytes) -> str:
    result = subprocess.run(
        ["pdftotext", "-layout", "-", "-"], input=pdf, capture_output=True, check=True
    )
    return result.stdout.decode("utf-8")


def test_preliminary_then_final_signature(reading: Reading) -> None:
    _draft(reading, "resident")
    report_id = _submit(reading, "resident")
    with session_scope() as session:
        summary = signature_summary(session, report_id=report_id)
    assert summary is not None and summary["stage"] == "preliminary"
    assert summary["signer"] == "resident" and summary["final"] is False
    pdf, document = _artifacts(report_id)
    assert _verify(pdf).valid and _verify(document).valid  # type: ignore[attr-defined]
    assert "以正式报告为准" in _pdf_text(pdf)
    assert json.loads(document)["document"]["report"]["status"] == "preliminary"

    with session_scope() as session:
        verify_report(
            session, principal=reading.people["attending"], report_id=report_id, now=utcnow()
        )
    pdf, document = _artifacts(report_id)
    signed = json.loads(document)["document"]
    assert signed["stage"] == "final" and signed["report"]["status"] == "final"
    assert signed["author"]["username"] == "resident"
    assert signed["verifier"]["username"] == "attending"
    assert signed["signer"]["username"] == "attending"
    assert signed["objects"] == [{"sop_instance_uid": f"{CT}.1.1", "sha256": "0" * 64}]
    assert signed["patient"]["patient_id"] == "P1" and signed["exam"]["study_instance_uid"] == CT
    pdf_result, doc_result = _verify(pdf), _verify(document)
    assert pdf_result.valid, pdf_result.reasons  # type: ignore[attr-defined]
    assert doc_result.valid, doc_result.reasons  # type: ignore[attr-defined]
    text = _pdf_text(pdf)
    assert "以正式报告为准" not in text
    for label in ("诊断意见", "影像所见", "检查资料", "报告医师", "审核医师", "电子签名"):
        assert label in text
    with session_scope() as session:
        stages = set(
            session.execute(
                select(SignedArtifact.stage).where(SignedArtifact.report_id == report_id)
            ).scalars()
        )
    assert stages == {SigningStage.PRELIMINARY, SigningStage.FINAL}


def test_any_changed_byte_fails_verification(reading: Reading) -> None:
    _draft(reading, "attending")
    report_id = _submit(reading, "attending")
    pdf, document = _artifacts(report_id)
    for original in (pdf, document):
        assert _verify(original).valid  # type: ignore[attr-defined]
        contents = original.find(b"/Contents <")
        offsets = {len(original) * k // 13 for k in range(1, 13)} | {len(original) - 2}
        if contents > 0:  # inside the CMS blob and in its zero padding
            offsets |= {contents + 40, contents + 2000, original.find(b"0000>", contents)}
        for offset in sorted(offsets):
            changed = bytearray(original)
            changed[offset] = (changed[offset] + 1) % 256 if changed[offset] != 0x7D else 0x20
            result = _verify(bytes(changed))
            assert not result.valid, f"byte {offset} of {len(original)} changed, still valid"  # type: ignore[attr-defined]
            assert result.reasons  # type: ignore[attr-defined]


def test_key_images_and_hr_mark_on_the_data_section(reading: Reading) -> None:
    with pytest.raises(InvalidInputError, match="not part of this exam"):
        _draft(reading, "attending", key_images=[{"sop_instance_uid": "1.2.9.2.1.1"}])
    with pytest.raises(InvalidInputError, match="frame"):
        _draft(reading, "attending", key_images=[{"sop_instance_uid": f"{CT}.1.1", "frame": 3}])
    report_id = _draft(reading, "attending", key_images=[{"sop_instance_uid": f"{CT}.1.1"}])
    recognition = {
        "granted": True,
        "mark": "HR",
        "scope": "医联体内",
        "recognizable_until": date(2027, 6, 30),  # not JSON: must become its string
        "items": [{"code": "CT-CHEST", "name": "胸部CT"}],
        "reasons": ["accredited"],
    }
    with session_scope() as session:
        report = session.get(Report, report_id)
        assert report is not None
        report.status, report.final_at = ReportStatus.FINAL, utcnow()
        session.flush()
        sign_final_report(
            session,
            report=report,
            exam=session.get(Exam, report.exam_id),
            signer=reading.people["attending"],
            recognition=recognition,
            now=utcnow(),
        )
    pdf, document = _artifacts(report_id)
    assert _verify(document).valid  # type: ignore[attr-defined]
    signed = json.loads(document)["document"]
    assert signed["recognition"]["recognizable_until"] == "2027-06-30"
    assert signed["report"]["key_images"] == [{"sop_instance_uid": f"{CT}.1.1", "frame": 1}]
    text = _pdf_text(pdf)
    data_at, mark_at = text.index("检查资料"), text.index("[HR]")
    findings_at, impression_at = text.index("影像所见"), text.index("诊断意见")
    assert data_at < mark_at < findings_at < impression_at
    assert "2027-06-30" in text and "互认有效期至" in text and "医联体内" in text
    # No renderer registered in process (the web app lends one): printed as a reference.
    assert "关键图像" in text and f"{CT}.1.1" in text


def test_ca_init_issue_renew_revoke(reading: Reading) -> None:
    with session_scope() as session:
        ca = init_ca(session, now=utcnow())
    with session_scope() as session, pytest.raises(CaExistsError):
        init_ca(session, now=utcnow())
    with session_scope() as session:
        first = issue_certificate(session, username="attending", now=utcnow())
    with session_scope() as session, pytest.raises(ConflictError, match="--renew"):
        issue_certificate(session, username="attending", now=utcnow())
    with session_scope() as session:
        second = issue_certificate(session, username="attending", now=utcnow(), renew=True)
    assert second.serial != first.serial and second.issuer == ca.subject
    with session_scope() as session:
        old = session.get(SigningCredential, first.id)
        assert old is not None and old.superseded_at is not None
        assert b"ENCRYPTED PRIVATE KEY" in old.encrypted_key_pem.encode()
    _draft(reading, "attending")
    report_id = _submit(reading, "attending")
    with session_scope() as session:
        assert (
            signature_summary(session, report_id=report_id)["certificate_serial"] == second.serial
        )  # type: ignore[index]
    pdf, _ = _artifacts(report_id)
    with session_scope() as session:
        revoke_certificate(session, serial=second.serial, now=utcnow())
    # Revoked after signing: the report stays valid.
    assert _verify(pdf).valid  # type: ignore[attr-defined]


def test_production_refuses_to_sign_without_certificate(
    reading: Reading, monkeypatch: pytest.MonkeyPatch
) -> None:
    _draft(reading, "attending")
    monkeypatch.setenv("RDC_ENV", "production")
    monkeypatch.setenv("RDC_SECRET_KEY", "production-secret-for-the-test-000000000")
    monkeypatch.setenv("RDC_DATABASE_URL", get_settings().resolved_database_url)
    reset_settings()
    objects = get_settings().objects_dir
    with pytest.raises(NoCertificateError, match="no signing certificate for attending"):
        _submit(reading, "attending")
    with session_scope() as session:
        report = session.execute(select(Report)).scalar_one()
        assert report.status is ReportStatus.DRAFT  # rolled back: nothing final unsigned
    assert not (objects / "reports").exists() or not any((objects / "reports").rglob("*.pdf"))
    with session_scope() as session:
        init_ca(session, now=utcnow())
        issue_certificate(session, username="attending", now=utcnow())
    report_id = _submit(reading, "attending")
    pdf, _ = _artifacts(report_id)
    assert _verify(pdf).valid  # type: ignore[attr-defined]


def test_amend_creates_linked_signed_versions_and_one_racer_wins(reading: Reading) -> None:
    _draft(reading, "attending")
    v1 = _submit(reading, "attending")
    with session_scope() as session:
        v2 = amend_report(
            session,
            principal=reading.people["chief"],
            report_id=v1,
            data=ReportAmendIn(
                kind="appended", reason="补充随访建议", recommendation="6个月后复查"
            ),
            now=utcnow(),
        )
    assert v2.version == 2 and v2.previous_id == v1 and v2.status == "final"
    assert v2.findings == "两肺纹理清晰" and "6个月后复查" in v2.recommendation
    with session_scope() as session, pytest.raises(ConflictError, match="not the current"):
        amend_report(
            session,
            principal=reading.people["chief"],
            report_id=v1,
            data=ReportAmendIn(kind="corrected", reason="x", impression="y"),
            now=utcnow(),
        )
    with session_scope() as session, pytest.raises(Exception, match="attending or chief"):
        amend_report(
            session,
            principal=reading.people["resident"],
            report_id=v2.id,
            data=ReportAmendIn(kind="corrected", reason="x", impression="y"),
            now=utcnow(),
        )
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def racer(who: str) -> None:
        barrier.wait()
        try:
            with session_scope() as session:
                amend_report(
                    session,
                    principal=reading.people[who],
                    report_id=v2.id,
                    data=ReportAmendIn(kind="corrected", reason=f"by {who}", impression=who),
                    now=utcnow(),
                )
            outcomes.append("won")
        except ConflictError:
            outcomes.append("lost")

    threads = [threading.Thread(target=racer, args=(w,)) for w in ("attending", "chief")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["lost", "won"]
    for report_id in (v1, v2.id):
        pdf, document = _artifacts(report_id)
        assert _verify(pdf).valid and _verify(document).valid  # type: ignore[attr-defined]
    with session_scope() as session:
        versions = session.execute(
            select(Report.version, Report.previous_id).order_by(Report.version)
        ).all()
    assert [v for v, _ in versions] == [1, 2, 3] and versions[2][1] == v2.id
    _, document = _artifacts(v2.id)
    amendment = json.loads(document)["document"]["report"]["amendment"]
    assert amendment == {"kind": "appended", "reason": "补充随访建议", "previous_id": v1}
