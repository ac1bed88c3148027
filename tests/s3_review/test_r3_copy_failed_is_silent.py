"""R3: a copy that can never be made (the key and its alternate name both hold other objects: a
PermanentError -> copies.state = 'failed') leaves the recording 'copying' forever, yet `once` exits 0,
prints nothing, and `status` (text) does not show the failed copy at all (it prints only pending, repair
and done). A recording without its off-box copy — with keep_local: false the configured archive — goes
unnoticed."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from daemon.archive import Naming, final_relpath
from tests.conftest import SimFactory, run_cli, write_config
from tests.s3servers import BUCKET, s3_server


async def test_a_failed_copy_is_not_exit_0(start_sim: SimFactory, tmp_path: Path) -> None:
    import asyncio
    sim = await start_sim(count=1)
    rec = sim.recordings[0]
    rel = str(final_relpath("{year}/{month}/{day}/{file}", Naming(rec.id, rec.file, rec.call_type),
                            dt.datetime.now(dt.UTC)))
    with s3_server("moto", tmp_path / "s3") as server:
        c = server.client()
        c.put_object(Bucket=BUCKET, Key=rel, Body=b"RIFF somebody else's")
        c.put_object(Bucket=BUCKET, Key=rel.replace(".wav", f"~{rec.id}.wav"), Body=b"RIFF and another")
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]},
                                                          "archive": {"s3": server.config()}})
        once = await asyncio.to_thread(run_cli, "once", "-c", str(cfg))
        status = json.loads((await asyncio.to_thread(run_cli, "status", "--json", "-c", str(cfg))).stdout)
        text = (await asyncio.to_thread(run_cli, "status", "-c", str(cfg))).stdout
        print(once.returncode, once.stderr[-500:], status["counts"], status["copies"], text, sep="\n")
        assert status["counts"]["done"] == 0 and status["copies"]["s3"] == {"failed": 1}
        assert once.returncode != 0, f"once exited {once.returncode} while the recording has no off-box copy"
        assert "failed" in text.split("copies to s3:")[1].splitlines()[0], "status hides the failed copy"
        assert once.returncode != 0, "once said all is well while the recording has no off-box copy"
