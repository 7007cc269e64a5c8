"""Signing reports in process: the alliance CA, preliminary and final signatures, tamper
detection, the HR mark's place on the PDF, amendments, and production's refusal to sign
without a certificate."""

from __future__ import annotations

import base64
import json
import math
import random
import re
import subprocess
import threading
from datetime import date, timedelta

import pytest
from cryptography import x509
from pydantic import ValidationError
from sqlalchemy import select

from rdc_core.db import session_scope, utcnow
from rdc_core.errors import ConflictError, InvalidInputError
from rdc_core.settings import get_settings, reset_settings
from rdc_core.storage import get_object_store
from tests.worklist import cms_tamper
from tests.worklist.conftest import Reading
from worklist.claims import claim_item
from worklist.models import Exam, Report, ReportStatus, User
from worklist.reports import amend_report, save_draft, submit_report, verify_report
from worklist.schemas import ReportAmendIn, ReportIn
from worklist.signing.models import SignedArtifact, SigningCredential, SigningStage
from worklist.signing.pki import (
    CaExistsError,
    NoCertificateError,
    init_ca,
    issue_certificate,
    revoke_certificate,
    signer_for,
)
from worklist.signing.service import (
    canonical_bytes,
    get_signed_artifact,
    sign_final_report,
    sign_report,
    signature_summary,
)
from worklist.signing.verify import check_report, verify_file

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
    # Changes that decode to the same values: another base64 spelling of the signature
    # (unused padding bits), hex digits in the other case inside /Contents, and fields
    # outside the signed document (the algorithm name, an added key).
    value = json.loads(document)["signature"]["value"]
    raw = base64.b64decode(value)
    body = value.rstrip("=")
    spellings = [
        body[:-1] + c + value[len(body) :]
        for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        if c != body[-1]
    ]
    # A 70- or 71-byte ECDSA signature has unused bits (a 72-byte one none).
    same = [v for v in spellings if base64.b64decode(v) == raw]
    assert len(raw) % 3 == 0 or same
    variants = [document.replace(value.encode(), v.encode()) for v in same]
    variants.append(document.replace(b'"algorithm":"ecdsa-with-SHA256"', b'"algorithm":"x"'))
    variants.append(document.replace(b'{"document":', b'{"comment":"x","document":', 1))
    contents = re.search(rb"/Contents\s*<([0-9a-fA-F]+)>", pdf)
    assert contents is not None
    at = contents.start(1) + next(
        i for i, b in enumerate(contents.group(1)) if b in b"abcdefABCDEF"
    )
    variants.append(pdf[:at] + bytes([pdf[at] ^ 0x20]) + pdf[at + 1 :])
    for variant in variants:
        assert variant not in (pdf, document)
        result = _verify(variant)
        assert not result.valid and result.reasons  # type: ignore[attr-defined]


