"""One settings object for the whole product, read from ``RDC_`` environment variables.

Read it through :func:`get_settings`; nothing reads the environment at import time, so tests
and the CLI can point a process at another database or data directory before first use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rdc_core.errors import ConfigurationError

__all__ = ["Settings", "cores_given", "get_settings", "private_directory", "reset_settings"]

# The default RDC_DICOM_PROCESSES is the cores given, up to this: each listener process
# costs an interpreter's memory and start-up, and on SQLite one index writer takes them all.
MAX_DEFAULT_DICOM_PROCESSES = 4


def cores_given() -> int:
    """How many cores this process may run on (its CPU affinity; all of the machine's
    where that cannot be read)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    dicom_max_associations_per_ae: int = Field(
        default=8, ge=1, description="Associations served at once from one calling AE title"
    )
    dicom_max_associations_per_clinic: int = Field(
        default=16, ge=1, description="Associations served at once from one clinic's AE titles"
    )
    dicom_processes: int = Field(
        default_factory=lambda: min(cores_given(), MAX_DEFAULT_DICOM_PROCESSES),
        ge=1,
        le=64,
        description=(
            "DICOM listener processes (default: the cores this process may run on, at most"
            " 4); 1: threads of the serving process"
        ),
    )
    dicom_max_pdu: int = 262_144
    dicom_acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dicom_network_timeout_seconds: float = Field(default=60.0, gt=0)
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 2575
    mllp_network_timeout_seconds: float = Field(
        default=300.0, gt=0, description="An MLLP connection idle this long is closed"
    )
    mllp_max_message_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Longest MLLP frame or HTTP body"
    )
    lab_autorelease: bool = Field(
        default=True,
        description="Release lab orders that pass auto-verification (自动审核); false: the "
        "stop switch, every order waits for a lab physician (also switchable at run time)",
    )
    lab_autorelease_signer: str | None = Field(
        default=None,
        description="Username of the responsible lab physician under whom auto-verified "
        "orders are signed; unset: nothing is released automatically",
    )
    lab_rules_path: Path | None = Field(
        default=None, description="Auto-verification rule set (YAML); unset: the shipped seed"
    )
    lab_critical_limits_path: Path | None = Field(
        default=None, description="Lab critical limits (YAML); unset: the shipped seed"
    )
    lab_process_scan_interval_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often accepted lab messages not processed yet are picked up again",
    )
    dicom_tls_port: int | None = Field(
        default=None, description="DICOM TLS listener port (PS3.15 Annex B); unset: none"
    )
    dicom_tls_cert: Path | None = None
    dicom_tls_key: Path | None = None
    dicom_tls_ca: Path | None = Field(
        default=None,
        description="CA bundle: client certificates required on the TLS listener; also "
        "verifies the peers of TLS push-backs",
    )

    stable_age_seconds: float = 30.0
    stable_scan_interval_seconds: float | None = Field(
        default=None, description="How often READY detection runs; default: stable age / 4"
    )
    worker_threads: int = 4
    ecg_prescreen_rules: Path | None = Field(
        default=None,
        description="ECG pre-screen (triage) rule table, YAML; default: the 2017 Chinese "
        "consensus set shipped in ecg_service/data/prescreen_rules.yaml",
    )
    ecg_max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest ECG upload (all its files)"
    )
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
    password_min_length: int = Field(
        default=10,
        ge=10,
        le=72,
        description="Shortest password accepted in production (configurable upward)",
    )
    auth_max_failures: int = Field(
        default=5, ge=1, description="Failed logins (per user, per address) or signing passwords"
    )
    auth_lockout_seconds: int = Field(
        default=900, ge=1, description="Window the failures are counted in; also the lock-out"
    )
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description="Proxies whose X-Forwarded-For/-Proto uvicorn trusts (comma-separated, *)",
    )
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
    national_id_issuer: str | None = Field(
        default=None,
        description="Issuer of Patient ID whose patient IDs are national IDs (居民身份证号)",
    )
    patient_index_key: SecretStr | None = Field(
        default=None,
        description="Encrypts and hashes national IDs in the patient index; "
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
    audit_seal_interval_seconds: float = Field(
        default=10.0, gt=0, description="How often new audit records are chained (sealed)"
    )
    audit_seal_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        description="A gap in the audit sequence older than this is sealed as rolled back",
    )
    audit_checkpoint_interval_seconds: float = Field(
        default=3600.0, gt=0, description="How often a signed audit checkpoint is written"
    )
    audit_verify_interval_seconds: float = Field(
        default=86400.0, gt=0, description="How often the audit chain is verified"
    )
    audit_checkpoint_key_file: Path | None = Field(
        default=None,
        description="PEM Ed25519 private key for audit checkpoints; "
        "default: derived from the secret key",
    )
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.env == "production" and self.secret_key is None:
            raise ConfigurationError("RDC_SECRET_KEY must be set when RDC_ENV=production")
        if self.env == "production" and self.secret_key is not None:
            _check_production_secret(self.secret_key.get_secret_value())
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
        if self.dicom_tls_port is not None and not (self.dicom_tls_cert and self.dicom_tls_key):
            raise ConfigurationError("RDC_DICOM_TLS_PORT needs RDC_DICOM_TLS_CERT and _KEY")
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
            private_directory(key_file.parent)
            try:
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process created it first
                pass
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(48))
        return key_file.read_text().strip()


def private_directory(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable by the owner only (0700): the data
    directory holds the database, the objects and the development secret."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for created in missing:  # parents=True creates parents with the umask's mode
        with contextlib.suppress(OSError):
            created.chmod(0o700)
    return path


# A production key must be at least 32 bytes of random material: 43 characters of
# ``secrets.token_urlsafe(32)``, 44 of ``openssl rand -base64 32`` or 64 hex digits.
_MIN_SECRET_BYTES = 32
_MIN_SECRET_DISTINCT = 12


def _check_production_secret(key: str) -> None:
    """Refuse keys that can be guessed or brute-forced offline (a token signed with ``x``
    was forged and accepted): too short, or too few different characters to be random."""
    if len(key.encode("utf-8")) < _MIN_SECRET_BYTES or len(set(key)) < _MIN_SECRET_DISTINCT:
        raise ConfigurationError(
            f"RDC_SECRET_KEY must be at least {_MIN_SECRET_BYTES} random bytes in production "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings so the next :func:`get_settings` reads the environment."""
    get_settings.cache_clear()
