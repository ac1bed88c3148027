"""Real-PBX fidelity: every behaviour of "What a real PBX may do" as a simulator option, and the archiver
coping with it on loopback — once per quirk, once with all of them together, I1-I4 checked each time."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.archive import Naming, final_relpath, with_format
from daemon.client import PbxClient
from daemon.config import DiscoverConfig, load_config
from daemon.discovery import Discovery
from daemon.identity import identity_problem
from daemon.ledger import Ledger, LedgerDb, Ref
from daemon.runner import RunResult, run_pipeline
from daemon.simulator import Simulator, transcoded
from tests.conftest import SimFactory, archive_files, pbx_config, run_cli, write_config

LAYOUT = "{year}/{month}/{day}/{file}"


async def _once(cfg: Path, **kwargs: Any) -> RunResult:
    return await run_pipeline(load_config(cfg), asyncio.Event(), once=True, **kwargs)


def _served(sim: Simulator, rec: Any) -> tuple[str, bytes]:
    """(archive path, bytes) a recording must be archived as: named and filled by what the PBX serves."""
    name = transcoded(rec).file if sim.opts.mp3_transcode else rec.file
    rel = final_relpath(LAYOUT, Naming(rec.id, with_format(name, None), rec.call_type), dt.datetime.now(dt.UTC))
    return str(rel), sim.served_content(rec)


def _assert_invariants(sim: Simulator, cfg_path: Path, archived: set[int]) -> None:
    """I1 + I3: exactly these recordings, once each, byte-identical to what was served, named by its
    format; I4: one done row per file, with its size and sha256."""
    cfg = load_config(cfg_path)
    recs = {r.id: r for r in sim.all_recordings}
    expected = dict(_served(sim, recs[i]) for i in archived)
    assert archive_files(cfg.archive.dir) == expected
    db = LedgerDb(cfg.state.path)
    try:
        done = db.rows("done")
    finally:
        db.close()
    assert sorted(r.final_path for r in done) == sorted(expected)
    for r in done:
        data = expected[str(r.final_path)]
        assert (r.bytes, r.sha256) == (len(data), hashlib.sha256(data).hexdigest())


QUIRKS: dict[str, dict[str, Any]] = {
    "page_cap": {"page_cap": 4},
    "page_cap_asked_offsets": {"page_cap": 4, "page_cap_offsets": "asked"},
    "close_after_response": {"close_after_response": True},
    "cleanup_on_list": {"cleanup_on_list": 1},
    "mp3_transcode_wav_name": {"mp3_transcode": "wav-name"},
    "mp3_transcode_mp3_name": {"mp3_transcode": "mp3-name"},
    "mp3_busy_503": {"format": "mp3", "mp3_busy_answer": "503"},
    "mp3_busy_minus2": {"format": "mp3", "mp3_busy_answer": "-2"},
    "mp3_busy_wait": {"format": "mp3", "mp3_busy_answer": "wait"},
    "expired_url_403": {"url_expired_rate": 0.3, "expired_url_answer": "403"},
    "expired_url_410": {"url_expired_rate": 0.3, "expired_url_answer": "410"},
    "expired_url_60001": {"url_expired_rate": 0.3, "expired_url_answer": "60001"},
    "no_range": {"range_support": False, "cut_rate": 0.2},
    "all_together": {"page_cap": 4, "page_cap_offsets": "asked", "close_after_response": True,
                     "cleanup_on_list": 1, "mp3_transcode": "wav-name", "mp3_busy_answer": "-2",
                     "url_expired_rate": 0.2, "expired_url_answer": "60001", "range_support": False,
                     "cut_rate": 0.1},
}


@pytest.mark.parametrize("quirk", list(QUIRKS))
async def test_the_quirk_matrix(start_sim: SimFactory, tmp_path: Path, quirk: str) -> None:
    """Discovery's back-fill and the pipeline against one behaviour of a real PBX at a time (and all of
    them together): every recording the PBX still holds is archived once, nothing it holds is missing."""
    sim = await start_sim(count=24, size_min=8_000, size_max=90_000, **QUIRKS[quirk])
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"discover": {"enabled": True, "page_size": 10}},
        "downloads": {"workers": 3, "checkpoint_bytes": 65536, "max_attempts": 20}})
    result = await _once(cfg)
    assert result.counts["failed"] == 0 and result.counts["pending"] == 0, result.counts
    held = {r.id for r in sim.recordings}
    db = LedgerDb(load_config(cfg).state.path)
    try:
        missing = {r.rec_id for r in db.rows("missing")}
        done = {r.rec_id for r in db.rows("done")}
    finally:
        db.close()
    assert not missing & held, "a recording the PBX still holds was marked missing"
    assert held <= done, f"not archived: {sorted(held - done)}"
    _assert_invariants(sim, cfg, done)
    assert sim.counters.mp3_violations == 0
    if sim.opts.close_after_response:
        assert sim.counters.dropped_reused > 0 and result.stats.pauses == 0
        assert sim.counters.logins == 1           # never a second get_token
    if sim.opts.mp3_transcode:
        assert all(p.endswith(".mp3") for p in archive_files(load_config(cfg).archive.dir))


@pytest.mark.parametrize(("opts", "why"), [
    ({"format": "mp3", "mp3_transcode": "", "body_length": "close"}, "mp3 says nothing of its length"),
    ({"mp3_transcode": "mp3-name", "body_length": "close"}, "the listing's size is the wav's"),
    ({"wav_riff_size": "zero", "body_length": "close"}, "a streaming writer's RIFF size 0"),
    ({"format": "mp3", "body_length": "close", "range_support": False}, "no Range: two transfers must agree"),
])
async def test_a_cut_that_looks_like_the_end_is_never_committed(start_sim: SimFactory, tmp_path: Path,
                                                                opts: dict[str, Any], why: str) -> None:
    """No Content-Length, the connection closes after the body, and a cut lands anywhere: before, the
    cut file was committed as done ({why}). Now a transfer nothing vouches for is fetched again and
    committed only when two agree byte for byte."""
    sim = await start_sim(count=6, size_min=100_000, size_max=300_000, cut_rate=0.4, seed=7, **opts)
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [r.id for r in sim.recordings]},     # no listing: no size to compare with
        "downloads": {"max_attempts": 30, "backoff_base_s": 0.01, "backoff_max_s": 0.05}})
    result = await _once(cfg)
    assert sim.counters.faults["cut"] > 0, "the test must cut transfers to prove anything"
    assert result.counts["done"] == 6 and result.counts["failed"] == 0, result.counts
    _assert_invariants(sim, cfg, {r.id for r in sim.recordings})


@pytest.mark.parametrize(("range_support", "transfers"), [(True, 3), (False, 6)])
async def test_a_wav_header_that_declares_more_than_the_pbx_ever_serves_is_archived_as_served(
        start_sim: SimFactory, tmp_path: Path, range_support: bool, transfers: int) -> None:
    """Some PBXs' files keep a RIFF size that was never updated: rejected for ever before (failed). With
    Range, a 416 for the bytes after the end settles it; without, two transfers that agree."""
    sim = await start_sim(count=3, wav_riff_size="more", body_length="close", range_support=range_support)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]}})
    result = await _once(cfg)
    assert result.counts["done"] == 3 and result.counts["failed"] == 0, result.counts
    # Without Range a probe gets the whole file: asked by at most each worker before it is learnt.
    assert transfers <= sum(sim.counters.transfers_completed.values()) <= transfers + (0 if range_support else 4)
    _assert_invariants(sim, cfg, {r.id for r in sim.recordings})


async def test_a_chunked_body_is_whole_by_its_last_chunk(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=3, wav_riff_size="zero", body_length="chunked", cut_rate=0.3)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                      "downloads": {"max_attempts": 20}})
    result = await _once(cfg)
    assert result.counts["done"] == 3 and result.counts["failed"] == 0, result.counts
    assert sum(sim.counters.transfers_completed.values()) == 3          # fetched once each
    _assert_invariants(sim, cfg, {r.id for r in sim.recordings})


async def test_a_served_mp3_name_then_a_wav_listing_never_compares_the_mp3_with_the_wav_size(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """An id row learns the served .mp3 name first; the listing then brings the .wav's size: that size
    is the wav's, and must never be held against the mp3 bytes (before: every attempt failed)."""
    sim = await start_sim(count=4, size_min=50_000, size_max=90_000, mp3_transcode="mp3-name", cut_rate=0.5)
    ids = [r.id for r in sim.recordings]
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": ids}, "downloads": {"max_attempts": 1}})
    first = await _once(cfg)                         # cut transfers fail: their rows know the .mp3 name now
    assert first.counts["failed"] > 0, "the test needs failed rows that learnt the served name"
    ledger = LedgerDb(load_config(cfg).state.path)
    try:
        ledger.enqueue([Ref(rec_id=r.id, file=r.file, meta=(("size", r.size),)) for r in sim.recordings],
                       source="discover", now=time.time())
        ledger.retry(None, now=time.time())
    finally:
        ledger.close()
    sim.control(options={"cut_rate": 0.0})
    second = await _once(cfg)
    assert second.counts["done"] == 4 and second.counts["failed"] == 0, second.counts
    _assert_invariants(sim, cfg, set(ids))


