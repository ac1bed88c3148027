"""ADV4-3: the archive folders kept open between files must not hold the archive's disk busy once the
archiver is idle or paused, or a plain ``umount`` of an idle archive fails with "target is busy"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, cli_env, run_cli, simulator_subprocess, write_config
from tests.test_daemon import _stop, _wait_until


def _open_under(pid: int, root: Path) -> list[str]:
    """What the process holds open at or below ``root`` (its descriptors, as the kernel names them)."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue   # closed meanwhile
        if target == str(root) or target.startswith(str(root) + os.sep):
            held.append(target)
    return held


def test_an_idle_run_holds_nothing_open_in_the_archive(tmp_path: Path) -> None:
    archive = (tmp_path / "archive").resolve()
    with simulator_subprocess("--count", "12") as base_url:
        # The ledger outside the archive, as the README advises: then nothing of ours need stay open there.
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": list(range(1000, 1012))},
                                                      "state": {"path": str(tmp_path / "state" / "ledger.db")}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
        try:
            _wait_until(lambda: len(list(archive.rglob("*.wav"))) == 12 and not list(archive.rglob("*.part*")))
            # Idle now: within a worker's idle turn or two, every folder kept open is let go.
            _wait_until(lambda: _open_under(proc.pid, archive) == [], timeout=30)
        finally:
            code, err = _stop(proc)
    assert code == 0, err


def test_a_paused_run_holds_nothing_open_in_the_archive(tmp_path: Path) -> None:
    archive = (tmp_path / "archive").resolve()
    log = tmp_path / "run.log"
    with simulator_subprocess("--count", "4") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001, 1002]},
                                                      "state": {"path": str(tmp_path / "state" / "ledger.db")},
                                                      "downloads": {"pause_max_s": 0.5}})
        with log.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)],
                                    stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, env=cli_env())
        _wait_until(lambda: len(list(archive.rglob("*.wav"))) == 3)
    try:
        # The PBX is gone and there is work: the run pauses and retries, and holds no archive folder.
        assert run_cli("enqueue", "-c", str(cfg), "1003").returncode == 0
        _wait_until(lambda: "pipeline.paused" in log.read_text(), timeout=30)
        _wait_until(lambda: _open_under(proc.pid, archive) == [], timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
