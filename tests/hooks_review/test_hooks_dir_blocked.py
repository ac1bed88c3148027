"""Hooks review (2): anything but a folder at archive.dir/.yeastar-archiver/hooks (a file left by a restore, an
operator's `touch`) is never cleared — ``clear_hook_names`` is ``rmtree(..., ignore_errors=True)``, which
leaves a file alone — and ``stage_for_hook`` fails (ENOTDIR) for every recording: with keep_local:
false every hook of every recording is dropped, at every start, for ever. The contract: the hook runs
once per recording when its off-box copy is verified."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config

HOOK = """
import os, sys
open(sys.argv[1], "a").write(os.environ["YEASTAR_ARCHIVER_RECORDING"] + "\\n")
"""


async def test_a_file_at_the_hooks_folder_never_drops_every_hook_for_ever(
        start_sim: SimFactory, tmp_path: Path) -> None:
    from tests.s3servers import s3_server
    sim = await start_sim(count=2)
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    runs = tmp_path / "runs.txt"
    runs.touch()
    with s3_server("moto", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"keep_local": False, "s3": server.config()},
            "hooks": {"on_archived": [sys.executable, str(script), str(runs)]}})
        cfg = load_config(cfg_path)
        marker = cfg.archive.dir / ".yeastar-archiver"
        marker.mkdir(parents=True, exist_ok=True)
        (marker / "hooks").write_text("")      # not a folder
        result = await run_pipeline(cfg, asyncio.Event(), once=True)
        assert result.counts["done"] == 2
    assert sorted(runs.read_text().split()) == sorted(str(r.id) for r in sim.recordings), \
        "every hook was dropped: the hooks' folder could not be made, and the start never cleared it"
