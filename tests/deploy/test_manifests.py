"""The deployment files hang together: every role runs a real command, nothing secret has a
default, every template value exists. Docker Compose v2 validates the compose file
(``docker compose config``; no Docker engine is needed for that), and Helm's own code lints
and renders the chart (helm-python-sdk bundles Helm's Go SDK: there is no helm binary). CI
also fails, rather than skips, when a service of the production pass is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.helpers import free_port, rdc_cli

DEPLOY = REPO / "deploy"
SECRETS = ("RDC_SECRET_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD")


def test_compose_roles_commands_and_secrets(rdc_env: dict[str, str]) -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "minio",
        "redis",
        "migrate",
        "web",
        "dicom",
        "worker",
        "beat",
    }
    for name in ("postgres", "minio", "redis", "web", "dicom", "worker"):
        assert "healthcheck" in services[name], name
    for name in ("migrate", "web", "dicom", "worker", "beat"):
        command = services[name]["command"]
        assert command[0] == "rdc"
        # The command exists and takes these options.
        rdc_cli(rdc_env, *command[1:], "--help")
        assert services[name]["environment"]["RDC_ENV"] == "production"
    for secret in ("RDC_SECRET_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        uses = re.findall(r"\$\{" + secret + r"(:\?[^}]*)?\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{secret} must be required"


def _paths(tree: object, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return {prefix}
    found = {prefix} if prefix else set()
    for key, value in tree.items():
        found |= _paths(value, f"{prefix}.{key}" if prefix else key)
    return found


def test_helm_templates_use_only_defined_values() -> None:
    chart = DEPLOY / "helm" / "rdc"
    values = _paths(yaml.safe_load((chart / "values.yaml").read_text()))
    used: set[str] = set()
    for template in (chart / "templates").glob("*"):
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()))
    assert used, "templates use no values?"
    assert used <= values, sorted(used - values)
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["name"] == "rdc"
    roles = {p.stem for p in (chart / "templates").glob("*.yaml")}
    assert {"web", "dicom", "worker", "migrate-job", "configmap"} <= roles


def _compose_command() -> list[str]:
    """Docker Compose v2: the Docker CLI plugin (./scripts/test installs it), or a standalone
    v2 ``docker-compose``."""
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        version = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, timeout=60
        )
        if version.returncode == 0 and version.stdout.strip().lstrip("v").startswith("2."):
            return command
    pytest.fail("Docker Compose v2 is not installed; ./scripts/test installs it")


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_compose_command(), "-f", str(DEPLOY / "compose.yaml"), "config", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_docker_compose_validates_the_stack() -> None:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("RDC_")}
    secrets = {
        "RDC_SECRET_KEY": "s3cret-key",
        "POSTGRES_PASSWORD": "pg-pw",
        "MINIO_ROOT_PASSWORD": "minio-pw",
    }
    result = _compose_config({**env, **secrets})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    worker = services["worker"]["environment"]
    assert worker["RDC_METRICS_PORT"] == "9100"
    assert worker["RDC_SECRET_KEY"] == "s3cret-key"
    assert "pg-pw@postgres" in worker["RDC_DATABASE_URL"]
    assert services["web"]["environment"]["RDC_S3_SECRET_KEY"] == "minio-pw"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Compose refuses to run the stack when any secret is missing.
    for secret in SECRETS:
        missing = _compose_config({**env, **{k: v for k, v in secrets.items() if k != secret}})
        assert missing.returncode != 0
        assert f"required variable {secret} is missing" in missing.stderr


_HELM = """
import json, sys
import helm_python as helm

chart = sys.argv[1]
report = helm.lint(chart, strict=True)
with helm.Chart.load(chart) as loaded:
    manifests = loaded.render(name="rdc", namespace="rdc")
print(json.dumps({"lint": report, "manifests": manifests}))
"""


def _helm(chart: Path) -> dict[str, Any]:
    """``helm lint --strict`` and ``helm template`` with Helm's own code, in a subprocess (the
    Go runtime stays out of the test process)."""
    result = subprocess.run(
        [sys.executable, "-c", _HELM, str(chart)], capture_output=True, text=True, timeout=120
    )
    if "No module named 'helm_python'" in result.stderr:
        pytest.fail("helm-python-sdk is not installed (a dev dependency: pip install -e '.[dev]')")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_helm_lints_and_renders_the_chart() -> None:
    chart = DEPLOY / "helm" / "rdc"
    out = _helm(chart)
    lint = out["lint"]
    assert lint["errors"] == [], lint
    # Helm's severities: 1 info, 2 warning, 3 error.
    assert [m for m in lint["messages"] if m["severity"] >= 2] == [], lint
    documents = [
        doc
        for text in out["manifests"].values()
        for doc in yaml.safe_load_all(text)
        if doc is not None
    ]
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    assert kinds == {
        ("ConfigMap", "rdc-config"),
        ("Deployment", "rdc-web"),
        ("Service", "rdc-web"),
        ("StatefulSet", "rdc-dicom"),
        ("Service", "rdc-dicom"),
        ("Deployment", "rdc-worker"),
        ("Deployment", "rdc-beat"),
        ("Job", "rdc-migrate-1"),
    }
    values = yaml.safe_load((chart / "values.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    commands = [service["command"] for service in compose.values() if "command" in service]
    pods = {
        doc["metadata"]["name"]: doc["spec"]["template"]
        for doc in documents
        if doc["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    for name, pod in pods.items():
        (container,) = pod["spec"]["containers"]
        # The same commands as compose (those run with --help above).
        assert container["command"] in commands, (name, container["command"])
        assert {"secretRef": {"name": values["existingSecret"]}} in container["envFrom"]
    worker = pods["rdc-worker"]
    port = str(values["worker"]["metricsPort"])
    (container,) = worker["spec"]["containers"]
    assert {"name": "RDC_METRICS_PORT", "value": port} in container["env"]
    assert worker["metadata"]["annotations"]["prometheus.io/port"] == port
    web = pods["rdc-web"]["spec"]["containers"][0]
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_ci_requires_the_services() -> None:
    """.ci/run sets RDC_REQUIRE_SERVICES=1, and then a missing PostgreSQL aborts the run."""
    assert "export RDC_REQUIRE_SERVICES=1" in (REPO / ".ci" / "run").read_text()
    closed = f"postgresql+psycopg://root@127.0.0.1:{free_port()}/test"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "tests/rdc_core/test_settings.py",
        ],
        cwd=REPO,
        env={**os.environ, "RDC_REQUIRE_SERVICES": "1", "RDC_TEST_POSTGRES_URL": closed},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"PostgreSQL at {closed}" in result.stdout + result.stderr
    assert " passed" not in result.stdout  # aborted before any test ran


@pytest.mark.production  # RDC_REQUIRE_SERVICES=1 checks the services first
def test_ci_turns_a_skip_into_a_failure(tmp_path: Path) -> None:
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_needs_a_service():\n    pytest.skip('service missing')\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.conftest",
            "-q",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_skips.py"),
        ],
        cwd=REPO,
        # As the embedded pass runs it (the production pass leaves out a test that touches
        # no stack, as this one).
        env={
            **{k: v for k, v in os.environ.items() if k != "RDC_TEST_DATABASE"},
            "RDC_REQUIRE_SERVICES": "1",
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout
    assert "RDC_REQUIRE_SERVICES=1 allows no skips: Skipped: service missing" in result.stdout
