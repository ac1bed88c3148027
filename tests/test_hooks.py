"""hooks.on_archived: real hook processes fed each archived recording, bounded, never blocking the archive."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.archive import HOOKS_DIR, MARKER_DIR, ArchiveDir
from daemon.clock import SystemClock
from daemon.config import HooksConfig, load_config, parse_config
from daemon.errors import ConfigError
from daemon.hooks import (
    DROPPED,
    ENV_PATH,
    ENV_RECORDING,
    ENV_SHA256,
    FAILED,
    KILLED,
    OK,
    SPAWN_ERROR,
    TIMEOUT,
    HookJob,
    HookRunner,
    hook_env,
    outcome,
    remaining_grace,
)
from daemon.runner import run_pipeline
from daemon.service import Health, Metrics
from tests.conftest import SimFactory, write_config

GOOD: dict[str, Any] = {
    "pbx": {"base_url": "https://192.0.2.10:8088", "client_id": "cid", "client_secret": "s3cret-value"},
    "archive": {"dir": "/srv/recordings"},
}

# A hook that records what it was given: stdin and its three variables, one JSON file per run.
RECORDER = """
import json, os, sys
out = os.path.join(sys.argv[1], os.environ["YEASTAR_ARCHIVER_RECORDING"] + ".json")
json.dump({"stdin": sys.stdin.read(), "path": os.environ["YEASTAR_ARCHIVER_PATH"],
           "sha256": os.environ["YEASTAR_ARCHIVER_SHA256"]}, open(out, "w"))
"""
# A hook that starts a grandchild in its process group, tells its pid, and hangs.
HANGER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
sys.stdin.read()
time.sleep(600)
"""


def _hooks(data: Any) -> HooksConfig:
    return parse_config({**GOOD, "hooks": data}, base_dir=Path("/etc/x")).hooks


@pytest.mark.parametrize(("value", "argv"), [
    (None, ()),
    (["/usr/local/bin/transcribe", "--lang", "de"], ("/usr/local/bin/transcribe", "--lang", "de")),
    ("/usr/local/bin/crm-upload --tag 'call recording'", ("/usr/local/bin/crm-upload", "--tag", "call recording")),
    ("notify $HOME; rm -rf /", ("notify", "$HOME;", "rm", "-rf", "/")),   # no shell: nothing expands or chains
])
def test_on_archived_is_an_argv_list_or_a_string_split_by_shell_rules(value: Any, argv: tuple[str, ...]) -> None:
    assert _hooks({"on_archived": value}).on_archived == argv


def test_hooks_have_the_documented_defaults() -> None:
    assert parse_config(GOOD, base_dir=Path("/etc/x")).hooks == HooksConfig(
        on_archived=(), max_concurrent=2, timeout_s=60.0, max_queued=100)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("on_archived", [], "a command"),
    ("on_archived", "", "a command"),
    ("on_archived", ["ok", 3], "a command"),
    ("on_archived", "unclosed 'quote", "a command"),
    ("max_concurrent", 0, "1 to 64"),
    ("timeout_s", 0, "> 0"),
    ("max_queued", -1, "0 to 100000"),
    ("colour", "blue", "unknown key"),
])
def test_a_bad_hooks_value_is_reported_with_its_key_path(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _hooks({key: value})
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"hooks.{key}:")
    assert fragment in info.value.problems[0]


