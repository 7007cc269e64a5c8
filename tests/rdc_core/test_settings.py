"""Settings come from RDC_ variables; production never runs on defaulted secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rdc_core.errors import ConfigurationError
from rdc_core.settings import Settings


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RDC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RDC_DICOM_PORT", "4242")
    monkeypatch.setenv("RDC_STABLE_AGE_SECONDS", "7.5")
    settings = Settings()
    assert settings.dicom_port == 4242
    assert settings.stable_age_seconds == 7.5
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve()}/rdc.sqlite3"


def test_production_requires_secret_and_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDC_ENV", "production")
    with pytest.raises(ConfigurationError, match="RDC_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("RDC_SECRET_KEY", "kq3ZQ7v0mB1n-PfW8xYtL2cR5sJ9hD4aE6gU_oViTwN")
    with pytest.raises(ConfigurationError, match="RDC_DATABASE_URL"):
        Settings()
    monkeypatch.setenv("RDC_DATABASE_URL", "postgresql+psycopg://db/rdc")
    assert Settings().env == "production"


def test_development_secret_is_generated_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = settings.token_secret()
    assert len(first) >= 32
    assert Settings(data_dir=tmp_path).token_secret() == first
    assert (tmp_path / ".secret_key").stat().st_mode & 0o077 == 0


def test_password_hash_cost_is_configurable_but_not_weak_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rdc_core.security import hash_password, verify_password
    from rdc_core.settings import reset_settings

    monkeypatch.setenv("RDC_PASSWORD_HASH_ROUNDS", "5")
    reset_settings()
    try:
        hashed = hash_password("s3cret-pw")
        assert hashed.startswith("$2b$05$")
        assert verify_password("s3cret-pw", hashed)
    finally:
        reset_settings()
    monkeypatch.delenv("RDC_PASSWORD_HASH_ROUNDS")
    assert Settings().password_hash_rounds == 12
    monkeypatch.setenv("RDC_ENV", "production")
    monkeypatch.setenv("RDC_SECRET_KEY", "kq3ZQ7v0mB1n-PfW8xYtL2cR5sJ9hD4aE6gU_oViTwN")
    monkeypatch.setenv("RDC_DATABASE_URL", "postgresql+psycopg://db/rdc")
    monkeypatch.setenv("RDC_PASSWORD_HASH_ROUNDS", "10")
    with pytest.raises(ConfigurationError, match="RDC_PASSWORD_HASH_ROUNDS"):
        Settings()


def test_hardening_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """What issue 16 fixed as defaults: 5 failures in 15 minutes lock logins and signing,
    the audit trail is verified daily, passwords of at least 10 characters in production
    (configurable upward only), 8 associations per calling AE, one trusted proxy."""
    for name in ("RDC_AUTH_MAX_FAILURES", "RDC_AUTH_LOCKOUT_SECONDS", "RDC_PASSWORD_MIN_LENGTH"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.auth_max_failures, settings.auth_lockout_seconds) == (5, 15 * 60)
    assert settings.audit_verify_interval_seconds == 24 * 3600
    assert settings.password_min_length == 10
    assert settings.dicom_max_associations_per_ae == 8
    assert settings.forwarded_allow_ips == "127.0.0.1"
    monkeypatch.setenv("RDC_PASSWORD_MIN_LENGTH", "16")
    assert Settings().password_min_length == 16
    monkeypatch.setenv("RDC_PASSWORD_MIN_LENGTH", "8")
    with pytest.raises(ValueError, match="password_min_length"):
        Settings()


def test_dicom_processes_default_to_the_cores_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default uses the cores the process may run on (at most 4); one core
    gets the threads of the serving process. Measured in a process confined to one core."""
    monkeypatch.delenv("RDC_DICOM_PROCESSES", raising=False)
    assert Settings().dicom_processes == min(len(os.sched_getaffinity(0)), 4)
    confined = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from rdc_core.settings import Settings; print(Settings().dicom_processes)",
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("RDC_")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert confined.stdout.strip() == "1"
    monkeypatch.setenv("RDC_DICOM_PROCESSES", "3")
    assert Settings().dicom_processes == 3
