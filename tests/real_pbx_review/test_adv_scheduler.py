"""scheduler._not_yet findings."""
from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import archive_files, write_config


async def test_an_id_listed_before_its_file_is_ready_survives_a_search_that_ignores_ids(
        start_sim, tmp_path: Path) -> None:
    # The CDR is listed at call end, the file comes 2 s later (60001 meanwhile), and recording/search
    # ignores ids= (answers its newest recording). _not_yet asks page_size=1 and takes "another id
    # came back" as "gone": the second-newest late recording is marked missing for good.
    sim = await start_sim(count=4, late_count=2, late_s=2.0, late_listed=True, search_ignores_ids=True)
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"missing_grace_s": 30, "discover": {"enabled": True}},
        "downloads": {"backoff_base_s": 0.2, "backoff_max_s": 0.5}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    assert result.counts["missing"] == 0 and len(archive_files(tmp_path / "archive")) == 4, result.counts
