"""Every fault of the reliability spec injected on loopback, each followed by the invariants I1-I5.

Each test runs with a unique canary client secret and searches every log line (rendered through the
production redactor, tracebacks included) and the status output for it and for every token issued.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
import trustme

from daemon.config import load_config
from daemon.ledger import LedgerDb, Ref
from tests.faults.conftest import FaultRun

pytestmark = pytest.mark.faults

FIRST = 1000


@pytest.mark.parametrize("fault", ["close", "rst", "cl_short", "chunked_no_end"])
async def test_a_broken_body_never_becomes_a_file_and_is_retried(fault_run: FaultRun, fault: str) -> None:
    """Row 1: body cut (FIN, RST), fewer bytes than Content-Length, chunked body without its last chunk."""
    fault_run.raw.script[FIRST] = [fault, fault]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    assert fault_run.raw.file_requests[FIRST] == 3
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


async def test_a_short_content_length_is_caught_by_the_listing_size(fault_run: FaultRun) -> None:
    """Row 1: the server declares fewer bytes than the recording has; the listing's size exposes it."""
    rec = fault_run.sim.recordings[0]
    fault_run.raw.script[FIRST] = ["cl_long"]
    cfg = fault_run.config(ids=[])
    db = LedgerDb(load_config(cfg).state.path)
    db.enqueue([Ref(rec_id=rec.id, file=rec.file, meta=(("size", rec.size),))], source="discover", now=0)
    db.close()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1 and fault_run.raw.file_requests[FIRST] == 2
    fault_run.assert_invariants(cfg, done={FIRST})


@pytest.mark.parametrize("fault", ["silence", "trickle"])
async def test_a_stalled_or_trickling_transfer_is_aborted_and_retried(fault_run: FaultRun, fault: str) -> None:
    """Row 2: headers then silence (read timeout); 10 bytes/s (minimum throughput)."""
    fault_run.raw.script[FIRST] = [fault]
    cfg = fault_run.config(downloads={"read_timeout_s": 0.5, "min_bytes_per_second": 1000,
                                      "throughput_window_s": 0.5})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3 and fault_run.raw.file_requests[FIRST] == 2
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


@pytest.mark.parametrize(("fault", "wait_s"), [("503_seconds", 1.0), ("429_seconds", 1.0), ("503_date", 1.0)])
async def test_retry_after_is_honoured(fault_run: FaultRun, fault: str, wait_s: float) -> None:
    """Row 5: 429/503 with Retry-After in seconds or as an HTTP date."""
    fault_run.raw.script[FIRST] = [fault]
    cfg = fault_run.config(downloads={"backoff_base_s": 0.01, "backoff_max_s": 0.02})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    first, second = fault_run.raw.request_times[FIRST][:2]
    assert second - first >= wait_s * 0.9   # a lower bound: waiting longer is allowed, shorter is not
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


@pytest.mark.parametrize("fault", ["html", "empty", "json_10004"])
async def test_a_body_that_is_not_the_recording_is_never_stored(fault_run: FaultRun, fault: str) -> None:
    """Row 10: HTML, zero bytes, a JSON envelope (10004: the token is renewed and the request retried)."""
    fault_run.raw.script[FIRST] = [fault]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})
    if fault == "json_10004":
        assert fault_run.sim.counters.refreshes == 1


async def test_a_json_not_found_in_place_of_audio_asks_for_a_new_url_and_the_pbx_decides(fault_run: FaultRun) -> None:
    """Rows 10, 12 and 35: errcode 60001 where the audio should be. From the file URL it may mean the URL
    (what an expired URL answers is not documented): a new URL is asked for; only recording/download's
    60001 makes the recording missing."""
    fault_run.raw.script[FIRST] = ["json_60001"]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3 and result.stats.failed == 0
    assert fault_run.raw.file_requests[FIRST] == 2
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


async def test_a_recording_gone_from_the_pbx_ends_missing(fault_run: FaultRun) -> None:
    """Row 12: recording/download answers 60001: state missing, not retried forever."""
    fault_run.sim.delete_recording(fault_run.sim.by_id[FIRST])
    cfg = fault_run.config(ids=[1000, 1001, 1002])
    result = await fault_run.once(cfg)
    assert result.counts["missing"] == 1 and result.counts["done"] == 2
    assert fault_run.raw.file_requests[FIRST] == 0
    fault_run.assert_invariants(cfg, done={1001, 1002})


