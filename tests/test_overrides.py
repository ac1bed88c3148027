"""Environment overrides (YEASTAR_ARCHIVER_<SECTION>__<KEY>), `check`'s effective config, $STATE_DIRECTORY."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.config import default_state_path
from tests.conftest import cli_env, run_cli, simulator_subprocess, write_config


@pytest.mark.parametrize(("state_directory", "expected"), [
    (None, "/srv/rec/.yeastar-archiver/ledger.db"),
    ("", "/srv/rec/.yeastar-archiver/ledger.db"),
    ("/var/lib/yeastar-archiver", "/var/lib/yeastar-archiver/ledger.db"),
    ("/var/lib/a:/var/lib/b", "/var/lib/a/ledger.db"),          # StateDirectory= with several: the first
    ("relative/dir", "/srv/rec/.yeastar-archiver/ledger.db"),   # not systemd's: it always sets absolute paths
])
def test_default_state_path_table(state_directory: str | None, expected: str) -> None:
    assert default_state_path(Path("/srv/rec"), state_directory) == Path(expected)



def test_once_under_systemd_keeps_the_ledger_in_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with simulator_subprocess("--count", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}})
        env = cli_env(STATE_DIRECTORY=f"{state}:{tmp_path / 'second'}")
        result = run_cli("once", "-c", str(cfg), env=env)
        assert result.returncode == 0, result.stderr
        status = run_cli("status", "--json", "-c", str(cfg), env=env)
    assert (state / "ledger.db").is_file()
    assert not (tmp_path / "archive" / ".yeastar-archiver" / "ledger.db").exists()
    assert json.loads(status.stdout)["counts"]["done"] == 1
