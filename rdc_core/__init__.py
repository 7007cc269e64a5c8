"""Shared core: settings, database, object store, task runner, errors, logging.

Every other package builds on this one; it imports none of them.
"""

from rdc_core.errors import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    DatabaseUnavailableError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    RDCError,
    StorageError,
)
from rdc_core.settings import Settings, get_settings

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConflictError",
    "DatabaseUnavailableError",
    "InvalidInputError",
    "NotFoundError",
    "PermissionDeniedError",
    "RDCError",
    "Settings",
    "StorageError",
    "get_settings",
]
