"""A lab deployment shared by a test module: ``rdc serve`` with CLINIC_A's HL7 sending
facilities registered (every facility of the shared HL7 test data) and CLINIC_B's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    Deployments,
    RdcServer,
    alliance_passwords,
    deployment_env,
    pass_database,
    rdc_cli,
)

# MSH-4 of the test data's messages, by namespace ID or (for two) universal ID; MSH-3 for
# the message whose MSH-4 is empty; GHHSFacility sends the ADT message.
CLINIC_A_FACILITIES = (
    "ELAB-3",
    "10D0876999",  # Avante at Ormond Beach^10D0876999^CLIA
    "00Z0000024",  # CAREEVOLUTION^00Z0000024^CLIA
    "CDC FTC",
    "TEST",
    "NIST Lab Facility",
    "CASECENTER FACILITY",
    "SomeSystem",
    "GHHSFacility",
)
CLINIC_B_FACILITY = "CLINIC_B_LIS"


@dataclass
class LabDeployment:
    server: RdcServer
    env: dict[str, str]
    passwords: dict[str, str]
    workdir: Path

    def client(self, username: str) -> httpx.Client:
        return self.server.client(username, self.passwords[username])


postgres_database = pass_database  # a module's own database (tests/lab_results/test_failures.py)


# Auto-verified orders are signed under the seeded senior reader (the lab physician); the lab
# deployment receives no DICOM (the product's default stable age).
LAB_SETTINGS: dict[str, str | None] = {
    "RDC_LAB_AUTORELEASE_SIGNER": "senior",
    "RDC_LAB_PROCESS_SCAN_INTERVAL_SECONDS": "5",
    "RDC_STABLE_AGE_SECONDS": None,
    # Push-backs to a clinic's HIS are retried within seconds (the ACK tests).
    "RDC_DELIVERY_SCAN_INTERVAL_SECONDS": "1",
    "RDC_DELIVERY_MAX_BACKOFF_SECONDS": "2",
}


def lab_env(workdir: Path, database_url: str | None) -> dict[str, str]:
    return deployment_env(workdir, database_url, **LAB_SETTINGS)


def register_facilities(env: dict[str, str]) -> None:
    """Through the CLI, on the clinics seed_alliance created (``--update``)."""
    args = [a for name in CLINIC_A_FACILITIES for a in ("--hl7-facility", name)]
    rdc_cli(env, "clinic", "add", "--code", "CLINIC_A", "--update", *args)
    rdc_cli(
        env, "clinic", "add", "--code", "CLINIC_B", "--update", "--hl7-facility", CLINIC_B_FACILITY
    )


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments
) -> Iterator[LabDeployment]:
    """One ``rdc serve`` for the module, clinics and facilities registered."""
    workdir = tmp_path_factory.mktemp("lab")
    with deployments.env(workdir, **LAB_SETTINGS) as env:
        register_facilities(env)
        with RdcServer(env, workdir / "serve.log") as server:
            yield LabDeployment(server, env, alliance_passwords(), workdir)