@pytest.mark.parametrize(("base", "kept"), [
    ({"PATH": "/usr/bin", "LANG": "C.UTF-8"}, {"PATH": "/usr/bin", "LANG": "C.UTF-8"}),
    ({ENV_PATH: "stale"}, {}),
    ({"YEASTAR_ARCHIVER_PBX__CLIENT_SECRET": "s3cret", "YEASTAR_ARCHIVER_CONFIG": "/etc/x.yaml"}, {}),
    ({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, {}),
])
def test_hook_env_is_the_daemons_less_its_settings_plus_the_recordings_three_variables(
        base: dict[str, str], kept: dict[str, str]) -> None:
    job = HookJob(recording="1007", path=Path("/srv/a/1007.wav"), sha256="ab" * 32, sidecar=b"{}")
    assert hook_env(base, job) == {**kept, ENV_PATH: "/srv/a/1007.wav", ENV_RECORDING: "1007", ENV_SHA256: "ab" * 32}


@pytest.mark.parametrize(("returncode", "timed_out", "killed", "expected"), [
    (0, False, False, OK),
    (3, False, False, FAILED),
    (-9, False, False, FAILED),     # killed by someone else: the hook failed
    (-9, True, False, TIMEOUT),
    (-9, False, True, KILLED),      # killed at shutdown after the grace
    (0, False, True, KILLED),
])
def test_outcome_of_a_run(returncode: int, timed_out: bool, killed: bool, expected: str) -> None:
    assert outcome(returncode, timed_out=timed_out, killed=killed) == expected


@pytest.mark.parametrize(("grace", "stopped_at", "now", "left"), [
    (20.0, None, 100.0, 20.0),     # not stopped (once at its end): the whole grace
    (20.0, 100.0, 105.0, 15.0),    # the downloads' grace already ran 5 s of it
    (20.0, 100.0, 130.0, 0.0),
])
def test_the_hooks_grace_counts_from_the_stop(grace: float, stopped_at: float | None, now: float, left: float) -> None:
    assert remaining_grace(grace, stopped_at, now) == left


def test_the_hook_counter_has_every_outcome_from_the_start() -> None:
    text = Metrics(Health(SystemClock())).render().decode()
    for name in (OK, FAILED, TIMEOUT, SPAWN_ERROR, DROPPED, KILLED):
        assert f'yeastar_archiver_hook_runs_total{{outcome="{name}"}} 0.0' in text


def _job(n: int, tmp_path: Path) -> HookJob:
    return HookJob(recording=str(n), path=tmp_path / f"{n}.wav", sha256="0" * 64, sidecar=b'{"id": %d}' % n)


async def test_submit_never_waits_and_a_full_backlog_drops_with_a_log_line(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    (tmp_path / "out").mkdir()
    cfg = HooksConfig(on_archived=(sys.executable, str(script), str(tmp_path / "out")), max_concurrent=1,
                      max_queued=2)
    runner = HookRunner(cfg, lambda o: counts.update([o]), grace_s=5, stop=asyncio.Event())
    runner.start()
    with structlog.testing.capture_logs() as logs:
        for n in range(1, 11):       # in one turn of the loop: no worker has taken any yet
            runner.submit(_job(n, tmp_path))
        await runner.close(drain=True)
    assert counts == {OK: 2, DROPPED: 8}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["1.json", "2.json"]
    dropped = [e for e in logs if e["event"] == "hook.dropped"]
    assert [e["recording"] for e in dropped] == [str(n) for n in range(3, 11)]
    assert {e["reason"] for e in dropped} == {"backlog full"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped by its parent, which we killed) is no longer running.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"


def _wait_gone(pid: int) -> None:
    """SIGKILL went to the hook's whole group; its delivery to a grandchild is asynchronous: a bounded wait."""
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived the kill of its hook's group"
        time.sleep(0.05)


async def _gone(pid: int) -> None:
    await asyncio.to_thread(_wait_gone, pid)


async def test_a_hook_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    script = tmp_path / "hang.py"
    script.write_text(HANGER)
    pid_file = tmp_path / "child.pid"
    cfg = HooksConfig(on_archived=(sys.executable, str(script), str(pid_file)), max_concurrent=1, timeout_s=5.0)
    runner = HookRunner(cfg, lambda o: counts.update([o]), grace_s=5, stop=asyncio.Event())
    runner.start()
    with structlog.testing.capture_logs() as logs:
        runner.submit(_job(1, tmp_path))
        await runner.close(drain=True)
    assert counts == {TIMEOUT: 1}
    assert [e["event"] for e in logs if e["event"].startswith("hook.")] == ["hook.timed_out"]
    await _gone(int(pid_file.read_text()))


async def test_at_a_stop_running_hooks_get_the_grace_then_are_killed_and_queued_ones_dropped(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    script = tmp_path / "hang.py"
    script.write_text(HANGER)
    pid_file = tmp_path / "child.pid"
    os.mkfifo(pid_file)   # read below: it returns once the first hook has started its grandchild
    stop = asyncio.Event()
    cfg = HooksConfig(on_archived=(sys.executable, str(script), str(pid_file)), max_concurrent=1, timeout_s=600)
    runner = HookRunner(cfg, lambda o: counts.update([o]), grace_s=0.5, stop=stop)
    runner.start()
    with structlog.testing.capture_logs() as logs:
        runner.submit(_job(1, tmp_path))
        runner.submit(_job(2, tmp_path))
        child = int(await asyncio.to_thread(pid_file.read_text))
        stop.set()
        runner.submit(_job(3, tmp_path))
        await runner.close(drain=False)
    assert counts == {KILLED: 1, DROPPED: 2}
    # 3, archived after the stop, is queued like 2 (archived within the grace is archived); the close
    # drops both, in order, and kills the run past the grace.
    assert [(e["event"], e["recording"]) for e in logs if e["event"].startswith("hook.")] == [
        ("hook.dropped", "2"), ("hook.dropped", "3"), ("hook.killed", "1")]
    await _gone(child)


async def test_a_hook_that_cannot_start_is_logged_and_counted(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    runner = HookRunner(HooksConfig(on_archived=(str(tmp_path / "no-such-hook"),)), lambda o: counts.update([o]),
                        grace_s=5, stop=asyncio.Event())
    runner.start()
    with structlog.testing.capture_logs() as logs:
        runner.submit(_job(1, tmp_path))
        await runner.close(drain=True)
    assert counts == {SPAWN_ERROR: 1}
    [event] = [e for e in logs if e["event"].startswith("hook.")]
    assert event["event"] == "hook.spawn_failed" and event["recording"] == "1"


async def test_once_runs_the_hook_for_each_archived_recording_with_its_sidecar_and_path(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=5)
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    out = tmp_path / "out"
    out.mkdir()
    cfg_path = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [r.id for r in sim.recordings]},
        "hooks": {"on_archived": [sys.executable, str(script), str(out)], "max_concurrent": 2}})
    cfg = load_config(cfg_path)
    result = await run_pipeline(cfg, asyncio.Event(), once=True)
    assert result.counts["done"] == 5
    seen = {p.stem: json.loads(p.read_text()) for p in out.iterdir()}
    assert sorted(seen) == sorted(str(r.id) for r in sim.recordings)
    for rec_id, got in seen.items():
        path = Path(got["path"])
        assert path.is_relative_to(cfg.archive.dir) and path.is_file()
        sidecar = json.loads(got["stdin"])
        # stdin is the sidecar written beside the file, and the hash is the file's.
        assert sidecar == json.loads(Path(f"{path}.json").read_text())
        assert str(sidecar["id"]) == rec_id and sidecar["sha256"] == got["sha256"]


async def test_failing_hooks_never_hold_up_the_archive(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=4)
    cfg_path = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [r.id for r in sim.recordings]},
        "hooks": {"on_archived": [sys.executable, "-c", "import sys; sys.stderr.write('crm down'); sys.exit(3)"],
                  "max_concurrent": 1}})
    with structlog.testing.capture_logs() as logs:
        result = await run_pipeline(load_config(cfg_path), asyncio.Event(), once=True)
    assert result.counts["done"] == 4 and result.stats.failed == 0
    failed = [e for e in logs if e["event"] == "hook.failed"]
    assert len(failed) == 4 and {(e["exit_code"], e["stderr"]) for e in failed} == {(3, "crm down")}


