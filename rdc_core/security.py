"""Password hashing (bcrypt)."""

from __future__ import annotations

import bcrypt

from rdc_core.errors import InvalidInputError
from rdc_core.settings import get_settings

__all__ = ["hash_password", "verify_password"]

# bcrypt only looks at the first 72 bytes; longer passwords are refused rather than
# silently truncated.
_MAX_PASSWORD_BYTES = 72


def hash_password(password: str) -> str:
    """A salted bcrypt hash of ``password`` at the configured cost (RDC_PASSWORD_HASH_ROUNDS)."""
    raw = password.encode("utf-8")
    if not raw:
        raise InvalidInputError("password must not be empty")
    if len(raw) > _MAX_PASSWORD_BYTES:
        raise InvalidInputError(f"password longer than {_MAX_PASSWORD_BYTES} bytes")
    settings = get_settings()
    if settings.env == "production" and len(password) < settings.password_min_length:
        raise InvalidInputError(
            f"password shorter than {settings.password_min_length} characters "
            "(RDC_PASSWORD_MIN_LENGTH)"
        )
    rounds = settings.password_hash_rounds
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds=rounds)).decode("ascii")


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed``; never raises on malformed input."""
    raw = password.encode("utf-8")
    if not raw or len(raw) > _MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(raw, hashed.encode("ascii"))
    except ValueError:
        return False
