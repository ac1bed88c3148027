"""Review of hooks with archive.s3 (F2, F7): a recording whose off-box object is lost and copied again
is no new recording — its hook runs once — and the run still going on the first copy keeps a whole file,
whatever the re-archive does at the archive path (keep_local: false fetches it anew there)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import structlog

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.hooks_review.common import VERIFY_INTERVAL, FastVerifyClock, until

# The first run waits for a go-file, as a slow transcription would; each run records whether the file
# it was given was there and whole when it read it.
HOOK = """
import hashlib, json, os, sys, time
out = sys.argv[1]
path, told = os.environ["YEASTAR_ARCHIVER_PATH"], os.environ["YEASTAR_ARCHIVER_SHA256"]
open(os.path.join(out, "started"), "a").write("x")
deadline = time.time() + 60
while not os.path.exists(os.path.join(out, "go")) and time.time() < deadline:
    time.sleep(0.05)
digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None
with open(os.path.join(out, "runs.jsonl"), "a") as f:
    f.write(json.dumps({"whole": digest == told}) + "\\n")
"""


def _copied_again_since(ledger: Path, since: float) -> bool:
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT r.state, c.state, c.verified_at FROM recordings r "
                         "JOIN copies c USING (key)").fetchone()
    finally:
        db.close()
    return row is not None and row[0] == "done" and row[1] == "done" and (row[2] or 0) > since


@pytest.mark.parametrize("keep_local", [True, False])
async def test_an_object_copied_again_runs_no_second_hook_and_the_first_keeps_a_whole_file(
        start_sim: SimFactory, tmp_path: Path, keep_local: bool) -> None:
    from tests.s3servers import BUCKET, s3_server
    sim = await start_sim(count=1)
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    out = tmp_path / "out"
    out.mkdir()
    ledger = tmp_path / "state" / "ledger.db"
    with s3_server("moto", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "state": {"path": str(ledger)},
            "service": {"listen": "127.0.0.1:0", "pbx_probe_interval_s": 0.2},
            "archive": {"keep_local": keep_local, "s3": server.config(), "sidecar": False},
            "verify": {"interval_s": VERIFY_INTERVAL},
            "hooks": {"on_archived": [sys.executable, str(script), str(out)], "max_concurrent": 1,
                      "timeout_s": 60}})
        cfg = load_config(cfg_path)
        stop = asyncio.Event()
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(run_pipeline(cfg, stop, once=False, clock=FastVerifyClock()))
            try:
                await until(lambda: (out / "started").exists())           # hook 1 runs, holding its file
                [key] = list(server.objects())
                deleted_at = time.time()
                server.client().delete_object(Bucket=BUCKET, Key=key)        # a lifecycle rule, a slip
                # verify finds it lost; it is copied again (from the local copy, or fetched anew) and done
                await until(lambda: _copied_again_since(ledger, deleted_at))
                (out / "go").write_text("")
                await until(lambda: (out / "runs.jsonl").exists())
            finally:
                (out / "go").write_text("")
                stop.set()
                await asyncio.wait_for(task, 30)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert runs == [{"whole": True}], runs
    outcomes = [e["event"] for e in logs if e["event"] in ("hook.completed", "hook.failed", "hook.dropped",
                                                           "hook.timed_out", "hook.killed", "hook.spawn_failed")]
    assert outcomes == ["hook.completed"], "a hook for the copy made again was queued: " + str(outcomes)
