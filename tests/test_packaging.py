"""The package as a distribution sees it: its import graph, metadata, sdist, and a shadowed `daemon`."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tarfile
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env


def _daemon_imports(path: Path) -> set[str]:
    """The ``daemon.*`` modules a module imports, at run time or for type checking alike."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daemon."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("daemon."))
    return out


def test_the_module_graph_has_no_circle() -> None:
    """service and notify read the live parts from daemon.live; nothing below the CLI reaches back
    into the lifecycle (daemon.runner), not even for type checking."""
    graph = {f"daemon.{p.stem}": _daemon_imports(p) for p in (REPO / "daemon").glob("*.py")}
    assert sorted(m for m, deps in graph.items() if "daemon.runner" in deps) == ["daemon.cli"]

    def reachable(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen
    assert [m for m in graph if m in reachable(m)] == []


def _console_script() -> Path:
    return Path(shutil.which("yeastar-archiver") or REPO / ".venv" / "bin" / "yeastar-archiver")


def test_the_version_has_one_source_the_distribution_metadata() -> None:
    import daemon
    assert daemon.__version__ == metadata.version("yeastar-archiver")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == daemon.__version__
    assert "__version__ =" not in (REPO / "daemon" / "__init__.py").read_text()
    done = subprocess.run([str(_console_script()), "--version"], capture_output=True, text=True, check=False,
                          env=cli_env(), timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"yeastar-archiver {daemon.__version__}"


def test_the_console_script_starts_from_a_module_no_other_package_can_shadow() -> None:
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")
               if ep.dist is not None and ep.dist.name == "yeastar-archiver"}
    assert scripts == {"yeastar-archiver": "yeastar_archiver:main"}


SHADOW = '''"""A different distribution's package called daemon, as python-daemon installs one."""
from daemon.daemon import DaemonContext  # noqa: F401
'''


def test_a_shadowing_daemon_package_gets_a_clear_message_not_an_import_error(tmp_path: Path) -> None:
    shadow = tmp_path / "site" / "daemon"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(SHADOW)
    (shadow / "daemon.py").write_text("class DaemonContext:\n    pass\n")
    env = cli_env(PYTHONPATH=str(tmp_path / "site"))
    # First make sure the shadow really wins: Python imports it, not ours.
    probe = subprocess.run([sys.executable, "-c", "import daemon; print(daemon.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True, timeout=30)
    assert probe.stdout.strip() == str(shadow / "__init__.py")
    done = subprocess.run([str(_console_script()), "--version"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, check=False, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "ImportError" not in done.stderr
    assert str(shadow / "__init__.py") in done.stderr and "python-daemon" in done.stderr
    assert "virtual environment of its own" in done.stderr


def test_the_sdist_carries_what_a_packager_needs_to_run_the_suite(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_sdist(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", build, str(out)], capture_output=True, text=True, cwd=REPO,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    name = done.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    for wanted in ("LICENSE", "README.md", "config.example.yaml", "Makefile", "pyproject.toml", "yeastar_archiver.py",
                   "daemon/py.typed", "daemon/config.schema.json", "daemon/cli.py",
                   "tests/conftest.py", "tests/faults/test_faults.py",
                   "systemd/yeastar-archiver.service", "systemd/yeastar-archiver@.service",
                   "deploy/prometheus/alerts.yml", "deploy/prometheus/alerts_test.yml",
                   "deploy/grafana/yeastar-archiver.json", "requirements.lock"):
        assert wanted in members, wanted
    assert not [m for m in members if "__pycache__" in m or m.startswith((".venv/", "dist/", ".git/"))]


_IMPORTED_BY = """
import sys
from daemon.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize(("argv", "forbidden"), [
    # A container HEALTHCHECK runs this every 30 s: no event loop, no logging stack, no HTTP client.
    (["health", "--url", "http://127.0.0.1:9/livez"], {"aiohttp", "asyncio", "structlog", "ssl", "daemon.runner",
                                                       "daemon.simulator", "daemon.client", "daemon.ledger"}),
    (["--version"], {"aiohttp", "asyncio", "structlog", "daemon.runner", "daemon.simulator"}),
    # status reads the ledger (whose module brings asyncio) but never talks HTTP.
    (["status", "-c", "{cfg}"], {"aiohttp", "daemon.runner", "daemon.simulator", "daemon.client",
                                 "prometheus_client"}),
])
def test_light_commands_do_not_import_the_heavy_parts(tmp_path: Path, argv: list[str], forbidden: set[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("pbx: {base_url: 'http://127.0.0.1:9', client_id: a, client_secret: b}\n"
                   f"archive: {{dir: '{tmp_path}'}}\nlogging: {{format: json}}\n")
    done = subprocess.run([sys.executable, "-c", _IMPORTED_BY, *[a.format(cfg=cfg) for a in argv]],
                          capture_output=True, text=True, cwd=tmp_path, env=cli_env(), check=False, timeout=60)
    modules = set(done.stdout.strip().splitlines()[-1].split()) if done.stdout.strip() else set()
    assert "daemon.cli" in modules, done.stderr
    assert modules & forbidden == set()
