"""The resident identity card number (居民身份证号, GB 11643-1999): validation, masking, and
how the index keeps it: encrypted with AES-GCM, matched by HMAC-SHA256, under two keys derived
(HKDF) from ``RDC_PATIENT_INDEX_KEY`` or, when that is not set, from the secret key.

The check character is ISO 7064 MOD 11-2, which GB 11643 specifies; it is a dozen lines, so
it is written here rather than taken from a library.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rdc_core.errors import InvalidInputError
from rdc_core.settings import Settings, get_settings

__all__ = [
    "InvalidNationalIdError",
    "NationalIdCipher",
    "cipher",
    "is_national_id",
    "mask_national_id",
    "shown_patient_id",
    "validate_national_id",
]

_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))  # 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2
_CHECK = "10X98765432"  # check character for sum mod 11 = 0..10
_AAD = b"rdc national id v1"


class InvalidNationalIdError(InvalidInputError):
    """A value offered as a national ID is not a valid 居民身份证号."""

    title = "Invalid national ID"


def validate_national_id(value: str) -> str:
    """The national ID in its canonical form (18 characters, upper-case X), or
    InvalidNationalIdError naming what is wrong (never echoing the whole number)."""
    text = value.strip().upper()
    if len(text) != 18:
        raise InvalidNationalIdError(f"a national ID has 18 characters, not {len(text)}")
    if not text[:17].isdigit() or not (text[17].isdigit() or text[17] == "X"):
        raise InvalidNationalIdError("a national ID is 17 digits and a check digit (0-9 or X)")
    expected = _CHECK[sum(int(c) * w for c, w in zip(text[:17], _WEIGHTS, strict=True)) % 11]
    if text[17] != expected:
        raise InvalidNationalIdError("national ID check digit does not match (GB 11643)")
    return text


def mask_national_id(value: str) -> str:
    """Shown as 110105********1234: region code and the last four characters only."""
    if len(value) < 10:
        return "*" * len(value)
    return value[:6] + "*" * (len(value) - 10) + value[-4:]


def is_national_id(value: str) -> bool:
    """Whether ``value`` is a valid national ID (18 characters, GB 11643 check digit)."""
    try:
        validate_national_id(value)
    except InvalidNationalIdError:
        return False
    return True


def shown_patient_id(issuer: str | None, patient_id: str) -> str:
    """A clinic's patient ID as people may see it: masked (110105********1234) when it is a
    national ID, i.e. its issuer is the configured national one (``RDC_NATIONAL_ID_ISSUER``)
    or the value itself is a valid 居民身份证号 (a clinic using the card number as its patient
    ID). Stored, signed and sent back to the clinic as received; only what is shown is
    masked."""
    national = get_settings().national_id_issuer or None
    if (national and issuer == national) or is_national_id(patient_id):
        return mask_national_id(patient_id)
    return patient_id


@dataclass(frozen=True, slots=True)
class NationalIdCipher:
    """Encrypts, decrypts and hashes national IDs under the deployment's index keys."""

    _encryption_key: bytes
    _hash_key: bytes

    def keyed_hash(self, national_id: str) -> str:
        return hmac.new(self._hash_key, national_id.encode("ascii"), hashlib.sha256).hexdigest()

    def encrypt(self, national_id: str) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(self._encryption_key).encrypt(nonce, national_id.encode("ascii"), _AAD)
        return base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, token: str) -> str | None:
        """The national ID, or None when it cannot be decrypted (another key)."""
        try:
            raw = base64.b64decode(token)
            return AESGCM(self._encryption_key).decrypt(raw[:12], raw[12:], _AAD).decode("ascii")
        except (InvalidTag, ValueError):
            return None


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"rdc-patient-index", info=info).derive(
        secret
    )


@lru_cache(maxsize=4)
def _cipher_for(secret: str) -> NationalIdCipher:
    raw = secret.encode("utf-8")
    return NationalIdCipher(_derive(raw, b"national id aes-gcm"), _derive(raw, b"national id hmac"))


def cipher(settings: Settings | None = None) -> NationalIdCipher:
    """The cipher of the configured deployment."""
    settings = settings or get_settings()
    if settings.patient_index_key is not None:
        return _cipher_for(settings.patient_index_key.get_secret_value())
    return _cipher_for(settings.token_secret())
