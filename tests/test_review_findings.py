"""What an adversarial review of the no-silent-loss work found, each pinned by the reproduction it came with.

The reviewer was briefed with the spec and the invariants only, and asked to lose, corrupt, duplicate
or leak a recording; each test below failed on the code it read (finding numbers are the review's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from daemon.archive import Naming, final_relpath
from daemon.clock import SystemClock
from daemon.config import load_config
from daemon.ledger import Ledger, LedgerDb, Ref
from daemon.runner import RunResult, run_pipeline
from daemon.scheduler import Scheduler, _reschedule_row
from daemon.simulator import SimOptions, Simulator, make_recordings, recording_bytes
from daemon.sources import QueueTail
from tests.conftest import (
    REPO,
    SimFactory,
    archive_files,
    cli_env,
    run_cli,
    sim_counters,
    simulator_subprocess,
    write_config,
)
from tests.faults.rawpbx import RawPbx


async def _once(cfg: Path) -> RunResult:
    return await run_pipeline(load_config(cfg), asyncio.Event(), once=True)


def _rows(cfg: Path) -> list[Any]:
    db = LedgerDb(load_config(cfg).state.path)
    try:
        return db.rows()
    finally:
        db.close()


def _enqueue(cfg: Path, refs: list[Ref]) -> None:
    db = LedgerDb(load_config(cfg).state.path)
    try:
        db.enqueue(refs, source="cli", now=time.time())
    finally:
        db.close()


def _set(cfg: Path, section: str, values: dict[str, Any]) -> None:
    data = yaml.safe_load(cfg.read_text())
    data.setdefault(section, {}).update(values)
    cfg.write_text(yaml.safe_dump(data))


def _final(rec: Any, layout: str = "{year}/{month}/{day}/{file}") -> Path:
    return Path(str(final_relpath(layout, Naming(rec.id, rec.file, rec.call_type), dt.datetime.now(dt.UTC))))


# ---------------------------------------------------------------- F4
class _CloseDelimited(RawPbx):
    """Answers file requests with no Content-Length and no chunking, then closes cleanly half way."""

    async def _file(self, writer: asyncio.StreamWriter, target: str, headers: dict[str, str]) -> None:
        parts = urlsplit(target)
        url = self.sim.urls.get(parts.path.rsplit("/", 1)[1])
        if url is None or parse_qs(parts.query).get("access_token", [""])[0] not in self.sim.tokens:
            return await super()._file(writer, target, headers)
        self.file_requests[url.rec.id] += 1
        data = recording_bytes(self.sim.opts.seed, self.sim.opts.format, url.rec)
        body = data if self.file_requests[url.rec.id] > 1 else data[: len(data) // 2]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()
        return None


async def test_f4_a_close_delimited_body_cut_short_is_caught_by_its_wav_header(tmp_path: Path) -> None:
    """Row 1: no Content-Length, a clean close half way, an id with no listing size. Before: committed as
    done with half its bytes. Now the RIFF header's declared size says it was cut; the retry is whole."""
    sim = Simulator(SimOptions(count=1, size_min=200_000, size_max=200_000))
    await sim.start()
    raw = _CloseDelimited(sim)
    await raw.start()
    try:
        rec = sim.recordings[0]
        cfg = write_config(tmp_path, raw.base_url, extra={"sources": {"ids": [rec.id]}})
        result = await _once(cfg)
        # The cut, a Range probe for what lies beyond (this server ignores Range: whole again, and no
        # more probes), then the transfer whose WAV header agrees.
        assert result.counts["done"] == 1 and raw.file_requests[rec.id] == 3
        assert archive_files(tmp_path / "archive") == {str(_final(rec)): sim.content(rec)}
    finally:
        await raw.stop()
        await sim.stop()


