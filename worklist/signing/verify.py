"""Verifying a signed report file: the signed JSON document or the PAdES PDF.

Anyone can verify: the only input besides the file is the alliance CA certificate (from
the database, or a PEM a verifier was given). The answer says only what the file itself
holds (who signed, when, which report version), so an outsider learns nothing more.

Certificates are checked at the signing time, so a report stays valid after its signer's
certificate expires. That time is the alliance's own record (``signed_artifacts``) when
the file is one the alliance stored; otherwise the time the file claims. Revocation needs
the database: a revoked certificate's signature is accepted only when the recorded signing
time precedes the revocation (a claimed time can be back-dated by whoever holds the key).
Without the database (``rdc verify --ca``) revocation is not checked, and the result says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from rdc_core.errors import NotFoundError
from worklist.access import Principal
from worklist.audit import record_access
from worklist.models import Report, ReportStatus
from worklist.queries import visible_exam
from worklist.signing.models import SignedArtifact
from worklist.signing.pki import (
    ca_certificates,
    credential_by_serial,
    signature_algorithm,
    verify_signature,
)
from worklist.signing.service import (
    LEGACY_SIGNED_FORMAT,
    SIGNED_FORMAT,
    canonical_bytes,
    get_signed_artifact,
    legacy_canonical_bytes,
    signature_summary,
)

__all__ = ["VerificationResult", "check_report", "detect_kind", "load_ca_pems", "verify_file"]


@dataclass
class VerificationResult:
    """The outcome of checking one file. ``valid`` only when every check passed;
    ``reasons`` says what failed (or, when valid, what was checked)."""

    kind: str
    valid: bool = False
    reasons: list[str] = field(default_factory=list)
    signer: dict[str, Any] | None = None
    signed_at: str | None = None
    report: dict[str, Any] | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    # False when no database was at hand (a CA PEM only): "valid" then says nothing
    # about revocation.
    revocation_checked: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return asdict(self)


def detect_kind(data: bytes) -> str:
    """``pdf``, ``document`` (signed JSON) or ``unknown``, from the content."""
    head = data[:1024].lstrip()
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"{"):
        return "document"
    return "unknown"


def load_ca_pems(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle."""
    return x509.load_pem_x509_certificates(data)


def _trust_roots(
    session: Session | None, ca_certs: list[x509.Certificate] | None
) -> list[x509.Certificate]:
    roots = list(ca_certs or [])
    if session is not None:
        roots += ca_certificates(session)  # never a revoked CA
    return roots


def _recorded_signing_time(session: Session | None, data: bytes) -> datetime | None:
    # The alliance's own record of when this exact file was signed (None for a file it
    # did not store).
    if session is None:
        return None
    digest = hashlib.sha256(data).hexdigest()
    return session.execute(
        select(SignedArtifact.signed_at)
        .where(or_(SignedArtifact.document_sha256 == digest, SignedArtifact.pdf_sha256 == digest))
        .limit(1)
    ).scalar_one_or_none()


def _check_revocation(
    session: Session | None, result: VerificationResult, serial: str, recorded: datetime | None
) -> None:
    if session is None:
        return
    result.revocation_checked = True
    credential = credential_by_serial(session, serial)
    if credential is None:
        result.reasons.append(f"certificate {serial} was not issued by this alliance's CA")
        result.checks["not_revoked"] = False
        return
    if not credential.revoked:
        result.checks["not_revoked"] = True
        return
    # Only a signing time from the alliance's records can show the signature predates
    # the revocation; the file's own claim is the key holder's word.
    before = (
        recorded is not None
        and credential.revoked_at is not None
        and recorded < credential.revoked_at
    )
    result.checks["not_revoked"] = before
    if before:
        return
    if recorded is None:
        result.reasons.append(
            f"certificate {serial} is revoked and this file is not in the alliance's records, "
            "so its claimed signing time cannot show it was signed before the revocation"
        )
    else:
        result.reasons.append(f"certificate {serial} was revoked when the report was signed")


