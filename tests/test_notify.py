"""Webhook notifications against a loopback receiver: failures, pauses, recoveries, summaries; no secrets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from daemon.clock import SystemClock
from daemon.config import load_config
from daemon.notify import copy_pause_kind, message, pause_kind, should_announce_pause
from daemon.runner import run_pipeline
from daemon.service import Health
from tests.conftest import SimFactory, serve_on_loopback, write_config


@pytest.mark.parametrize(("reason", "kind"), [
    (None, None), ("FatalAuthError", "auth"), ("StorageError", "disk"), ("PbxUnavailableError", "pbx"),
    ("TokenLimitError", "pbx"), ("PbxBusyError", "pbx"),
])
def test_pause_kind(reason: str | None, kind: str | None) -> None:
    assert pause_kind(reason) == kind


@pytest.mark.parametrize(("kind", "paused_for", "after", "announce"), [
    ("auth", 0, 600, True), ("disk", 0, 600, True), ("pbx", 599, 600, False), ("pbx", 600, 600, True),
])
def test_when_a_pause_is_announced(kind: str, paused_for: float, after: float, announce: bool) -> None:
    assert should_announce_pause(kind, paused_for, after) is announce


def test_messages_carry_text_and_no_secret() -> None:
    body = message("recording.failed", 0, recording="7", reason="GET /x?access_token=SeCrEt-123 failed")
    assert body["event"] == "recording.failed" and body["text"].startswith("yeastar-archiver: recording 7 failed")
    assert "SeCrEt-123" not in json.dumps(body)


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail_next = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=503)
        self.bodies.append(await request.json())
        return web.Response(status=204)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [b for b in self.bodies if b["event"] == name]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    runner, base = await serve_on_loopback(rec.handle)
    yield rec, f"{base}/hook"
    await runner.cleanup()


async def _until(predicate, limit_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(wait(), limit_s)


async def test_failed_recordings_pbx_outages_recoveries_and_summaries_reach_the_webhook(
        start_sim: SimFactory, tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.fail_next = 1  # the receiver hiccups once: the message is tried again
    sim = await start_sim(count=4, size_min=100_000, size_max=100_000)
    port = int(sim.base_url.rsplit(":", 1)[1])
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [1000, 1001, 1002, 1003, 424242]},
        "downloads": {"max_attempts": 1, "pause_max_s": 0.3},
        "service": {"pbx_probe_interval_s": 0.2},
        "notify": {"url": url, "pbx_down_after_s": 0.5, "summary_interval_s": 1}})
    sim.control(options={"cut_rate": 1.0})   # every transfer is cut: with one attempt each, they fail
    health = Health(SystemClock())
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False, health=health))
    await _until(lambda: len(rec.events("recording.failed")) == 4)
    await _until(lambda: len(rec.events("summary")) >= 1)
    sim.control(options={"cut_rate": 0.0})
    await sim.stop()
    assert health.pipeline is not None
    await health.pipeline.ledger.call(lambda db: db.retry(None, now=0))   # work to find the PBX gone
    await _until(lambda: len(rec.events("pipeline.paused")) == 1)
    await sim.start("127.0.0.1", port)
    await _until(lambda: len(rec.events("pipeline.recovered")) == 1)
    stop.set()
    await asyncio.wait_for(task, 30)
    paused = rec.events("pipeline.paused")[0]
    assert paused["kind"] == "pbx" and "text" in paused
    assert {b["recording"] for b in rec.events("recording.failed")} == {"1000", "1001", "1002", "1003"}
    assert rec.events("summary")[0]["failed"] == 4 and rec.events("summary")[0]["missing"] == 1
    everything = json.dumps(rec.bodies)
    for secret in [sim.opts.client_secret, *sim.tokens]:
        assert secret not in everything


async def test_refused_credentials_are_announced_at_once(start_sim: SimFactory, tmp_path: Path,
                                                         receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    sim = await start_sim(count=1)
    cfg = write_config(tmp_path, sim.base_url, secret="wrong-secret-value", extra={
        "sources": {"ids": [1000]}, "notify": {"url": url, "pbx_down_after_s": 3600}})
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False))
    await _until(lambda: len(rec.events("pipeline.paused")) == 1)
    stop.set()
    await asyncio.wait_for(task, 30)
    paused = rec.events("pipeline.paused")[0]
    assert paused["kind"] == "auth" and "rejected the client id or secret" in paused["reason"]
    assert "wrong-secret-value" not in json.dumps(rec.bodies)


@pytest.mark.parametrize(("reason", "kind"), [
    (None, None), ("DestinationUnavailableError", "unreachable"), ("DestinationRefusedError", "refused"),
    ("DestinationConfigError", "config"), ("DestinationFullError", "full"), ("LedgerError", "disk"),
    ("KeyError", "error"),
])
def test_copy_pause_kind(reason: str | None, kind: str | None) -> None:
    assert copy_pause_kind(reason) == kind


async def test_an_s3_outage_and_a_verify_walk_that_finds_damage_reach_the_webhook(
        start_sim: SimFactory, tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    from daemon.ledger import Ref
    from daemon.verify import Verifier
    from tests.s3servers import SECRET_KEY, s3_server
    rec, url = receiver
    sim = await start_sim(count=3, size_min=40_000, size_max=40_000)
    with s3_server("rclone", tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [1000, 1001]}, "archive": {"s3": server.config(timeout_s=1)},
            "downloads": {"pause_max_s": 0.3}, "notify": {"url": url, "pbx_down_after_s": 0.5}})
        health = Health(SystemClock())
        stop = asyncio.Event()
        task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False, health=health))
        await _until(lambda: health.counts.get("done", 0) == 2)
        p = health.pipeline
        assert p is not None and p.copier is not None
        server.stop()
        await p.ledger.call(lambda db: db.enqueue([Ref(rec_id=1002)], source="test", now=0))
        p.scheduler.notify()
        await _until(lambda: len(rec.events("copy.paused")) == 1)
        server.start()
        await _until(lambda: len(rec.events("copy.recovered")) == 1)
        await _until(lambda: health.counts.get("done", 0) == 3)
        damaged = tmp_path / "archive" / str((await p.ledger.call(lambda db: db.rows()))[0].final_path)
        damaged.write_bytes(b"RIFF")
        await Verifier(p.ledger, p.downloader.archive, SystemClock(), dest=p.copier.dest).run()
        await _until(lambda: len(rec.events("verify.problems")) == 1)
        stop.set()
        await asyncio.wait_for(task, 30)
    paused = rec.events("copy.paused")[0]
    assert paused["kind"] == "unreachable" and paused["destination"] == "s3" and "cannot reach" in paused["reason"]
    found = rec.events("verify.problems")[0]
    assert found["problems"] == 1 and found["checked"] == 3 and "verify found 1" in found["text"]
    assert SECRET_KEY not in json.dumps(rec.bodies)