# ---------------------------------------------------------------- F5
async def test_f5_a_deferred_ledger_write_is_applied_exactly_once_however_many_workers_turn(tmp_path: Path) -> None:
    """Row 27: before, every worker replayed the same deferred reschedule (one failure burnt 4 attempts)
    and all but one crashed with KeyError."""
    cfg = load_config(write_config(tmp_path, "http://127.0.0.1:9", extra={"downloads": {"max_attempts": 3}}))
    async with Ledger(cfg.state.path) as ledger:
        await ledger.call(lambda db: db.enqueue_many([Ref(rec_id=7)], source="cli", now=0))
        await ledger.call(lambda db: db.claim(1, now=1, lease_s=60))
        sched = Scheduler(cfg, ledger, None, None, SystemClock(), asyncio.Event(), once=False)  # type: ignore[arg-type]
        sched._unsaved["id:7"] = functools.partial(ledger.call, functools.partial(
            _reschedule_row, key="id:7", error="TransferError: cut", next_at=0, burn=True, max_attempts=3, now=1))
        results = await asyncio.gather(*(sched._save_unsaved() for _ in range(4)), return_exceptions=True)
        row = await ledger.call(lambda db: db.get("id:7"))
    assert results == [None] * 4
    assert row is not None and (row.state, row.attempts) == ("pending", 1)


def _done_in_ledger(path: Path) -> bool:
    import sqlite3
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    try:
        return bool(conn.execute("SELECT COUNT(*) FROM recordings WHERE state = 'done'").fetchone()[0])
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def test_f18_a_completion_recorded_late_gets_its_sidecar_at_once(start_sim: SimFactory, tmp_path: Path) -> None:
    """Row 27: a committed recording whose ledger update waited for a locked ledger gets its sidecar when
    the update is applied (before: only after the next restart)."""
    import sqlite3
    sim = await start_sim(count=1, size_min=20_000, size_max=20_000)
    rec = sim.recordings[0]
    cfg = load_config(write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]},
                                                                  "downloads": {"pause_max_s": 0.3}}))
    stop = asyncio.Event()
    from daemon.downloader import Downloader
    original = Downloader._finish
    held: dict[str, Any] = {}

    async def lock_then_finish(self: Downloader, *args: Any, **kwargs: Any) -> Any:
        if not held:   # the ledger gets locked by another process just as the file is committed
            holder = sqlite3.connect(cfg.state.path, isolation_level=None, check_same_thread=False)
            holder.execute("BEGIN EXCLUSIVE")
            held["conn"] = holder
            await self.ledger.call(lambda db: db.conn.execute("PRAGMA busy_timeout = 100"))
        return await original(self, *args, **kwargs)
    Downloader._finish = lock_then_finish  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(run_pipeline(cfg, stop, once=False))
        while "conn" not in held:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        held["conn"].execute("ROLLBACK")
        held["conn"].close()
        sidecar = tmp_path / "archive" / f"{_final(rec)}.json"
        deadline = time.monotonic() + 20
        # An id row's sidecar goes out with the commit itself, before the ledger: wait for both.
        while not sidecar.exists() or not _done_in_ledger(cfg.state.path):
            assert time.monotonic() < deadline, "no sidecar or ledger row while run is still running"
            await asyncio.sleep(0.05)
        stop.set()
        result = await asyncio.wait_for(task, 30)
    finally:
        Downloader._finish = original  # type: ignore[method-assign]
    assert result.counts["done"] == 1 and sim.counters.transfers_completed[rec.id] == 1


# ---------------------------------------------------------------- F7
@pytest.mark.parametrize("layout", ["{year}/{month}/{day}/{file}", "{year}/{id}.{ext}"])
async def test_f7_discovery_meeting_an_archived_name_row_and_a_waiting_id_row_keeps_one_row_and_one_copy(
        start_sim: SimFactory, tmp_path: Path, layout: str) -> None:
    """Row 25: before, the done name row was deleted and the id row downloaded the recording again (a
    second file with {id} in the layout, the first one with no ledger row)."""
    sim = await start_sim(count=1, size_min=50_000, size_max=50_000)
    rec = sim.recordings[0]
    cfg = write_config(tmp_path, sim.base_url, extra={"archive": {"layout": layout}})
    _enqueue(cfg, [Ref(file=rec.file)])
    await _once(cfg)
    _set(cfg, "sources", {"ids": [rec.id], "discover": {"enabled": True}})
    await _once(cfg)
    files = archive_files(tmp_path / "archive")
    rows = _rows(cfg)
    assert [(r.key, r.state) for r in rows] == [(f"id:{rec.id}", "done")]
    assert sorted(files) == [r.final_path for r in rows] and len(files) == 1
    assert sim.counters.transfers_completed[rec.id] == 1


