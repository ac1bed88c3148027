"""R2 (keep_local: false): start-up reconciliation "finishes a removal a crash cut short" by unlinking
whatever file is at the final path of EVERY archived row with local_kept = 0. Once the local copy of
recording A is gone, nothing on disk reserves its path, so a later recording B with the same archive path
(two recordings sharing a file name — the ledger knows this case: "two ids: two recordings that happen
to share a name") is archived right there. If B's off-box copy has not been made yet (S3 down, `once`
gave up) the next start deletes B's only copy. When the PBX has meanwhile dropped B, B is lost."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from daemon.config import load_config
from daemon.ledger import LedgerDb
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, archive_files, write_config
from tests.s3servers import s3_server


async def test_restart_never_deletes_an_uncopied_recording(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    a, b0 = sim.recordings
    b = dataclasses.replace(b0, file=a.file)            # same name, other bytes (other id)
    sim.recordings[1] = b
    sim.by_id[b.id] = b
    sim.all_recordings[1] = b
    with s3_server("moto", tmp_path / "s3") as server:
        good = server.config()
        # 1. A is archived and copied; its local copy goes (keep_local: false).
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [a.id]},
                                                          "archive": {"keep_local": False, "s3": good}})
        r1 = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        assert r1.counts["done"] == 1 and archive_files(tmp_path / "archive") == {}
        # 2. B arrives while the bucket is unreachable: archived locally, copy waiting.
        down = dict(good, endpoint_url="http://127.0.0.1:9", timeout_s=1)
        cfg = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [a.id, b.id]}, "downloads": {"once_give_up_s": 2, "pause_max_s": 0.3},
            "archive": {"keep_local": False, "s3": down}})
        r2 = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        assert r2.copy_gave_up and r2.counts["copying"] == 1
        assert list(archive_files(tmp_path / "archive").values()) == [sim.content(b)]   # B's only copy
        # 3. The PBX's Auto Cleanup drops B; the bucket is back; the next once starts.
        sim.delete_recording(b)
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [a.id, b.id]},
                                                          "archive": {"keep_local": False, "s3": good}})
        r3 = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        objects = server.objects()
        db = LedgerDb(load_config(cfg).state.path)
        states = {r.key: r.state for r in db.rows()}
        db.close()
        print("states", states, "objects", list(objects), "reconcile", r3.reconcile)
        held = [k for k, v in objects.items() if v == sim.content(b)] + \
            [k for k, v in archive_files(tmp_path / "archive").items() if v == sim.content(b)]
        assert held, f"recording {b.id} is gone from disk and bucket; ledger says {states[f'id:{b.id}']}"
