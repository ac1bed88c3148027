"""The archiving pipeline in-process against the simulator on loopback, with real files and a real ledger."""

from __future__ import annotations

import asyncio
import io
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.archive import Naming, final_relpath
from daemon.cli import progress_reporter
from daemon.config import load_config
from daemon.ledger import LedgerDb
from daemon.runner import RunResult, run_pipeline
from daemon.simulator import Simulator
from tests.conftest import SimFactory, archive_files, cli_env, run_cli, write_config


async def _once(cfg_path: Path) -> RunResult:
    return await run_pipeline(load_config(cfg_path), asyncio.Event(), once=True)


def _expected(sim: Simulator, layout: str = "{year}/{month}/{day}/{file}") -> dict[str, bytes]:
    import datetime as dt
    now = dt.datetime.now(dt.UTC)
    return {str(final_relpath(layout, Naming(r.id, r.file, r.call_type), now)): sim.content(r) for r in sim.recordings}


def _ids(sim: Simulator) -> list[int]:
    return [r.id for r in sim.recordings]


async def test_300_recordings_with_short_lifetimes_and_faults_are_archived_byte_identical(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=300, size_min=8_000, size_max=60_000, token_lifetime_s=3, url_lifetime_s=2,
                          http500_rate=0.01, errcode_rate=0.01, busy_rate=0.01, cut_rate=0.01, json_body_rate=0.01)
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": _ids(sim)}, "downloads": {"url_lifetime_s": 2, "url_refresh_margin_s": 1}})
    result = await _once(cfg)
    assert result.counts == {"pending": 0, "in_progress": 0, "done": 300, "failed": 0, "missing": 0, "copying": 0,
                             "forgotten": 0}
    assert archive_files(tmp_path / "archive") == _expected(sim)
    assert sum(sim.counters.faults.values()) > 0
    assert sim.snapshot()["tokens_live"] == 0  # revoked at the end
    hidden = [p for p in (tmp_path / "archive").rglob(".*") if p.name != ".yeastar-archiver"
              and ".yeastar-archiver" not in p.parts]
    assert hidden == []  # no temp file left anywhere
    sidecars = list((tmp_path / "archive").rglob("*.wav.json"))
    assert len(sidecars) == 300


async def test_mp3_never_has_two_requests_in_flight(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=40, format="mp3", size_min=20_000, size_max=120_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}, "downloads": {"workers": 4}})
    result = await _once(cfg)
    assert result.counts["done"] == 40
    assert sim.counters.mp3_violations == 0
    assert sim.counters.max_concurrency == 1
    assert archive_files(tmp_path / "archive") == _expected(sim)


async def test_wav_uses_the_configured_workers(start_sim: SimFactory, tmp_path: Path) -> None:
    # Big enough that a transfer outlives the kernel's socket buffers, so the server sees the overlap.
    sim = await start_sim(count=8, size_min=6_000_000, size_max=8_000_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}, "downloads": {"workers": 4}})
    await _once(cfg)
    assert 1 < sim.counters.max_concurrency <= 4


async def test_bodies_of_several_mib_written_a_mib_at_a_time_with_checkpoints_are_byte_identical(
        start_sim: SimFactory, tmp_path: Path) -> None:
    # Sizes off the MiB boundaries, checkpoints between the writes: every hand-over of the write
    # buffer (to the writer and the hashing thread) is crossed, and the sidecars' sha256 with it.
    import hashlib
    import json
    sim = await start_sim(count=4, size_min=2_500_000, size_max=3_700_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)},
                                                      "downloads": {"workers": 2, "checkpoint_bytes": 1_000_000}})
    result = await _once(cfg)
    assert result.counts["done"] == 4
    files = archive_files(tmp_path / "archive")
    assert files == _expected(sim)
    for rel, body in files.items():
        sidecar = json.loads((tmp_path / "archive" / f"{rel}.json").read_text())
        assert sidecar["sha256"] == hashlib.sha256(body).hexdigest()


