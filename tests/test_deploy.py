"""The deployment files, checked as far as a machine without containers can: the Dockerfile by
hadolint, the Compose file against the Compose specification's schema, the Kubernetes manifests
against Kubernetes' own schemas (strict), HAProxy's configuration by haproxy itself; and every
setting they give the server is one it has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config import SETTINGS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_dockerfile_passes_hadolint():
    result = run(str(BIN / "hadolint"), "deploy/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_what_the_makefile_installs():
    """The packages installed without their dependencies, at the Makefile's pins."""
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (DEPLOY / "Dockerfile").read_text()
    pins = re.findall(r"'([\w-]+==[\w.]+)'", makefile)
    assert pins and all(f"'{pin}'" in dockerfile for pin in pins), pins


@pytest.mark.parametrize("broken", [False, True])
def test_the_compose_file_follows_the_compose_specification(tmp_path, broken):
    text = (DEPLOY / "compose.yaml").read_text()
    if broken:  # the check can fail: a key the specification does not have
        text = text.replace("    restart: unless-stopped\n", "    restart_policy: unless-stopped\n", 1)
    (tmp_path / "compose.yaml").write_text(text)
    result = run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(tmp_path / "compose.yaml"))
    assert (result.returncode != 0) == broken, result.stdout + result.stderr


@pytest.mark.parametrize("broken", [False, True])
def test_the_kubernetes_manifests_are_valid(tmp_path, broken):
    text = (DEPLOY / "kubernetes.yaml").read_text()
    if broken:
        text = text.replace("terminationGracePeriodSeconds: 40", "terminationGracePeriod: 40")
    (tmp_path / "kubernetes.yaml").write_text(text)
    result = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(tmp_path / "kubernetes.yaml"))
    assert (result.returncode != 0) == broken, result.stdout + result.stderr


def test_haproxy_takes_its_configuration():
    if shutil.which("haproxy") is None:  # `make test` installs it
        pytest.fail("needs haproxy (apt-get install haproxy)")
    env = os.environ | {"VOICE_PROXY_BIND": "127.0.0.1:8080", "VOICE_WORKER_1": "127.0.0.1:8081", "VOICE_WORKER_2": "127.0.0.1:8082"}
    result = subprocess.run(["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0 and "Configuration file is valid" in result.stdout, result.stdout + result.stderr


def _variables() -> set[str]:
    """Every VOICE_AGENT_* variable the deployment files set."""
    names = set()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in compose["services"].values():
        names |= {name for name in service.get("environment", {}) if name.startswith("VOICE_AGENT_")}
    for document in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()):
        for container in document.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            names |= {e["name"] for e in container.get("env", []) if e["name"].startswith("VOICE_AGENT_")}
    names |= set(re.findall(r"VOICE_AGENT_\w+", (DEPLOY / "Dockerfile").read_text()))
    return names


def test_every_setting_the_deployment_files_give_is_one_the_server_has():
    known = {item.env for item in SETTINGS}
    given = _variables()
    assert {"VOICE_AGENT_REGISTRY", "VOICE_AGENT_ADVERTISE_URL", "VOICE_AGENT_DRAIN_TIMEOUT_S"} <= given
    assert given <= known, given - known