async def test_a_pbx_that_ignores_the_page_number_does_not_hang_once(start_sim: SimFactory, tmp_path: Path) -> None:
    """recording/list answering page 1 to every page never gives the empty page a listing ends on:
    before, `once` paged for ever. Now the listing ends after pages with nothing new (and the back-fill
    past total_number), with what the first page held archived."""
    sim = await start_sim(count=25, page_ignored=True)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True, "page_size": 10}}})
    result = await asyncio.wait_for(_once(cfg), 60)
    newest = sorted((r.id for r in sim.recordings), reverse=True)[:10]
    assert result.counts["done"] == 10 and result.counts["failed"] == 0, result.counts
    _assert_invariants(sim, cfg, set(newest))
    assert len(sim.list_queries) < 20


# ---------------------------------------------------------------- 1. page_size capped
@pytest.mark.parametrize("offsets", ["capped", "asked"])
async def test_a_capped_page_size_is_learnt_and_nothing_is_skipped(start_sim: SimFactory, tmp_path: Path,
                                                                   offsets: str) -> None:
    """Item 1: a PBX that gives 30 per page whatever was asked. Before: the back-fill stopped after page 1
    ("fewer than page_size"), 25 of 120 found."""
    sim = await start_sim(count=120, page_cap=30, page_cap_offsets=offsets)
    async with Ledger(tmp_path / "l.db") as ledger, PbxClient(pbx_config(sim.base_url)) as client:
        discovery = Discovery(DiscoverConfig(enabled=True, page_size=100), client, ledger, client.clock, lambda: None)
        with structlog.testing.capture_logs() as logs:
            assert await discovery.run_once()
        ids = await ledger.call(lambda db: {r.rec_id for r in db.rows()})
    assert ids == {r.id for r in sim.recordings}
    assert discovery.page_size == 30 and any(e["event"] == "pbx.page_size_capped" for e in logs)


