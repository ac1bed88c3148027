"""`run` and `once` as real subprocesses: SIGKILL and restart, SIGTERM, concurrent CLI, exit codes."""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.archive import Naming, final_relpath
from daemon.simulator import SimOptions, make_recordings, recording_bytes
from tests.conftest import REPO, archive_files, cli_env, run_cli, sim_counters, simulator_subprocess, write_config

pytestmark = pytest.mark.slow


def _expected(opts: SimOptions) -> dict[str, bytes]:
    now = dt.datetime.now(dt.UTC)
    return {str(final_relpath("{year}/{month}/{day}/{file}", Naming(r.id, r.file, r.call_type), now)):
            recording_bytes(opts.seed, opts.format, r) for r in make_recordings(opts)}


def _start_run(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())


def _status(cfg: Path) -> dict[str, int]:
    result = run_cli("status", "--json", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    counts: dict[str, int] = json.loads(result.stdout)["counts"]
    return counts


def _done_now(cfg: Path) -> int:
    """Done rows, read straight from the ledger (read-only): fast enough to poll while a run works."""
    import sqlite3
    path = cfg.parent / "archive" / ".yeastar-archiver" / "ledger.db"
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM recordings WHERE state = 'done'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _wait_until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the daemon"
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigkill_at_five_random_moments_then_restart_archives_everything_once(tmp_path: Path) -> None:
    opts = SimOptions(count=60, size_min=300_000, size_max=3_000_000, cut_rate=0.02)
    rng = random.Random(7)
    with simulator_subprocess("--count", "60", "--size-min", "300000", "--size-max", "3000000",
                              "--cut-rate", "0.02", "--bytes-per-second", "8000000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [r.id for r in make_recordings(opts)]}})
        kills = 0
        for _ in range(5):
            proc = _start_run(cfg)
            # A random moment while transfers are in flight: mid-body, mid-commit, mid-ledger-write.
            # (A CLI call per poll would take long enough under load for a run to finish everything.)
            _wait_until(lambda: sim_counters(base_url)["in_flight"] > 0 or _done_now(cfg) == 60)
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()
            proc.communicate(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            kills += 1
        assert _status(cfg)["done"] < 60  # the kills really landed while work was left
        proc = _start_run(cfg)
        _wait_until(lambda: _status(cfg)["done"] == 60)
        code, err = _stop(proc)
        assert code == 0, err
        counters = sim_counters(base_url)
    assert archive_files(tmp_path / "archive") == _expected(opts)
    assert not list((tmp_path / "archive").rglob("*.part"))
    assert not [p for p in (tmp_path / "archive").rglob("*~*")]   # no second copy under another name
    redundant = sum(counters["transfers_completed"].values()) - 60
    assert 0 <= redundant <= kills
    assert counters["tokens_live"] == 0 or counters["tokens_live"] <= kills  # killed runs cannot revoke


def test_sigterm_with_downloads_in_flight_exits_0_within_the_grace_time(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "6", "--stall-rate", "1", "--stall-s", "60") as base_url:
        # recording_format wav: in auto mode only the first bytes (stalled here) open the one-request gate.
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": list(range(1000, 1006))},
                                                      "pbx": {"recording_format": "wav"},
                                                      "service": {"shutdown_grace_s": 1}})
        proc = _start_run(cfg)
        _wait_until(lambda: sim_counters(base_url)["in_flight"] >= 2, timeout=30)
        started = time.monotonic()
        code, err = _stop(proc)
        elapsed = time.monotonic() - started
        counters = sim_counters(base_url)
    assert code == 0, err
    assert elapsed < 1 + 5
    assert "shutdown.abandoned" in err
    assert archive_files(tmp_path / "archive") == {}   # nothing half-written under a final name
    counts = _status(cfg)
    assert counts["in_progress"] == 0 and counts["pending"] == 6 and counts["failed"] == 0
    assert counters["tokens_live"] == 0                # the token was revoked on the way out


def test_status_and_enqueue_work_while_run_is_running(tmp_path: Path) -> None:
    opts = SimOptions(count=10)
    with simulator_subprocess("--count", "10") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001]}})
        proc = _start_run(cfg)
        _wait_until(lambda: _status(cfg)["done"] == 2)
        added = run_cli("enqueue", "-c", str(cfg), *[str(i) for i in range(1002, 1010)])
        assert added.returncode == 0 and "8 added" in added.stdout
        # By id, and by the file name of one already archived: both known.
        again = run_cli("enqueue", "-c", str(cfg), "1002", make_recordings(opts)[0].file)
        assert "0 added, 2 already known" in again.stdout
        _wait_until(lambda: _status(cfg)["done"] == 10)
        human = run_cli("status", "-c", str(cfg))
        assert "done: 10" in human.stdout
        code, err = _stop(proc)
    assert code == 0, err
    assert archive_files(tmp_path / "archive") == _expected(opts)


def test_enqueue_rejects_bad_refs_with_exit_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli("enqueue", "-c", str(cfg), "1727", "notes.txt")
    assert result.returncode == 2
    assert "notes.txt" in result.stderr


def test_once_exit_codes(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "3", "--json-body-rate", "1") as base_url:
        ok_dir, bad_dir, refused_dir = (tmp_path / n for n in ("ok", "bad", "refused"))
        for d in (ok_dir, bad_dir, refused_dir):
            d.mkdir()
        # Every file answer is an errcode envelope: with one attempt, the recording ends failed -> 1.
        bad = write_config(bad_dir, base_url, extra={"sources": {"ids": [1000]}, "downloads": {"max_attempts": 1}})
        result = run_cli("once", "-c", str(bad))
        assert result.returncode == 1, result.stderr
        assert "download.failed" in result.stderr
        retried = run_cli("retry", "-c", str(bad))
        assert "1 recording(s) back to pending" in retried.stdout
        assert _status(bad)["pending"] == 1
        # A recording the PBX does not have ends missing -> 0.
        ok = write_config(ok_dir, base_url, extra={"sources": {"ids": [424242]}})
        assert run_cli("once", "-c", str(ok)).returncode == 0
        assert _status(ok)["missing"] == 1
        # Wrong secret -> 3, with exactly one login attempt.
        before = sim_counters(base_url)["failed_logins"]
        refused = write_config(refused_dir, base_url, secret="not-the-secret",
                               extra={"sources": {"ids": [1000, 1001, 1002]}})
        result = run_cli("once", "-c", str(refused))
        assert result.returncode == 3, result.stderr
        assert sim_counters(base_url)["failed_logins"] == before + 1
        assert "not-the-secret" not in result.stderr
        assert _status(refused)["pending"] == 3


def test_once_gives_up_on_a_long_outage_with_exit_5_and_nothing_failed(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path, f"http://127.0.0.1:{port}", extra={
        "sources": {"ids": [1000, 1001]}, "downloads": {"once_give_up_s": 1, "pause_max_s": 0.3}})
    result = run_cli("once", "-c", str(cfg), timeout=60)
    assert result.returncode == 5
    assert "gave up" in result.stderr and "2 recording(s) left" in result.stderr
    counts = _status(cfg)
    assert counts["pending"] == 2 and counts["failed"] == 0