async def test_hostile_names_stay_inside_the_archive(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=10, hostile_names=True)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    result = await _once(cfg)
    assert result.counts["done"] == 10
    files = archive_files(tmp_path / "archive")
    assert files == _expected(sim)
    for rec in sim.recordings[:8]:
        assert any(p.endswith(f"/{rec.id}.wav") for p in files), rec.file
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not str(p).startswith(str(tmp_path / "archive"))]
    assert sorted(p.name for p in outside) == ["client_secret", "config.yaml"]


async def test_an_identical_existing_file_without_proof_is_downloaded_then_adopted_never_duplicated(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=3)
    expected = _expected(sim)
    rel, content = next(iter(expected.items()))
    (tmp_path / "archive" / rel).parent.mkdir(parents=True)
    (tmp_path / "archive" / rel).write_bytes(content)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    result = await _once(cfg)
    assert result.counts["done"] == 3
    assert sum(sim.counters.transfers_completed.values()) == 3   # bare ids: the bytes are the only proof
    assert archive_files(tmp_path / "archive") == expected       # and they matched: no second copy


async def test_a_different_file_under_the_final_name_is_never_overwritten(start_sim: SimFactory,
                                                                          tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    rec = sim.recordings[0]
    rel = next(iter(_expected(sim)))
    target = tmp_path / "archive" / rel
    target.parent.mkdir(parents=True)
    imposter = b"RIFF\x00\x00\x00\x00WAVE" + b"other recording"
    target.write_bytes(imposter)
    # With the listing's size known, the imposter's size shows it is a different recording.
    cfg = write_config(tmp_path, sim.base_url)
    db = LedgerDb(load_config(cfg).state.path)
    from daemon.ledger import Ref
    db.enqueue([Ref(rec_id=rec.id, file=rec.file, meta=(("size", rec.size),))], source="test", now=0)
    db.close()
    result = await _once(cfg)
    assert result.counts["done"] == 1
    assert target.read_bytes() == imposter
    alt = target.with_name(target.stem + f"~{rec.id}.wav")
    assert alt.read_bytes() == sim.content(rec)


async def test_a_deleted_ledger_is_rebuilt_without_downloading_again(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=6)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    await _once(cfg)
    assert sum(sim.counters.transfers_completed.values()) == 6
    state = load_config(cfg).state.path
    for suffix in ("", "-wal", "-shm"):
        Path(str(state) + suffix).unlink(missing_ok=True)
    result = await _once(cfg)
    assert result.reconcile.rebuilt == 6
    assert result.counts["done"] == 6
    assert sum(sim.counters.transfers_completed.values()) == 6
    assert archive_files(tmp_path / "archive") == _expected(sim)


async def test_a_vanished_file_is_requeued_and_reported(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=3)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    await _once(cfg)
    rel = next(iter(_expected(sim)))
    (tmp_path / "archive" / rel).unlink()
    with structlog.testing.capture_logs() as logs:
        result = await _once(cfg)
    assert result.reconcile.vanished == [rel]
    assert any(e["event"] == "reconcile.file_vanished" for e in logs)
    assert archive_files(tmp_path / "archive") == _expected(sim)


async def test_stray_temp_files_are_removed_at_start(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    stray = tmp_path / "archive" / "2022" / ".leftover.wav.part"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    result = await _once(cfg)
    assert result.reconcile.parts_removed == 1 and not stray.exists()


async def test_missing_recordings_end_missing_and_once_exits_clean(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [*_ids(sim), 99999]}})
    result = await _once(cfg)
    assert result.counts == {"pending": 0, "in_progress": 0, "done": 2, "failed": 0, "missing": 1, "copying": 0,
                             "forgotten": 0}
    assert sim.counters.requests["recording/download"] == 3  # 60001 is not retried


