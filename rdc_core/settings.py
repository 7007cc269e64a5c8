"""One settings object for the whole product, read from ``RDC_`` environment variables.

Read it through :func:`get_settings`; nothing reads the environment at import time, so tests
and the CLI can point a process at another database or data directory before first use.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rdc_core.errors import ConfigurationError

__all__ = ["Settings", "get_settings", "reset_settings"]


class Settings(BaseSettings):
    """Runtime configuration. Every field maps to ``RDC_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="RDC_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Field(default=Path("rdc-data"), description="Root for the embedded stack")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file in the data directory"
    )
    storage_backend: Literal["local", "s3"] = "local"
    storage_url: str | None = Field(
        default=None, description="Local object directory (path or file:// URL)"
    )
    s3_endpoint: str | None = Field(default=None, description="host:port of the S3 server")
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "rdc"
    s3_secure: bool = True
    s3_region: str = "us-east-1"

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    public_url: str | None = Field(
        default=None,
        description="External base URL (scheme://host[:port][/prefix]) for links in DICOMweb "
        "responses (BulkDataURI, RetrieveURL); unset: links relative to the DICOMweb root",
    )
    cors_origins: str = Field(
        default="",
        description="Comma-separated origins (https://viewer.example:3000) allowed to call "
        "the API and DICOMweb from a browser (e.g. OHIF); empty: none",
    )
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    dicom_ae_title: str = "RDC"
    dicom_max_associations: int = Field(
        default=32, ge=1, description="Associations served at once, by all listener processes"
    )
    dicom_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="DICOM listener processes; 1: threads of the serving process",
    )
    dicom_max_pdu: int = 262_144
    dicom_acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dicom_network_timeout_seconds: float = Field(default=60.0, gt=0)

    stable_age_seconds: float = 30.0
    stable_scan_interval_seconds: float | None = Field(
        default=None, description="How often READY detection runs; default: stable age / 4"
    )
    worker_threads: int = 4
    task_backend: Literal["inprocess", "celery"] = "inprocess"
    broker_url: str | None = Field(
        default=None, description="Celery broker, e.g. redis://host:6379/0 or amqp://..."
    )
    task_queue: str = "rdc"
    metrics_port: int | None = Field(
        default=None, description="Port of rdc worker's Prometheus /metrics (off when unset)"
    )

    secret_key: SecretStr | None = Field(
        default=None, description="Token signing key; required in production"
    )
    password_hash_rounds: int = Field(
        default=12, ge=4, le=16, description="bcrypt cost; production refuses less than 12"
    )
    access_token_minutes: int = 8 * 60
    claim_lease_seconds: int = Field(
        default=900, ge=30, description="How long a claim holds an exam without renewal"
    )
    timezone: str = "Asia/Shanghai"

    alliance_name: str = Field(
        default="医联体远程诊断中心 Remote Diagnostic Centre",
        description="Printed at the top of reports and in the CA's name",
    )
    signing_key_passphrase: SecretStr | None = Field(
        default=None,
        description="Encrypts the CA's and readers' private keys at rest; "
        "default: derived from the secret key",
    )
    critical_escalation_minutes: float = Field(
        default=10.0, gt=0, description="Unacknowledged critical-value alerts escalate after this"
    )
    critical_scan_interval_seconds: float = Field(
        default=30.0, gt=0, description="How often overdue critical-value alerts are escalated"
    )
    delivery_scan_interval_seconds: float = Field(
        default=5.0, gt=0, description="How often pending report push-backs are attempted"
    )
    delivery_max_backoff_seconds: float = Field(
        default=600.0, gt=0, description="Longest wait between two attempts of one push-back"
    )
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.env == "production" and self.secret_key is None:
            raise ConfigurationError("RDC_SECRET_KEY must be set when RDC_ENV=production")
        if self.env == "production" and self.password_hash_rounds < 12:
            raise ConfigurationError("RDC_PASSWORD_HASH_ROUNDS below 12 is refused in production")
        if self.env == "production" and self.database_url is None:
            raise ConfigurationError("RDC_DATABASE_URL must be set when RDC_ENV=production")
        if self.storage_backend == "s3" and not (
            self.s3_endpoint and self.s3_access_key and self.s3_secret_key
        ):
            raise ConfigurationError(
                "RDC_STORAGE_BACKEND=s3 needs RDC_S3_ENDPOINT, RDC_S3_ACCESS_KEY and "
                "RDC_S3_SECRET_KEY"
            )
        if self.task_backend == "celery" and not self.broker_url:
            raise ConfigurationError("RDC_TASK_BACKEND=celery needs RDC_BROKER_URL")
        ZoneInfo(self.timezone)  # fail at start-up, not at the first report
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigurationError("RDC_PUBLIC_URL must start with http:// or https://")
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'rdc.sqlite3').resolve()}"

    @property
    def objects_dir(self) -> Path:
        if self.storage_url:
            return Path(self.storage_url.removeprefix("file://")).resolve()
        return (self.data_dir / "objects").resolve()

    @property
    def stable_scan_interval(self) -> float:
        if self.stable_scan_interval_seconds is not None:
            return self.stable_scan_interval_seconds
        return max(0.5, min(self.stable_age_seconds / 4, 10.0))

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def token_secret(self) -> str:
        """The token signing key.

        In development a random key is created once and kept in the data directory so that
        tokens survive a restart; production refuses to start without ``RDC_SECRET_KEY``.
        """
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        key_file = self.data_dir / ".secret_key"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(secrets.token_urlsafe(48))
            key_file.chmod(0o600)
        return key_file.read_text().strip()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings so the next :func:`get_settings` reads the environment."""
    get_settings.cache_clear()