@pytest.mark.parametrize(("page_no", "size", "got", "total", "short_before", "capped"), [
    (1, 100, 30, 120, None, True),       # total says a full page was due
    (2, 30, 30, 120, None, False),
    (4, 30, 29, 119, None, False),       # the last page, naturally short...
    (4, 30, 29, 120, None, True),        # ...or one short of a count off by one: 29 a page, harmless
    (4, 30, 1, 91, None, False),         # 91 with 30 a page: the last page holds one
    (4, 30, 1, 92, None, False),         # a count off by one: before, paging dropped to 1 a page
    (1, 100, 30, 0, None, False),        # no total: nothing to tell yet...
    (2, 100, 30, 0, 30, True),           # ...a short page followed by another: capped
    (2, 100, 0, 0, 30, False),
])
def test_page_capped(page_no: int, size: int, got: int, total: int, short_before: int | None, capped: bool) -> None:
    from daemon.discovery import page_capped
    assert page_capped(page_no, size, got, total, short_before) is capped


@pytest.mark.parametrize("total", ["absent", "plus1"])
async def test_a_capped_pbx_without_a_true_total_is_paged_to_the_end(start_sim: SimFactory, tmp_path: Path,
                                                                      total: str) -> None:
    """Cap detection leaned on total_number: without it the back-fill paged by the asked size and
    skipped what lay between; with a count off by one the last page set the page size (to 1)."""
    sim = await start_sim(count=57, page_cap=10, total_number=total)
    async with Ledger(tmp_path / "l.db") as ledger, PbxClient(pbx_config(sim.base_url)) as client:
        discovery = Discovery(DiscoverConfig(enabled=True, page_size=25), client, ledger, client.clock, lambda: None)
        assert await discovery.run_once()
        ids = await ledger.call(lambda db: {r.rec_id for r in db.rows()})
        assert discovery.page_size == 10
        # The sweep's confirmation asks by id, no more per page than the PBX gives: all 57 are there.
        assert await discovery.confirm_present(sorted(ids)) == ids
    assert ids == {r.id for r in sim.recordings}
    assert len(sim.list_queries) < 20


