"""Deployment files: systemd units verified and hardened, the Dockerfile linted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import ServiceConfig
from daemon.simulator import SimOptions
from tests.conftest import REPO, archive_files, cli_env, simulator_subprocess

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
    from daemon.service import START_EXTEND_INTERVAL_S
    # The start-up reconcile asks for more time as it goes: the fixed budget need not cover it, only
    # be long enough for the first request to land.
    assert START_EXTEND_INTERVAL_S < int(settings["TimeoutStartSec"]) <= 120


@pytest.mark.parametrize("source", list(UNITS))
def test_units_point_at_the_documentation_pyproject_names(source: str) -> None:
    """Documentation= is the address in pyproject's [project.urls] (Documentation, else Homepage), never a
    made-up one or a file: path; with no public address yet, the units carry none."""
    import tomllib
    urls = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("urls", {})
    want = urls.get("Documentation") or urls.get("Homepage")
    docs = [line.split("=", 1)[1] for line in (REPO / "systemd" / source).read_text().splitlines()
            if line.startswith("Documentation=")]
    assert docs == ([want] if want else [])
    assert all(d.startswith("https://") for d in docs)


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


# ---------------------------------------------------------------- the README's systemd recipe, as the service user

README = REPO / "README.md"
# Steps of the recipe that need a running systemd or install the package: the test runs this checkout's
# binary instead, and everything else in the block exactly as written.
_NOT_HERE = ("python3 -m venv", "/opt/yeastar-archiver/bin/pip", "cp systemd/", "systemctl", "journalctl")
# The recipe's paths, longest first, and where they live under the test's root.
_PATHS = ("/opt/yeastar-archiver/bin/yeastar-archiver", "/etc/yeastar-archiver", "/var/lib/yeastar-archiver",
          "/srv/recordings")
_SERVICE_USER = re.compile(r"(?<![\w/.$-])yeastar-archiver(?![\w/.-])")


def readme_sh_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in the README."""
    text = README.read_text()
    after = text[text.index(f"\n{heading}\n"):]
    return after.split("```sh\n", 1)[1].split("\n```", 1)[0]


def recipe_steps(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments dropped, systemd/install steps left out."""
    joined = re.sub(r"\\\n\s*", "", block)
    steps = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip()
        if line and not line.startswith(_NOT_HERE):
            steps.append(line)
    return steps


def localise(step: str, *, root: Path, user: str, binary: Path) -> str:
    """One recipe step with its paths under ``root``, its service user ``user``, the binary ``binary``."""
    step = _SERVICE_USER.sub(user, step)
    for path in _PATHS:
        step = step.replace(path, str(binary) if path.endswith("/bin/yeastar-archiver") else f"{root}{path}")
    return step


def test_recipe_steps_are_read_from_the_readme_as_written() -> None:
    """The extraction the as-the-service-user test relies on: the check runs as the service user."""
    steps = recipe_steps(readme_sh_block("## Deploy with systemd"))
    assert steps[0].startswith("useradd --system")
    check = next(s for s in steps if " check -c " in s)
    assert "setpriv --reuid yeastar-archiver --regid yeastar-archiver --clear-groups" in check
    assert localise(check, root=Path("/r"), user="u1", binary=Path("/b/ya")) == (
        "CREDENTIALS_DIRECTORY=$CRED setpriv --reuid u1 --regid u1 --clear-groups -- "
        "/b/ya check -c /r/etc/yeastar-archiver/config.yaml")
    assert any(s.startswith("install -d -o root -g yeastar-archiver -m 0750 /etc/yeastar-archiver") for s in steps)


@pytest.fixture
def reachable_root() -> Iterator[Path]:
    """A folder any uid can reach (pytest's tmp_path lies below a 0700 folder of root's)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the recipe as an unprivileged uid")
    path = Path(tempfile.mkdtemp(prefix="yeastar-archiver-deploy-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    """The name the recipe's `useradd` creates, deleted afterwards (user and its group) whatever happened."""
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not installed")
    name = f"ya-deploy-{os.getpid()}"
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)
        subprocess.run(["groupdel", name], capture_output=True, check=False)


def _binary() -> Path:
    return REPO / ".venv" / "bin" / "yeastar-archiver"


def _recipe_config(base_url: str, root: Path) -> str:
    import yaml
    return yaml.safe_dump({
        "pbx": {"base_url": base_url, "client_id": SimOptions.client_id,
                "client_secret_file": "${CREDENTIALS_DIRECTORY}/client_secret", "requests_per_second": 1000},
        "sources": {"ids": [1000, 1001]},
        "archive": {"dir": f"{root}/srv/recordings", "min_free_bytes": 0},
        "state": {"path": f"{root}/var/lib/yeastar-archiver/ledger.db"},
        "service": {"listen": None},
        "logging": {"format": "json"},
    })


def _credentials_as_systemd_does(root: Path, uid: int, gid: int) -> Path:
    """What LoadCredential= gives the service: a folder of its own holding a copy of the root-only secret."""
    cred = root / "credentials"
    cred.mkdir(mode=0o700)
    shutil.copyfile(root / "etc/yeastar-archiver/client_secret", cred / "client_secret")
    (cred / "client_secret").chmod(0o400)
    for p in (cred, cred / "client_secret"):
        os.chown(p, uid, gid)
    return cred


def test_the_readme_systemd_recipe_works_as_the_service_user(reachable_root: Path, throwaway_user: str) -> None:
    """The README's steps, run literally (paths under a temp root, the service user a throwaway one): the
    config is readable by the service's group only, `check` runs as the service user and passes, and
    `once` as that uid (its own uid and group, no supplementary groups) archives into the recipe's folders."""
    import grp
    import pwd
    root = reachable_root
    steps = [localise(s, root=root, user=throwaway_user, binary=_binary())
             for s in recipe_steps(readme_sh_block("## Deploy with systemd"))]
    config = root / "etc/yeastar-archiver/config.yaml"
    secret = root / "etc/yeastar-archiver/client_secret"
    for sub in ("etc", "srv", "var/lib"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # The operator's edits ("then write the Client Secret into it", "then edit it"), right after the step
    # that installs the config; `>` keeps each file's owner and mode.
    at = next(i for i, s in enumerate(steps) if s.endswith(str(config))) + 1
    with simulator_subprocess("--count", "2") as base_url:
        (root / "edit.secret").write_text(SimOptions.client_secret + "\n")
        (root / "edit.config").write_text(_recipe_config(base_url, root))
        steps.insert(at, f'cat {root}/edit.secret > {secret} && cat {root}/edit.config > {config}')
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(steps)], capture_output=True,
                              text=True, cwd=REPO, env=cli_env(TMPDIR=str(root)), timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        user = pwd.getpwnam(throwaway_user)
        group = grp.getgrgid(user.pw_gid)
        assert group.gr_name == throwaway_user
        # check ran as the service user, not as root: it says whose access it checked
        assert f"archive.dir '{root}/srv/recordings' exists and is writable (uid {user.pw_uid})" in done.stdout
        assert "logged in to" in done.stdout
        modes = {p: (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o7777)
                 for p in (config.parent, config, secret)}
        assert modes == {config.parent: (0, user.pw_gid, 0o750), config: (0, user.pw_gid, 0o640),
                         secret: (0, 0, 0o600)}
        cred = _credentials_as_systemd_does(root, user.pw_uid, user.pw_gid)
        once = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                               str(_binary()), "once", "-c", str(config)], capture_output=True, text=True,
                              cwd=root, env=cli_env(CREDENTIALS_DIRECTORY=str(cred)), timeout=120, check=False)
    assert once.returncode == 0, once.stderr
    archived = archive_files(root / "srv/recordings")
    assert len(archived) == 2
    assert {(root / "srv/recordings" / name).stat().st_uid for name in archived} == {user.pw_uid}
    assert not [p for p in root.iterdir() if p.name.startswith("tmp.")]


