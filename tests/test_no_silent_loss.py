"""Paths to a wrong, lost or resurrected recording, each pinned on loopback with real files and a real ledger.

Every test here failed on the code before the fix it names (issue "No silent loss"); the invariants
I1-I4 are checked after each through the same helpers the fault suite uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from daemon.archive import MARKER_DIR, MARKER_FILE, Naming, final_relpath
from daemon.config import load_config
from daemon.ledger import LedgerDb, Ref
from daemon.runner import RunResult, run_pipeline
from daemon.simulator import SimOptions, Simulator, make_recordings
from tests.conftest import (
    REPO,
    SimFactory,
    archive_files,
    cli_env,
    run_cli,
    serve_on_loopback,
    sim_counters,
    simulator_subprocess,
    write_config,
)


async def _once(cfg_path: Path, **kwargs: Any) -> RunResult:
    return await run_pipeline(load_config(cfg_path), asyncio.Event(), once=True, **kwargs)


def _expected(sim: Simulator, ids: set[int] | None = None) -> dict[str, bytes]:
    now = dt.datetime.now(dt.UTC)
    return {str(final_relpath("{year}/{month}/{day}/{file}", Naming(r.id, r.file, r.call_type), now)):
            sim.content(r) for r in sim.recordings if ids is None or r.id in ids}


def _rows(cfg_path: Path) -> list[Any]:
    db = LedgerDb(load_config(cfg_path).state.path)
    try:
        return db.rows()
    finally:
        db.close()


def _assert_ledger_matches_disk(cfg_path: Path) -> None:
    """I4: every done row's file is on disk with its size and sha256, and every archived file has one row."""
    cfg = load_config(cfg_path)
    files = archive_files(cfg.archive.dir)
    done = [r for r in _rows(cfg_path) if r.state == "done"]
    assert sorted(r.final_path for r in done) == sorted(files)
    for r in done:
        data = files[r.final_path]
        assert (r.bytes, r.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def _enqueue(cfg_path: Path, refs: list[Ref]) -> None:
    db = LedgerDb(load_config(cfg_path).state.path)
    try:
        db.enqueue(refs, source="cli", now=time.time())
    finally:
        db.close()


# ---------------------------------------------------------------- 1. one recording named twice
async def test_an_id_and_its_file_name_before_it_resolves_give_one_row_one_transfer_one_whole_copy(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 1 (row 25): the same recording as a config id and as a file name (enqueue), two workers.
    Before: two rows shared one temp file and a truncated file was committed as done."""
    sim = await start_sim(count=1, size_min=4_000_000, size_max=4_000_000, bytes_per_second=4_000_000)
    rec = sim.recordings[0]
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]}, "downloads": {"workers": 2}})
    (tmp_path / "archive" / MARKER_DIR).mkdir()
    _enqueue(cfg, [Ref(file=rec.file)])
    result = await _once(cfg)
    assert result.counts == {"pending": 0, "in_progress": 0, "done": 1, "failed": 0, "missing": 0, "copying": 0,
                             "forgotten": 0}
    rows = _rows(cfg)
    assert [(r.key, r.state) for r in rows] == [(f"id:{rec.id}", "done")]
    assert archive_files(tmp_path / "archive") == _expected(sim)
    assert sim.counters.transfers_completed[rec.id] == 1
    assert not list((tmp_path / "archive").rglob("*.part")) and not list((tmp_path / "archive").rglob("*~*"))
    _assert_ledger_matches_disk(cfg)


@pytest.mark.parametrize("second", ["name", "id"])
async def test_the_second_name_for_a_recording_in_transfer_waits_and_takes_its_result(
        start_sim: SimFactory, tmp_path: Path, second: str) -> None:
    """Item 1 (row 25), in run: the other name arrives while the first transfer is in flight."""
    sim = await start_sim(count=1, size_min=3_000_000, size_max=3_000_000, bytes_per_second=2_000_000)
    rec = sim.recordings[0]
    cfg_path = write_config(tmp_path, sim.base_url, extra={"downloads": {"workers": 2}})
    first, other = (Ref(rec_id=rec.id), Ref(file=rec.file)) if second == "name" else \
        (Ref(file=rec.file), Ref(rec_id=rec.id))
    cfg = load_config(cfg_path)
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(cfg, stop, once=False))
    while not (cfg.state.path.exists() and sim.counters.in_flight):
        await asyncio.sleep(0.01)
        if not _rows(cfg_path):
            _enqueue(cfg_path, [first])
    db = LedgerDb(cfg.state.path)
    db.enqueue_many([other], source="queue", now=time.time())   # as the queue file or enqueue would
    db.close()
    while {r.state for r in _rows(cfg_path)} != {"done"}:
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 30)
    rows = _rows(cfg_path)
    assert len(rows) == 1 and rows[0].state == "done"
    assert sim.counters.transfers_completed[rec.id] == 1
    assert archive_files(tmp_path / "archive") == _expected(sim)
    _assert_ledger_matches_disk(cfg_path)


# ---------------------------------------------------------------- 3. the archive is not the ledger's
def _archive_once(tmp_path: Path, base_url: str, ids: list[int]) -> Path:
    cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": ids},
                                                   "state": {"path": str(tmp_path / "state" / "ledger.db")}})
    done = run_cli("once", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    return cfg


def test_an_unmounted_emptied_or_foreign_archive_is_exit_6_and_keeps_the_evidence(tmp_path: Path) -> None:
    """Item 3 (row 29): with the ledger elsewhere, an archive folder that is missing, emptied or another
    archive's is refused (exit 6); nothing is downloaded into it and every done row keeps its sha256.
    Before: everything was re-queued with sha256 NULL and downloaded into the bare mount point."""
    opts = SimOptions(count=3)
    ids = [r.id for r in make_recordings(opts)]
    with simulator_subprocess("--count", "3") as base_url:
        cfg = _archive_once(tmp_path, base_url, ids)
        before = _rows(cfg)
        assert [r.state for r in before] == ["done"] * 3 and all(r.sha256 for r in before)
        served = sum(sim_counters(base_url)["transfers_completed"].values())
        archive = tmp_path / "archive"
        marker = (archive / MARKER_DIR / MARKER_FILE).read_text()

        shutil.rmtree(archive)                                          # unmounted: the folder is gone
        result = run_cli("once", "-c", str(cfg))
        assert result.returncode == 6, result.stderr
        assert "does not exist" in result.stderr and not archive.exists()

        archive.mkdir()                                                 # the bare mount point
        result = run_cli("once", "-c", str(cfg))
        assert result.returncode == 6, result.stderr
        assert "is the archive disk mounted" in result.stderr
        assert list(archive.iterdir()) == []                            # nothing written into it

        (archive / MARKER_DIR).mkdir()                                  # another archive's disk
        (archive / MARKER_DIR / MARKER_FILE).write_text("not-" + marker)
        result = run_cli("once", "-c", str(cfg))
        assert result.returncode == 6 and "another archive" in result.stderr

        run_cli("status", "-c", str(cfg))
        after = _rows(cfg)
        assert [(r.key, r.state, r.final_path, r.sha256) for r in after] == \
            [(r.key, r.state, r.final_path, r.sha256) for r in before]
        assert sum(sim_counters(base_url)["transfers_completed"].values()) == served


def test_enqueue_and_status_never_create_a_missing_archive_folder(tmp_path: Path) -> None:
    """Item 3: the default ledger lives inside archive.dir; with it unmounted, enqueue must not make it."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    shutil.rmtree(tmp_path / "archive")
    result = run_cli("enqueue", "1000", "-c", str(cfg))
    assert result.returncode != 0
    assert run_cli("status", "-c", str(cfg)).returncode == 0
    assert not (tmp_path / "archive").exists()


async def test_a_vanished_file_is_fetched_again_and_its_old_sha256_is_the_proof(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 3: a done row whose file vanished keeps its sha256; an identical copy put back is adopted by it."""
    sim = await start_sim(count=2)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000, 1001]}})
    await _once(cfg)
    files = archive_files(tmp_path / "archive")
    first, second = sorted(files)
    (tmp_path / "archive" / first).unlink()
    saved = (tmp_path / "archive" / second).read_bytes()
    (tmp_path / "archive" / second).unlink()
    served = sum(sim.counters.transfers_completed.values())
    db = LedgerDb(load_config(cfg).state.path)
    from daemon.archive import ArchiveDir
    from daemon.reconcile import reconcile
    report = reconcile(db, ArchiveDir(tmp_path / "archive"), now=time.time(), skip=(tmp_path / "archive" / MARKER_DIR))
    rows = {r.final_path: r for r in db.rows()}
    db.close()
    assert sorted(report.vanished) == [first, second]
    assert all(rows[p].state == "pending" and rows[p].sha256 for p in (first, second))
    (tmp_path / "archive" / second).write_bytes(saved)     # an operator restores one from a backup
    result = await _once(cfg)
    assert result.counts["done"] == 2
    assert sum(sim.counters.transfers_completed.values()) == served + 1   # only the lost one crossed the wire
    assert result.stats.adopted == 1
    assert archive_files(tmp_path / "archive") == _expected(sim)
    _assert_ledger_matches_disk(cfg)


# ---------------------------------------------------------------- 5. a few always-failing recordings
async def test_a_few_always_failing_recordings_never_starve_the_healthy_ones(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 5 (row 28): 3 recordings whose download always answers HTTP 500, 7 good ones, one worker.
    Before: the same bad row was claimed first after every pause: 0 archived, then "gave up"."""
    sim = await start_sim(count=10, fail_ids=(1000, 1001, 1002))
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [r.id for r in sim.recordings]},
        "downloads": {"workers": 1, "max_attempts": 4, "backoff_base_s": 0.05, "backoff_max_s": 0.2,
                      "pause_max_s": 0.3, "once_give_up_s": 30}})
    result = await _once(cfg)
    assert result.counts["done"] == 7 and result.counts["failed"] == 3
    assert not result.gave_up
    assert archive_files(tmp_path / "archive") == _expected(sim, {r.id for r in sim.recordings} - {1000, 1001, 1002})
    failed = {r.rec_id: r.attempts for r in _rows(cfg) if r.state == "failed"}
    assert failed == {1000: 4, 1001: 4, 1002: 4}
    _assert_ledger_matches_disk(cfg)