def test_any_changed_byte_of_the_cms_container_fails(reading: Reading) -> None:
    # The bytes of the signature container that no signature check reads (versions, the
    # digest algorithm set, algorithm identifier tags) and bytes anywhere in it, including
    # its zero padding: each change must fail verification.
    _draft(reading, "attending")
    pdf = _artifacts(_submit(reading, "attending"))[0]
    assert _verify(pdf).valid  # type: ignore[attr-defined]
    length = cms_tamper.container_length(pdf)
    cases = [
        (name, offset, xor)
        for name, offset in cms_tamper.named_offsets(pdf).items()
        for xor in (0x01, 0x02)
    ]
    pick = random.Random(16)
    cases += [
        ("random byte", offset, pick.randrange(1, 256)) for offset in pick.sample(range(length), 16)
    ]
    cases.append(("padding", length + 100, 0x01))
    for name, offset, xor in cases:
        result = _verify(cms_tamper.change_byte(pdf, offset, xor))
        assert not result.valid, f"{name} (byte {offset} ^ {xor:#x}) changed, still valid"  # type: ignore[attr-defined]
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
    pdf, document = _artifacts(report_id)
    with session_scope() as session:
        user = session.execute(select(User).where(User.username == "attending")).scalar_one()
        stolen = signer_for(session, user=user, now=utcnow())  # the key, as a thief has it
    with session_scope() as session:
        revoked_at = revoke_certificate(session, serial=second.serial, now=utcnow()).revoked_at
    assert revoked_at is not None
    # Revoked after signing: the report stays valid (its signing time is the database's).
    assert _verify(pdf).valid and _verify(document).valid  # type: ignore[attr-defined]
    # Signed after revocation with a back-dated claim: the claim is not believed.
    forged = json.loads(document)["document"]
    forged["report"]["impression"] = "伪造 forged"
    forged["signed_at"] = (revoked_at - timedelta(seconds=1)).isoformat()
    envelope = json.loads(document)
    envelope["document"] = forged
    envelope["signature"]["value"] = base64.b64encode(stolen.sign(canonical_bytes(forged))).decode()
    result = _verify(canonical_bytes(envelope))
    assert not result.valid and result.checks["signature"]  # type: ignore[attr-defined]
    assert result.checks["not_revoked"] is False  # type: ignore[attr-defined]
    # Offline (a CA PEM, no database): valid, but it says revocation was not checked.
    ca_cert = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
    offline = verify_file(pdf, ca_certs=[ca_cert])
    assert offline.valid and offline.revocation_checked is False
    assert _verify(pdf).revocation_checked is True  # type: ignore[attr-defined]
    # A revoked CA is no trust root: nothing it issued verifies against the database.
    with session_scope() as session:
        revoke_certificate(session, serial=ca.serial, now=utcnow())
    for data in (pdf, document):
        result = _verify(data)
        assert not result.valid, result.kind  # type: ignore[attr-defined]
        assert any("alliance CA" in r for r in result.reasons)  # type: ignore[attr-defined]


def test_production_refuses_to_sign_without_certificate(
    reading: Reading, monkeypatch: pytest.MonkeyPatch
) -> None:
    _draft(reading, "attending")
    monkeypatch.setenv("RDC_ENV", "production")
    monkeypatch.setenv("RDC_SECRET_KEY", "production-secret-for-the-test-000000000")
    monkeypatch.setenv("RDC_DATABASE_URL", get_settings().resolved_database_url)
    monkeypatch.setenv("RDC_PASSWORD_HASH_ROUNDS", "12")
    reset_settings()
    with pytest.raises(NoCertificateError, match="no signing certificate for attending"):
        _submit(reading, "attending")
    with session_scope() as session:
        report = session.execute(select(Report)).scalar_one()
        assert report.status is ReportStatus.DRAFT  # rolled back: nothing final unsigned
    assert not [k for k in get_object_store().iter_keys("reports/") if k.endswith(".pdf")]
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


def _stored(report_id: str, stage: SigningStage) -> tuple[bytes, bytes]:
    with session_scope() as session:
        row = session.get(SignedArtifact, (report_id, stage))
        assert row is not None
        keys = row.pdf_key, row.document_key
    store = get_object_store()
    with store.open(keys[0]) as pdf, store.open(keys[1]) as document:
        return pdf.read(), document.read()


def test_old_signatures_verify_at_their_signing_time(reading: Reading) -> None:
    # A CA and a reader's certificate from three years ago: the certificate expired a
    # year ago, and what it signed while valid must still verify (PDF and JSON alike).
    past = utcnow() - timedelta(days=3 * 365)
    with session_scope() as session:
        ca = init_ca(session, now=past - timedelta(days=1))
        issue_certificate(session, username="attending", now=past)
    report_id = _draft(reading, "attending")
    with session_scope() as session:
        report = session.get(Report, report_id)
        assert report is not None
        report.status, report.final_at = ReportStatus.FINAL, past + timedelta(days=10)
        session.flush()
        exam = session.get(Exam, report.exam_id)
        for stage, at in (
            (SigningStage.FINAL, past + timedelta(days=10)),
            # Before the certificate's validity: neither file may verify.
            (SigningStage.PRELIMINARY, past - timedelta(hours=1)),
        ):
            sign_report(
                session,
                report=report,
                exam=exam,
                signer=reading.people["attending"],
                recognition=None,
                stage=stage,
                now=at,
            )
    pdf, document = _stored(report_id, SigningStage.FINAL)
    for data in (pdf, document):
        result = _verify(data)
        assert result.valid, result.reasons  # type: ignore[attr-defined]
    with session_scope() as session:
        checked = check_report(session, principal=reading.people["chief"], report_id=report_id)
    assert checked["valid"] is True, checked["reasons"]
    # An uploaded file without a database record: the signed attributes' time is used.
    ca_cert = x509.load_pem_x509_certificate(ca.certificate_pem.encode())
    assert verify_file(pdf, ca_certs=[ca_cert]).valid
    early_pdf, early_document = _stored(report_id, SigningStage.PRELIMINARY)
    for data in (early_pdf, early_document):
        result = verify_file(data, ca_certs=[ca_cert])
        assert not result.valid
        assert "the signer's certificate was not valid at signing time" in result.reasons