# ---------------------------------------------------------------- 2. 60001 before the file is ready
async def test_a_name_announced_before_the_pbx_serves_it_is_retried_for_the_grace_period(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 2: the newest recording answers 60001 for 2 s (a queue name, an event at call end). Before:
    missing at once, for good, and once exited 0."""
    sim = await start_sim(count=3, late_count=1, late_s=2.0)
    late = sim.recordings[-1]
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"missing_grace_s": 30},
                                                      "downloads": {"backoff_base_s": 0.2, "backoff_max_s": 0.5}})
    db = LedgerDb(load_config(cfg).state.path)
    db.enqueue([Ref(file=late.file)], source="queue", now=time.time())
    db.close()
    started = time.monotonic()
    result = await _once(cfg)
    assert result.counts == {"pending": 0, "in_progress": 0, "done": 1, "failed": 0, "missing": 0, "copying": 0,
                             "forgotten": 0}
    assert time.monotonic() - started >= 2.0
    _assert_invariants(sim, cfg, {late.id})


async def test_an_id_listed_before_its_file_is_ready_is_retried_not_missing(start_sim: SimFactory,
                                                                            tmp_path: Path) -> None:
    """A PBX that lists the CDR at call end, before the file is there: 60001 for a listed id. Before:
    missing at once, for good. Now: retried while recording/search still lists it, within the grace."""
    sim = await start_sim(count=4, late_count=1, late_s=2.0, late_listed=True)
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"missing_grace_s": 30, "discover": {"enabled": True}},
        "downloads": {"backoff_base_s": 0.2, "backoff_max_s": 0.5}})
    result = await _once(cfg)
    assert result.counts["done"] == 4 and result.counts["missing"] == 0, result.counts
    _assert_invariants(sim, cfg, {r.id for r in sim.recordings})


async def test_an_id_the_pbx_no_longer_lists_is_missing_at_once(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [sim.recordings[0].id, 999_999],
                                                                  "missing_grace_s": 600}})
    started = time.monotonic()
    result = await _once(cfg)
    assert result.counts["done"] == 1 and result.counts["missing"] == 1, result.counts
    assert time.monotonic() - started < 30


async def test_after_the_grace_period_a_name_the_pbx_never_serves_is_missing(start_sim: SimFactory,
                                                                            tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"missing_grace_s": 0.5},
                                                      "downloads": {"backoff_base_s": 0.1, "backoff_max_s": 0.2}})
    db = LedgerDb(load_config(cfg).state.path)
    db.enqueue([Ref(file="20220112090000-1.1-1-2-Internal.wav")], source="queue", now=time.time())
    db.close()
    result = await _once(cfg)
    assert result.counts["missing"] == 1


async def test_an_event_that_comes_before_the_file_ends_archived(start_sim: SimFactory, tmp_path: Path) -> None:
    """Items 2 and 4: 30012 fires 1.5 s before the file can be served (msg as an object, too)."""
    sim = await start_sim(count=1, event_early_s=1.5)
    cfg = load_config(write_config(tmp_path, sim.base_url, extra={
        "sources": {"discover": {"enabled": True, "events": True, "interval_s": 600}, "missing_grace_s": 30},
        "downloads": {"backoff_base_s": 0.2, "backoff_max_s": 0.5}}))
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(cfg, stop, once=False))
    while sim.counters.ws_connections == 0 or not sim.websockets:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    rec = await sim.add_recording(msg_as_object=True)
    deadline = time.monotonic() + 20
    while True:
        db = LedgerDb(cfg.state.path)
        done = {r.rec_id or r.file for r in db.rows("done")}
        db.close()
        if len(done) == 2:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 30)
    _assert_invariants(sim, Path(str(cfg.source_path)), {sim.recordings[0].id, rec.id})


# ---------------------------------------------------------------- 3. Auto Cleanup during a sweep
async def test_auto_cleanup_during_a_sweep_never_marks_a_recording_the_pbx_holds_missing(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 3: before, the sweep paged oldest first by page number, items slid past it, and it marked
    them missing without asking."""
    sim = await start_sim(count=60)
    async with Ledger(tmp_path / "l.db") as ledger, PbxClient(pbx_config(sim.base_url)) as client:
        discovery = Discovery(DiscoverConfig(enabled=True, page_size=10), client, ledger, client.clock, lambda: None)
        await ledger.call(lambda db: db.enqueue([Ref(rec_id=r.id) for r in sim.recordings], source="t", now=0))
        sim.opts = dataclasses.replace(sim.opts, cleanup_on_list=2)
        await discovery.sweep()
        missing = await ledger.call(lambda db: {r.rec_id for r in db.rows("missing")})
    held = {r.id for r in sim.recordings}
    deleted = {r.id for r in sim.all_recordings} - held
    # What went before it was listed is missing; what went after it was listed waits for the next sweep;
    # nothing the PBX holds is missing.
    assert missing and missing <= deleted


# ---------------------------------------------------------------- 4. the heartbeat on a timer
async def test_the_heartbeat_goes_on_a_timer_however_busy_the_event_stream(start_sim: SimFactory,
                                                                            tmp_path: Path) -> None:
    """Item 4: events every 0.2 s and a PBX that drops a socket silent for 1.5 s. Before: the heartbeat
    went only when nothing arrived, so the socket was dropped and reconnected in a loop."""
    sim = await start_sim(count=1, ws_idle_s=1.5, new_every_s=0.2)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        subscribed: list[bool] = []
        got: list[dict[str, Any]] = []

        async def listen() -> None:
            async for event in client.events([30012], heartbeat_s=1.0, on_subscribed=lambda: subscribed.append(True)):
                got.append(event)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(listen(), 4)
    assert subscribed == [True] and len(got) > 10
    assert sim.counters.ws_connections == 1 and sim.counters.heartbeats_late == 0
    assert sim.counters.ws_heartbeats >= 3


# ---------------------------------------------------------------- 5. mp3 served for a .wav listing
async def test_mp3_bytes_for_a_wav_listing_are_named_mp3_and_keep_the_one_request_rule(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 5: before, every attempt failed the listing's (wav) size, the gate opened on the .wav name
    (39 concurrent requests refused), and what was archived was mp3 bytes under .wav names."""
    sim = await start_sim(count=8, size_min=50_000, size_max=200_000, mp3_transcode="wav-name")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True}},
                                                      "downloads": {"workers": 4}})
    result = await _once(cfg)
    assert result.counts["done"] == 8 and result.counts["failed"] == 0
    assert sim.counters.mp3_violations == 0 and sim.counters.max_concurrency == 1
    _assert_invariants(sim, cfg, {r.id for r in sim.recordings})
    sidecar = json.loads(next((tmp_path / "archive").rglob("*.mp3.json")).read_text())
    assert sidecar["file"].endswith(".wav")   # the PBX's own name stays on record


async def test_a_wav_configured_pbx_that_serves_mp3_goes_one_request_at_a_time(start_sim: SimFactory,
                                                                              tmp_path: Path) -> None:
    sim = await start_sim(count=6, size_min=400_000, size_max=400_000, bytes_per_second=4_000_000,
                          mp3_transcode="mp3-name")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                      "pbx": {"recording_format": "wav"},
                                                      "downloads": {"workers": 4}})
    result = await _once(cfg)
    assert result.counts["done"] == 6
    _assert_invariants(sim, cfg, {r.id for r in sim.recordings})


# ---------------------------------------------------------------- 6. connections closed after each answer
async def test_a_pbx_that_closes_each_connection_costs_a_retry_on_a_fresh_one_never_a_pause(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """Item 6: a request lost on a pooled connection the PBX had closed is sent again on a fresh one;
    logins always go on a fresh one (never a second get_token)."""
    sim = await start_sim(count=30, close_after_response=True)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]}})
    with structlog.testing.capture_logs() as logs:
        result = await _once(cfg)
    assert result.counts["done"] == 30 and result.stats.pauses == 0
    assert sim.counters.dropped_reused > 0 and sim.counters.logins == 1
    assert any(e["event"] == "pbx.closes_connections" for e in logs)


# ---------------------------------------------------------------- 7. error codes
@pytest.mark.parametrize("errcode", [10002, 10003])
def test_an_api_version_the_pbx_does_not_serve_is_a_configuration_error(tmp_path: Path, errcode: int) -> None:
    """Item 7: before, check exited 4 and once 1 (retrying); now exit 2 naming pbx.api_path, at once."""
    from tests.conftest import simulator_subprocess
    with simulator_subprocess("--api-version-error", str(errcode)) as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}})
        for command in ("check", "once"):
            result = run_cli(command, "-c", str(cfg), timeout=60)
            assert result.returncode == 2, (command, result.stderr)
            assert "pbx.api_path" in result.stderr


async def test_70084_and_a_60002_outside_login_and_partial_success(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000, 1001]}})
    sim.control(inject={"recording/download": [60002]})            # a quantity limit: busy, retried
    result = await _once(cfg)
    assert result.counts["done"] == 2 and sim.counters.token_limit_hits == 0
    (tmp_path / "b").mkdir()
    cfg2 = write_config(tmp_path / "b", sim.base_url, extra={"sources": {"ids": [1000]}})
    sim.control(inject={"recording/download": [70084]})            # ACTION FORBIDDEN: exit 2
    result = await _once(cfg2)
    assert result.fatal is not None and result.fatal.exit_code == 2 and "permission" in str(result.fatal)


async def test_a_partial_success_answer_is_taken_not_raised(start_sim: SimFactory) -> None:
    sim = await start_sim(count=3)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        await client.check()
        sim.control(inject={"recording/list": [1]})
        with structlog.testing.capture_logs() as logs:
            page = await client.list_recordings(page=1, page_size=10)
    assert page.items == [] and any(e["event"] == "pbx.partial_success" for e in logs)


def test_an_ip_block_says_when_it_lifts(tmp_path: Path) -> None:
    """Item 7: 70004's block_expire_time is honoured when present (and said)."""
    from tests.conftest import simulator_subprocess
    with simulator_subprocess("--block-expire", "300") as base_url:
        cfg = write_config(tmp_path, base_url, secret="wrong-secret-123")
        # --force-login: past the failed-login memory, which would refuse the fourth (as it should).
        for _ in range(5):
            run_cli("check", "--force-login", "-c", str(cfg), timeout=30)
        result = run_cli("check", "--force-login", "-c", str(cfg), timeout=30)
    assert result.returncode == 3 and "lifts the block in" in result.stderr


async def test_run_logs_in_again_when_the_pbx_said_its_ip_block_lifts(start_sim: SimFactory, tmp_path: Path) -> None:
    """Before, `run` waited pbx.auth_retry_interval_s (here an hour) whatever 70004's block_expire_time said."""
    from daemon.clock import SystemClock
    from daemon.service import Health
    sim = await start_sim(count=3, block_expire_s=1)
    sim.blocked_ips.add("127.0.0.1")
    sim.block_until = time.time() + 1
    cfg = load_config(write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [r.id for r in sim.recordings]}, "pbx": {"auth_retry_interval_s": 3600}}))
    stop = asyncio.Event()
    health = Health(SystemClock())
    task = asyncio.create_task(run_pipeline(cfg, stop, once=False, health=health))
    try:
        deadline = time.monotonic() + 30
        while health.counts.get("done", 0) < 3:
            assert time.monotonic() < deadline, health.counts
            assert not task.done()
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sim.counters.logins >= 1


