"""Identity errors: system/information's answer decides the fate of whichever recording was claimed."""
from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from daemon.config import load_config
from daemon.runner import run_pipeline
from daemon.simoptions import SimOptions
from daemon.simulator import Simulator, _error
from tests.conftest import archive_files, write_config


class ParamFussySim(Simulator):
    """A firmware whose system/information answers a parameter error (40003) — or 60001 — for the
    API application; every other endpoint works."""

    answer = 40003

    async def system_information(self, request: web.Request) -> web.Response:
        if not self._token_ok(request):
            return _error(10004)
        return _error(self.answer)


async def _run(tmp_path: Path, answer: int) -> tuple[dict, int]:
    sim = ParamFussySim(SimOptions(count=3))
    sim.answer = answer
    await sim.start("127.0.0.1", 0)
    try:
        cfg = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings], "missing_grace_s": 0}})
        result = await asyncio.wait_for(run_pipeline(load_config(cfg), asyncio.Event(), once=True), 60)
        return result.counts, len(archive_files(tmp_path / "archive"))
    finally:
        await sim.stop()


async def test_a_system_information_parameter_error_does_not_fail_every_recording(tmp_path: Path) -> None:
    # Expected: a PBX question (pause / configuration error), never a verdict on the recordings.
    counts, _files = await _run(tmp_path, 40003)
    assert counts["failed"] == 0 and counts["missing"] == 0, counts


async def test_a_system_information_60001_does_not_mark_recordings_missing(tmp_path: Path) -> None:
    counts, _files = await _run(tmp_path, 60001)
    assert counts["failed"] == 0 and counts["missing"] == 0, counts
