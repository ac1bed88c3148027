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


PROMETHEUS = REPO / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (`make test` installs it)")


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_alert_rules_pass_their_unit_tests() -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested_firing() -> None:
    """Each rule in alerts.yml has at least one rule test in which it fires."""
    import yaml
    rules = {r["alert"] for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")}
    assert rules == fired


def test_the_container_lock_pins_every_dependency_with_hashes() -> None:
    """requirements.lock (make lock) satisfies pyproject.toml and pins each package with its hashes;
    the Dockerfile installs from it and nothing else."""
    import tomllib

    from packaging.requirements import Requirement
    text = (REPO / "requirements.lock").read_text()
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", text):
        line = block.splitlines()[0]
        if line.startswith("#") or not line.strip():
            continue
        name, _, version = line.split(";")[0].strip(" \\").partition("==")
        assert version, f"not pinned: {line}"
        assert "--hash=sha256:" in block, f"no hash: {line}"
        pins[name.lower().replace("_", "-")] = version
    for spec in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(spec)
        assert req.name.lower() in pins, f"{req.name} is not in requirements.lock: run make lock"
        assert req.specifier.contains(pins[req.name.lower()]), f"{req.name}=={pins[req.name.lower()]} breaks {spec}"
    assert "dumb-init" in pins
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r requirements.lock" in dockerfile
    assert "--no-index --no-deps --no-build-isolation ." in dockerfile
