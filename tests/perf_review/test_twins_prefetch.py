"""ADV4-2: an id row and its file-name row for the same recording, 4 workers: both rows answer
"wait" to each other (each sees the other in_progress) and are deferred together every 15 s,
forever: `once` never ends, the rows never archive. Also reproduces on the tree before 0ff6494
(pre-existing), so not caused by this change, but the change does not fix it."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import structlog

from daemon.archive import MARKER_DIR
from daemon.config import load_config
from daemon.ledger import LedgerDb, Ref
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config


@pytest.mark.parametrize("PREFETCH", [32])
async def test_twins_claimed_ahead_together(PREFETCH: int, start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=6, size_min=20_000, size_max=30_000)
    cfg_path = write_config(tmp_path, sim.base_url, extra={
        "downloads": {"workers": 4, "prefetch_urls": PREFETCH}})
    (tmp_path / "archive" / MARKER_DIR).mkdir()
    cfg = load_config(cfg_path)
    db = LedgerDb(cfg.state.path)
    refs = []
    for r in sim.recordings:
        refs += [Ref(rec_id=r.id), Ref(file=r.file)]
    db.enqueue(refs, source="cli", now=time.time())
    db.close()
    t0 = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        # Bounded, not timed: before, the twins deferred each other for ever and this never ended.
        result = await asyncio.wait_for(run_pipeline(cfg, asyncio.Event(), once=True), 90)
    took = time.monotonic() - t0
    deferred = [e for e in logs if e["event"] == "download.deferred"]
    print("took", round(took, 1), "deferred", len(deferred), result.counts, dict(sim.counters.transfers_completed))
    assert result.counts["done"] == 6
    assert all(v == 1 for v in sim.counters.transfers_completed.values())
