"""R5: a local copy that vanished after its off-box copy was verified. Start-up reconciliation re-queues it
to the PBX without looking at the verified S3 copy (only `verify` would restore from the bucket, and
`once`/`run` reconcile first). Once the PBX's Auto Cleanup dropped it the recording ends `missing` — its
copies row still says done at a key holding the right bytes — and from then on neither `verify`
(only done/copying rows) nor the copier look at it: the archive says "missing" for a recording it holds."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from daemon.archive import Naming, final_relpath
from daemon.config import load_config
from daemon.ledger import LedgerDb
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.s3servers import s3_server


async def test_a_lost_local_copy_is_restored_from_the_bucket(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    rec = sim.recordings[0]
    rel = str(final_relpath("{year}/{month}/{day}/{file}", Naming(rec.id, rec.file, rec.call_type),
                            dt.datetime.now(dt.UTC)))
    with s3_server("moto", tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]},
                                                          "archive": {"s3": server.config()}})
        r1 = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        assert r1.counts["done"] == 1
        (tmp_path / "archive" / rel).unlink()          # the local copy is lost
        sim.delete_recording(rec)                     # ... and the PBX cleaned it up
        await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        assert server.objects()[rel] == sim.content(rec)          # the bucket holds it, verified
        db = LedgerDb(load_config(cfg).state.path)
        (row,) = db.rows()
        copies = db.copies_of(row.key)
        db.close()
        print(row.state, copies)
        assert row.state in ("done", "copying"), f"ledger says {row.state!r} for a recording the bucket holds"
