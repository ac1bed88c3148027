"""What a busy, flaky or full S3 provider does to the off-box copy: injected by a front (tests/s3front.py)
between the archiver and a real server on loopback. After each fault: every recording once in the
bucket under its own name (no alternate names, no leftover multipart uploads), nothing failed,
nothing downloaded twice."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.clock import SystemClock
from daemon.config import load_config
from daemon.logs import configure_logging
from daemon.runner import run_pipeline
from daemon.service import Health
from tests.conftest import SimFactory, run_cli, write_config
from tests.s3front import S3Front, request_kind
from tests.s3servers import BUCKET, S3Server, s3_server
from tests.test_s3 import _assert_both_hold, _once, _rel

PART = 5 * 1024 * 1024


@pytest.mark.parametrize(("method", "target", "kind"), [
    ("PUT", "/b/k.wav", "put"),
    ("PUT", "/b/k.wav?partNumber=2&uploadId=u", "part"),
    ("POST", "/b/k.wav?uploads", "create"),
    ("POST", "/b/k.wav?uploadId=u", "complete"),
    ("DELETE", "/b/k.wav?uploadId=u", "abort"),
    ("HEAD", "/b/k.wav", "head"),
    ("GET", "/b?list-type=2", "list"),
    ("GET", "/b?uploads&prefix=", "list"),
    ("GET", "/b/k.wav", "get"),
])
def test_the_front_tells_requests_apart(method: str, target: str, kind: str) -> None:
    assert request_kind(method, target) == kind


def _events(logs: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, logs.getvalue().splitlines()) if e.get("event") == name]


def _no_leftovers(server: S3Server) -> None:
    if server.kind == "moto":     # rclone cannot list multipart uploads (NoSuchUpload)
        assert not server.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    assert not [k for k in server.objects() if "~" in k], "an alternate name for our own bytes"


@pytest.mark.parametrize("kind", ["moto", "rclone"])
async def test_slowdown_and_5xx_pause_the_copies_honour_retry_after_and_fail_nothing(
        start_sim: SimFactory, tmp_path: Path, kind: str) -> None:
    sim = await start_sim(count=4, size_min=20_000, size_max=7_000_000)
    with s3_server(kind, tmp_path / "s3") as server:
        front = S3Front(server.port)
        await front.start()
        try:
            front.retry_after_s = 2
            front.add("put", "slowdown", 2)
            front.add("part", "internal", 2)
            front.add("create", "slowdown", 1)
            front.add("head", "internal", 1)
            cfg = write_config(tmp_path, sim.base_url, extra={
                "sources": {"ids": [r.id for r in sim.recordings]}, "downloads": {"pause_max_s": 0.5},
                "archive": {"s3": server.config(endpoint_url=front.endpoint_url, part_size_bytes=PART)}})
            logs = io.StringIO()
            configure_logging("json", "debug", stream=logs)
            result = await _once(cfg)
        finally:
            await front.stop()
        assert front.faulted["slowdown"] == 3 and front.faulted["internal"] == 3
        assert result.counts["done"] == 4 and result.counts["failed"] == 0
        assert result.copy_stats is not None and result.copy_stats.failed == 0
        assert sum(sim.counters.transfers_completed.values()) == 4          # no download twice
        pauses = _events(logs, "copier.paused")
        assert pauses and all(p["retry_in_s"] >= 2 for p in pauses)          # Retry-After beats pause_max_s
        assert not _events(logs, "copy.failed")
        _assert_both_hold(server, cfg, {_rel(r): sim.content(r) for r in sim.recordings})
        _no_leftovers(server)


@pytest.mark.parametrize("kind", ["moto", "rclone"])
@pytest.mark.parametrize("fault", [
    ("put", "cut_request"), ("put", "cut_answer"), ("part", "cut_request"), ("part", "cut_answer"),
    ("complete", "cut_answer"), ("create", "cut_answer"),
])
async def test_a_cut_upload_or_a_lost_answer_leaves_one_copy_under_its_own_name(
        start_sim: SimFactory, tmp_path: Path, kind: str, fault: tuple[str, str]) -> None:
    """A lost answer is the dangerous one: the server did it, the archiver does not know. It must find
    its own bytes at the key next time and adopt them, never write them again under another name."""
    sim = await start_sim(count=2, size_min=6_000_000 if fault[0] != "put" else 100_000,
                          size_max=8_000_000 if fault[0] != "put" else 200_000)
    with s3_server(kind, tmp_path / "s3") as server:
        front = S3Front(server.port)
        await front.start()
        try:
            front.add(*fault, times=1)
            cfg = write_config(tmp_path, sim.base_url, extra={
                "sources": {"ids": [r.id for r in sim.recordings]},
                "downloads": {"pause_max_s": 0.5, "backoff_base_s": 0.1, "backoff_max_s": 0.2},
                "archive": {"s3": server.config(endpoint_url=front.endpoint_url, part_size_bytes=PART,
                                                timeout_s=2)}})
            result = await _once(cfg)
        finally:
            await front.stop()
        assert front.faulted[fault[1]] == 1
        assert result.counts["done"] == 2 and result.counts["failed"] == 0
        assert sum(sim.counters.transfers_completed.values()) == 2
        _assert_both_hold(server, cfg, {_rel(r): sim.content(r) for r in sim.recordings})
        _no_leftovers(server)
        assert result.copy_stats is not None and result.copy_stats.copied + result.copy_stats.adopted == 2
        if fault == ("complete", "cut_answer"):     # done on the server, unknown to us: found, not sent again
            assert result.copy_stats.adopted == 1


async def test_a_full_bucket_pauses_the_run_says_so_and_resumes_when_there_is_room(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=3, size_min=50_000, size_max=60_000)
    with s3_server("rclone", tmp_path / "s3") as server:
        front = S3Front(server.port)
        await front.start()
        try:
            front.add("put", "quota", times=10_000)
            cfg = load_config(write_config(tmp_path, sim.base_url, extra={
                "sources": {"ids": [r.id for r in sim.recordings]}, "downloads": {"pause_max_s": 0.5},
                "archive": {"s3": server.config(endpoint_url=front.endpoint_url)}}))
            front.retry_after_s = 0
            stop = asyncio.Event()
            health = Health(SystemClock())
            task = asyncio.create_task(run_pipeline(cfg, stop, once=False, health=health))
            deadline = time.monotonic() + 30
            while True:
                ready, checks = health.readiness()
                if health.counts.get("copying", 0) == 3 and not ready and not checks["s3"]["ok"]:
                    break
                assert time.monotonic() < deadline, (health.counts, checks)
                await asyncio.sleep(0.1)
            assert "full" in json.dumps(checks["s3"]).lower()
            assert health.counts.get("failed", 0) == 0
            front.rules.clear()                                     # room again
            while health.counts.get("done", 0) < 3:
                assert time.monotonic() < deadline + 30, health.counts
                await asyncio.sleep(0.1)
            assert health.readiness()[1]["s3"]["ok"]
            stop.set()
            result = await asyncio.wait_for(task, 30)
        finally:
            await front.stop()
        assert result.counts["failed"] == 0 and front.faulted["quota"] >= 3
        assert sum(sim.counters.transfers_completed.values()) == 3
        _assert_both_hold(server, Path(str(cfg.source_path)), {_rel(r): sim.content(r) for r in sim.recordings})


async def test_expired_credentials_stop_once_with_exit_3_and_the_next_once_copies_without_downloading(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=2, size_min=50_000, size_max=60_000)
    with s3_server("moto", tmp_path / "s3") as server:
        front = S3Front(server.port)
        await front.start()
        try:
            front.add("put", "expired", times=10_000)
            cfg = write_config(tmp_path, sim.base_url, extra={
                "sources": {"ids": [r.id for r in sim.recordings]},
                "archive": {"s3": server.config(endpoint_url=front.endpoint_url)}})
            first = await asyncio.to_thread(run_cli, "once", "-c", str(cfg), timeout=60)
            assert first.returncode == 3, first.stderr
            assert "ExpiredToken" in first.stderr
            counts = json.loads((await asyncio.to_thread(run_cli, "status", "--json", "-c", str(cfg))).stdout)["counts"]
            assert counts["copying"] == 2 and counts["failed"] == 0
            front.rules.clear()                                     # new credentials
            second = await asyncio.to_thread(run_cli, "once", "-c", str(cfg), timeout=60)
            assert second.returncode == 0, second.stderr
        finally:
            await front.stop()
        assert sum(sim.counters.transfers_completed.values()) == 2
        _assert_both_hold(server, cfg, {_rel(r): sim.content(r) for r in sim.recordings})
        _no_leftovers(server)
