"""Hooks review (2): a symlink standing at archive.dir/.yeastar-archiver/hooks survives the start-up clear
(``shutil.rmtree`` refuses a symlink, the error is ignored) and ``stage_for_hook`` then makes the hook's
own name for each recording *outside the archive*, by following it (``tempfile.mkdtemp(dir=base)``).
The contract: the hook's name for the file must never escape the archive (symlinks)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config

HOOK = """
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"path": os.environ["YEASTAR_ARCHIVER_PATH"],
                        "real": os.path.realpath(os.environ["YEASTAR_ARCHIVER_PATH"])}) + "\\n")
"""


async def test_a_symlinked_hooks_folder_never_takes_the_hooks_names_outside_the_archive(
        start_sim: SimFactory, tmp_path: Path) -> None:
    from tests.s3servers import s3_server
    sim = await start_sim(count=2)
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    runs = tmp_path / "runs.jsonl"
    outside = tmp_path / "outside"     # same filesystem: the hard link works there
    outside.mkdir()
    with s3_server("moto", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"keep_local": False, "s3": server.config()},
            "hooks": {"on_archived": [sys.executable, str(script), str(runs)], "max_concurrent": 1}})
        cfg = load_config(cfg_path)
        marker = cfg.archive.dir / ".yeastar-archiver"
        marker.mkdir(parents=True, exist_ok=True)
        os.symlink(outside, marker / "hooks")
        result = await run_pipeline(cfg, asyncio.Event(), once=True)
        assert result.counts["done"] == 2
    seen = [json.loads(line) for line in runs.read_text().splitlines()]
    assert len(seen) == 2
    root = os.path.realpath(cfg.archive.dir)
    escaped = [s["real"] for s in seen if not s["real"].startswith(root + os.sep)]
    assert escaped == [], f"the hook was handed a name outside the archive: {escaped}"
