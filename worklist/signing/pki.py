"""The alliance's own certification authority and the readers' signing credentials.

Every private key (the CA's and each reader's) is kept in the database as encrypted PKCS#8
(``BestAvailableEncryption``) under ``RDC_SIGNING_KEY_PASSPHRASE``, or, when that is not
set, under a passphrase derived by HKDF from the deployment's secret key. Only the service
acting for the signed-in reader unlocks the reader's key, which is what 电子签名法 Art. 13
asks of the signer's control over the signature-creation data.

Signing goes through the :class:`Signer` protocol. :class:`StoredKeySigner` is the one built
here (the key stored above); an external CA's certificate with a PKCS#11 token (pyHanko's
``PKCS11Signer`` for the PDF and the token's sign call for the JSON document) is another
implementation of the same protocol, installed with :func:`set_signer_provider`.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from sqlalchemy import select
from sqlalchemy.orm import Session

from rdc_core.db import stable_id
from rdc_core.errors import ConflictError, NotFoundError
from rdc_core.settings import Settings, get_settings
from worklist.models import Organization, OrgKind, User
from worklist.signing.models import CredentialKind, SigningCredential

__all__ = [
    "CA_VALIDITY_DAYS",
    "READER_VALIDITY_DAYS",
    "CaExistsError",
    "NoCertificateError",
    "Signer",
    "StoredKeySigner",
    "ca_certificate",
    "ca_certificates",
    "certificate_name",
    "credential_by_serial",
    "current_credential",
    "init_ca",
    "issue_certificate",
    "revoke_certificate",
    "set_signer_provider",
    "signature_algorithm",
    "signer_for",
    "verify_signature",
]

CA_VALIDITY_DAYS = 20 * 365
READER_VALIDITY_DAYS = 2 * 365
# id-kp-documentSigning (RFC 9336): what a reader's certificate is for.
_DOCUMENT_SIGNING = ObjectIdentifier("1.3.6.1.5.5.7.3.36")


class CaExistsError(ConflictError):
    """``rdc ca init`` on a deployment that already has its CA."""

    title = "CA exists"


class NoCertificateError(ConflictError):
    """The reader has no signing certificate (production never issues one on the fly)."""

    title = "No signing certificate"


def _passphrase(settings: Settings) -> bytes:
    if settings.signing_key_passphrase is not None:
        return settings.signing_key_passphrase.get_secret_value().encode("utf-8")
    # A separate key from the token secret: a leaked passphrase does not forge tokens.
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"rdc-signing-keys", info=b"pkcs8 at rest"
    ).derive(settings.token_secret().encode("utf-8"))
    return base64.urlsafe_b64encode(derived)


def _encrypt_key(key: ec.EllipticCurvePrivateKey, settings: Settings) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(_passphrase(settings)),
    ).decode("ascii")


# Decrypting a PKCS#8 key runs its key-derivation function (deliberately slow); signing a
# report must not pay it every time. Keyed by the encrypted PEM's hash and the passphrase's.
_key_cache: dict[tuple[str, str], Any] = {}
_key_lock = threading.Lock()


def _decrypt_key(pem: str, settings: Settings) -> Any:
    passphrase = _passphrase(settings)
    cache_key = (hashlib.sha256(pem.encode()).hexdigest(), hashlib.sha256(passphrase).hexdigest())
    with _key_lock:
        key = _key_cache.get(cache_key)
    if key is None:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=passphrase)
        with _key_lock:
            if len(_key_cache) > 256:
                _key_cache.clear()
            _key_cache[cache_key] = key
    return key


def certificate_name(cert: x509.Certificate, *, subject: bool = True) -> str:
    """The certificate's subject (or issuer) as an RFC 4514 string."""
    return (cert.subject if subject else cert.issuer).rfc4514_string()


def _row(kind: CredentialKind, user_id: str | None, cert: x509.Certificate, key_pem: str) -> Any:
    serial = format(cert.serial_number, "x")
    return SigningCredential(
        id=stable_id("signing_credential", serial),
        kind=kind,
        user_id=user_id,
        serial=serial,
        subject=certificate_name(cert)[:500],
        issuer=certificate_name(cert, subject=False)[:500],
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        encrypted_key_pem=key_pem,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        revoked=False,
    )


def _current_ca(session: Session) -> SigningCredential | None:
    return session.execute(
        select(SigningCredential)
        .where(
            SigningCredential.kind == CredentialKind.CA,
            SigningCredential.superseded_at.is_(None),
            SigningCredential.revoked.is_(False),
        )
        .order_by(SigningCredential.created_at.desc())
        .limit(1)
    ).scalar_one_or_none()


