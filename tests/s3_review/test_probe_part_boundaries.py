"""Probe (held up if it passes): sizes at part_size boundaries on both servers."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.s3servers import s3_server

P = 5 * 1024 * 1024


@pytest.mark.parametrize("kind", ["moto", "rclone"])
@pytest.mark.parametrize("size", [P - 1, P, P + 1, 2 * P, 2 * P + 1, 100])
async def test_boundaries(start_sim: SimFactory, tmp_path: Path, kind: str, size: int) -> None:
    sim = await start_sim(count=1, size_min=size, size_max=size)
    rec = sim.recordings[0]
    with s3_server(kind, tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]},
                                                          "archive": {"s3": server.config(part_size_bytes=P)}})
        r = await asyncio.wait_for(run_pipeline(load_config(cfg), asyncio.Event(), once=True), 60)
        assert r.counts["done"] == 1
        objs = server.objects()
        assert [v for k, v in objs.items() if not k.endswith(".json")] == [sim.content(rec)]
        if kind == "moto":  # rclone answers NoSuchUpload to a list when there are none
            assert not server.client().list_multipart_uploads(Bucket="call-recordings").get("Uploads")
        r2 = await asyncio.wait_for(run_pipeline(load_config(cfg), asyncio.Event(), once=True), 60)
        assert r2.copy_stats.copied == 0
