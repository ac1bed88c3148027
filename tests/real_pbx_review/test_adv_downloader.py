"""A1: a deterministic cut with no declared length is committed as the recording (two cut transfers agree)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.config import load_config
from daemon.downloader import wav_declared_size
from daemon.ledger import LedgerDb
from daemon.runner import run_pipeline
from tests.conftest import archive_files, write_config


async def test_a_deterministic_cut_without_a_length_is_not_committed(start_sim, tmp_path: Path) -> None:
    # The PBX (or a proxy in front of it) ends every file transfer at byte 40000 and closes the
    # connection; it declares no length (HTTP/1.0 style). The WAV header inside says the file is longer.
    sim = await start_sim(count=2, size_min=100_000, size_max=120_000, body_length="close", truncate_at=40_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    files = archive_files(tmp_path / "archive")
    db = LedgerDb(load_config(cfg).state.path)
    try:
        done = db.rows("done")
    finally:
        db.close()
    for data in files.values():
        # I1/I3: nothing under a final name is shorter than the recording (its own header says how long)
        assert len(data) == wav_declared_size(data[:64]), (
            f"committed {len(data)} bytes, header declares {wav_declared_size(data[:64])}; counts={result.counts}")
    assert not done, [(r.rec_id, r.bytes) for r in done]


async def test_a_chunked_transfer_is_proven_whole_by_its_last_chunk_and_fetched_once(start_sim, tmp_path: Path) -> None:
    # A transcoding PBX cannot know the mp3's length up front: it answers chunked. The terminal
    # zero-length chunk proves the end (a cut chunked body is a ClientPayloadError), but the archiver
    # treats chunked like "connection closed" and downloads every recording twice — on the one-request
    # mp3 gate, doubling the time the PBX is held.
    sim = await start_sim(count=3, body_length="chunked", mp3_transcode="wav-name")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    assert result.counts["done"] == 3
    assert dict(sim.counters.transfers_completed) == {r.id: 1 for r in sim.recordings}
