"""Discovery findings."""
from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import archive_files, write_config


async def test_a_total_number_that_counts_the_page_does_not_end_the_backfill_early(start_sim, tmp_path: Path) -> None:
    # total_number as the count of items in this answer (a plausible firmware bug, "wrong in another
    # way" than absent/plus1): the back-fill's "past total_number" end fires after 4 pages.
    sim = await start_sim(count=120, size_min=2000, size_max=3000, total_number="page")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True, "page_size": 5}}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    files = archive_files(tmp_path / "archive")
    assert len(files) == 120, f"archived {len(files)} of 120; counts={result.counts}"


async def test_a_capped_pbx_without_total_number_that_offsets_by_the_asked_size_is_listed_fully(
        start_sim, tmp_path: Path) -> None:
    # Both documented quirks at once: page_size capped at 4, page N starting at (N-1)*asked, and no
    # total_number. Page 1 gives 4 (short), page 2 (offset 100) is empty: "no cap" is concluded and
    # the listing ends — poll, back-fill and sweep alike see only the 4 newest recordings, forever.
    sim = await start_sim(count=30, size_min=2000, size_max=3000, page_cap=4, page_cap_offsets="asked",
                          total_number="absent")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True}}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    files = archive_files(tmp_path / "archive")
    assert len(files) == 30, f"archived {len(files)} of 30; counts={result.counts}"


async def test_a_capped_pbx_holding_fewer_than_page_size_with_asked_offsets_is_listed_fully(
        start_sim, tmp_path: Path) -> None:
    # The documented quirks "page_size capped" + page N at (N-1)*asked, total_number RIGHT. The PBX
    # holds 30 (< page_size 100): page 1 gives 4, total_number says 30. page_capped wants a *full* page
    # due (total >= 100) before it calls it a cap, so the cap is never learnt; page 2 (offset 100) is
    # empty and every listing ends after the 4 newest.
    sim = await start_sim(count=30, size_min=2000, size_max=3000, page_cap=4, page_cap_offsets="asked")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True}}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    files = archive_files(tmp_path / "archive")
    assert len(files) == 30, f"archived {len(files)} of 30; counts={result.counts}"


async def test_an_interrupted_backfill_on_a_capped_pbx_resumes_where_it_stopped(start_sim, tmp_path: Path) -> None:
    # The back-fill persisted page 20 in the PBX's (learnt) size 4. A new process starts with
    # page_size = the configured 100; with no total_number the poll (which stops at its floor on page 1)
    # does not re-learn the cap, so backfill_step sees size 4 != 100 and starts over from page 1 — on
    # every restart. A back-fill longer than a process's life (cron `once` with a timeout, a daemon
    # restarted daily) never completes.
    from daemon.discovery import KV_BACKFILL, KV_HIGH_WATER, Backfill
    from daemon.ledger import LedgerDb

    sim = await start_sim(count=200, size_min=2000, size_max=2100, page_cap=4, total_number="absent")
    top = max(r.id for r in sim.recordings)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True, "overlap_ids": 0}}})
    db = LedgerDb(load_config(cfg).state.path)
    db.kv_set(KV_HIGH_WATER, str(top))
    db.kv_set(KV_BACKFILL, Backfill(page=20, top=top, done=False, size=4).dump())
    db.close()
    stop = asyncio.Event()
    # stop as soon as the back-fill has asked 3 pages: where did it resume?
    async def watch() -> None:
        while len(sim.list_queries) < 6:
            await asyncio.sleep(0.01)
        stop.set()
    w = asyncio.create_task(watch())
    await run_pipeline(load_config(cfg), stop, once=True)
    w.cancel()
    pages = [p for p, _ in sim.list_queries]
    # The poll asks page 1 (and, seeing a short page with no total, page 2 once to learn the cap, then
    # page 1 again in its size); the back-fill then goes on at page 19 (one back), never at 1 again.
    assert 19 in pages, pages
    assert 1 not in pages[pages.index(19):], pages