async def test_f7_a_failed_id_row_takes_the_result_its_name_row_archived(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1, size_min=50_000, size_max=50_000, fail_ids=(1000,))
    rec = sim.recordings[0]
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]}, "downloads": {"max_attempts": 2}})
    await _once(cfg)
    assert [r.state for r in _rows(cfg)] == ["failed"]
    sim.opts = dataclasses.replace(sim.opts, fail_ids=())
    _enqueue(cfg, [Ref(file=rec.file)])
    await _once(cfg)
    _set(cfg, "sources", {"discover": {"enabled": True}})
    result = await _once(cfg)
    assert result.counts["done"] == 1 and result.counts["failed"] == 0
    assert sorted(archive_files(tmp_path / "archive")) == [r.final_path for r in _rows(cfg)]


# ---------------------------------------------------------------- F8, F17
def test_f8_once_whose_discovery_cannot_list_the_pbx_exits_5_not_0(tmp_path: Path) -> None:
    """Before: an unreachable PBX made once with discovery exit 0 (cron saw success)."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9", extra={"sources": {"discover": {"enabled": True}},
                                                              "downloads": {"once_give_up_s": 5}})
    result = run_cli("once", "-c", str(cfg), timeout=120)
    assert result.returncode == 5, result.stderr
    assert "discovery" in result.stderr and "run once again" in result.stderr


def test_f17_sigterm_during_once_s_back_fill_ends_it_between_two_pages(tmp_path: Path) -> None:
    """Row 19: before, the whole back-fill ran to its end before the stop was looked at."""
    with simulator_subprocess("--count", "3000", "--size-min", "2000", "--size-max", "3000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"discover": {"enabled": True, "page_size": 20}},
                                                      "pbx": {"requests_per_second": 10},
                                                      "service": {"shutdown_grace_s": 5}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
        deadline = time.monotonic() + 30
        while sim_counters(base_url)["requests"].get("recording/list", 0) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
    assert proc.returncode == 5, err
    assert elapsed < 5, elapsed        # 3000 recordings at 20 a page and 10 requests/s would take 15 s


# ---------------------------------------------------------------- F9
def test_f9_a_queue_file_rewritten_in_place_behind_an_unchanged_header_is_read_again(tmp_path: Path) -> None:
    """Row 23: before, only the first 64 bytes were compared; the old offset into the new content lost
    1007 and read "6" out of 123456."""
    header = "# recordings to archive -- generated by crm-export.sh every 5 minutes, do not edit\n"

    def rewrite(text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, text.encode())
        os.close(fd)
    path = tmp_path / "queue.txt"
    path.write_text(header + "1005\n1010\n")
    tail = QueueTail(path)
    assert [str(r) for r in tail.poll()] == ["1005", "1010"]
    time.sleep(0.01)
    rewrite(header + "1005\n1007\n1010\n1012\n")
    assert "1007" in [str(r) for r in tail.poll()]
    time.sleep(0.01)
    rewrite(header + "1005\n123456\n")
    got = [str(r) for r in tail.poll()]
    assert "123456" in got and "6" not in got
    tail.close()


# ---------------------------------------------------------------- F10
def test_f10_a_checkpointed_temp_file_changed_behind_our_back_is_never_spliced(tmp_path: Path) -> None:
    """I3, rows 11 and 18: kill -9 after a checkpoint, one byte of the kept prefix flipped, run again.
    Before: the flipped byte was committed inside a done recording."""
    opts = SimOptions(count=1, size_min=3_000_000, size_max=3_000_000)
    rec = make_recordings(opts)[0]
    with simulator_subprocess("--count", "1", "--size-min", "3000000", "--size-max", "3000000",
                              "--bytes-per-second", "600000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [rec.id]},
                                                      "downloads": {"checkpoint_bytes": 65536}})
        ledger = load_config(cfg).state.path
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            if ledger.exists():
                db = LedgerDb(ledger)
                row = db.get(f"id:{rec.id}")
                db.close()
                if row and row.part_synced > 1_000_000:
                    break
        proc.kill()
        proc.wait()
        part = tmp_path / "archive" / str(row.part_path)
        with part.open("r+b") as f:
            f.seek(500_000)
            byte = f.read(1)
            f.seek(500_000)
            f.write(bytes([byte[0] ^ 0xFF]))
        again = run_cli("once", "-c", str(cfg), timeout=120)
    assert again.returncode == 0, again.stderr
    assert "download.checkpoint_mismatch" in again.stderr
    (data,) = archive_files(tmp_path / "archive").values()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(recording_bytes(opts.seed, "wav", rec)).hexdigest()


# ---------------------------------------------------------------- F12, F14
@pytest.mark.parametrize("planted", ["directory", "symlink", "fifo"])
def test_f12_f14_a_folder_symlink_or_fifo_at_the_final_name_is_left_alone_and_the_recording_kept_beside(
        tmp_path: Path, planted: str) -> None:
    """Rows 16/17: before, a folder or symlink made the recording fail, and a FIFO hung the process for
    good (SIGTERM ignored)."""
    opts = SimOptions(count=2, size_min=20_000, size_max=20_000)
    recs = make_recordings(opts)
    with simulator_subprocess("--count", "2", "--size-min", "20000", "--size-max", "20000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [r.id for r in recs]}})
        final = tmp_path / "archive" / _final(recs[0])
        final.parent.mkdir(parents=True)
        outside = tmp_path / "outside.wav"
        outside.write_bytes(b"RIFF....WAVE" + b"x" * 100)
        if planted == "directory":
            final.mkdir()
        elif planted == "symlink":
            final.symlink_to(outside)
        else:
            os.mkfifo(final)
        result = run_cli("once", "-c", str(cfg), timeout=60)
    assert result.returncode == 0, result.stderr
    files = archive_files(tmp_path / "archive")
    contents = {r.id: recording_bytes(opts.seed, "wav", r) for r in recs}
    assert sorted(files.values()) == sorted(contents.values())
    alternate = final.with_name(f"{final.stem}~{recs[0].id}.wav")
    assert alternate.read_bytes() == contents[recs[0].id]
    assert outside.read_bytes().endswith(b"x" * 100)


def test_f12_a_fifo_as_the_queue_file_is_skipped_not_a_hang(tmp_path: Path) -> None:
    queue = tmp_path / "queue.txt"
    os.mkfifo(queue)
    cfg = write_config(tmp_path, "http://127.0.0.1:9", extra={"sources": {"queue_file": "queue.txt"}})
    result = run_cli("once", "-c", str(cfg), timeout=30)
    assert result.returncode == 0 and "queue.not_a_file" in result.stderr


# ---------------------------------------------------------------- F13
def test_f13_once_ends_when_every_download_url_is_refused(tmp_path: Path) -> None:
    """Before: a file URL that always answers 404 kept once at it for ever, burning nothing."""
    with simulator_subprocess("--count", "1", "--url-expired-rate", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}, "downloads": {"max_attempts": 2}})
        result = run_cli("once", "-c", str(cfg), timeout=90)
    assert result.returncode == 1, result.stderr
    assert [r.state for r in _rows(cfg)] == ["failed"]


# ---------------------------------------------------------------- F19
def test_f19_enqueue_and_retry_on_a_locked_ledger_say_so_without_a_traceback(tmp_path: Path) -> None:
    import sqlite3
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    path = load_config(cfg).state.path
    LedgerDb(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for args in (("enqueue", "1000"), ("retry",)):
            result = run_cli(*args, "-c", str(cfg), timeout=60)
            assert result.returncode == 1
            assert "Traceback" not in result.stderr and str(path) in result.stderr and "locked" in result.stderr
    finally:
        holder.execute("ROLLBACK")
        holder.close()
