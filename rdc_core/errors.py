"""The error hierarchy every package raises; edges map these to protocol answers."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConflictError",
    "DatabaseUnavailableError",
    "InvalidInputError",
    "NotFoundError",
    "PermissionDeniedError",
    "RDCError",
    "StorageError",
    "TooManyAttemptsError",
]


class RDCError(Exception):
    """Base of every error the product raises on purpose.

    ``title`` is a short human-readable summary for problem responses and logs; the message
    carries the detail.
    """

    title = "RDC error"


class ConfigurationError(RDCError):
    """Settings are missing or inconsistent; the process should not start."""

    title = "Configuration error"


class InvalidInputError(RDCError):
    """The caller sent something we cannot accept; nothing was changed."""

    title = "Invalid input"


class NotFoundError(RDCError):
    """The object does not exist, or the caller may not know that it exists."""

    title = "Not found"


class PermissionDeniedError(RDCError):
    """The caller is known but not allowed to do this."""

    title = "Permission denied"


class AuthenticationError(RDCError):
    """The caller could not be identified (bad credentials or token)."""

    title = "Authentication failed"


class TooManyAttemptsError(RDCError):
    """Too many failed attempts (login, signing password): refused until ``retry_after``
    seconds have passed, whatever is sent meanwhile."""

    title = "Too many attempts"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class ConflictError(RDCError):
    """The request conflicts with the current state (duplicate, already taken, ...)."""

    title = "Conflict"


class StorageError(RDCError):
    """The object store could not complete a read or write; the caller may retry later."""

    title = "Object store unavailable"


class DatabaseUnavailableError(RDCError):
    """The database could not complete the transaction; the caller may retry later."""

    title = "Database unavailable"


class TransactionLostError(DatabaseUnavailableError):
    """The database ended the whole transaction (an error rolled it back, or the connection
    was lost): everything written in it is gone, not only the last unit of work."""