@pytest.mark.parametrize("answer", ["range_ignored", "range_wrong", "416"])
async def test_resume_never_splices_two_attempts(fault_run: FaultRun, answer: str) -> None:
    """Row 11: a resumed transfer meets a server that ignores Range, answers the wrong range, or 416."""
    # First transfer cut after a checkpoint; the second (a Range request) gets the answer under test.
    fault_run.raw.script[FIRST] = ["close", answer]
    cfg = fault_run.config(ids=[FIRST], downloads={"checkpoint_bytes": 65536})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1
    assert fault_run.raw.ranges, "the second attempt should have asked for a range"
    fault_run.assert_invariants(cfg, done={FIRST})


async def test_416_on_a_complete_temp_file_finishes_it(fault_run: FaultRun, tmp_path: Path) -> None:
    """Row 11: all bytes were on disk when the process died; the resume answers 416 and the file is
    verified and committed without transferring again."""
    rec = fault_run.sim.recordings[0]
    cfg = fault_run.config(ids=[FIRST], downloads={"checkpoint_bytes": 65536})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1
    # Rebuild the crash: the file back in its temp name with a checkpoint at its full size.
    c = load_config(cfg)
    final = next(c.archive.dir.rglob(rec.file))
    part = final.with_name(f".{final.name}.part")
    final.rename(part)
    final.with_name(final.name + ".json").unlink()
    db = LedgerDb(c.state.path)
    db.conn.execute("UPDATE recordings SET state='pending', final_path=NULL, part_path=?, part_synced=? "
                    "WHERE rec_id=?", (str(part.relative_to(c.archive.dir)), rec.size, rec.id))
    db.close()
    before = fault_run.raw.file_requests[FIRST]
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1
    assert fault_run.raw.file_requests[FIRST] == before + 1 and fault_run.raw.served["ok"] >= 2
    fault_run.assert_invariants(cfg, done={FIRST})


async def test_tokens_refused_by_every_file_url_cost_at_most_one_refresh_each(fault_run: FaultRun) -> None:
    """Row 6: the file URLs answer 10004 to several workers at once; each stale token is renewed once
    (strict single flight under 20 concurrent callers is pinned in tests/test_client.py)."""
    for rec in fault_run.sim.recordings:
        fault_run.raw.script[rec.id] = ["json_10004"]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    assert fault_run.sim.counters.refreshes <= 3   # one per stale token seen, never one per request storm
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


@pytest.mark.parametrize("when", ["downloading", "starting"])
async def test_a_read_only_archive_pauses_and_resumes(fault_run: FaultRun, tmp_path: Path, when: str) -> None:
    """Row 14: the archive's filesystem turns read-only (EROFS), then writable again: while downloading
    (the pipeline pauses), or already at start, before the archive has its marker (start-up waits)."""
    import os
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs read-only")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cfg = fault_run.config(archive={"dir": str(disk / "archive")},
                               state={"path": str(tmp_path / "state" / "ledger.db")},
                               downloads={"pause_max_s": 0.3})
        (disk / "archive").mkdir(exist_ok=True)
        if when == "downloading":
            from daemon.archive import ArchiveDir
            ArchiveDir(disk / "archive").write_marker()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        import asyncio
        sign = '"event": "pipeline.paused"' if when == "downloading" else '"event": "reconcile.failed"'

        async def writable_later() -> None:
            while sign not in fault_run.logs.getvalue():
                await asyncio.sleep(0.02)
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        result, _ = await asyncio.gather(fault_run.once(cfg), writable_later())
        assert result.counts["done"] == 3 and result.counts["failed"] == 0
        assert sign in fault_run.logs.getvalue() and "Read-only file system" in fault_run.logs.getvalue()
        files = {p.name for p in (disk / "archive").rglob("*.wav")}
        assert files == {r.file for r in fault_run.sim.recordings}
        fault_run.assert_no_secrets()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_an_expired_pbx_certificate_is_a_hard_failure(fault_run: FaultRun, tmp_path: Path) -> None:
    """Row 24: an expired certificate fails clearly; nothing falls back to no verification."""
    import datetime as dt

    from daemon.client import PbxClient
    from daemon.errors import TlsError
    from daemon.simulator import SimOptions, Simulator
    from tests.conftest import pbx_config
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                  not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC)).configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sim = Simulator(SimOptions(count=1))
    await sim.start(ssl_context=ctx)
    try:
        from daemon.config import TlsConfig
        async with PbxClient(pbx_config(sim.base_url, tls=TlsConfig(ca_file=ca_file))) as client:
            with pytest.raises(TlsError) as info:
                await client.check()
        assert "expired" in str(info.value).lower()
        assert sim.counters.logins == 0
    finally:
        await sim.stop()


