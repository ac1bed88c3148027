"""Hooks review: a hook that changes the file's inode metadata (a hard link into an inbox, a chmod) makes the
put-off removal (keep_local: false) think another file stands at the path: the local copy stays."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config

# Realistic hooks: hand the file to a transcription inbox by a hard link (no copy of the bytes), or
# make it readable for the transcriber's user. Neither writes a byte of the recording.
LINKER = """
import os, sys
src = os.environ["YEASTAR_ARCHIVER_PATH"]
os.link(src, os.path.join(sys.argv[1], os.environ["YEASTAR_ARCHIVER_RECORDING"] + ".wav"))
"""
CHMODDER = """
import os
os.chmod(os.environ["YEASTAR_ARCHIVER_PATH"], 0o644)
"""


@pytest.mark.parametrize("hook", ["hardlink", "chmod"])
async def test_keep_local_false_removes_the_file_after_a_hook_that_linked_or_chmodded_it(
        start_sim: SimFactory, tmp_path: Path, hook: str) -> None:
    from tests.s3servers import s3_server
    sim = await start_sim(count=2)
    script = tmp_path / "hook.py"
    script.write_text(LINKER if hook == "hardlink" else CHMODDER)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with s3_server("moto", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"keep_local": False, "s3": server.config(), "sidecar": False},
            "hooks": {"on_archived": [sys.executable, str(script), str(inbox)], "max_concurrent": 1}})
        cfg = load_config(cfg_path)
        result = await run_pipeline(cfg, asyncio.Event(), once=True)
        assert result.counts["done"] == 2
    left = [p for p in cfg.archive.dir.rglob("*") if p.is_file()
            and not p.relative_to(cfg.archive.dir).parts[0].startswith(".")]
    # keep_local: false — the staging copies must be gone once the hooks are done with them.
    assert [p for p in left if not p.name.endswith(".json")] == []
