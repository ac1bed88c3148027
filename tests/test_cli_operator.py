"""Clear answers for an operator: real processes, real files, a real unprivileged uid, real pipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.ledger import LedgerDb, Ref
from daemon.preflight import configured_sources, free_space_problem
from tests.conftest import REPO, cli_env, run_cli, simulator_subprocess, write_config

NOBODY = 65534


def _as_nobody(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m daemon ARGS`` as uid/gid 65534 with no supplementary groups: permissions apply, as
    they do to a service user (root passes every permission check and would hide the problem)."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=cli_env(), check=False)


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A folder uid 65534 can reach (pytest's tmp_path lies below a 0700 folder of root's)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as an unprivileged uid")
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", "import daemon.cli, daemon.ledger"],
                           capture_output=True, cwd=REPO, env=cli_env(), check=False, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run this interpreter or checkout: {probe.stderr[-200:]!r}")
    path = Path(tempfile.mkdtemp(prefix="yeastar-archiver-nobody-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(path)


def _chown_tree(root: Path, uid: int = NOBODY) -> None:
    for p in [root, *root.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def _nobody_config(root: Path, *, with_ledger: bool) -> tuple[Path, Path]:
    """A config owned by uid 65534 whose state folder (``root/state``) that user cannot write; with a
    ledger holding two recordings when ``with_ledger``. Returns (config, state folder)."""
    cfg = write_config(root, "http://127.0.0.1:9", extra={"state": {"path": "state/ledger.db"}})
    state = root / "state"
    state.mkdir(mode=0o700)
    if with_ledger:
        db = LedgerDb(state / "ledger.db")
        db.enqueue([Ref(rec_id=1000), Ref(rec_id=1001)], source="test", now=1.0)
        db.close()
    _chown_tree(root)
    state.chmod(0o500)
    return cfg, state


# ---------------------------------------------------------------- a state folder this user cannot write
def test_a_state_folder_the_user_cannot_write_is_exit_2_naming_state_path_for_every_writer(
        nobody_dir: Path) -> None:
    """once, run, enqueue, retry and verify on a state folder the service user cannot write: one line
    naming ``state.path`` and the folder, exit 2 (a set-up mistake), no traceback, nothing created.
    Before: ``OSError ... ledger.db.lock`` / ``sqlite3.OperationalError: unable to open database file``."""
    cfg, state = _nobody_config(nobody_dir, with_ledger=True)
    before = sorted(p.name for p in state.iterdir())
    for args in (("once",), ("run",), ("enqueue", "1002"), ("retry",), ("verify",)):
        result = _as_nobody(*args, "-c", str(cfg))
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, args
        assert "state.path" in result.stderr and str(state) in result.stderr, (args, result.stderr)
        assert "uid 65534" in result.stderr, result.stderr
    assert sorted(p.name for p in state.iterdir()) == before


def test_status_reads_a_ledger_in_a_state_folder_it_cannot_write(nobody_dir: Path) -> None:
    """status opens the ledger read-only (``immutable`` where ``mode=ro`` would need to create the
    ``-shm`` file): it shows the counts and leaves no file behind."""
    cfg, state = _nobody_config(nobody_dir, with_ledger=True)
    before = sorted(p.name for p in state.iterdir())
    result = _as_nobody("status", "--json", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"]["pending"] == 2 and data["ledger_exists"] is True
    assert _as_nobody("status", "-c", str(cfg)).returncode == 0
    assert sorted(p.name for p in state.iterdir()) == before


def test_status_on_an_empty_read_only_state_folder_and_once_on_it(nobody_dir: Path) -> None:
    """No ledger yet: status says so (exit 0); once cannot make one there (exit 2), and says why."""
    cfg, state = _nobody_config(nobody_dir, with_ledger=False)
    status = _as_nobody("status", "--json", "-c", str(cfg))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["ledger_exists"] is False
    once = _as_nobody("once", "-c", str(cfg))
    assert once.returncode == 2 and "state.path" in once.stderr and "Traceback" not in once.stderr
    assert list(state.iterdir()) == []


def test_status_on_a_ledger_this_user_cannot_read_is_exit_2(nobody_dir: Path) -> None:
    """A ledger owned by another user (0600): status names ``state.path`` and the file, no traceback."""
    cfg, state = _nobody_config(nobody_dir, with_ledger=True)
    state.chmod(0o755)
    os.chown(state / "ledger.db", 0, 0)
    result = _as_nobody("status", "-c", str(cfg))
    assert result.returncode == 2, result.stderr
    assert "state.path" in result.stderr and "cannot read" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- a reader that goes away
def _closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone: every write to it is EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def test_status_into_a_closed_pipe_stops_quietly_like_a_unix_tool(tmp_path: Path) -> None:
    """``status | head -2``: no BrokenPipeError traceback; 141, what a shell reports for a tool that
    SIGPIPE ended. Before: a traceback on stderr and exit 1 (or 120 from the interpreter's flush)."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    db = LedgerDb(tmp_path / "archive" / ".yeastar-archiver" / "ledger.db")
    db.enqueue([Ref(rec_id=i) for i in range(1000, 1050)], source="test", now=1.0)
    db.close()
    for args in (("status",), ("status", "--json"), ("enqueue", "1050")):
        stdout = _closed_pipe()
        try:
            result = subprocess.run([sys.executable, "-m", "daemon", *args, "-c", str(cfg)], stdout=stdout,
                                    stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env(), timeout=60,
                                    check=False)
        finally:
            os.close(stdout)
        assert result.returncode == 141, (args, result.stderr)
        assert result.stderr == "", (args, result.stderr)
    assert json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]["pending"] == 51