def test_the_fault_server_knows_every_fault() -> None:
    from tests.faults.rawpbx import FAULTS
    assert len(set(FAULTS)) == len(FAULTS) == 20
    assert time.monotonic() > 0


# ---------------------------------------------------------------- rows 25-37
class _Foreign:
    """A server on 127.0.0.2 (another host) that records every request it gets."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.runner: object = None

    async def start(self) -> str:
        from aiohttp import web

        async def handler(request: web.Request) -> web.StreamResponse:
            self.requests.append(f"{request.method} {request.path_qs} {await request.text()}")
            return web.Response(body=b"RIFF\x00\x00\x00\x00WAVE" + bytes(200_000), content_type="audio/wav")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.2", 0).start()
        self.runner = runner
        return f"http://127.0.0.2:{runner.addresses[-1][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()  # type: ignore[attr-defined]


async def test_a_file_url_redirect_to_another_host_is_never_followed(fault_run: FaultRun) -> None:
    """Row 26: a file URL answering 302 to another host: nothing is fetched there (the token stays home),
    nothing from there is archived; the recording burns its attempts like any broken transfer."""
    foreign = _Foreign()
    fault_run.raw.foreign_url = await foreign.start() + "/stolen.wav"
    try:
        fault_run.raw.script[FIRST] = ["redirect_foreign"] * 5
        cfg = fault_run.config(downloads={"max_attempts": 2})
        result = await fault_run.once(cfg)
    finally:
        await foreign.stop()
    assert foreign.requests == []
    assert result.counts["done"] == 2 and result.counts["failed"] == 1
    assert "never followed" in fault_run.logs.getvalue()
    fault_run.assert_invariants(cfg, done={1001, 1002})


async def test_an_api_redirect_never_carries_the_secret_or_a_token_elsewhere(fault_run: FaultRun,
                                                                             tmp_path: Path) -> None:
    """Row 26: get_token answering 307 to another origin (which would get the client secret in the
    re-sent body), and a WebSocket upgrade answering 307: refused, and a configuration error (exit 2)."""
    import asyncio

    from aiohttp import web

    from daemon.client import PbxClient
    from daemon.errors import PbxConfigError
    from tests.conftest import pbx_config, run_cli, serve_on_loopback
    foreign = _Foreign()
    elsewhere = await foreign.start()

    async def pbx(request: web.Request) -> web.Response:
        if request.path.endswith("/get_token") and request.query.get("go") != "ok":
            raise web.HTTPTemporaryRedirect(f"{elsewhere}{request.path}")
        if request.path.endswith("/get_token"):
            return web.json_response({"errcode": 0, "errmsg": "SUCCESS", "access_token": "a" * 20,
                                      "refresh_token": "r" * 20, "access_token_expire_time": 1800})
        raise web.HTTPTemporaryRedirect(f"{elsewhere}{request.path_qs}")
    runner, base_url = await serve_on_loopback(pbx)
    try:
        cfg = fault_run.config()
        text = cfg.read_text().replace(fault_run.raw.base_url, base_url)
        cfg.write_text(text)
        result = await asyncio.to_thread(run_cli, "check", "-c", str(cfg))
        assert result.returncode == 2, result.stderr
        assert "307" in result.stderr and base_url in result.stderr and "never followed" in result.stderr
        result = await asyncio.to_thread(run_cli, "once", "-c", str(cfg))
        assert result.returncode == 2, result.stderr
        fault_run.outputs += [result.stdout, result.stderr]
        # The WebSocket upgrade cannot be told not to follow: the session's guard stops it.
        async with PbxClient(pbx_config(base_url + "/openapi/v1.0?go=ok".replace("/openapi/v1.0?go=ok", ""),
                                        api_path="openapi/v1.0")) as client:
            client.tokens._access = "a" * 20
            client.tokens._access_expires_at = float("inf")
            with pytest.raises(PbxConfigError, match="never followed"):
                async for _ in client.events([30012]):
                    pass
    finally:
        await runner.cleanup()
        await foreign.stop()
    assert foreign.requests == []
    fault_run.assert_no_secrets()


@pytest.mark.parametrize("length", ["declared", "chunked"])
async def test_a_huge_api_answer_fails_cleanly_in_bounded_memory(tmp_path: Path, length: str) -> None:
    """Row 31: a 200 MB get_token answer (before: read whole, 1.2 GB RSS for 400 MB) fails past 8 MiB."""
    import tracemalloc

    from aiohttp import web

    from daemon.client import PbxClient
    from daemon.errors import PbxBusyError
    from tests.conftest import pbx_config, serve_on_loopback
    size = 200 * 1024 * 1024

    async def pbx(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if length == "declared":
            resp.content_length = size
        await resp.prepare(request)
        block = b" " * (1024 * 1024)
        try:
            for _ in range(size // len(block)):
                await resp.write(block)
        except ConnectionError:
            pass
        return resp
    runner, base_url = await serve_on_loopback(pbx)
    tracemalloc.start()
    try:
        async with PbxClient(pbx_config(base_url)) as client:
            with pytest.raises(PbxBusyError, match="larger than 8 MiB"):
                await client.check()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await runner.cleanup()
    assert peak < 40 * 1024 * 1024


async def test_a_trickling_body_that_starts_like_an_envelope_is_cut_by_the_throughput_floor(
        fault_run: FaultRun) -> None:
    """Row 31: a body starting with `{` at 10 B/s. Before: the envelope peek read it with only a per-read
    timeout, for hours (and in mp3 mode held the PBX's one request)."""
    fault_run.raw.script[FIRST] = ["trickle_json"]
    cfg = fault_run.config(downloads={"read_timeout_s": 5, "min_bytes_per_second": 1000,
                                      "throughput_window_s": 0.5})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3 and fault_run.raw.file_requests[FIRST] == 2
    assert "slower than downloads.min_bytes_per_second" in fault_run.logs.getvalue()
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


async def test_a_full_disk_under_the_ledger_pauses_every_loop_and_none_dies(fault_run: FaultRun,
                                                                            tmp_path: Path) -> None:
    """Row 27: the ledger's disk fills up during `run` with discovery and the queue file busy. Every loop
    backs off and shows in readiness; once space returns, what was announced meanwhile is archived.
    Before: one SQLite error ended discovery and the queue tail for good while /readyz said ready."""
    import asyncio
    import os
    import shutil
    import subprocess

    from daemon.clock import SystemClock
    from daemon.runner import run_pipeline
    from daemon.service import Health
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "statedisk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    queue = tmp_path / "queue.txt"
    queue.write_text("")
    try:
        cfg_path = fault_run.config(ids=[FIRST], state={"path": str(disk / "ledger.db")},
                                    sources={"queue_file": str(queue), "queue_poll_interval_s": 0.1,
                                             "discover": {"enabled": True, "interval_s": 1}},
                                    downloads={"pause_max_s": 0.5})
        cfg = load_config(cfg_path)
        health = Health(SystemClock())
        stop = asyncio.Event()
        task = asyncio.create_task(run_pipeline(cfg, stop, once=False, health=health))

        async def until(predicate: object, within: float = 30) -> None:
            deadline = time.monotonic() + within
            while not predicate():  # type: ignore[operator]
                assert time.monotonic() < deadline, health.readiness()
                await asyncio.sleep(0.05)

        def done() -> int:
            return health.counts.get("done", 0)
        await until(lambda: done() == 3)           # discovery's back-fill found the other two
        filler = disk / "filler"
        # Unbuffered: a buffered file keeps the bytes of the last short write and raises ENOSPC again
        # when it is closed, whenever the free space is not a multiple of the write size.
        with filler.open("wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        new = await fault_run.sim.add_recording()   # discovery will see it; the queue names another one
        queue.write_text(f"{new.id}\n{FIRST}\n")
        await until(lambda: set(health.loops.failing(local_only=True)) >= {"queue", "discover.poll"})
        ready, checks = health.readiness()
        assert not ready and not checks["loops"]["ok"]
        assert "full" in checks["loops"]["failing"]["queue"]["error"]
        filler.unlink()
        await until(lambda: done() == 4 and health.readiness()[0], within=60)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 30)
        fault_run.assert_invariants(cfg_path, done={1000, 1001, 1002, new.id})
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