async def test_a_live_run_counts_hook_outcomes_in_its_metrics(start_sim: SimFactory, tmp_path: Path) -> None:
    from tests.test_metrics import _until, start_live_run, stop_live_run, value
    sim = await start_sim(count=3)
    live = await start_live_run(sim, tmp_path, hooks={"on_archived": [sys.executable, "-c", "raise SystemExit(3)"]})
    try:
        async def counted() -> bool:
            return value(await live.samples(), "yeastar_archiver_hook_runs_total", outcome=FAILED) == 3
        await _until(counted)
        samples = await live.samples()
        assert value(samples, "yeastar_archiver_hook_runs_total", outcome=OK) == 0
        assert value(samples, "yeastar_archiver_hook_runs_total", outcome=DROPPED) == 0
    finally:
        await stop_live_run(live)


def test_sigterm_kills_a_hanging_hook_and_its_children_after_the_grace_and_run_exits_0(tmp_path: Path) -> None:
    from tests.conftest import simulator_subprocess
    from tests.test_daemon import _start_run, _stop
    script = tmp_path / "hang.py"
    script.write_text(HANGER)
    fifo = tmp_path / "child.pid"
    os.mkfifo(fifo)
    with simulator_subprocess("--count", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={
            "sources": {"ids": [1000]}, "service": {"shutdown_grace_s": 1},
            "hooks": {"on_archived": [sys.executable, str(script), str(fifo)], "timeout_s": 600}})
        proc = _start_run(cfg)
        try:
            child = int(fifo.read_text())   # returns once the recording is archived and its hook runs
        except BaseException:
            proc.kill()
            raise
        code, err = _stop(proc)
    assert code == 0, err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "hook.killed" in events and "download.completed" in events
    _wait_gone(child)


