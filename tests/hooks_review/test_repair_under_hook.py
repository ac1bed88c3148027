"""Hooks review: a repaired off-box copy removes the local file at once, under the hook still running on it.

While hook 1 holds the local copy (keep_local: false, ledger local_kept = 0), the background verify
finds the bucket object damaged: it keeps it aside, marks the copy `repair` and re-queues the
recording. The downloader adopts the file still at the path; the copier's repair copy has no hook
(``on_done`` is None for a repair) and so calls the release at once: the file goes while hook 1 runs."""


from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.hooks_review.common import VERIFY_INTERVAL, FastVerifyClock, until

# Records each run (did the file it was given exist, with the bytes it was told); the first run waits
# for a go-file, as a slow transcription would.
HOOK = """
import hashlib, json, os, sys, time
out = sys.argv[1]
path, told = os.environ["YEASTAR_ARCHIVER_PATH"], os.environ["YEASTAR_ARCHIVER_SHA256"]
first = not os.path.exists(os.path.join(out, "started"))
open(os.path.join(out, "started"), "a").write("x")
if first:
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "go")) and time.time() < deadline:
        time.sleep(0.05)
digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None
with open(os.path.join(out, "runs.jsonl"), "a") as f:
    f.write(json.dumps({"first": first, "whole": digest == told}) + "\\n")
"""


async def test_a_repair_copy_never_removes_the_local_file_under_a_running_hook(
        start_sim: SimFactory, tmp_path: Path) -> None:
    from tests.s3servers import BUCKET, s3_server
    sim = await start_sim(count=1)
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    out = tmp_path / "out"
    out.mkdir()
    with s3_server("moto", tmp_path / "s3") as server:
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "service": {"listen": "127.0.0.1:0", "pbx_probe_interval_s": 0.2},
            "archive": {"keep_local": False, "s3": server.config(), "sidecar": False},
            "verify": {"interval_s": VERIFY_INTERVAL},
            "hooks": {"on_archived": [sys.executable, str(script), str(out)], "max_concurrent": 1,
                      "timeout_s": 60}})
        cfg = load_config(cfg_path)
        stop = asyncio.Event()
        task = asyncio.create_task(run_pipeline(cfg, stop, once=False, clock=FastVerifyClock()))
        try:
            await until(lambda: (out / "started").exists())          # hook 1 runs, holding the file
            [(key, good)] = list(server.objects().items())
            server.client().put_object(Bucket=BUCKET, Key=key, Body=b"RIFF damaged")   # bit rot, a slip
            await until(lambda: server.objects().get(key) == good)      # verify found it, it was repaired
            await asyncio.sleep(0.5)
            (out / "go").write_text("")                                  # hook 1 now reads its file
            await until(lambda: (out / "runs.jsonl").exists())
        finally:
            (out / "go").write_text("")
            stop.set()
            await asyncio.wait_for(task, 30)
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    # The hook's file exists and is whole for as long as it runs.
    assert runs[0]["whole"], runs