# ---------------------------------------------------------------- 6. a stub at the final name
async def test_a_stub_that_merely_looks_like_audio_is_never_adopted(start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 6 (row 32): a 1 KB RIFF stub at the final name, no listing size: the recording is downloaded
    and kept beside it; the stub is left alone. Before: the stub was adopted as the recording."""
    sim = await start_sim(count=1, size_min=60_000, size_max=60_000)
    rec = sim.recordings[0]
    rel = next(iter(_expected(sim)))
    stub = tmp_path / "archive" / rel
    stub.parent.mkdir(parents=True)
    stub.write_bytes(b"RIFF\x00\x04\x00\x00WAVEfmt " + bytes(1024 - 16))
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]}})
    result = await _once(cfg)
    assert result.counts["done"] == 1 and result.stats.adopted == 0
    assert stub.read_bytes()[:4] == b"RIFF" and stub.stat().st_size == 1024
    alt = stub.with_name(f"{stub.stem}~{rec.id}.wav")
    assert alt.read_bytes() == sim.content(rec)
    row = _rows(cfg)[0]
    assert row.final_path == str(Path(rel).with_name(alt.name))


# ---------------------------------------------------------------- 7. the rebuild is not skipped
async def test_a_ledger_made_by_enqueue_before_the_first_run_is_still_rebuilt_from_the_archive(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 7: the ledger was deleted; `enqueue` makes a new one before the first run. Before: the rebuild
    was skipped because the ledger file existed, and the archived recordings went untracked."""
    sim = await start_sim(count=4)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]}})
    await _once(cfg)
    state = load_config(cfg).state.path
    for p in state.parent.glob(state.name + "*"):
        p.unlink()
    enq = await asyncio.to_thread(run_cli, "enqueue", "1000", "-c", str(cfg))
    assert enq.returncode == 0, enq.stderr
    cfg2 = write_config(tmp_path, sim.base_url)   # no config ids now: only what the ledger knows
    served = sum(sim.counters.transfers_completed.values())
    result = await _once(cfg2)
    assert result.reconcile.rebuilt == 4 and result.reconcile.rebuild_complete
    assert result.counts["done"] == 4
    assert sum(sim.counters.transfers_completed.values()) == served
    _assert_ledger_matches_disk(cfg2)