async def test_an_item_that_keeps_failing_ends_failed_after_max_attempts(start_sim: SimFactory,
                                                                         tmp_path: Path) -> None:
    sim = await start_sim(count=1, cut_rate=1.0, size_min=100_000, size_max=100_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)},
                                                      "downloads": {"max_attempts": 3}})
    result = await _once(cfg)
    assert result.counts["failed"] == 1
    assert sim.counters.requests["file"] == 3
    assert archive_files(tmp_path / "archive") == {}


async def test_expired_urls_are_re_resolved_without_burning_attempts(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=20, url_expired_rate=0.5)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)},
                                                      "downloads": {"max_attempts": 1}})
    result = await _once(cfg)
    assert sim.counters.faults["url_expired"] >= 5
    assert result.counts["done"] == 20  # with max_attempts 1, a single burnt attempt would have failed one
    assert sim.counters.requests["recording/download"] == 20 + sim.counters.faults["url_expired"]


async def test_the_pbx_going_away_fails_nothing_and_work_resumes(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=30, size_min=100_000, size_max=200_000)
    port = int(sim.base_url.rsplit(":", 1)[1])
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)},
                                                      "downloads": {"max_attempts": 2, "workers": 2,
                                                                    "pause_max_s": 0.4}})

    async def outage() -> None:
        while sum(sim.counters.transfers_completed.values()) < 5:
            await asyncio.sleep(0.01)
        await sim.stop()
        await asyncio.sleep(2.0)  # the outage lasts through several pauses
        await sim.start("127.0.0.1", port)
    with structlog.testing.capture_logs() as logs:
        result, _ = await asyncio.gather(_once(cfg), outage())
    assert result.counts == {"pending": 0, "in_progress": 0, "done": 30, "failed": 0, "missing": 0, "copying": 0,
                             "forgotten": 0}
    assert result.stats.pauses >= 2
    events = [e["event"] for e in logs]
    assert "pipeline.paused" in events and "pipeline.resumed" in events
    assert archive_files(tmp_path / "archive") == _expected(sim)


