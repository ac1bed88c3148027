"""Hooks review (2): keep_local: false frees a recording's archive path once its off-box copy is verified; the
daemon knows another recording of the same file name may then be archived there (reconcile checks the
bytes before it finishes a removal: ``_holds``). ``forget --erase`` of the first recording does not
check: ``erase_local`` unlinks whatever file and sidecar stand at the forgotten row's final_path — here
the second recording's only copy (its off-box copy not made yet). The contract: the removal must
never delete a file that belongs to another recording; no recording is lost."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import sqlite3
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, run_cli, write_config


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_forget_erase_of_a_removed_recording_never_deletes_the_one_now_at_its_path(
        start_sim: SimFactory, tmp_path: Path) -> None:
    from tests.s3servers import s3_server
    sim = await start_sim(count=2)
    a, b0 = sim.recordings
    # A second, different recording under the same file name (the archiver's alternate_name exists for it).
    b = dataclasses.replace(b0, file=a.file)
    sim.recordings[1] = b
    sim.all_recordings[1] = b
    sim.by_id[b.id] = b
    with s3_server("moto", tmp_path / "s3") as server:
        # 1. A is archived, copied off-box, and its local copy goes (keep_local: false).
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [a.id]}, "archive": {"keep_local": False, "s3": server.config()}})
        result = await run_pipeline(load_config(cfg_path), asyncio.Event(), once=True)
        assert result.counts["done"] == 1
        cfg = load_config(cfg_path)
        db = sqlite3.connect(cfg.state.path)
        (rel,) = db.execute("SELECT final_path FROM recordings WHERE state = 'done'").fetchone()
        db.close()
        path = cfg.archive.dir / rel
        assert not path.exists()
        # 2. B is archived at the path A freed; the bucket is out of reach, so B's local file is its only copy.
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [b.id]}, "downloads": {"once_give_up_s": 2},
            "archive": {"keep_local": False, "s3": server.config(endpoint_url=f"http://127.0.0.1:{_dead_port()}",
                                                                 timeout_s=1)}})
        await run_pipeline(load_config(cfg_path), asyncio.Event(), once=True)
        assert path.exists() and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(sim.content(b)).digest()
        # 3. The operator erases A (an erasure request), the bucket back.
        cfg_path = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [a.id, b.id]}, "archive": {"keep_local": False, "s3": server.config()}})
        erase = await asyncio.to_thread(run_cli, "forget", "--erase", str(a.id), "--reason", "request 1",
                                        "-c", str(cfg_path))
        print(erase.stdout, erase.stderr)
        assert path.exists(), f"forget --erase {a.id} deleted recording {b.id}'s only copy at {rel}"
        db = sqlite3.connect(cfg.state.path)
        (state,) = db.execute("SELECT state FROM recordings WHERE rec_id = ?", (b.id,)).fetchone()
        db.close()
        assert state != "forgotten", f"forget {a.id} forgot recording {b.id} too (same file name)"
