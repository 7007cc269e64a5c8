"""The deployment files hang together: every role runs a real command, nothing secret has a
default, every template value exists. (No Docker engine or helm binary on this machine.)"""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO
from tests.helpers import rdc_cli

DEPLOY = REPO / "deploy"


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