def test_canonical_json_is_rfc8785(reading: Reading) -> None:
    for bad in (math.nan, math.inf, -math.inf, 2**53, [{"deep": math.nan}]):
        with pytest.raises(ValidationError, match="structured"):
            ReportIn(structured={"x": bad})
        with pytest.raises(ValidationError, match="structured"):
            ReportAmendIn(kind="corrected", reason="r", structured={"x": {"y": bad}})
    structured = {"big": 1e16, "sum": 0.1 + 0.2, "neg": -0.0, "\U0001f600": 1, "\uff01": 2}
    _draft(reading, "attending", structured=structured)
    report_id = _submit(reading, "attending")
    pdf, document = _artifacts(report_id)
    assert _verify(document).valid and _verify(pdf).valid  # type: ignore[attr-defined]
    envelope = json.loads(document)
    assert envelope["format"] == "rdc-signed-report/2"
    # ECMAScript number forms and keys in UTF-16 order (U+1F600 is D83D DE00 < FF01).
    expected = '"structured":{"big":10000000000000000,"neg":0,"sum":0.30000000000000004,'
    assert (expected + '"\U0001f600":1,"\uff01":2}').encode() in document
    # A document of the first format (Python's sorted JSON) still verifies.
    with session_scope() as session:
        user = session.execute(select(User).where(User.username == "attending")).scalar_one()
        key = signer_for(session, user=user, now=utcnow())

    def legacy(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    old = json.loads(document)
    del old["document"]["report"]["structured"]["big"]  # 10^16: an int JCS cannot take
    old["format"] = "rdc-signed-report/1"
    old["document"]["structured_note"] = "旧格式"
    old["signature"]["value"] = base64.b64encode(key.sign(legacy(old["document"]))).decode()
    result = _verify(legacy(old))
    assert result.valid, result.reasons  # type: ignore[attr-defined]
    assert not _verify(canonical_bytes(old)).valid  # type: ignore[attr-defined]


def test_without_a_cjk_font_file_development_falls_back_and_production_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from zoneinfo import ZoneInfo

    from rdc_core.errors import ConfigurationError
    from rdc_core.settings import reset_settings
    from worklist.signing import pdf

    monkeypatch.setattr(pdf, "CJK_FONT_CANDIDATES", (("/nonexistent/cjk.ttc", 0),))
    monkeypatch.setattr(pdf, "_font_ready", [])
    monkeypatch.setenv("RDC_ENV", "production")
    monkeypatch.setenv("RDC_SECRET_KEY", "kq3ZQ7v0mB1n-PfW8xYtL2cR5sJ9hD4aE6gU_oViTwN")
    monkeypatch.setenv("RDC_DATABASE_URL", "sqlite://")
    monkeypatch.setenv("RDC_PASSWORD_HASH_ROUNDS", "12")
    reset_settings()
    try:
        with pytest.raises(ConfigurationError, match="fonts-wqy-microhei"):
            pdf.render_report_pdf({}, key_images=[], zone=ZoneInfo("UTC"), notice=None)
        monkeypatch.setenv("RDC_ENV", "development")
        reset_settings()
        rendered = pdf.render_report_pdf(
            {}, key_images=[], zone=ZoneInfo("UTC"), notice="以正式报告为准"
        )
    finally:
        reset_settings()
    assert "以正式报告为准" in _pdf_text(rendered)
