"""`simulate` and `check` as real subprocesses: exit codes 0, 3 and 4 as the contract says."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, simulator_subprocess


@pytest.fixture
def simulator_process() -> Iterator[str]:
    """`yeastar-archiver simulate --port 0 --count 7` as a subprocess; yields its base URL."""
    with simulator_subprocess("--count", "7") as base_url:
        yield base_url


def _config(tmp_path: Path, base_url: str, secret: str = "sim-secret-please-change") -> Path:
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    cfg = tmp_path / "config.yaml"
    (tmp_path / "archive").mkdir(exist_ok=True)   # check checks that it exists: run never creates it
    cfg.write_text(f"pbx:\n  base_url: {base_url}\n  client_id: archiver\n  client_secret_file: secret\n"
                   "sources:\n  ids: [1000]\narchive:\n  dir: archive\n  min_free_bytes: 0\n"
                   "logging:\n  format: json\n")
    return cfg


def test_check_against_the_simulator_exits_0(simulator_process: str, tmp_path: Path) -> None:
    result = run_cli("check", "-c", str(_config(tmp_path, simulator_process)))
    assert result.returncode == 0, result.stderr
    assert "check: OK" in result.stdout and "7 recordings" in result.stdout and "token revoked" in result.stdout


def test_check_with_a_wrong_secret_exits_3_without_the_secret_in_output(simulator_process: str,
                                                                         tmp_path: Path) -> None:
    result = run_cli("-c", str(_config(tmp_path, simulator_process, secret="wrong-secret-xyz")), "check")
    assert result.returncode == 3
    assert "rejected the client id or secret" in result.stderr
    assert "wrong-secret-xyz" not in result.stderr + result.stdout


def test_check_against_nothing_exits_4(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("check", "-c", str(_config(tmp_path, f"http://127.0.0.1:{port}")))
    assert result.returncode == 4
    assert "cannot connect" in result.stderr


def test_unknown_subcommand_is_exit_2() -> None:
    assert run_cli("frobnicate").returncode == 2
