"""The command line's help and global options: what `COMMAND --help` promises, -c where it is read, -v/-q."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from daemon.cli import NO_CONFIG, build_parser, own_command
from daemon.logs import shifted_level
from tests.conftest import run_cli, simulator_subprocess, write_config


def _subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_help_has_a_description_its_exit_codes_and_an_example(name: str) -> None:
    """Real `yeastar-archiver COMMAND --help`: a description line, the exit codes, an example of this command."""
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    usage, _, rest = text.partition("\n\n")
    assert usage.startswith(f"usage: yeastar-archiver {name}")
    description = rest.splitlines()[0]
    assert description and not description.startswith(("positional", "options")), text
    assert "\nexit codes: 0 " in text
    assert f"\nexample: yeastar-archiver {name}" in text


def test_simulate_help_shows_each_default() -> None:
    text = run_cli("simulate", "--help").stdout
    for shown in ("(default: 8088)", "(default: 127.0.0.1)", "(default: wav)", "(default: 404)"):
        assert shown in " ".join(text.split()), shown


@pytest.mark.parametrize("name", NO_CONFIG)
@pytest.mark.parametrize("where", ["before", "after"])
def test_commands_that_read_no_config_refuse_a_c(name: str, where: str, tmp_path: Path) -> None:
    args = ["-c", str(tmp_path / "x.yaml")]
    result = run_cli(*([*args, name] if where == "before" else [name, *args]), timeout=30)
    assert result.returncode == 2
    assert ("reads no config" if where == "before" else "unrecognized arguments: -c") in result.stderr
    assert not (tmp_path / "yeastar-archiver-demo").exists()


@pytest.mark.parametrize(("level", "shift", "shown"), [
    ("info", 0, "info"),
    ("info", 1, "debug"),
    ("info", 5, "debug"),          # never past the most verbose
    ("info", -1, "warning"),
    ("warning", -2, "critical"),
    ("error", -9, "critical"),
    ("warning", 1, "info"),        # relative to logging.level
    ("DEBUG", 0, "debug"),
])
def test_shifted_level_table(level: str, shift: int, shown: str) -> None:
    assert shifted_level(level, shift) == shown


def _events(stderr: str) -> set[str]:
    return {json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")}


def test_v_and_q_raise_and_lower_the_configured_level_before_or_after_the_command(tmp_path: Path) -> None:
    """logging.level: warning hides info events; -v (either side of the command) shows them, -q hides
    warnings too (a recording that ends missing logs one)."""
    with simulator_subprocess("--count", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 99999]},
                                                      "logging": {"format": "json", "level": "warning"}})
        plain = run_cli("once", "-c", str(cfg))
        assert "download.missing" in _events(plain.stderr) and "run.summary" not in _events(plain.stderr)
        for args in (("-v", "once"), ("once", "-v")):
            louder = run_cli("retry", "--missing", "-c", str(cfg))
            assert louder.returncode == 0
            louder = run_cli(*args, "-c", str(cfg))
            assert "run.summary" in _events(louder.stderr), args
        assert run_cli("retry", "--missing", "-c", str(cfg)).returncode == 0
        quiet = run_cli("-q", "once", "-c", str(cfg), "-q")   # counted on both sides: warning -> critical
    assert quiet.returncode == 0
    assert _events(quiet.stderr) == set()
    assert "once: " in quiet.stderr    # the operator's own lines are not log events: -q keeps them


def test_own_command_is_the_script_beside_the_interpreter_else_python_m_daemon(tmp_path: Path) -> None:
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("")
    assert own_command(str(python)) == f"{python} -m daemon"
    script = python.parent / "yeastar-archiver"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert own_command(str(python)) == str(script)


def test_the_v_q_shift_survives_the_level_a_reload_sets() -> None:
    """SIGHUP re-reads logging.level (runner calls set_level): -v given at start still counts."""
    import io

    import structlog

    from daemon.logs import configure_logging, set_level, set_level_shift
    out = io.StringIO()
    set_level_shift(1)
    configure_logging("json", "warning", stream=out)
    structlog.get_logger("t").info("seen_before_reload")
    set_level("warning")
    structlog.get_logger("t").info("seen_after_reload")
    structlog.get_logger("t").debug("not_seen")
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["seen_before_reload", "seen_after_reload"]