# A hook whose recording name says what it does: "ok-…" exits 0, "fail-…" 3, "hang-…" sleeps until
# killed. It leaves its pid, so that a release can tell whether the run it follows is over.
BY_NAME = ('echo $$ > "$1/$YEASTAR_ARCHIVER_RECORDING.pid"; case "$YEASTAR_ARCHIVER_RECORDING" in '
           'hang*) exec sleep 600;; fail*) exit 3;; esac')


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(["ok", "fail", "hang", "bad\x00name"]), min_size=1, max_size=6),
       max_concurrent=st.integers(1, 2), max_queued=st.integers(0, 3),
       stop_after=st.none() | st.integers(0, 6), drain=st.booleans())
def test_each_jobs_release_is_called_once_after_its_run_whatever_became_of_it(
        tmp_path: Path, kinds: list[str], max_concurrent: int, max_queued: int, stop_after: int | None,
        drain: bool) -> None:
    """Ran, failed, timed out, could not start, dropped at submit or at the stop, killed: the job's
    release (the removal of a local copy, keep_local: false) runs once, and never under a live hook."""
    pids = tmp_path / f"pids-{time.monotonic_ns()}"
    pids.mkdir()
    released: list[tuple[str, bool]] = []

    def release_of(name: str) -> Callable[[], None]:
        def release() -> None:
            pid_file = pids / f"{name}.pid"
            running = pid_file.exists() and pid_file.read_text().strip() != "" and _alive(
                int(pid_file.read_text()))
            released.append((name, running))
        return release

    names = [f"{kind}-{n}" for n, kind in enumerate(kinds)]
    counts: Counter[str] = Counter()

    async def main() -> None:
        stop = asyncio.Event()
        runner = HookRunner(HooksConfig(on_archived=("/bin/sh", "-c", BY_NAME, "sh", str(pids)),
                                        max_concurrent=max_concurrent, max_queued=max_queued, timeout_s=0.5),
                            lambda o: counts.update([o]), grace_s=0.2, stop=stop)
        runner.start()
        for n, name in enumerate(names):
            if n == stop_after:
                stop.set()
            runner.submit(HookJob(recording=name, path=tmp_path / name, sha256="0" * 64, sidecar=b"{}",
                                  release=release_of(name)))
            await asyncio.sleep(0)
        await runner.close(drain=drain)

    with structlog.testing.capture_logs():
        asyncio.run(main())
    assert sorted(n for n, _ in released) == sorted(names), "a release was lost or called twice"
    assert [n for n, running in released if running] == [], "released while its hook still ran"
    assert sum(counts.values()) == len(names)


def test_a_release_that_fails_is_logged_and_the_pool_goes_on(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()

    def broken() -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.wav"))

    async def main() -> None:
        runner = HookRunner(HooksConfig(on_archived=("/bin/true",), max_concurrent=1), lambda o: counts.update([o]),
                            grace_s=1, stop=asyncio.Event())
        runner.start()
        runner.submit(HookJob(recording="1", path=tmp_path / "x.wav", sha256="0" * 64, sidecar=b"{}", release=broken))
        runner.submit(_job(2, tmp_path))
        await runner.close(drain=True)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main())
    assert counts == {OK: 2}
    assert [e["recording"] for e in logs if e["event"] == "hook.release_failed"] == ["1"]


