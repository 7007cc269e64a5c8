"""TLS for DICOM (PS3.15 Annex B, BCP 195): the listener's server context, the push-backs'
client context, and the clinic a client certificate stands for.

TLS 1.2 or later only; TLS 1.2 cipher suites restricted to ECDHE with AES-GCM or
ChaCha20-Poly1305 (TLS 1.3 suites are all AEAD). Compression off.

A client certificate stands for the clinic whose code is its subject Common Name (for
example ``CN=CLINIC_A``), and the calling AE title must belong to that clinic.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from rdc_core.errors import ConfigurationError
from rdc_core.settings import Settings
from rdc_core.tls import CIPHERS, client_context, harden

__all__ = ["CIPHERS", "client_context", "clinic_of_certificate", "server_context"]


def _file(path: Path | None, name: str) -> str:
    if path is None or not Path(path).is_file():
        raise ConfigurationError(f"{name} {path} is not a readable file")
    return str(path)


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS listener's context; with ``RDC_DICOM_TLS_CA`` client certificates are
    required and verified against it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    harden(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(
            _file(settings.dicom_tls_cert, "RDC_DICOM_TLS_CERT"),
            _file(settings.dicom_tls_key, "RDC_DICOM_TLS_KEY"),
        )
        if settings.dicom_tls_ca is not None:
            context.load_verify_locations(_file(settings.dicom_tls_ca, "RDC_DICOM_TLS_CA"))
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigurationError(f"DICOM TLS certificate or key unusable: {exc}") from exc
    return context


def clinic_of_certificate(peercert: Any) -> str | None:
    """The clinic code a verified client certificate stands for: its subject CN."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
