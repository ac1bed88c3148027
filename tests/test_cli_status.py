"""``status`` at a glance: is the daemon running and ready (and if not, why), rates, last success,
oldest pending, failures by reason; against real ``run`` processes, a real simulator and real locks."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import daemon_status
from daemon.ledger import flock_held, run_lock_held
from tests.conftest import REPO, cli_env, run_cli, simulator_subprocess, write_config
from tests.test_cli_operator import _free_port
from tests.test_daemon import _stop, _wait_until

DEV = os.makedev(0xFD, 0x01)
LOCKS = ("1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n"
         "2: POSIX  ADVISORY  WRITE 4243 fd:01:999 0 EOF\n"
         "2: -> FLOCK  ADVISORY  WRITE 4244 fd:01:777 0 EOF\n")


@pytest.mark.parametrize(("dev", "ino", "held"), [
    (DEV, 1234, True),                       # a granted flock on that inode
    (DEV, 999, False),                       # a POSIX lock is not the run lock (it is an flock)
    (DEV, 777, False),                       # a waiter holds nothing
    (os.makedev(0xFD, 0x02), 1234, False),   # same inode number, another device
    (DEV, 12345, False),                     # a longer inode number sharing the prefix
])
def test_flock_held_reads_proc_locks(dev: int, ino: int, held: bool) -> None:
    assert flock_held(LOCKS, dev, ino) is held


def _ready(ready: bool, **checks: Any) -> tuple[int, bytes]:
    return (200 if ready else 503), json.dumps({"ready": ready, "checks": checks}).encode()


@pytest.mark.parametrize(("running", "listen", "answer", "error", "want"), [
    (None, None, None, None, {"state": "unknown", "why": "cannot tell whether a run holds the ledger's lock (a run "
                                                         "in another container or PID namespace is invisible here)"}),
    (None, "127.0.0.1:1", None, "connection refused",
     {"state": "unknown", "why": "cannot tell whether a run holds the ledger's lock (a run in another container or "
                                 "PID namespace is invisible here); its health port does not answer (connection "
                                 "refused)"}),
    # Cannot tell from the lock, but its health port answers: that is a running daemon (review V3).
    (None, "127.0.0.1:1", _ready(True, pbx={"ok": True}), None, {"state": "running", "ready": True}),
    (False, "127.0.0.1:1", None, None, {"state": "not running"}),
    (True, None, None, None, {"state": "running", "why": "service.listen is null: no readiness to ask"}),
    (True, "127.0.0.1:1", None, "connection refused",
     {"state": "running", "why": "its health port does not answer (connection refused)"}),
    (True, "127.0.0.1:1", (200, b"<html>"), None,
     {"state": "running", "why": "/readyz answered HTTP 200 without its JSON"}),
    (True, "127.0.0.1:1", _ready(True, pbx={"ok": True}), None, {"state": "running", "ready": True}),
    (True, "127.0.0.1:1", _ready(False, pbx={"ok": False, "reason": "credentials refused"}, archive={"ok": True}),
     None, {"state": "running", "ready": False, "why": "pbx: credentials refused"}),
    (True, "127.0.0.1:1", _ready(False, pipeline={"ok": False, "reason": "starting"}), None,
     {"state": "running", "ready": False, "why": "pipeline: starting"}),
])
def test_daemon_status_table(running: bool | None, listen: str | None, answer: tuple[int, bytes] | None,
                             error: str | None, want: dict[str, Any]) -> None:
    assert daemon_status(running, listen, answer, error) == want


def test_the_run_lock_probe_sees_a_real_flock_and_never_takes_it(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    assert run_lock_held(ledger) is False           # no lock file: nothing ever ran
    lock = tmp_path / "ledger.db.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert run_lock_held(ledger) is False       # a lock file left by a run that ended
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_lock_held(ledger) is True
        # Probing took nothing: the holder can still drop and retake it, and another taker is refused.
        other = os.open(lock, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.close(other)
    finally:
        os.close(fd)
    assert run_lock_held(ledger) is False


def _status_json(cfg: Path) -> dict[str, Any]:
    result = run_cli("status", "--json", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_status_tells_a_running_ready_daemon_then_not_ready_and_why_then_stopped(tmp_path: Path) -> None:
    port = _free_port()
    # 1000-1002 exist; 4242 does not (missing, a reason status groups); 1003 comes later.
    with simulator_subprocess("--count", "4") as base_url:
        cfg = write_config(tmp_path, base_url, extra={
            "sources": {"ids": [1000, 1001, 1002, 4242]}, "service": {"listen": f"127.0.0.1:{port}"},
            "downloads": {"pause_max_s": 0.3, "backoff_max_s": 0.2}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
        try:
            _wait_until(lambda: [_status_json(cfg)["counts"][s] for s in ("done", "missing")] == [3, 1])
            _wait_until(lambda: _status_json(cfg)["daemon"] == {"state": "running", "ready": True})
            data = _status_json(cfg)
            assert data["archived_last_hour"] == 3 and data["archived_last_day"] == 3
            assert data["last_success_at"] is not None and data["oldest_pending"] is None
            assert [(f["state"], f["count"]) for f in data["failures_by_reason"]] == [("missing", 1)]
            human = run_cli("status", "-c", str(cfg)).stdout
            assert human.splitlines()[0] == "daemon: running, ready"
            assert "archived in the last hour: 3, last day: 3; last success: 20" in human
            assert "oldest pending: none" in human
            assert "failures by reason:" in human and "missing" in human
        except BaseException:
            proc.kill()
            raise
    # The PBX is gone; a new recording makes the run ask for it and find nobody there.
    try:
        assert run_cli("enqueue", "-c", str(cfg), "1003").returncode == 0
        _wait_until(lambda: _status_json(cfg)["daemon"].get("ready") is False)
        data = _status_json(cfg)
        assert data["daemon"]["state"] == "running" and data["daemon"]["why"].startswith("pbx: ")
        assert data["oldest_pending"]["recording"] == "1003"
        human = run_cli("status", "-c", str(cfg)).stdout
        assert human.splitlines()[0].startswith("daemon: running, NOT ready (pbx: ")
        assert "oldest pending: 1003, enqueued 20" in human
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    assert _status_json(cfg)["daemon"] == {"state": "not running"}
    assert run_cli("status", "-c", str(cfg)).stdout.splitlines()[0] == "daemon: not running"
