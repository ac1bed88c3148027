"""R9 (keep_local: false): verify finds the S3 object damaged, keeps a copy aside and re-queues the
recording to the PBX (no local copy to mend from). The re-download puts the copy back to 'pending' —
not 'repair' — so the copier treats the damaged object (still at the recording's key) as somebody else's
and uploads the good bytes under the alternate name `~<id>`. The damaged bytes stay forever at the
recording's own key (and once more in the .damaged- copy): anyone restoring the recording by its path
gets the rotten object, and the bucket holds the damage twice."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from daemon.archive import Naming, final_relpath
from daemon.config import load_config
from daemon.ledger import LedgerDb
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, run_cli, write_config
from tests.s3servers import BUCKET, s3_server


async def test_a_damaged_object_is_mended_at_its_key(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    rec = sim.recordings[0]
    rel = str(final_relpath("{year}/{month}/{day}/{file}", Naming(rec.id, rec.file, rec.call_type),
                            dt.datetime.now(dt.UTC)))
    with s3_server("moto", tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]},
                                                          "archive": {"keep_local": False, "s3": server.config()}})
        assert (await run_pipeline(load_config(cfg), asyncio.Event(), once=True)).counts["done"] == 1
        server.client().put_object(Bucket=BUCKET, Key=rel, Body=b"RIFF rotten" + b"\0" * 1000)   # bit rot
        v = await asyncio.to_thread(run_cli, "verify", "-c", str(cfg))
        assert v.returncode == 1, v.stdout + v.stderr
        r = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        objects = server.objects()
        db = LedgerDb(load_config(cfg).state.path)
        (copy,) = db.copies_of(f"id:{rec.id}")
        db.close()
        print(r.counts, copy["object_key"], sorted(objects))
        assert objects[rel] == sim.content(rec), "the recording's own key still holds the damaged bytes"
        assert copy["object_key"] == rel