def test_once_whose_log_reader_goes_away_keeps_archiving_and_exits_0(tmp_path: Path) -> None:
    """``once 2>&1 | head -1``: the reader takes one line and leaves; once drops its log from then on
    and archives everything. Before: BrokenPipeError tracebacks, and the archiving stopped."""
    count = 12
    with simulator_subprocess("--count", str(count), "--bytes-per-second", "400000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": list(range(1000, 1000 + count))},
                                                      "downloads": {"workers": 2}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=REPO, env=cli_env())
        assert proc.stdout is not None
        assert proc.stdout.readline()   # `head -1`
        proc.stdout.close()
        at_close = _done(cfg)
        assert proc.wait(timeout=90) == 0
    assert at_close < count                      # the pipe closed with work left: logging went on into it
    assert _done(cfg) == count


def test_once_with_a_closed_stdout_and_stderr_from_the_start_archives_and_keeps_its_exit_code(
        tmp_path: Path) -> None:
    """Every log line, the summary and the final stderr line go to a pipe nobody reads: none of them
    changes what once does or its exit code (1: a recording failed)."""
    with simulator_subprocess("--count", "3", "--fail-ids", "1002") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001, 1002]},
                                                      "downloads": {"max_attempts": 2}})
        out = _closed_pipe()
        try:
            code = subprocess.run([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], stdout=out, stderr=out,
                                  cwd=REPO, env=cli_env(), timeout=90, check=False).returncode
        finally:
            os.close(out)
    assert code == 1
    counts = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]
    assert counts["done"] == 2 and counts["failed"] == 1


def _done(cfg: Path) -> int:
    from tests.test_daemon import _done_now
    return _done_now(cfg)


# ---------------------------------------------------------------- a second run on the same config
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_second_run_on_the_same_config_is_told_about_the_ledger_not_the_port(tmp_path: Path) -> None:
    """Two real ``run`` processes, one config: the second takes the ledger lock before it listens, so
    it says "another run/once is already using the ledger" (naming state.path) rather than
    "service.listen: address already in use" (exit 2); the first keeps running and serving."""
    port = _free_port()
    with simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001]},
                                                      "service": {"listen": f"127.0.0.1:{port}"}})
        first = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
        try:
            deadline = time.monotonic() + 30
            while True:   # the first run holds the lock and the port once /livez answers
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert first.poll() is None and time.monotonic() < deadline, "the first run did not come up"
                time.sleep(0.05)
            second = run_cli("run", "-c", str(cfg), timeout=30)
            assert second.returncode == 1, second.stderr
            assert "another run/once is already using the ledger" in second.stderr and "state.path" in second.stderr
            assert "address already in use" not in second.stderr and "service.listen" not in second.stderr
            assert "Traceback" not in second.stderr
            assert first.poll() is None
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as r:
                assert r.status == 200
        finally:
            first.terminate()
            _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err


# ---------------------------------------------------------------- a config that names no source
ESSENTIALS_ONLY = "no source is configured"


