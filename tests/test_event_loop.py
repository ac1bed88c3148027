"""service.event_loop: `run` and `once` on uvloop when it is installed, asyncio's own loop as the
fallback or when told, the choice logged; real `once` processes against the simulator."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.eventloop import pick_loop
from tests.conftest import archive_files, cli_env, run_cli, simulator_subprocess, write_config


@pytest.mark.parametrize(("choice", "installed", "name", "refused"), [
    ("auto", "0.23.0", "uvloop", False),
    ("auto", None, "asyncio", False),        # the fallback: never a reason not to archive
    ("asyncio", "0.23.0", "asyncio", False),
    ("asyncio", None, "asyncio", False),
    ("uvloop", "0.23.0", "uvloop", False),
    ("uvloop", None, "asyncio", True),       # asked for by name and absent: said, exit 2
])
def test_the_loop_is_picked_from_the_config_and_what_is_installed(choice: Any, installed: str | None, name: str,
                                                                  refused: bool) -> None:
    pick = pick_loop(choice, installed)
    assert pick.name == name and (pick.error is not None) == refused and pick.reason
    if installed is None and choice != "asyncio":
        assert "not installed" in pick.reason


def _loop_events(stderr: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == "service.event_loop"]


def _once(work: Path, base_url: str, choice: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    work.mkdir()
    cfg = write_config(work, base_url, extra={"sources": {"ids": [1000, 1001, 1002]},
                                             "service": {"event_loop": choice}})
    result = run_cli("once", "-c", str(cfg), env=env)
    return result.returncode, result.stderr


def test_once_runs_on_uvloop_unless_told_otherwise_and_logs_the_loop_that_runs(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "3") as base_url:
        for choice, loop in (("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")):
            code, stderr = _once(tmp_path / choice, base_url, choice)
            assert code == 0, stderr
            events = _loop_events(stderr)
            assert [e["loop"] for e in events] == [loop], stderr
            assert len(archive_files(tmp_path / choice / "archive")) == 3


def _without_uvloop(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment with a uvloop that cannot be imported ahead of the installed one on the
    path: as on a platform with no wheel for it."""
    blocker = tmp_path / "blocker" / "uvloop"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("no uvloop here (the test\'s blocker)")\n')
    return cli_env(PYTHONPATH=os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")])))


def test_without_uvloop_auto_falls_back_to_asyncio_and_uvloop_by_name_is_exit_2(tmp_path: Path) -> None:
    env = _without_uvloop(tmp_path)
    with simulator_subprocess("--count", "3") as base_url:
        code, stderr = _once(tmp_path / "auto", base_url, "auto", env)
        assert code == 0, stderr
        events = _loop_events(stderr)
        assert [e["loop"] for e in events] == ["asyncio"] and "not installed" in events[0]["reason"]
        assert len(archive_files(tmp_path / "auto" / "archive")) == 3
        code, stderr = _once(tmp_path / "named", base_url, "uvloop", env)
        assert code == 2 and "service.event_loop: uvloop is not installed" in stderr, stderr
        assert archive_files(tmp_path / "named" / "archive") == {}



def test_check_refuses_uvloop_by_name_without_uvloop_as_run_and_once_do(tmp_path: Path) -> None:
    # An operator's pre-flight must not pass a config the daemon then refuses (exit 2, which systemd
    # does not restart).
    env = _without_uvloop(tmp_path)
    with simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]},
                                                      "service": {"event_loop": "uvloop"}})
        once = run_cli("once", "-c", str(cfg), env=env)
        assert once.returncode == 2 and "service.event_loop" in once.stderr, once.stderr
        check = run_cli("check", "-c", str(cfg), env=env)
    assert check.returncode == 2 and "service.event_loop: uvloop is not installed" in check.stderr, check.stderr

@pytest.mark.parametrize("closed", ["0", "0 1", "2"])
def test_once_started_with_stdio_closed_archives_and_exits_0(tmp_path: Path, closed: str) -> None:
    # libuv aborts the process (exit 134) when it closes a descriptor it was given at 0-2, which is
    # what the loop's own descriptors become when the daemon is started with them closed (`0<&-`).
    import subprocess
    import sys

    from tests.conftest import REPO
    with simulator_subprocess("--count", "3") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001, 1002]}})
        log = tmp_path / "stderr.txt"
        redirections = " ".join(f"{fd}<&-" for fd in closed.split())
        # stderr goes to a file unless it is the one closed; the exit code is the test's evidence.
        script = f'exec "$0" -m daemon once -c "$1" {redirections}' + ("" if "2" in closed else ' 2>"$2"')
        result = subprocess.run(["/bin/sh", "-c", script, sys.executable, str(cfg), str(log)], cwd=REPO,
                                env=cli_env(), capture_output="2" not in closed, timeout=60, check=False)
    assert result.returncode == 0, log.read_text() if log.exists() else result
    assert len(archive_files(tmp_path / "archive")) == 3