def test_a_hooks_own_name_for_a_recording_outlives_the_archive_path_and_goes_when_unstaged(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    (root / "2026" / "12").mkdir(parents=True)
    archive = ArchiveDir(root)
    rel = PurePosixPath("2026/12/a.wav")
    (root / rel).write_bytes(b"RIFF one")
    staged = archive.stage_for_hook(rel)
    again = archive.stage_for_hook(rel)          # a second run of the same file gets a name of its own
    assert staged != again and staged.name == again.name == "a.wav"
    assert staged.is_relative_to(root / MARKER_DIR / HOOKS_DIR)
    assert os.stat(staged).st_ino == os.stat(root / rel).st_ino     # a hard link: no bytes copied
    (root / rel).unlink()                                             # keep_local: false
    (root / rel).write_bytes(b"RIFF another recording at the same path")
    assert staged.read_bytes() == b"RIFF one"
    # The archive's walk (reconcile's) never sees the hooks' names as recordings.
    assert [f for _, files in archive.walk() for f in files if f.endswith(".wav")] == ["a.wav"]
    archive.unstage(staged)
    assert not staged.parent.exists() and again.exists() and (root / rel).exists()
    archive.unstage(tmp_path / "elsewhere" / "a.wav")                 # never anything but its own folders
    archive.clear_hook_names()                                        # at start: an earlier process's
    assert list((root / MARKER_DIR / HOOKS_DIR).iterdir()) == [] and (root / rel).exists()


def test_a_symlink_at_the_hooks_folder_never_takes_a_name_outside_the_archive(tmp_path: Path) -> None:
    """Review adv2 F1: the names stay inside the archive whatever stands at .yeastar-archiver/hooks."""
    root = tmp_path / "archive"
    root.mkdir()
    (root / MARKER_DIR).mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the archiver's")
    archive = ArchiveDir(root)
    rel = PurePosixPath("a.wav")
    (root / rel).write_bytes(b"RIFF one")
    (root / MARKER_DIR / HOOKS_DIR).symlink_to(outside)
    archive.clear_hook_names()                       # the symlink goes, never what it points at
    assert not (root / MARKER_DIR / HOOKS_DIR).is_symlink() and (outside / "keep.txt").exists()
    (root / MARKER_DIR / HOOKS_DIR).symlink_to(outside)
    staged = archive.stage_for_hook(rel)             # planted again: still not followed
    assert staged.resolve().is_relative_to(root.resolve()) and staged.read_bytes() == b"RIFF one"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    archive.unstage(staged)
    assert not staged.exists() and (outside / "keep.txt").exists()


# With an off-box copy: what the hook saw when it ran (the ledger's state for its recording, the file's
# hash), after a pause that gives a removal under it every chance to happen.
S3_RECORDER = """
import hashlib, json, os, sqlite3, sys, time
time.sleep(0.3)
rec, path = os.environ["YEASTAR_ARCHIVER_RECORDING"], os.environ["YEASTAR_ARCHIVER_PATH"]
db = sqlite3.connect(f"file:{sys.argv[2]}?mode=ro", uri=True)
state = db.execute("SELECT state FROM recordings WHERE rec_id = ?", (int(rec),)).fetchone()[0]
digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None
json.dump({"state": state, "sha256": digest, "told": os.environ["YEASTAR_ARCHIVER_SHA256"], "path": path,
           "stdin": json.loads(sys.stdin.read())}, open(os.path.join(sys.argv[1], rec + ".json"), "w"))
"""


@pytest.mark.parametrize("keep_local", [True, False])
async def test_with_an_off_box_copy_the_hook_runs_once_it_is_done_and_before_the_local_copy_goes(
        start_sim: SimFactory, tmp_path: Path, keep_local: bool) -> None:
    from tests.s3servers import s3_server
    sim = await start_sim(count=4)
    script = tmp_path / "recorder.py"
    script.write_text(S3_RECORDER)
    out = tmp_path / "out"
    out.mkdir()
    with s3_server("moto", tmp_path / "s3") as server:
        state_path = tmp_path / "state" / "ledger.db"
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"keep_local": keep_local, "s3": server.config(), "sidecar": False},
            "state": {"path": str(state_path)},
            "hooks": {"on_archived": [sys.executable, str(script), str(out), str(state_path)],
                      "max_concurrent": 2}})
        cfg = load_config(cfg_path)
        result = await run_pipeline(cfg, asyncio.Event(), once=True)
        assert result.counts["done"] == 4
        objects = server.objects()
    seen = {p.stem: json.loads(p.read_text()) for p in out.iterdir()}
    assert sorted(seen) == sorted(str(r.id) for r in sim.recordings)
    for rec in sim.recordings:
        got = seen[str(rec.id)]
        # Run once the off-box copy made it done, on a local file still there and whole.
        assert got["state"] == "done"
        assert got["sha256"] == got["told"] == hashlib.sha256(sim.content(rec)).hexdigest()
        assert got["stdin"]["sha256"] == got["told"] and str(got["stdin"]["id"]) == str(rec.id)
        assert sim.content(rec) in objects.values()
    left = [p for p in cfg.archive.dir.rglob("*") if p.is_file()
            and not p.relative_to(cfg.archive.dir).parts[0].startswith(".")]
    assert len([p for p in left if not p.name.endswith(".json")]) == (4 if keep_local else 0)
    # keep_local: the archive's own file; else a name of the hook's own, gone once the run was over.
    hook_names = cfg.archive.dir / MARKER_DIR / HOOKS_DIR
    for rec in sim.recordings:
        assert Path(seen[str(rec.id)]["path"]).is_relative_to(cfg.archive.dir if keep_local else hook_names)
    assert not hook_names.exists() or list(hook_names.iterdir()) == []