def _chains_to(cert: x509.Certificate, roots: list[x509.Certificate], at: datetime) -> str | None:
    """None when ``cert`` was directly issued by one of ``roots`` and valid at ``at``;
    otherwise why not. The alliance's hierarchy is one level deep by construction."""
    if not roots:
        return "no trusted alliance CA certificate to check against (give --ca CA.pem)"
    for root in roots:
        if root.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if not (root.not_valid_before_utc <= at <= root.not_valid_after_utc):
            return "the CA certificate was not valid at signing time"
        if not (cert.not_valid_before_utc <= at <= cert.not_valid_after_utc):
            return "the signer's certificate was not valid at signing time"
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return "the signer's certificate has no key usage"
        if not (usage.digital_signature and usage.content_commitment):
            return "the signer's certificate is not for signing (key usage)"
        return None
    return "the signer's certificate does not chain to the alliance CA"


def _jcs_int(text: str) -> int | float:
    # RFC 8785 numbers are doubles: a double such as 1e16 is written as an integer that
    # Python would otherwise read as an int too large for JCS.
    value = int(text)
    return value if abs(value) < 2**53 else float(value)


_ENVELOPE_KEYS = {"format", "document", "signature"}
_SIGNATURE_KEYS = {"algorithm", "value", "certificate", "chain"}


