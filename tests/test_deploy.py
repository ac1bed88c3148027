"""Deployment files: systemd units verified and hardened, the Dockerfile linted."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.config import ServiceConfig
from tests.conftest import REPO

UNITS = {"yeastar-archiver.service": "yeastar-archiver.service",
         "yeastar-archiver@.service": "yeastar-archiver@pbx1.service"}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")


def _installable(tmp_path: Path, source: str, name: str) -> Path:
    """The unit as an operator installs it, ExecStart pointing at this checkout's real binary."""
    text = (REPO / "systemd" / source).read_text()
    binary = Path(shutil.which("yeastar-archiver") or REPO / ".venv" / "bin" / "yeastar-archiver")
    unit = tmp_path / name
    unit.write_text(text.replace("/opt/yeastar-archiver/bin/yeastar-archiver", str(binary)))
    return unit


@needs_systemd
@pytest.mark.parametrize(("source", "name"), list(UNITS.items()))
def test_units_pass_systemd_analyze_verify(tmp_path: Path, source: str, name: str) -> None:
    unit = _installable(tmp_path, source, name)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@needs_systemd
@pytest.mark.parametrize(("source", "name"), list(UNITS.items()))
def test_units_are_hardened_to_an_exposure_of_at_most_2(tmp_path: Path, source: str, name: str) -> None:
    unit = _installable(tmp_path, source, name)
    done = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(unit)], capture_output=True,
                          text=True, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    assert float(match.group(1)) <= 2.0


@pytest.mark.parametrize("source", list(UNITS))
def test_units_keep_the_service_contract(source: str) -> None:
    text = (REPO / "systemd" / source).read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"].split() == ["2", "3", "6"]
    from daemon.runner import STOP_TAIL_S
    assert int(settings["TimeoutStopSec"]) > ServiceConfig().shutdown_grace_s + STOP_TAIL_S
    assert settings["RequiresMountsFor"].startswith("/srv/recordings")
    assert int(settings["WatchdogSec"]) > 60   # above the default read timeout of one stalled transfer
    assert settings["LoadCredential"].startswith("client_secret:")
    assert "ReadWritePaths" in settings and "ConfigurationDirectory" in settings


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_example_passes_the_secret_as_a_file() -> None:
    import yaml
    compose = yaml.safe_load((REPO / "docker-compose.example.yml").read_text())
    service = compose["services"]["yeastar-archiver"]
    assert service["secrets"] == ["client_secret"]
    assert "client_secret_file: /run/secrets/client_secret" in (REPO / "docker-compose.example.yml").read_text()
    assert int(service["stop_grace_period"].rstrip("s")) > ServiceConfig().shutdown_grace_s