def init_ca(
    session: Session, *, now: datetime, settings: Settings | None = None
) -> SigningCredential:
    """Create the alliance's root CA (key and self-signed certificate named after
    ``alliance_name``). Raises CaExistsError when there is one already."""
    settings = settings or get_settings()
    if _current_ca(session) is not None:
        raise CaExistsError("the alliance CA exists already")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{settings.alliance_name} Root CA"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, settings.alliance_name[:64]),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    row = _row(CredentialKind.CA, None, cert, _encrypt_key(key, settings))
    session.add(row)
    session.flush()
    return row


def ca_certificate(session: Session) -> SigningCredential:
    """The current CA credential; NotFoundError before ``rdc ca init``."""
    row = _current_ca(session)
    if row is None:
        raise NotFoundError("the alliance CA does not exist yet; run rdc ca init")
    return row


def ca_certificates(session: Session) -> list[x509.Certificate]:
    """Every CA certificate the alliance has had and not revoked (old reports chain to an
    old CA); these are the verifiers' trust roots, so a revoked CA is never one."""
    rows = session.execute(
        select(SigningCredential.certificate_pem).where(
            SigningCredential.kind == CredentialKind.CA, SigningCredential.revoked.is_(False)
        )
    ).scalars()
    return [x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in rows]


def current_credential(session: Session, *, user_id: str) -> SigningCredential | None:
    """The reader's current (not superseded, not revoked) signing credential."""
    return session.execute(
        select(SigningCredential)
        .where(
            SigningCredential.kind == CredentialKind.READER,
            SigningCredential.user_id == user_id,
            SigningCredential.superseded_at.is_(None),
            SigningCredential.revoked.is_(False),
        )
        .order_by(SigningCredential.created_at.desc())
        .limit(1)
    ).scalar_one_or_none()


def credential_by_serial(session: Session, serial: str) -> SigningCredential | None:
    """The credential whose certificate has this serial number (hex)."""
    return session.execute(
        select(SigningCredential).where(SigningCredential.serial == serial.lower())
    ).scalar_one_or_none()


def _lead_name(session: Session, user: User) -> str:
    org = session.get(Organization, user.org_id)
    if org is not None:
        return org.name
    lead = session.execute(
        select(Organization.name).where(Organization.kind == OrgKind.LEAD)
    ).scalar_one_or_none()
    return lead or ""


