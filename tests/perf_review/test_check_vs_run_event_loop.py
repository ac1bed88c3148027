"""Item 3, contract: `check` is "validate the config, then log in ... exit 0 ok, 2 config invalid". With
service.event_loop: uvloop and no importable uvloop, `run` and `once` refuse the config (exit 2,
"service.event_loop: uvloop is not installed"), but `check` passes it (exit 0): the operator's
pre-flight says OK for a config the daemon then refuses (and systemd does not restart exit 2)."""
from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import cli_env, run_cli, simulator_subprocess, write_config


def test_check_refuses_what_run_refuses(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "uvloop"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("no uvloop here")\n')
    env = cli_env(PYTHONPATH=os.pathsep.join(filter(None, [str(blocker.parent), os.environ.get("PYTHONPATH")])))
    with simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]},
                                                      "service": {"event_loop": "uvloop"}})
        once = run_cli("once", "-c", str(cfg), env=env)
        assert once.returncode == 2 and "service.event_loop" in once.stderr, once.stderr
        check = run_cli("check", "-c", str(cfg), env=env)
    assert check.returncode == once.returncode, (check.returncode, check.stdout, check.stderr)