def test_the_old_recipe_root_only_config_folder_is_a_clear_exit_2(reachable_root: Path) -> None:
    """The recipe before this fix (`install -d -m 0750 /etc/yeastar-archiver`, root:root): the service user
    cannot read its config. `check` run as that uid says so, naming the file, exit 2, no traceback."""
    etc = reachable_root / "etc/yeastar-archiver"
    etc.mkdir(parents=True, mode=0o750)
    config = etc / "config.yaml"
    config.write_text("pbx: {}\n")
    config.chmod(0o644)
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           str(_binary()), "check", "-c", str(config)], capture_output=True, text=True,
                          cwd=reachable_root, env=cli_env(), timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(config) in done.stderr and "Permission denied" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


# ---------------------------------------------------------------- the README's Docker recipe, for the container test

def docker_recipe(image: str) -> list[str]:
    """The README's Docker commands as tests/container/container-test.sh runs them, in the folder holding
    config.yaml and client_secret: the same commands, with only what a test host needs changed — podman
    for docker (no Docker engine), its host network (the simulator listens on the host's loopback), the
    image it built, and no `sudo` (it runs as root). The image is built by the script itself."""
    steps = []
    for step in recipe_steps(readme_sh_block("## Deploy with Docker or Compose")):
        if step.startswith("docker build"):
            continue
        step = step.removeprefix("sudo ").replace("&& sudo ", "&& ")
        if step.startswith("docker run "):
            words = step.split(" ")
            step = " ".join(["podman", "run", "--network", "host", *words[2:-1], image])
        steps.append(step)
    return steps


def test_the_container_test_runs_the_readme_docker_recipe() -> None:
    """The secret's ownership is in the README's recipe, and the container test runs that recipe (not a
    chown of its own): what passes there is what a reader of the README does."""
    steps = docker_recipe("localhost/x:test")
    assert "chown 10001:10001 client_secret && chmod 0600 client_secret" in steps
    run = steps[-1]
    assert run.startswith("podman run --network host -d ") and run.endswith(" localhost/x:test")
    assert '-v "$PWD/client_secret:/run/secrets/client_secret:ro"' in run
    script = (REPO / "tests" / "container" / "container-test.sh").read_text()
    assert "docker_recipe" in script
    assert "chown -R 10001" not in script and "chown 10001" not in script