def _verify_document(
    data: bytes, session: Session | None, roots: list[x509.Certificate], recorded: datetime | None
) -> VerificationResult:
    result = VerificationResult(kind="document")
    try:
        envelope = json.loads(data.decode("utf-8"))
        fmt = envelope.get("format") if isinstance(envelope, dict) else None
        if fmt == SIGNED_FORMAT:
            envelope = json.loads(data.decode("utf-8"), parse_int=_jcs_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        result.reasons.append(f"not a JSON document: {exc}")
        return result
    if fmt not in (SIGNED_FORMAT, LEGACY_SIGNED_FORMAT):
        result.reasons.append(f"not a signed report document ({SIGNED_FORMAT})")
        return result
    canonical_form = canonical_bytes if fmt == SIGNED_FORMAT else legacy_canonical_bytes
    # The file is canonical JSON as written: any byte changed outside the signed document
    # (spacing, the signature block) breaks this, inside it breaks the signature.
    try:
        canonical = canonical_form(envelope) == data
    except ValueError:
        canonical = False
    result.checks["canonical"] = canonical
    if not canonical:
        result.reasons.append("the file is not in its signed canonical form (modified)")
    document = envelope.get("document")
    signature = envelope.get("signature") or {}
    if not isinstance(document, dict) or not isinstance(signature, dict):
        result.reasons.append("document or signature missing")
        return result
    # Nothing unsigned may travel along: only the keys the signer writes.
    if set(envelope) != _ENVELOPE_KEYS or set(signature) != _SIGNATURE_KEYS:
        result.reasons.append("the file holds fields the signer did not write (modified)")
    result.signer = document.get("signer")
    result.signed_at = document.get("signed_at")
    report = document.get("report") or {}
    result.report = {
        "id": report.get("id"),
        "version": report.get("version"),
        "status": report.get("status"),
        "stage": document.get("stage"),
    }
    try:
        cert = x509.load_pem_x509_certificate(str(signature.get("certificate", "")).encode())
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
    except ValueError as exc:
        result.reasons.append(f"unreadable signature or certificate: {exc}")
        return result
    # Base64 decoding ignores unused bits: only the one spelling the signer wrote counts.
    if base64.b64encode(value).decode("ascii") != signature.get("value"):
        result.reasons.append("the signature value is not written as signed (modified)")
    try:
        algorithm: str | None = signature_algorithm(cert)
    except (ValueError, UnsupportedAlgorithm):  # a damaged certificate's key (or its curve)
        algorithm = None
    if algorithm is None or signature.get("algorithm") != algorithm:
        result.reasons.append("the signature algorithm does not match the certificate's key")
    pem = serialization.Encoding.PEM
    try:
        chain = [x509.load_pem_x509_certificate(str(c).encode()) for c in signature["chain"]]
    except (KeyError, TypeError, ValueError):
        chain = None
    roots_der = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    # The certificates travel outside the signed bytes: they must be exactly as written
    # (the signer's own, and copies of the trusted CA), so no byte of them can change.
    exact = (
        chain is not None
        and cert.public_bytes(pem).decode() == signature.get("certificate")
        and [c.public_bytes(pem).decode() for c in chain] == signature.get("chain")
        and all(c.public_bytes(serialization.Encoding.DER) in roots_der for c in chain)
    )
    result.checks["certificates"] = exact
    if not exact:
        result.reasons.append("the embedded certificates are not the signer's and the CA's")
    try:
        verify_signature(cert, value, canonical_form(document))
        result.checks["signature"] = True
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        result.checks["signature"] = False
        result.reasons.append("the signature does not match the document (modified)")
    serial = format(cert.serial_number, "x")
    claimed = (result.signer or {}).get("certificate_serial")
    if claimed != serial:
        result.reasons.append("the document names another certificate than the one it carries")
    try:
        signed_at = datetime.fromisoformat(str(result.signed_at))
        if signed_at.tzinfo is None:
            raise ValueError("naive time")
    except ValueError:
        result.reasons.append("no valid signing time")
        return result
    problem = _chains_to(cert, roots, recorded or signed_at)
    result.checks["chain"] = problem is None
    if problem:
        result.reasons.append(problem)
    _check_revocation(session, result, serial, recorded)
    result.valid = not result.reasons
    return result


def _contents_padding_clean(sig: Any) -> bool:
    # /Contents is the CMS blob padded with zeros; pyHanko reads the blob and would not
    # notice a change in the padding, which is inside no byte range either.
    from asn1crypto import parser

    contents = bytes(sig.sig_object["/Contents"])
    _, _, _, header, body, trailer = parser.parse(contents)
    used = len(header) + len(body) + len(trailer)
    return not any(contents[used:])


def _contents_as_written(sig: Any, data: bytes) -> bool:
    # The /Contents hex string is outside the byte range, and hex digits read the same
    # in either case: the gap must hold exactly what pyHanko writes (upper-case hex).
    start, _, end, _ = (int(n) for n in sig.sig_object["/ByteRange"])
    gap_start = start + int(sig.sig_object["/ByteRange"][1])
    contents = bytes(sig.sig_object["/Contents"])
    return data[gap_start:end] == b"<" + binascii.hexlify(contents).upper() + b">"


def _algorithm_as_written(value: Any, cls: Any) -> Any:
    # An algorithm identifier rebuilt from its OID, its parameters NULL when there were
    # any (the DER forms signers write): anything else in them was changed.
    from asn1crypto import core

    fields: dict[str, Any] = {"algorithm": value["algorithm"].dotted}
    if value["parameters"].dump():
        fields["parameters"] = core.Null()
    return cls(fields)


def _container_canonical(sig: Any) -> bool:
    """The CMS container is exactly the one its parts define, in DER.

    pyHanko checks only what it needs (the digest, the signed attributes, the signature
    value, the certificates): the SignedData and SignerInfo versions, the digest algorithm
    set, the encapsulated content type and an algorithm identifier's parameters are read
    by no one, so a changed byte there would go unnoticed. The container is rebuilt from
    its meaningful parts, the versions derived as RFC 5652 prescribes, encoded in DER, and
    must equal the bytes in the file.
    """
    from asn1crypto import algos, cms, parser

    contents = bytes(sig.sig_object["/Contents"])
    _, _, _, header, body, trailer = parser.parse(contents)
    blob = contents[: len(header) + len(body) + len(trailer)]
    info = cms.ContentInfo.load(blob, strict=True)
    signed = info["content"]
    if info["content_type"].native != "signed_data" or len(signed["signer_infos"]) != 1:
        return False
    signer = signed["signer_infos"][0]
    sid_kind = signer["sid"].name
    # RFC 5652 5.1 and 5.3: v1 with issuerAndSerialNumber, v3 with subjectKeyIdentifier;
    # the SignedData takes 3 when a signer info does, otherwise 1 (plain X.509
    # certificates, no CRLs, id-data content).
    version = "v1" if sid_kind == "issuer_and_serial_number" else "v3"
    digest = _algorithm_as_written(signer["digest_algorithm"], algos.DigestAlgorithm)
    rebuilt_signer = cms.SignerInfo(
        {
            "version": version,
            "sid": signer["sid"].copy(),
            "digest_algorithm": digest,
            "signed_attrs": signer["signed_attrs"].copy(),
            "signature_algorithm": _algorithm_as_written(
                signer["signature_algorithm"], algos.SignedDigestAlgorithm
            ),
            "signature": signer["signature"].native,
        }
    )
    rebuilt = cms.ContentInfo(
        {
            "content_type": "signed_data",
            "content": cms.SignedData(
                {
                    "version": version,
                    "digest_algorithms": [digest.copy()],
                    "encap_content_info": {"content_type": "data"},
                    "certificates": [choice.copy() for choice in signed["certificates"] or []],
                    "signer_infos": [rebuilt_signer],
                }
            ),
        }
    )
    return bool(rebuilt.dump(force=True) == blob)


def _container_clean(sig: Any, roots_der: set[bytes]) -> bool:
    # The CMS certificate set and unsigned attributes are outside the signed digest; only
    # the signer's certificate and exact copies of the trusted CA may travel there, so a
    # changed byte in them is noticed too.
    signer_der = sig.signer_cert.dump()
    for choice in sig.signed_data["certificates"] or []:
        if choice.dump() != signer_der and choice.chosen.dump() not in roots_der | {signer_der}:
            return False
    return all(
        not info["unsigned_attrs"] or not len(info["unsigned_attrs"])
        for info in sig.signed_data["signer_infos"]
    )


def _verify_pdf(
    data: bytes, session: Session | None, roots: list[x509.Certificate], recorded: datetime | None
) -> VerificationResult:
    try:
        return _check_pdf(data, session, roots, recorded)
    except Exception as exc:  # pyHanko and asn1crypto parse lazily: a damaged part raises late
        return VerificationResult(kind="pdf", reasons=[f"the signature cannot be read: {exc}"])


def _check_pdf(
    data: bytes, session: Session | None, roots: list[x509.Certificate], recorded: datetime | None
) -> VerificationResult:
    from asn1crypto import x509 as asn1_x509
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import SignatureCoverageLevel, validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    result = VerificationResult(kind="pdf")
    try:
        reader = PdfFileReader(io.BytesIO(data), strict=False)
        signatures = reader.embedded_signatures
    except Exception as exc:  # pyHanko raises many kinds on a damaged file
        result.reasons.append(f"unreadable PDF: {exc}")
        return result
    if len(signatures) != 1:
        result.reasons.append(f"expected one signature, found {len(signatures)}")
        return result
    sig = signatures[0]
    if not roots:
        result.reasons.append(
            "no trusted alliance CA certificate to check against (give --ca CA.pem)"
        )
        return result
    claimed = sig.self_reported_timestamp
    moment = recorded or claimed
    if moment is None:
        result.reasons.append("no signing time in the signature")
        return result
    der = serialization.Encoding.DER
    # Validated as of the signing time: an expired certificate does not void what it
    # signed while valid.
    context = ValidationContext(
        trust_roots=[asn1_x509.Certificate.load(r.public_bytes(der)) for r in roots],
        allow_fetching=False,
        revocation_mode="soft-fail",
        moment=moment,
    )
    try:
        status = validate_pdf_signature(sig, context)
    except Exception as exc:
        result.reasons.append(f"the signature cannot be validated: {exc}")
        return result
    cert = sig.signer_cert
    result.signer = {
        "name": cert.subject.native.get("common_name"),
        "username": cert.subject.native.get("user_id"),
        "certificate_serial": format(cert.serial_number, "x"),
        "certificate_issuer": cert.issuer.human_friendly,
    }
    signed_at = status.signer_reported_dt or claimed
    result.signed_at = signed_at.astimezone(UTC).isoformat() if signed_at else None
    result.checks.update(
        intact=bool(status.intact),
        valid=bool(status.valid),
        trusted=bool(status.trusted),
        entire_file=status.coverage == SignatureCoverageLevel.ENTIRE_FILE,
    )
    try:
        result.checks["padding"] = (
            _contents_as_written(sig, data)
            and _contents_padding_clean(sig)
            and _container_clean(sig, {r.public_bytes(der) for r in roots})
            and _container_canonical(sig)
        )
    except Exception:  # asn1crypto raises many kinds on a damaged container
        result.checks["padding"] = False
    messages = {
        "intact": "the signed bytes were changed (digest mismatch)",
        "valid": "the signature value is not valid",
        "trusted": _untrusted_reason(cert, roots, moment, status),
        "entire_file": "the signature does not cover the whole file (bytes added or changed)",
        "padding": "the signature container was modified",
    }
    result.reasons += [messages[name] for name, ok in result.checks.items() if not ok]
    _check_revocation(session, result, format(cert.serial_number, "x"), recorded)
    result.valid = not result.reasons
    return result


def _untrusted_reason(
    cert: Any, roots: list[x509.Certificate], moment: datetime, status: Any
) -> str:
    # Say what failed (no chain, not valid then, key usage), not only that trust failed.
    problem = _chains_to(x509.load_der_x509_certificate(cert.dump()), roots, moment)
    if problem:
        return problem
    indication = getattr(status, "trust_problem_indic", None)
    name = getattr(indication, "name", None) or "unknown"
    return f"the signer's certificate could not be validated at signing time ({name})"


def verify_file(
    data: bytes,
    *,
    session: Session | None = None,
    ca_certs: list[x509.Certificate] | None = None,
    signed_at: datetime | None = None,
) -> VerificationResult:
    """Check a signed report file (PDF or JSON document, told apart by content) against the
    alliance CA: from ``session``'s database and/or the given ``ca_certs``. Certificates
    are checked at the signing time: ``signed_at`` when given (the caller's trusted record),
    else the alliance's record of this file, else the time the file claims. With a session
    the signer's certificate must not have been revoked before that recorded time
    (``revocation_checked``); without one revocation is not checked."""
    roots = _trust_roots(session, ca_certs)
    recorded = signed_at or _recorded_signing_time(session, data)
    kind = detect_kind(data)
    if kind == "pdf":
        return _verify_pdf(data, session, roots, recorded)
    if kind == "document":
        return _verify_document(data, session, roots, recorded)
    return VerificationResult(kind="unknown", reasons=["neither a PDF nor a signed JSON document"])


def check_report(session: Session, *, principal: Principal, report_id: str) -> dict[str, Any]:
    """Verify the stored signed document and PDF of a report version the principal may
    read (clinics: their own submitted reports; otherwise not found), as of the signing
    time the database recorded. Audited."""
    report = session.get(Report, report_id)
    if report is None:
        raise NotFoundError(f"no report {report_id}")
    visible_exam(session, principal=principal, exam_id=report.exam_id)
    if principal.is_clinic_user and report.status is ReportStatus.DRAFT:
        raise NotFoundError(f"no report {report_id}")
    record_access(session, principal, action="verify", object_type="report", object_id=report_id)
    summary = signature_summary(session, report_id=report_id)
    if summary is None:
        return {
            "valid": False,
            "report_id": report_id,
            "stage": None,
            "document": None,
            "pdf": None,
            "signer": None,
            "reasons": ["the report version is not signed"],
        }
    answer: dict[str, Any] = {"report_id": report_id, "stage": summary["stage"]}
    signed_at = datetime.fromisoformat(summary["signed_at"])
    reasons: list[str] = []
    for kind, digest_name in (("document", "document_sha256"), ("pdf", "pdf_sha256")):
        try:
            data = get_signed_artifact(session, report_id=report_id, kind=kind)  # type: ignore[arg-type]
        except NotFoundError as exc:
            answer[kind] = None
            reasons.append(f"{kind}: {exc}")
            continue
        # The database's signing time, not the file's claim.
        result = verify_file(data, session=session, signed_at=signed_at)
        if hashlib.sha256(data).hexdigest() != summary[digest_name]:
            result.valid = False
            result.reasons.append("the stored file is not the one that was signed")
        answer[kind] = result.as_dict()
        reasons += [f"{kind}: {reason}" for reason in result.reasons]
    answer["signer"] = {
        "username": summary["signer"],
        "name": summary["signer_name"],
        "signed_at": summary["signed_at"],
        "certificate_serial": summary["certificate_serial"],
    }
    answer["reasons"] = reasons
    answer["valid"] = not reasons
    return answer