def test_once_with_no_source_and_nothing_queued_is_exit_2_naming_the_keys(tmp_path: Path) -> None:
    """The example's essentials only (no ids, no queue file, discovery off): once says so, exit 2,
    instead of archiving nothing and exiting 0 with "total 0"."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli("once", "-c", str(cfg))
    assert result.returncode == 2, result.stderr
    assert ESSENTIALS_ONLY in result.stderr and "Traceback" not in result.stderr
    for key in ("sources.ids", "sources.queue_file", "sources.discover"):
        assert key in result.stderr


def test_once_with_no_source_archives_what_enqueue_queued(tmp_path: Path) -> None:
    """``enqueue`` then ``once`` stays a way to work: the ledger is the source; a warning says that
    the config names none."""
    with simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url)
        assert run_cli("enqueue", "1001", "-c", str(cfg)).returncode == 0
        result = run_cli("once", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "sources.none_configured" in result.stderr
    assert json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]["done"] == 1


def test_check_with_no_source_fails_the_sources_line_and_still_checks_the_pbx(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "2") as base_url:
        result = run_cli("check", "-c", str(write_config(tmp_path, base_url)))
    assert result.returncode == 2, result.stderr
    assert f"check: FAILED: sources: {ESSENTIALS_ONLY}" in result.stderr
    assert "sources.ids" in result.stderr and "sources.queue_file" in result.stderr
    assert "check: OK: logged in to" in result.stdout   # the other checks still ran


def test_configured_sources_names_each_source_the_config_has() -> None:
    from daemon.config import DiscoverConfig, SourcesConfig
    assert configured_sources(SourcesConfig()) == []
    assert configured_sources(SourcesConfig(ids=(1, 2))) == ["2 id(s) in sources.ids"]
    assert configured_sources(SourcesConfig(queue_file=Path("q"))) == ["sources.queue_file"]
    assert configured_sources(SourcesConfig(discover=DiscoverConfig(enabled=True, events=True))) == \
        ["discovery with events"]


# ---------------------------------------------------------------- check checks what run needs
@pytest.mark.parametrize(("free", "floor", "fails"), [
    (10, 0, False), (10, 10, False), (9, 10, True), (0, 1, True), (300 << 20, 256 << 20, False),
])
def test_free_space_problem_table(free: int, floor: int, fails: bool) -> None:
    problem = free_space_problem(free, floor)
    assert (problem is not None) == fails
    if problem:
        assert "archive.min_free_bytes" in problem


def _check_config(root: Path, base_url: str, **archive: object) -> Path:
    """A config for check with every local item in place and owned by uid 65534."""
    (root / "queue.txt").write_text("1000\n")
    cfg = write_config(root, base_url, extra={"sources": {"queue_file": "queue.txt"},
                                              "state": {"path": "state/ledger.db"}, "archive": dict(archive)})
    (root / "state").mkdir()
    _chown_tree(root)
    return cfg


def test_check_as_the_service_user_reports_each_thing_run_needs(nobody_dir: Path) -> None:
    """Run as uid 65534: every local line OK (exit 0); then the archive folder, the state folder and
    the queue file taken away from that user one at a time: each its own FAILED line, exit 2."""
    with simulator_subprocess("--count", "2") as base_url:
        cfg = _check_config(nobody_dir, base_url)
        ok = _as_nobody("check", "-c", str(cfg))
        assert ok.returncode == 0, ok.stderr
        for wanted in ("check: OK: sources: sources.queue_file", "check: OK: archive.dir",
                       "writable (uid 65534)", "free (archive.min_free_bytes", "check: OK: state.path",
                       "check: OK: sources.queue_file", "check: OK: logged in to"):
            assert wanted in ok.stdout, (wanted, ok.stdout)
        assert "FAILED" not in ok.stderr and "checked as root" not in ok.stdout

        as_root = run_cli("check", "-c", str(cfg))
        assert as_root.returncode == 0 and "check: note: checked as root" in as_root.stdout

        for path, key, mode in ((nobody_dir / "archive", "archive.dir", 0o555),
                                (nobody_dir / "state", "state.path", 0o555),
                                (nobody_dir / "queue.txt", "sources.queue_file", 0o000)):
            before = path.stat().st_mode & 0o7777
            path.chmod(mode)
            try:
                failed = _as_nobody("check", "-c", str(cfg))
            finally:
                path.chmod(before)
            assert failed.returncode == 2, (key, failed.stderr)
            lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("check: FAILED: ")]
            assert len(lines) == 1 and key in lines[0] and "uid 65534" in lines[0], (key, failed.stderr)
            assert "check: OK: logged in to" in failed.stdout and "Traceback" not in failed.stderr


def test_check_fails_on_a_missing_archive_a_missing_queue_file_and_too_little_free_space(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"queue_file": "absent.txt"},
                                                      "archive": {"min_free_bytes": 1 << 60}})
        low = run_cli("check", "-c", str(cfg))
        shutil.rmtree(tmp_path / "archive")
        gone = run_cli("check", "-c", str(cfg))
    assert low.returncode == 2, low.stderr
    assert "check: FAILED: archive.dir" in low.stderr and "below archive.min_free_bytes" in low.stderr
    assert "check: FAILED: sources.queue_file" in low.stderr and "does not exist" in low.stderr
    assert gone.returncode == 2
    assert "archive.dir" in gone.stderr and "does not exist" in gone.stderr and "Traceback" not in gone.stderr
    assert not (tmp_path / "archive").exists()   # check never creates it either


# ---------------------------------------------------------------- mistyped ids: once names them, retry says why
@pytest.mark.parametrize(("states", "failed_copies", "missing", "why"), [
    ([], False, False, "unknown to the ledger"),
    ([], False, True, "unknown to the ledger"),
    (["failed"], False, False, None),
    (["done"], True, False, None),                    # a failed off-box copy is retried
    (["done"], False, False, "already archived"),
    (["copying"], False, False, "already archived"),
    (["missing"], False, False, "retry --missing"),
    (["missing"], False, True, None),
    (["forgotten"], False, True, "forgotten"),
    (["pending"], False, False, "already queued"),
    (["in_progress"], False, True, "already queued"),
    (["done", "failed"], False, False, None),         # its id row and its name row: one failed is enough
])
def test_retry_verdict_table(states: list[str], failed_copies: bool, missing: bool, why: str | None) -> None:
    from daemon.cli import retry_verdict
    verdict = retry_verdict(states, failed_copies=failed_copies, missing=missing)
    assert (verdict is None) if why is None else (verdict is not None and why in verdict)


@pytest.mark.parametrize(("named", "count", "tail"), [
    (["99999"], 1, "99999; retry --missing"),
    (["1", "2"], 2, "1, 2; retry"),
    (["1", "2"], 12, "1, 2 +10 more; retry"),
])
def test_missing_line_names_the_first_then_counts_the_rest(named: list[str], count: int, tail: str) -> None:
    from daemon.cli import missing_line
    line = missing_line(named, count)
    assert line.startswith(f"once: {count} recording(s) ended missing") and tail in line


def test_mistyped_ids_are_named_by_once_and_retry_says_why_for_each_ref(tmp_path: Path) -> None:
    """A mistyped id ends missing: once still exits 0 (nothing failed) but names it on stderr and in
    run.summary; retry names every ref it cannot act on, with why, and exits 1; retry --missing puts
    missing ones back to pending and the next once asks the PBX again."""
    with simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 99999, 99998]}})
        once = run_cli("once", "-c", str(cfg))
        assert once.returncode == 0, once.stderr
        assert "once: 2 recording(s) ended missing" in once.stderr and "99999, 99998" in once.stderr
        events = [json.loads(line) for line in once.stderr.splitlines() if line.startswith("{")]
        assert sorted(e["recording"] for e in events if e["event"] == "download.missing") == ["99998", "99999"]
        summary = next(e for e in events if e["event"] == "run.summary")
        assert sorted(summary["missing_recordings"]) == ["99998", "99999"]

        retry = run_cli("retry", "99999", "1000", "4242", "-c", str(cfg))
        assert retry.returncode == 1, retry.stderr
        assert "retry: 99999: missing" in retry.stderr and "retry --missing" in retry.stderr
        assert "retry: 1000: already archived" in retry.stderr
        assert "retry: 4242: unknown to the ledger" in retry.stderr
        assert "retry: 0 recording(s) back to pending, 3 not" in retry.stdout

        one = run_cli("retry", "--missing", "99999", "-c", str(cfg))
        assert one.returncode == 0, one.stderr
        assert "retry: 1 recording(s) back to pending" in one.stdout
        counts = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]
        assert counts["pending"] == 1 and counts["missing"] == 1
        every = run_cli("retry", "--missing", "-c", str(cfg))
        assert every.returncode == 0 and "retry: 1 recording(s) back to pending" in every.stdout
        again = run_cli("once", "-c", str(cfg))
    assert again.returncode == 0, again.stderr
    assert "once: 2 recording(s) ended missing" in again.stderr   # asked again, still not on the PBX


@pytest.mark.parametrize(("ref", "why"), [("a..b.wav", "a path"), ("x/y.wav", "a path"), ("nul\x01.wav", "control")])
def test_enqueue_refuses_a_path_like_name_saying_why(tmp_path: Path, ref: str, why: str) -> None:
    """The CLI edge refuses what the queue file's edge refuses, naming the REF and why; nothing is queued."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    result = run_cli("enqueue", ref, "-c", str(cfg))
    assert result.returncode == 2 and f"REF {ref!r}: " in result.stderr and why in result.stderr
    assert json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]["pending"] == 0
