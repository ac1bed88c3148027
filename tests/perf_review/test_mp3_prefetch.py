"""ADV4-1: prefetch breaks the mp3 one-request rule even with ONE worker.

pbx.recording_format: wav, but the PBX serves mp3 (sim mp3_transcode). With workers: 1 the
archiver used to make exactly one request at a time (resolve, then transfer, sequentially), so
the first mp3 body closed the gate before any second request. Now the scheduler claims
prefetch_urls (32) rows ahead and fires 32 recording/download calls at once at start-up.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config


@pytest.mark.parametrize("PREFETCH", [0, 32])
async def test_one_worker_wav_configured_mp3_served_never_two_requests(PREFETCH: int, start_sim: SimFactory,
                                                                      tmp_path: Path) -> None:
    sim = await start_sim(count=12, size_min=50_000, size_max=60_000, mp3_transcode="mp3-name",
                          resolve_delay_s=0.05)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                      "pbx": {"recording_format": "wav"},
                                                      "downloads": {"workers": 1, "prefetch_urls": PREFETCH}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    assert result.counts["done"] == 12
    # one worker: before the change, strictly one request at a time
    assert sim.counters.max_concurrency == 1, sim.counters
    assert sim.counters.mp3_violations == 0, sim.counters
