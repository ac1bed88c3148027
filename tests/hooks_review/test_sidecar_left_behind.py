"""Hooks review: keep_local: false leaves the sidecar for ever when the audio file went first.

A hook that takes the file it is given (moves it into its inbox), an operator's `rm`, or a crash
between the release's two unlinks: the put-off removal sees no file at the path and returns without
removing the sidecar, and reconcile only finishes a removal whose *audio* file is still there. The
sidecar stays in the staging folder across every restart."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config

MOVER = """
import os, shutil, sys
src = os.environ["YEASTAR_ARCHIVER_PATH"]
shutil.move(src, os.path.join(sys.argv[1], os.path.basename(src)))
"""


async def test_keep_local_false_leaves_no_sidecar_behind_when_the_hook_took_the_file(
        start_sim: SimFactory, tmp_path: Path) -> None:
    from tests.s3servers import s3_server
    sim = await start_sim(count=2)
    script = tmp_path / "hook.py"
    script.write_text(MOVER)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with s3_server("moto", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"keep_local": False, "s3": server.config(), "sidecar": True},
            "hooks": {"on_archived": [sys.executable, str(script), str(inbox)], "max_concurrent": 1}})
        cfg = load_config(cfg_path)
        result = await run_pipeline(cfg, asyncio.Event(), once=True)
        assert result.counts["done"] == 2
        # The next start: its reconcile finishes what a removal left.
        again = await run_pipeline(cfg, asyncio.Event(), once=True)
        assert again.counts["done"] == 2
    assert len(list(inbox.iterdir())) == 2
    left = [p for p in cfg.archive.dir.rglob("*") if p.is_file()
            and not p.relative_to(cfg.archive.dir).parts[0].startswith(".")]
    assert left == [], "sidecars of recordings whose local copy went are left in the staging folder"
