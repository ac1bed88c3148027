"""Discovery against the simulator: back-fill, polling, checkpoint, filters, sweep, WebSocket events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon.client import PbxClient
from daemon.config import DiscoverConfig, load_config
from daemon.discovery import Discovery, event_recording, item_ref, wanted
from daemon.ledger import Ledger, LedgerDb, Ref
from daemon.runner import run_pipeline
from daemon.simulator import Simulator
from tests.conftest import SimFactory, pbx_config, run_cli, write_config

ITEM = {"id": 614, "time": "01/12/2022 17:36:24", "uid": "2022011217362446627", "call_from": "Evelyn<5566>",
        "call_to": "Dave Harris<5556>", "duration": 250, "size": 825588, "call_type": "Internal",
        "file": "20220112173629-1641980184.14-5566-5556-Internal.wav", "archive_status": "x"}


# ---------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(("cfg", "item", "keep"), [
    (DiscoverConfig(), ITEM, True),
    (DiscoverConfig(since_id=614), ITEM, True),
    (DiscoverConfig(since_id=615), ITEM, False),
    (DiscoverConfig(since_date="2022-01-12"), ITEM, True),
    (DiscoverConfig(since_date="2022-01-13"), ITEM, False),
    (DiscoverConfig(since_date="2022-01-13"), {**ITEM, "file": "odd-name.wav"}, True),   # no date: keep
    (DiscoverConfig(call_types=("Inbound", "Outbound")), ITEM, False),
    (DiscoverConfig(call_types=("Internal",)), ITEM, True),
    (DiscoverConfig(call_types=("Inbound",)), {k: v for k, v in ITEM.items() if k != "call_type"}, True),
    (DiscoverConfig(min_duration_s=250), ITEM, True),
    (DiscoverConfig(min_duration_s=251), ITEM, False),
])
def test_filters(cfg: DiscoverConfig, item: dict[str, Any], keep: bool) -> None:
    assert wanted(item, cfg) is keep


def test_item_ref_keeps_the_metadata_the_pipeline_uses() -> None:
    ref = item_ref(ITEM)
    assert ref is not None
    assert ref.rec_id == 614 and ref.file == ITEM["file"]
    assert dict(ref.meta) == {k: ITEM[k] for k in ("size", "time", "uid", "call_from", "call_to", "call_type",
                                                   "duration")}
    assert item_ref({"id": "614"}) is None
    assert item_ref({"id": True}) is None
    assert item_ref({**ITEM, "size": "big"}) is not None and "size" not in dict(item_ref({**ITEM, "size": "big"})
                                                                                 .meta)  # type: ignore[union-attr]


@pytest.mark.parametrize(("event", "name"), [
    ({"type": 30012, "sn": "x", "msg": '{"recording": "a.wav", "uid": "1"}'}, "a.wav"),
    ({"type": 30012, "msg": '{"recording": ""}'}, None),
    ({"type": 30012, "msg": "not json"}, None),
    ({"type": 30011, "msg": '{"recording": "a.wav"}'}, None),
    ({"type": 30012, "msg": {"recording": "b.wav"}}, "b.wav"),
])
def test_event_recording(event: dict[str, Any], name: str | None) -> None:
    assert event_recording(event) == name


# ---------------------------------------------------------------- against the simulator


@asynccontextmanager
async def discovering(sim: Simulator, path: Path, **cfg: Any) -> AsyncIterator[tuple[Discovery, LedgerDb]]:
    """A Discovery with its own client and ledger, as one `run` would have; the ledger readable too."""
    async with Ledger(path) as ledger, PbxClient(pbx_config(sim.base_url)) as client:
        discovery = Discovery(DiscoverConfig(enabled=True, **cfg), client, ledger, client.clock, lambda: None)
        reader = LedgerDb(path)
        try:
            yield discovery, reader
        finally:
            reader.close()


def _ids(db: LedgerDb) -> set[int]:
    return {r.rec_id for r in db.rows() if r.rec_id is not None}


async def test_a_full_backfill_of_1000_recordings_through_paging(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1000)
    async with discovering(sim, tmp_path / "l.db", page_size=100) as (discovery, db):
        await discovery.run_once()
        rows = db.rows()
        assert {r.rec_id for r in rows} == {r.id for r in sim.recordings}
        assert all(r.file and r.meta.get("size") for r in rows)   # enqueued with the PBX metadata
        pages = [p for p, order in sim.list_queries if order == "desc"]
        # the newest id; the poll (its overlap reaches into a second page); ten back-fill pages and the end
        assert len(pages) == 1 + 2 + 11


async def test_the_checkpoint_survives_a_restart(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=300)
    async with discovering(sim, tmp_path / "l.db", page_size=50, overlap_ids=20) as (discovery, _):
        await discovery.run_once()
    sim.list_queries.clear()
    for _ in range(3):
        await sim.add_recording()
    async with discovering(sim, tmp_path / "l.db", page_size=50, overlap_ids=20) as (discovery, db):
        await discovery.run_once()          # a restart: no full re-listing
        assert sim.list_queries == [(1, "desc")]
        assert _ids(db) == {r.id for r in sim.recordings}


async def test_recordings_inserted_while_paging_are_not_missed(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=250, grow_on_list=2)
    async with discovering(sim, tmp_path / "l.db", page_size=40, overlap_ids=10) as (discovery, db):
        await discovery.run_once()
        sim.control(options={"grow_on_list": 0})
        await discovery.poll_new()
        assert len(sim.recordings) > 260
        assert _ids(db) == {r.id for r in sim.recordings}


async def test_a_restart_in_the_middle_of_the_first_backfill_resumes_it(start_sim: SimFactory,
                                                                        tmp_path: Path) -> None:
    sim = await start_sim(count=500)
    async with discovering(sim, tmp_path / "l.db", page_size=50, overlap_ids=0) as (discovery, db):
        await discovery.start()
        for _ in range(4):
            assert not await discovery.backfill_step()
        assert len(db.rows()) == 200
    sim.list_queries.clear()
    async with discovering(sim, tmp_path / "l.db", page_size=50, overlap_ids=0) as (discovery, db):
        await discovery.run_once()
        desc_pages = [p for p, order in sim.list_queries if order == "desc"]
        # The poll for new recordings (page 1), then the back-fill one page back from where it stopped.
        assert desc_pages == [1, 4, 5, 6, 7, 8, 9, 10, 11]
        assert _ids(db) == {r.id for r in sim.recordings}


async def test_filters_apply_to_what_is_enqueued(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=120)
    async with discovering(sim, tmp_path / "l.db", call_types=("Inbound",), since_id=1030) as (discovery, db):
        await discovery.run_once()
        expected = {r.id for r in sim.recordings if r.call_type == "Inbound" and r.id >= 1030}
        assert _ids(db) == expected and expected


async def test_the_sweep_enqueues_what_was_missed_and_reports_what_vanished(start_sim: SimFactory,
                                                                            tmp_path: Path) -> None:
    sim = await start_sim(count=60)
    async with discovering(sim, tmp_path / "l.db", page_size=25) as (discovery, db):
        await discovery.run_once()
        gone = sim.recordings.pop(10)                 # deleted on the PBX before it was archived
        db.conn.execute("DELETE FROM recordings WHERE rec_id = ?", (sim.recordings[20].id,))   # missed
        added, vanished = await discovery.sweep()
        assert (added, vanished) == (1, 1)
        row = db.get(f"id:{gone.id}")
        assert row is not None and row.state == "missing" and "vanished" in (row.last_error or "")


async def _wait_for(predicate: Callable[[], bool], limit_s: float = 15.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(wait(), limit_s)


def _done(cfg_path: Path) -> int:
    db = LedgerDb(load_config(cfg_path).state.path)
    try:
        return db.counts()["done"]
    finally:
        db.close()


async def test_new_recordings_are_archived_within_one_poll_interval(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=5)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True, "interval_s": 1}}})
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False))
    await _wait_for(lambda: _done(cfg) == 5)
    await sim.add_recording()
    await sim.add_recording()
    await _wait_for(lambda: _done(cfg) == 7, limit_s=10)
    stop.set()
    await asyncio.wait_for(task, 20)


async def test_with_events_new_recordings_arrive_within_seconds_and_drops_are_covered_by_polling(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=3)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {
        "enabled": True, "interval_s": 3600, "events": True, "heartbeat_s": 1}}})
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False))
    await _wait_for(lambda: _done(cfg) == 3 and sim.counters.ws_connections == 1)
    await sim.add_recording()                       # the poll is an hour away: only the event can bring it
    await _wait_for(lambda: _done(cfg) == 4, limit_s=10)
    assert sim.counters.events_sent == 1
    await _wait_for(lambda: sim.counters.ws_heartbeats >= 1, limit_s=5)
    stop.set()
    await asyncio.wait_for(task, 20)
    db = LedgerDb(load_config(cfg).state.path)
    try:
        assert len(db.rows()) == 4                  # the event's file row was replaced by the id row
        assert db.kv_get("discover.last_event_at") is not None
    finally:
        db.close()


async def test_a_dropped_websocket_reconnects_and_polling_picks_up_what_it_missed(start_sim: SimFactory,
                                                                                  tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {
        "enabled": True, "interval_s": 1, "events": True}}})
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False))
    await _wait_for(lambda: _done(cfg) == 2 and sim.counters.ws_connections == 1)
    await sim.drop_websockets()
    await sim.add_recording()                       # nobody is subscribed: this event is lost
    assert sim.counters.events_sent == 0
    await _wait_for(lambda: _done(cfg) == 3, limit_s=10)
    await _wait_for(lambda: sim.counters.ws_connections == 2, limit_s=10)
    stop.set()
    await asyncio.wait_for(task, 20)


async def test_once_with_discovery_archives_everything_and_status_shows_the_checkpoint(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=30)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"discover": {"enabled": True, "page_size": 7}}})
    result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    assert result.counts["done"] == 30
    status = run_cli("status", "-c", str(cfg))
    assert "discovery: newest id seen 1029, back-fill done" in status.stdout
    assert "last poll 20" in status.stdout


def test_enqueue_by_file_then_by_id_keeps_one_row(tmp_path: Path) -> None:
    db = LedgerDb(tmp_path / "l.db")
    try:
        db.enqueue([Ref(file="a.wav")], source="event", now=0)
        db.enqueue([Ref(rec_id=7, file="a.wav", meta=(("size", 10),))], source="discover", now=0)
        rows = db.rows()
        assert [(r.key, r.meta.get("size")) for r in rows] == [("id:7", 10)]
        db.enqueue([Ref(file="a.wav")], source="event", now=0)
        assert len(db.rows()) == 1
    finally:
        db.close()