async def test_a_content_type_that_says_wav_never_opens_the_one_request_gate(start_sim: SimFactory,
                                                                           tmp_path: Path) -> None:
    """mp3 bytes labelled audio/wav keep the one-request rule (the headers never open the gate; on
    loopback they arrive with the first bytes, so the pure rule is pinned in test_decisions too)."""
    sim = await start_sim(count=4, mp3_transcode="wav-name", content_type="audio/wav")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                      "downloads": {"workers": 4}})
    result = await _once(cfg)
    assert result.counts["done"] == 4
    assert sim.counters.mp3_violations == 0 and sim.counters.max_concurrency == 1


async def test_a_busy_system_information_pauses_and_burns_no_recording_s_attempt(start_sim: SimFactory,
                                                                                tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    sim.control(inject={"system/information": [70082, 70082, 70082]})
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                      "downloads": {"max_attempts": 1, "pause_max_s": 0.3}})
    result = await _once(cfg)
    assert result.counts["done"] == 2 and result.counts["failed"] == 0, result.counts
    assert sim.counters.errcodes_injected[70082] == 3


# ---------------------------------------------------------------- 8. which PBX this is
@pytest.mark.parametrize(("recorded", "told", "needs", "accept", "problem"), [
    (None, "A", False, False, None),
    ("A", "A", True, False, None),
    ("A", "B", False, False, "serial A"),
    ("A", "B", False, True, None),
    (None, None, False, False, None),
    (None, None, True, False, "{pbx_sn}"),
    ("A", None, False, False, "no longer tells"),       # another PBX behind the URL, without the endpoint
    ("A", None, False, True, None),
])
def test_identity_problem(recorded: str | None, told: str | None, needs: bool, accept: bool,
                          problem: str | None) -> None:
    got = identity_problem(recorded, told, layout_needs_sn=needs, accept_new=accept)
    assert (got is None) == (problem is None) and (problem is None or problem in str(got))