def issue_certificate(
    session: Session,
    *,
    username: str,
    now: datetime,
    renew: bool = False,
    settings: Settings | None = None,
) -> SigningCredential:
    """Issue ``username`` a key pair and a certificate from the alliance CA (CN = display
    name, O = organisation; digitalSignature + nonRepudiation; two years). A reader who has
    a current certificate gets a new one only with ``renew`` (the old one is superseded, and
    still verifies what it signed)."""
    settings = settings or get_settings()
    user = session.execute(select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise NotFoundError(f"no user {username}")
    existing = current_credential(session, user_id=user.id)
    if existing is not None and not renew:
        raise ConflictError(
            f"{username} has a signing certificate (serial {existing.serial}); use --renew"
        )
    ca = ca_certificate(session)
    ca_cert = x509.load_pem_x509_certificate(ca.certificate_pem.encode("ascii"))
    ca_key = _decrypt_key(ca.encrypted_key_pem, settings)
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, (user.display_name or user.username)[:64]),
        x509.NameAttribute(NameOID.USER_ID, user.username[:64]),
    ]
    organisation = _lead_name(session, user)
    if organisation:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation[:64]))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + timedelta(days=READER_VALIDITY_DAYS), ca.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,  # nonRepudiation
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([_DOCUMENT_SIGNING, ExtendedKeyUsageOID.EMAIL_PROTECTION]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    if existing is not None:
        existing.superseded_at = now
    row = _row(CredentialKind.READER, user.id, cert, _encrypt_key(key, settings))
    session.add(row)
    session.flush()
    return row


def revoke_certificate(session: Session, *, serial: str, now: datetime) -> SigningCredential:
    """Mark a certificate revoked from ``now``: a reader's signatures recorded before stay
    valid, later ones do not verify. A revoked CA is no longer a trust root: nothing it
    issued verifies any more."""
    row = credential_by_serial(session, serial)
    if row is None:
        raise NotFoundError(f"no certificate with serial {serial}")
    if not row.revoked:
        row.revoked = True
        row.revoked_at = now
        session.flush()
    return row


def signature_algorithm(cert: x509.Certificate) -> str:
    """The name of the algorithm a key of this certificate signs documents with."""
    if isinstance(cert.public_key(), rsa.RSAPublicKey):
        return "sha256WithRSAEncryption"
    return "ecdsa-with-SHA256"


def verify_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    """Check ``signature`` over ``data`` with the certificate's key; raises
    cryptography's InvalidSignature (or ValueError for a key type we do not sign with)."""
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise ValueError(f"unsupported key type {type(public).__name__}")


class Signer(Protocol):
    """Whatever holds a reader's signature-creation data.

    ``certificate`` and ``chain`` (issuer first, up to the root) are embedded in what is
    signed; :meth:`sign` signs raw bytes (the canonical JSON document) and
    :meth:`pdf_signer` returns a pyHanko ``Signer`` for the PAdES signature. A PKCS#11
    token implements both without the key ever leaving it.
    """

    @property
    def certificate(self) -> x509.Certificate: ...

    @property
    def chain(self) -> list[x509.Certificate]: ...

    def sign(self, data: bytes) -> bytes: ...

    def pdf_signer(self) -> Any: ...


@dataclass(frozen=True)
class StoredKeySigner:
    """A :class:`Signer` over a key kept (encrypted) in ``signing_credentials``."""

    certificate: x509.Certificate
    chain: list[x509.Certificate]
    _key: Any

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return bytes(self._key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
        return bytes(self._key.sign(data, ec.ECDSA(hashes.SHA256())))

    def pdf_signer(self) -> Any:
        from asn1crypto import keys as asn1_keys
        from asn1crypto import x509 as asn1_x509
        from pyhanko.sign.signers import SimpleSigner
        from pyhanko_certvalidator.registry import SimpleCertificateStore

        der = serialization.Encoding.DER
        key_der = self._key.private_bytes(
            der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return SimpleSigner(
            signing_cert=asn1_x509.Certificate.load(self.certificate.public_bytes(der)),
            signing_key=asn1_keys.PrivateKeyInfo.load(key_der),
            cert_registry=SimpleCertificateStore.from_certs(
                [asn1_x509.Certificate.load(c.public_bytes(der)) for c in self.chain]
            ),
        )


SignerProvider = Callable[[Session, User, datetime], Signer]


def _stored_key_signer(session: Session, user: User, now: datetime) -> Signer:
    settings = get_settings()
    credential = current_credential(session, user_id=user.id)
    if credential is None or credential.not_after <= now:
        if settings.env != "development":
            raise NoCertificateError(
                f"no signing certificate for {user.username}; "
                "an administrator must run rdc ca issue "
                f"/ {user.username} 没有签名证书，请管理员执行 rdc ca issue"
            )
        # Development convenience only: the demo and the tests sign without ceremony.
        if _current_ca(session) is None:
            init_ca(session, now=now, settings=settings)
        credential = issue_certificate(
            session, username=user.username, now=now, renew=True, settings=settings
        )
    return StoredKeySigner(
        certificate=x509.load_pem_x509_certificate(credential.certificate_pem.encode("ascii")),
        chain=[_issuing_ca(session, credential)],
        _key=_decrypt_key(credential.encrypted_key_pem, settings),
    )


def _issuing_ca(session: Session, credential: SigningCredential) -> x509.Certificate:
    # The CA that issued this certificate (after a CA change, old readers' certificates
    # still chain to the old one).
    for pem in session.execute(
        select(SigningCredential.certificate_pem).where(
            SigningCredential.kind == CredentialKind.CA,
            SigningCredential.subject == credential.issuer,
        )
    ).scalars():
        ca = x509.load_pem_x509_certificate(pem.encode("ascii"))
        cert = x509.load_pem_x509_certificate(credential.certificate_pem.encode("ascii"))
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    raise NotFoundError(f"the CA that issued certificate {credential.serial} is not known")


_provider: list[SignerProvider] = [_stored_key_signer]


def set_signer_provider(provider: SignerProvider | None) -> None:
    """Replace how a reader's :class:`Signer` is obtained (external CA, PKCS#11 token);
    ``None`` restores the stored-key signer."""
    _provider[0] = provider or _stored_key_signer


def signer_for(session: Session, *, user: User, now: datetime) -> Signer:
    """The reader's signer. In production a reader without a certificate cannot sign
    (NoCertificateError); in development one is issued on the spot."""
    return _provider[0](session, user, now)
