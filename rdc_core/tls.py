"""TLS contexts shared by the DICOM listener and the report push-backs (DICOM and MLLP):
TLS 1.2 or later, TLS 1.2 suites limited to ECDHE with AES-GCM or ChaCha20-Poly1305
(BCP 195, DICOM PS3.15 Annex B non-downgrading profile), no compression."""

from __future__ import annotations

import ssl

from rdc_core.settings import Settings

__all__ = ["CIPHERS", "client_context", "harden"]

CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def harden(context: ssl.SSLContext) -> None:
    """Apply the protocol floor, the cipher list and the options every context shares."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION


def client_context(settings: Settings) -> ssl.SSLContext:
    """The context of a TLS push-back: the peer's certificate and host name are verified
    (against ``RDC_DICOM_TLS_CA``, else the system's trust store); the centre's certificate
    (``RDC_DICOM_TLS_CERT``/``_KEY``) is presented when set."""
    cafile = str(settings.dicom_tls_ca) if settings.dicom_tls_ca else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    harden(context)
    if settings.dicom_tls_cert and settings.dicom_tls_key:
        context.load_cert_chain(str(settings.dicom_tls_cert), str(settings.dicom_tls_key))
    return context