async def test_queue_lines_appended_while_running_get_archived(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=6)
    queue = tmp_path / "queue.txt"
    queue.write_text("# ids\n1000\n")
    cfg_path = write_config(tmp_path, sim.base_url, extra={"sources": {"queue_file": "queue.txt",
                                                                       "queue_poll_interval_s": 0.05}})
    cfg = load_config(cfg_path)
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(cfg, stop, once=False))

    async def wait_done(n: int) -> None:
        while True:
            db = LedgerDb(cfg.state.path)
            try:
                if db.counts()["done"] >= n:
                    return
            finally:
                db.close()
            await asyncio.sleep(0.05)
    await asyncio.wait_for(wait_done(1), 20)
    with queue.open("a") as f:
        f.write("1001\nnot-a-ref\n10")  # a writer between two writes: "10" is half of "1002"
        f.flush()
        await asyncio.wait_for(wait_done(2), 20)
        await asyncio.sleep(0.2)         # several polls see the half-written line
        db = LedgerDb(cfg.state.path)
        assert db.get("id:10") is None   # only newline-terminated lines count in run
        db.close()
        f.write("02\n")
    await asyncio.wait_for(wait_done(3), 20)
    queue.rename(tmp_path / "queue.txt.1")                  # rotation
    queue.write_text("1003\n")
    await asyncio.wait_for(wait_done(4), 20)
    queue.write_text("1004\n")                               # truncation to a shorter file
    await asyncio.wait_for(wait_done(5), 20)
    stop.set()
    result = await asyncio.wait_for(task, 20)
    assert result.counts["done"] == 5
    assert len(archive_files(tmp_path / "archive")) == 5


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root, which CI has); skipped with the reason otherwise."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("disk-full test needs root to mount a tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_pauses_without_leaving_a_corrupt_file(start_sim: SimFactory, tmp_path: Path,
                                                              tiny_disk: Path) -> None:
    sim = await start_sim(count=8, size_min=200_000, size_max=200_000)
    cfg_path = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": _ids(sim)}, "archive": {"dir": str(tiny_disk / "archive")},
        "state": {"path": str(tmp_path / "state" / "ledger.db")}, "downloads": {"pause_max_s": 0.3}})
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (2_600_000))  # leaves room for about two of the eight recordings

    def paused_for_disk() -> bool:
        return any(e["event"] == "pipeline.paused" and e["reason"] == "StorageError" for e in logs)

    async def free_space_later() -> None:
        while not paused_for_disk():
            await asyncio.sleep(0.01)
        # While paused: nothing corrupt under a final name.
        for rel, data in archive_files(tiny_disk / "archive").items():
            assert data == _expected(sim)[rel]
        filler.unlink()
    with structlog.testing.capture_logs() as logs:
        result, _ = await asyncio.gather(_once(cfg_path), free_space_later())
    assert result.counts["done"] == 8 and result.counts["failed"] == 0
    assert paused_for_disk()
    assert archive_files(tiny_disk / "archive") == _expected(sim)
    assert not [p for p in (tiny_disk / "archive").rglob("*.part")]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_is_a_live_line_on_a_tty_and_log_events_otherwise(start_sim: SimFactory,
                                                                         tmp_path: Path) -> None:
    sim = await start_sim(count=30, size_min=100_000, size_max=200_000, bytes_per_second=2_000_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    tty = _Tty()
    await run_pipeline(load_config(cfg), asyncio.Event(), once=True,
                       progress=progress_reporter(tty, interval_s=0.05))
    line = tty.getvalue()
    assert "\r" in line and "/30" in line and "MB/s" in line and "ETA" in line
    assert line.rstrip("\n").rsplit("\r", 1)[-1].removeprefix("\x1b[K").strip().startswith("30/30")  # after erase-line
    (tmp_path / "again").mkdir()
    cfg2 = write_config(tmp_path / "again", sim.base_url, extra={"sources": {"ids": [1000, 1001]}})
    with structlog.testing.capture_logs() as logs:
        await run_pipeline(load_config(cfg2), asyncio.Event(), once=True,
                           progress=progress_reporter(io.StringIO(), interval_s=0.05))
    progress = [e for e in logs if e["event"] == "progress"]
    assert progress and progress[-1]["ended"] == 2 and progress[-1]["total"] == 2


def test_demo_runs_the_whole_tour(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "archived 200 recordings" in result.stdout
    assert len(archive_files(tmp_path / "demo" / "archive")) == 200
    # The closing hint is a command that works as printed (the venv's script, not a bare name off PATH).
    hint = next(line for line in result.stdout.splitlines() if line.startswith("demo: try  "))
    status = subprocess.run(shlex.split(hint.removeprefix("demo: try  ")), capture_output=True, text=True,
                            timeout=60, env=cli_env(), check=False)
    assert status.returncode == 0, status.stderr
    assert "done: 200" in status.stdout
    again = run_cli("demo", "--dir", str(tmp_path / "demo"), timeout=120)   # a second tour starts afresh
    assert again.returncode == 0 and "archived 200 recordings" in again.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    refused = run_cli("demo", "--dir", str(tmp_path / "mine"))
    assert refused.returncode == 2 and (tmp_path / "mine" / "precious.txt").exists()


async def test_a_lost_sidecar_is_rewritten_at_start(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    await _once(cfg)
    sidecar = next((tmp_path / "archive").rglob("*.wav.json"))
    before = sidecar.read_text()
    sidecar.unlink()
    result = await _once(cfg)
    assert result.reconcile.sidecars_written == 1
    assert sidecar.read_text() == before


async def test_the_free_space_floor_pauses_instead_of_filling_the_disk(start_sim: SimFactory,
                                                                       tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": _ids(sim)}, "archive": {"min_free_bytes": 2**62},
        "downloads": {"once_give_up_s": 0.5, "pause_max_s": 0.2}})
    with structlog.testing.capture_logs() as logs:
        result = await _once(cfg)
    assert result.gave_up and result.counts["pending"] == 2 and result.counts["failed"] == 0
    assert any(e["event"] == "pipeline.paused" and e["reason"] == "StorageError" for e in logs)
    assert sum(sim.counters.transfers_completed.values()) == 0


async def test_a_second_runner_on_the_same_ledger_is_refused(start_sim: SimFactory, tmp_path: Path) -> None:
    from daemon.errors import StorageError
    from daemon.ledger import RunLock
    sim = await start_sim(count=1)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)}})
    lock = RunLock(load_config(cfg).state.path)
    lock.acquire()
    try:
        with pytest.raises(StorageError, match="already using the ledger"):
            await _once(cfg)
    finally:
        lock.release()
    assert (await _once(cfg)).counts["done"] == 1