async def test_the_pbx_serial_is_in_sidecars_status_check_and_the_layout(start_sim: SimFactory,
                                                                         tmp_path: Path) -> None:
    sim = await start_sim(count=2, sn="PBX-0042")
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000, 1001]},
                                                      "archive": {"layout": "{pbx_sn}/{year}/{file}"}})
    result = await _once(cfg)
    assert result.counts["done"] == 2
    files = archive_files(tmp_path / "archive")
    assert all(p.startswith("PBX-0042/") for p in files)
    sidecar = json.loads(next((tmp_path / "archive").rglob("*.wav.json")).read_text())
    assert sidecar["pbx_sn"] == "PBX-0042"
    status = await asyncio.to_thread(run_cli, "status", "--json", "-c", str(cfg))
    assert json.loads(status.stdout)["pbx"]["sn"] == "PBX-0042"
    check = await asyncio.to_thread(run_cli, "check", "-c", str(cfg))
    assert "PBX serial PBX-0042, firmware 37.12.0.22" in check.stdout


async def test_a_new_pbx_s_recordings_with_the_old_one_s_ids_are_archived_not_skipped(
        start_sim: SimFactory, tmp_path: Path) -> None:
    """After --new-pbx, ids start again: before, the new PBX's 1000 and 1001 were taken for the old
    PBX's (done) and skipped, and discovery, its high-water mark at the old PBX's newest id, never
    looked at them. Discovery also wrote the ledger before the serial was checked."""
    old = await start_sim(count=2, sn="FIRST", seed=1)
    cfg = write_config(tmp_path, old.base_url, extra={"sources": {"ids": [1000, 1001]}})
    assert (await _once(cfg)).counts["done"] == 2
    new = await start_sim(count=3, sn="SECOND", seed=2)
    cfg = write_config(tmp_path, new.base_url, extra={"sources": {"ids": [1000], "discover": {"enabled": True}}})
    refused = await _once(cfg)                              # another serial, not told: nothing written
    ledger = LedgerDb(load_config(cfg).state.path)
    try:
        assert ledger.kv_get("discover.high_water") is None and refused.counts["done"] == 2
    finally:
        ledger.close()
    result = await _once(cfg, new_pbx=True)
    assert result.counts["failed"] == 0, result.counts
    archived = archive_files(tmp_path / "archive")
    for sim in (old, new):
        for rec in sim.recordings:
            assert sim.content(rec) in archived.values(), f"{sim.opts.sn} {rec.id} not archived"
    assert len(archived) == 5
    status = json.loads((await asyncio.to_thread(run_cli, "status", "--json", "-c", str(cfg))).stdout)
    assert status["pbx"]["sn"] == "SECOND" and status["counts"]["done"] == 5


