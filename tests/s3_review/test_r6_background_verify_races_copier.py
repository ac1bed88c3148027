"""R6 (keep_local: false, `run` with verify.interval_s): the background verify takes a snapshot of the
archived rows (done AND copying, local_kept = 1) and then walks them slowly (max_bytes_per_second). The
copier, meanwhile, copies the 'copying' ones and removes their local files. When the walk reaches such a
row it reports a false "local vanished" problem and "mends" it by restoring the file from the bucket —
so the staging area refills with files the ledger says are gone (local_kept = 0), and the last verify
report (status, metric yeastar_archiver_verify_problems, alerts) shows problems that do not exist.
(If the restore fails — S3 busy — the recording is even re-queued to the PBX.)

The interval is set below the config's 60 s floor only to keep the test short; the race is the same with
interval_s: 3600 and a walk that lasts hours."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

from daemon.config import VerifyConfig, load_config
from daemon.ledger import LedgerDb
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, archive_files, write_config
from tests.s3servers import s3_server


async def test_background_verify_does_not_resurrect_removed_local_copies(start_sim: SimFactory,
                                                                        tmp_path: Path) -> None:
    sim = await start_sim(count=4, size_min=200_000, size_max=200_000)
    with s3_server("rclone", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "downloads": {"once_give_up_s": 1, "pause_max_s": 0.3},
            "archive": {"keep_local": False, "s3": server.config(timeout_s=1)}})
        server.stop()
        r1 = await run_pipeline(load_config(cfg_path), asyncio.Event(), once=True)   # S3 down: all 'copying'
        assert r1.counts["copying"] == 4
        cfg = dataclasses.replace(load_config(cfg_path),
                                  verify=VerifyConfig(interval_s=0.3, max_bytes_per_second=100_000))
        stop = asyncio.Event()
        task = asyncio.create_task(run_pipeline(cfg, stop, once=False))
        await asyncio.sleep(1.0)            # the walk has started (snapshot taken), the copier is paused
        server.start()                      # the bucket is back: the copier copies and removes local files
        deadline = time.monotonic() + 40
        report = None
        while report is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)
            db = LedgerDb(cfg.state.path)
            raw = db.kv_get("verify.last_report")
            db.close()
            report = json.loads(raw) if raw else None
        stop.set()
        await asyncio.wait_for(task, 30)
        db = LedgerDb(cfg.state.path)
        rows = db.rows()
        db.close()
        left = archive_files(tmp_path / "archive")
        print("report", report, "states", {r.key: (r.state, r.local_kept) for r in rows}, "local", list(left))
        assert report["problems"] == 0, f"verify reported {report['problems']} problem(s) though no copy was damaged"
        assert left == {}, f"{len(left)} local file(s) back in the staging area though the ledger says removed"