class _CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def test_a_small_recording_costs_two_thread_hops(start_sim: SimFactory, tmp_path: Path) -> None:
    """Prepare (folder, final name, temp file) and commit (write, fsync, link, folder fsync, sidecar) are
    one hop each for a body smaller than one write: thread hand-offs were most of the CPU per file."""
    submitted = []
    for n in (1, 31):
        sim = await start_sim(count=n, size_min=20_000, size_max=60_000)
        (tmp_path / str(n)).mkdir()
        cfg = write_config(tmp_path / str(n), sim.base_url, extra={"sources": {"ids": _ids(sim)}})
        counting = _CountingExecutor()
        asyncio.get_running_loop().set_default_executor(counting)
        result = await _once(cfg)
        assert result.counts["done"] == n
        assert archive_files(tmp_path / str(n) / "archive") == _expected(sim)
        submitted.append(counting.submitted)
    assert (submitted[1] - submitted[0]) / 30 <= 2.0, submitted   # 8 before, per recording


async def test_urls_resolved_ahead_that_expire_while_waiting_are_renewed_not_burnt(start_sim: SimFactory,
                                                                                    tmp_path: Path) -> None:
    """Prefetch: one worker, paced transfers and 1-second URLs, so that most URLs resolved ahead age
    past their refresh margin before their turn: each is renewed before use, no transfer meets an
    expired URL, and no attempt is burnt (max_attempts 1 would fail the recording)."""
    sim = await start_sim(count=10, size_min=200_000, size_max=200_000, url_lifetime_s=1.0,
                          bytes_per_second=1_000_000)
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": _ids(sim)},
        "downloads": {"workers": 1, "prefetch_urls": 8, "max_attempts": 1, "url_lifetime_s": 1.0,
                      "url_refresh_margin_s": 0.4}})
    result = await _once(cfg)
    assert result.counts["done"] == 10
    assert archive_files(tmp_path / "archive") == _expected(sim)
    assert sim.counters.requests["recording/download"] > 10          # some resolved ahead, then renewed
    assert sum(sim.counters.transfers_completed.values()) == 10     # every transfer had a live URL
    assert sim.counters.requests["file"] == 10
    db = LedgerDb(tmp_path / "archive" / ".yeastar-archiver" / "ledger.db")
    try:
        assert {r.attempts for r in db.rows()} == {0}
    finally:
        db.close()


async def test_a_stop_gives_back_the_rows_claimed_ahead(start_sim: SimFactory, tmp_path: Path) -> None:
    """Rows claimed for prefetching that no worker took yet are pending again after a stop, not left
    in progress; the next run archives them."""
    sim = await start_sim(count=40, size_min=20_000, size_max=20_000, bytes_per_second=100_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": _ids(sim)},
                                                      "downloads": {"workers": 2, "prefetch_urls": 16}})
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False))
    while sum(sim.counters.transfers_completed.values()) < 2:
        await asyncio.sleep(0.02)
    stop.set()
    result = await asyncio.wait_for(task, 30)
    assert result.counts["in_progress"] == 0 and result.counts["pending"] > 0
    result = await _once(cfg)
    assert result.counts["done"] == 40 and archive_files(tmp_path / "archive") == _expected(sim)
