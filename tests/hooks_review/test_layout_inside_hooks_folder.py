"""Hooks review (2): ``archive.layout`` is accepted when it puts recordings in the daemon's own folder for hook
names (``.yeastar-archiver/hooks/...``): no ``..``, no leading ``/``, known fields — valid. Then every
start's ``clear_hook_names`` rmtree's the archive, and ``walk`` (reconcile, rebuild) never sees it.
The contract: the hooks' folder and the recordings must never be taken for each other; no recording is
lost. A layout there must be refused (or the folder kept apart) — the second start deletes every
archived recording while the ledger still says ``done``."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.errors import ConfigError
from tests.conftest import SimFactory, write_config

LAYOUT = ".yeastar-archiver/hooks/{year}/{month}/{file}"


async def test_a_layout_inside_the_hooks_folder_never_loses_the_archive_at_the_next_start(
        start_sim: SimFactory, tmp_path: Path) -> None:
    from tests.s3servers import s3_server
    sim = await start_sim(count=2)
    with s3_server("moto", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"layout": LAYOUT, "s3": server.config()}})   # keep_local: true (the default)
        # Refused before any I/O: what is there is not kept, and the archive's walk never looks there.
        with pytest.raises(ConfigError, match=r"outside \.yeastar-archiver/"):
            load_config(cfg_path)
