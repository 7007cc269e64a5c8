"""No input answers 500: the live app against its own OpenAPI description.

Schemathesis generates requests for every operation of ``/openapi.json`` (valid and invalid
ones: parameters out of range, wrong types, odd strings), each sent with an administrator's
and a clinic user's token, and checks only that no answer is a server error. Bounded: a
few examples per operation, so the module runs in a couple of minutes on two cores.

The values that did answer 500 (integers beyond SQLite's range, times whose zone offset
pushes them off the calendar in UTC, a STOW boundary longer than the parser takes) are also
sent by hand, so that they are tried on every run, not only when generated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.helpers import Deployments, RdcServer, alliance_passwords, storescu

MAX_EXAMPLES = int(os.environ.get("RDC_SCHEMATHESIS_EXAMPLES", "3"))


class _Live:
    def __init__(
        self, server: RdcServer, tokens: dict[str, str], passwords: dict[str, str]
    ) -> None:
        self.server = server
        self.tokens = tokens
        self.passwords = passwords


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, deployments: Deployments, testdata: Path, dcmtk: Path
) -> Iterator[_Live]:
    """One ``rdc serve`` for the module, with a study received, and tokens of an
    administrator and a clinic technician."""
    workdir = tmp_path_factory.mktemp("schemathesis")
    # What is under test is every answer of rdc serve, nothing a background task does: on
    # the production pass no rdc worker and rdc beat beside it (its Celery client still
    # queues what it would run).
    with (
        deployments.env(workdir) as env,
        RdcServer(env, workdir / "serve.log", workers=False) as server,
    ):
        ct = testdata / "dicom" / "CT_small.dcm"
        for result in storescu(dcmtk, [ct], port=server.dicom_port, calling_ae="CLINIC_A_CT"):
            assert result.returncode == 0, result.stderr
        passwords = alliance_passwords()
        tokens = {who: server.token(who, passwords[who]) for who in ("admin", "tech_a")}
        yield _Live(server, tokens, passwords)


@pytest.fixture(scope="module")
def api_schema(live: _Live) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{live.server.http}/openapi.json")
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES
    )
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


_BIG = str(2**63)
_QUERIES = [
    f"/api/v1/exams?offset={_BIG}",
    f"/api/v1/worklist?offset={_BIG}",
    f"/api/v1/reports?offset={_BIG}",
    f"/api/v1/deliveries?offset={_BIG}",
    f"/api/v1/critical-alerts?offset={_BIG}",
    f"/api/v1/notifications?offset={_BIG}",
    f"/api/v1/recognition/declines?offset={_BIG}",
    f"/api/v1/recognition/catalog?version={_BIG}",
    f"/api/v1/recognition/catalog?version={2**31}",
    "/api/v1/critical-alerts?since=0001-01-01T00:00:00%2B23:59",
    "/api/v1/critical-alerts?until=9999-12-31T23:59:59-23:59",
    "/api/v1/reports?since=0001-01-01T00:00:00%2B14:00",
    "/api/v1/reports?since=9999-12-31T23:00:00-14:00",
    "/api/v1/critical-alerts?since=2026-01-01T08:00:00",  # no zone
    # The audit search and export, the QC indicators, cases, exports and monthly report.
    f"/api/v1/audit/events?offset={_BIG}",
    "/api/v1/audit/events?from=0001-01-01T00:00:00%2B14:00",
    "/api/v1/audit/events?to=9999-12-31T23:59:59-14:00",
    "/api/v1/audit/events.csv?from=0001-01-01T00:00:00%2B14:00",
    "/api/v1/audit/events.csv?to=9999-12-31T23:59:59-14:00",
    "/api/v1/qc/indicators?to=0001-01-01",
    "/api/v1/qc/indicators?to=9999-12-31",
    "/api/v1/qc/indicators?from=9999-12-31",
    f"/api/v1/qc/indicators/RRC-02/cases?offset={_BIG}",
    "/api/v1/qc/indicators/RCV-04/histogram?to=0001-01-01",
    "/api/v1/qc/export.csv?to=9999-12-31",
    "/api/v1/qc/export.xlsx?to=0001-01-01",
    "/api/v1/qc/report.pdf?month=0000-01",
    "/api/v1/qc/report.pdf?month=0001-01",
    "/api/v1/qc/report.pdf?month=9999-12",
    "/api/v1/qc/report.pdf?month=2026-13",
    "/api/v1/qc/indicators?from=0002-01-01&to=0002-12-31",
]


def test_out_of_range_values_answer_problems(live: _Live) -> None:
    with httpx.Client(
        base_url=live.server.http,
        # Runs before the fuzzing, which may log the admin out or lock its logins.
        headers={"Authorization": f"Bearer {live.server.token('admin', live.passwords['admin'])}"},
        timeout=30,
    ) as client:
        for query in _QUERIES:
            response = client.get(query)
            assert response.status_code == 422, (query, response.status_code, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
        # A NUL character (PostgreSQL's text cannot hold one) is refused, never a crash.
        nul = client.get("/api/v1/recognized-results?issuer=A%00&patient_id=%00")
        assert nul.status_code < 500, nul.text
        # Times within range in UTC still work, whatever their offset.
        fine = client.get("/api/v1/critical-alerts?since=0001-01-01T00:00:00-05:00")
        assert fine.status_code == 200, fine.text
        assert client.get(f"/api/v1/exams?offset={10**9}").status_code == 200
        assert client.get(f"/api/v1/audit/events?offset={10**9}").status_code == 200
        assert client.get("/api/v1/qc/indicators?from=1900-01-01&to=1902-12-31").status_code == 200
        assert client.get("/api/v1/qc/indicators?from=2999-12-01&to=2999-12-31").status_code == 200

        boundary = "b" * 300
        part = "Content-Type: application/dicom\r\n\r\nnot dicom\r\n"
        body = f"--{boundary}\r\n{part}--{boundary}--\r\n"
        stow = client.post(
            "/dicomweb/studies",
            content=body.encode(),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
            },
        )
        assert stow.status_code in (400, 422), stow.text
        assert stow.headers["content-type"].startswith("application/problem+json")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
def test_no_input_answers_a_server_error(case: schemathesis.Case, live: _Live) -> None:
    for token in live.tokens.values():
        case.call_and_validate(
            headers={"Authorization": f"Bearer {token}"},
            checks=[not_a_server_error],
            timeout=60,
        )