# ---------------------------------------------------------------- 8. reconcile never crashes on one file
async def test_a_file_reconcile_cannot_check_or_mend_is_reported_and_the_run_goes_on(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 8: a symlinked day folder (an operator moved it to another disk) and a done row whose folder
    became a file. Before: the OSError crashed run into a restart loop."""
    sim = await start_sim(count=3)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]}})
    await _once(cfg)
    files = sorted(archive_files(tmp_path / "archive"))
    moved = tmp_path / "archive" / Path(files[0]).parent
    elsewhere = tmp_path / "other-disk"
    shutil.move(str(moved), str(elsewhere))
    moved.symlink_to(elsewhere, target_is_directory=True)
    for sidecar in elsewhere.glob("*.json"):
        sidecar.unlink()                           # reconcile would like to write them back
    db = LedgerDb(load_config(cfg).state.path)
    db.enqueue_many([Ref(rec_id=4242)], source="t", now=0)
    db.conn.execute("UPDATE recordings SET state = 'done', final_path = ?, bytes = 1, sha256 = 'x' WHERE key = "
                    "'id:4242'", (f"{files[0]}.json/inner.wav",))
    db.close()
    with structlog.testing.capture_logs() as logs:
        result = await _once(cfg)
    assert result.reconcile.errors >= 2
    assert {e["path"] for e in logs if e["event"] == "reconcile.file_error"} >= {files[0], f"{files[0]}.json/inner.wav"}
    assert not list(elsewhere.glob("*.json"))     # nothing written through the symlink
    assert result.counts["failed"] == 0


# ---------------------------------------------------------------- 12. an untrusted certificate
async def test_once_against_an_untrusted_certificate_exits_4_at_once(tmp_path: Path) -> None:
    """Item 12: no retry loop (before: still retrying after 180 s); the message names pbx.tls.ca_file."""
    import ssl

    import trustme
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    sim = Simulator(SimOptions(count=2))
    await sim.start(ssl_context=ctx)
    try:
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000, 1001]}})
        started = time.monotonic()
        result = await asyncio.to_thread(run_cli, "once", "-c", str(cfg))
        assert result.returncode == 4, result.stderr
        assert "pbx.tls.ca_file" in result.stderr
        assert time.monotonic() - started < 20
        assert sim.counters.logins == 0
    finally:
        await sim.stop()


async def test_run_against_an_untrusted_certificate_stays_up_not_ready_and_tells_the_webhook_at_once(
        tmp_path: Path) -> None:
    """Item 12: run stays up, /readyz says "certificate", the webhook hears of it without waiting."""
    import ssl

    import trustme

    from daemon.service import Health
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    sim = Simulator(SimOptions(count=2))
    await sim.start(ssl_context=ctx)
    heard: list[dict[str, Any]] = []

    async def receiver(request: web.Request) -> web.Response:
        heard.append(await request.json())
        return web.json_response({})
    runner, hook = await serve_on_loopback(receiver)
    try:
        cfg = load_config(write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [1000]}, "notify": {"url": hook, "pbx_down_after_s": 3600}}))
        health = Health(__import__("daemon.clock", fromlist=["SystemClock"]).SystemClock())
        stop = asyncio.Event()
        task = asyncio.create_task(run_pipeline(cfg, stop, once=False, health=health))
        deadline = time.monotonic() + 20
        while not any(h.get("kind") == "certificate" for h in heard):
            assert time.monotonic() < deadline, heard
            await asyncio.sleep(0.05)
        ready, checks = health.readiness()
        assert not ready and "certificate" in checks["pbx"]["reason"]
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        await runner.cleanup()
        await sim.stop()


# ---------------------------------------------------------------- 13. once interrupted
def _start_once(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())


def _wait_for_transfer(base_url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sim_counters(base_url)["in_flight"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_once_stopped_by_sigterm_with_work_left_exits_5_and_says_how_many_are_left(tmp_path: Path) -> None:
    """Item 13 (row 37): before, exit 0 with 13 pending. The next once finishes the job."""
    with simulator_subprocess("--count", "12", "--size-min", "400000", "--size-max", "400000",
                              "--bytes-per-second", "400000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": list(range(1000, 1012))},
                                                      "downloads": {"workers": 2},
                                                      "service": {"shutdown_grace_s": 10}})
        proc = _start_once(cfg)
        _wait_for_transfer(base_url)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 5, err
        assert "recording(s) left" in err and "run once again" in err
        assert run_cli("once", "-c", str(cfg), timeout=120).returncode == 0
        assert json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]["done"] == 12


def test_a_second_sigint_ends_the_grace_wait_at_once(tmp_path: Path) -> None:
    """Item 13: Ctrl-C twice means now: in-flight transfers are abandoned cleanly, not waited for."""
    with simulator_subprocess("--count", "2", "--size-min", "5000000", "--size-max", "5000000",
                              "--bytes-per-second", "100000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001]},
                                                      "downloads": {"min_bytes_per_second": 0},
                                                      "service": {"shutdown_grace_s": 60}})
        proc = _start_once(cfg)
        _wait_for_transfer(base_url)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 15          # not the 60 s of grace, nor the 50 s transfers
        assert proc.returncode == 5, err
        assert not [p for p in (tmp_path / "archive").rglob("*.wav")]   # nothing half-written under a final name


# ---------------------------------------------------------------- low: pool, stop deadline, webhook URL
async def test_the_connection_pool_is_sized_from_the_workers(start_sim: SimFactory, tmp_path: Path) -> None:
    """Low: 40 workers with long transfers and a 2 s connect timeout. Before: a pool of 32, and the 8
    workers waiting for it timed out as "PBX unreachable" and paused everything."""
    sim = await start_sim(count=40, size_min=1_500_000, size_max=1_500_000, bytes_per_second=500_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                      "pbx": {"timeout_s": 2},
                                                      "downloads": {"workers": 40}})
    result = await _once(cfg)
    assert result.counts["done"] == 40
    assert result.stats.pauses == 0 and "PbxUnavailableError" not in result.stats.errors
    assert sim.counters.max_concurrency > 32


class _Relay:
    """A TCP relay in front of the simulator that can fall silent: once ``silent`` is set, it accepts
    every new connection and never answers (a PBX that hangs), so del_token would wait its timeout."""

    def __init__(self, target: str) -> None:
        import socket
        import threading
        from urllib.parse import urlsplit
        parts = urlsplit(target)
        self.target = (str(parts.hostname), int(parts.port or 80))
        self.silent = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.open: list[socket.socket] = []      # every socket made, closed by close()
        self.threads: list[threading.Thread] = []
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        import threading
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        import socket
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.open.append(conn)
            if self.silent.is_set():
                continue                        # held open, never answered
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                continue
            self.open.append(upstream)
            self._start(self._pipe, conn, upstream)
            self._start(self._pipe, upstream, conn)

    @staticmethod
    def _pipe(a: Any, b: Any) -> None:
        import socket
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        import socket
        self.sock.close()
        for c in self.open:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self.threads:
            t.join(timeout=5)


def test_the_whole_stop_is_bounded_even_when_the_pbx_stops_answering(tmp_path: Path) -> None:
    """Low: against a PBX that stops answering, grace + notifier + del_token once added up to a minute,
    past TimeoutStopSec=45. Now the stop takes at most the grace time plus 10 s."""
    with simulator_subprocess("--count", "1", "--size-min", "3000000", "--size-max", "3000000",
                              "--bytes-per-second", "100000") as sim_url:
        relay = _Relay(sim_url)
        cfg = write_config(tmp_path, relay.base_url, extra={
            "sources": {"ids": [1000]}, "pbx": {"timeout_s": 30},
            "downloads": {"min_bytes_per_second": 0},
            "service": {"shutdown_grace_s": 2}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
        _wait_for_transfer(sim_url)
        relay.silent.set()           # from now on the PBX accepts and says nothing: del_token will hang
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
        elapsed = time.monotonic() - started
        relay.close()
    assert proc.returncode == 0, err
    assert "token.revoke_timed_out" in err
    assert elapsed < 2 + 10 + 3, elapsed      # grace + STOP_TAIL_S + start-up noise


def test_the_webhook_url_is_redacted_wherever_it_would_show() -> None:
    """Low: Slack/Teams webhook URLs are credentials. Whatever puts one in a log line (an aiohttp error
    for an invalid URL, a traceback), the line carries neither the URL nor its secret path."""
    import io

    from daemon.client import Webhook
    from daemon.logs import configure_logging
    url = "https://hooks.example.org/services/T0000/B0000/XXXXsecretXXXXtoken"
    Webhook(url, 1.0, "test")
    out = io.StringIO()
    configure_logging("json", "debug", stream=out)
    log = structlog.get_logger("test")
    log.warning("notify.failed", error=f"webhook: InvalidUrlClientError: {url}")
    log.warning("notify.failed", error="yarl says /services/T0000/B0000/XXXXsecretXXXXtoken is odd")
    text = out.getvalue()
    assert text.count("[REDACTED]") == 2 and "XXXXsecretXXXXtoken" not in text


def test_the_units_require_the_archive_mount_and_never_restart_into_a_wrong_archive() -> None:
    for unit in ("yeastar-archiver.service", "yeastar-archiver@.service"):
        text = (REPO / "systemd" / unit).read_text()
        settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
        assert settings["RequiresMountsFor"].startswith("/srv/recordings")
        assert "6" in settings["RestartPreventExitStatus"].split()


def test_a_secret_file_readable_by_anyone_is_exit_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    (tmp_path / "client_secret").chmod(0o644)
    result = run_cli("check", "-c", str(cfg))
    assert result.returncode == 2 and "pbx.client_secret_file" in result.stderr
    assert os.access(tmp_path / "client_secret", os.R_OK)