def test_another_pbx_behind_the_same_config_is_refused_unless_told(tmp_path: Path) -> None:
    """Item 8: recording ids are per PBX; another one's 1000 is not the ledger's 1000."""
    from tests.conftest import simulator_subprocess
    with simulator_subprocess("--count", "2", "--sn", "FIRST") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}})
        assert run_cli("once", "-c", str(cfg)).returncode == 0
    with simulator_subprocess("--count", "2", "--sn", "SECOND") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1001]}})
        refused = run_cli("once", "-c", str(cfg))
        assert refused.returncode == 2 and "serial FIRST" in refused.stderr and "--new-pbx" in refused.stderr
        assert "cannot be used as configured" in refused.stderr and "refused us" not in refused.stderr
        # check says so too, before once or run meets it: a local failure (exit 2), the PBX itself is fine.
        checked = run_cli("check", "-c", str(cfg))
        assert checked.returncode == 2, checked.stderr
        assert "check: FAILED: the ledger was filled from the PBX with serial FIRST" in checked.stderr
        assert "answers as SECOND" in checked.stderr and "check: OK: logged in" in checked.stdout
        told = run_cli("once", "--new-pbx", "-c", str(cfg))
        assert told.returncode == 0, told.stderr
        assert run_cli("check", "-c", str(cfg)).returncode == 0     # the ledger's PBX now
        assert json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["pbx"]["sn"] == "SECOND"
