"""Discovery: find every recording the PBX makes without being told its id.

Four parts, all idempotent against the ledger: a poll of ``recording/list`` by id descending down to
the persisted high-water mark (minus an overlap for late arrivals); a resumable back-fill of what
the PBX held before the first poll; a periodic full sweep that enqueues anything missed and reports
recordings that vanished before they were archived; and, optionally, 30012 events over the PBX
WebSocket for pick-up within seconds. Events can be missed, so polling always runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from daemon.client import BLOCK_LIFT_MARGIN_S
from daemon.clock import Clock, sleep_or_stop
from daemon.config import DiscoverConfig
from daemon.errors import ArchiverError, FatalAuthError
from daemon.ledger import KV_BACKFILL, KV_HIGH_WATER, META_FIELDS, Ledger, Ref
from daemon.supervise import Loops

if TYPE_CHECKING:  # status reads discovery's checkpoint keys: it must not pay for aiohttp
    from daemon.client import PbxClient
    from daemon.identity import PbxIdentity

log = structlog.get_logger("daemon.discovery")

KV_LAST_POLL = "discover.last_poll_at"
KV_LAST_EVENT = "discover.last_event_at"
KV_LAST_SWEEP = "discover.last_sweep_at"
EVENT_NEW_CDR = 30012
STALE_PAGES = 3            # pages in a row with nothing new, or past total_number, end a listing
SEARCH_BATCH = 50          # ids per recording/search call when confirming that recordings are gone
_NAME_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})\d{6}-")
_NAME_CALL_TYPE = re.compile(r"-(Inbound|Outbound|Internal)\.(?:wav|mp3)$")
_META_TYPES: dict[str, type] = {"size": int, "duration": int, "time": str, "uid": str, "call_from": str,
                                "call_to": str, "call_type": str}


def item_ref(item: dict[str, Any]) -> Ref | None:
    """A listing item as a ledger ref with its metadata; None when it has no usable id. Pure."""
    rec_id = item.get("id")
    if not isinstance(rec_id, int) or isinstance(rec_id, bool) or rec_id <= 0:
        return None
    file = item.get("file") if isinstance(item.get("file"), str) and item.get("file") else None
    meta = tuple((k, item[k]) for k in META_FIELDS if isinstance(item.get(k), _META_TYPES[k])
                 and not isinstance(item.get(k), bool))
    return Ref(rec_id=rec_id, file=file, meta=meta)


def page_capped(page_no: int, size: int, got: int, total: int, short_before: int | None) -> bool:
    """Whether a PBX gave fewer items per page than asked because it caps ``page_size``. Pure.

    By ``total_number``: the first page holds fewer than it says; a later page, it says a full page was
    due (not merely one more item: a count that is off by one must not make the last, naturally short
    page look capped, and paging drop to its size). Without a usable total: a short page followed by a
    non-empty one (``short_before``: the previous page's count when it was short); a short first page
    alone is settled by the caller with one more request."""
    if got <= 0:
        return False
    if got < size and total > 0:
        if page_no == 1:
            return total > got       # the first page is full up to the total, whatever its offsets
        return total >= (page_no - 1) * size + size
    return total <= 0 and short_before is not None and page_no > 1


def name_date(file: str | None) -> str | None:
    """YYYY-MM-DD from the PBX file name's prefix, if it has one."""
    m = _NAME_DATE.match(file or "")
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def wanted(item: dict[str, Any], cfg: DiscoverConfig) -> bool:
    """The operator's filters: since (id or date), call types, minimum duration. Pure; tested as a table.

    A value the PBX did not send never excludes a recording: better one too many than one missed."""
    rec_id = item.get("id")
    if cfg.since_id is not None and isinstance(rec_id, int) and rec_id < cfg.since_id:
        return False
    date = name_date(item.get("file"))
    if cfg.since_date is not None and date is not None and date < cfg.since_date:
        return False
    call_type = item.get("call_type")
    if cfg.call_types and isinstance(call_type, str) and call_type not in cfg.call_types:
        return False
    duration = item.get("duration")
    return not (cfg.min_duration_s and isinstance(duration, int) and duration < cfg.min_duration_s)


def event_recording(event: dict[str, Any]) -> str | None:
    """The recording file name of a 30012 event, or None (another event, an unrecorded call). Pure."""
    if event.get("type") != EVENT_NEW_CDR:
        return None
    msg = event.get("msg")
    try:
        body = json.loads(msg) if isinstance(msg, str) else msg
    except json.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    name = body.get("recording")
    return name if isinstance(name, str) and name.strip() else None


def event_item(file: str) -> dict[str, Any]:
    """What an event tells of a recording, in listing form, for the filters."""
    m = _NAME_CALL_TYPE.search(file)
    return {"file": file, **({"call_type": m.group(1)} if m else {})}


@dataclass
class Backfill:
    """Progress of the first back-fill: the next page (by id, descending, of ``size`` items) and the id
    it started under."""

    page: int
    top: int
    done: bool
    size: int = 0

    def dump(self) -> str:
        return json.dumps({"page": self.page, "top": self.top, "done": self.done, "size": self.size})

    @classmethod
    def load(cls, text: str | None) -> Backfill | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(page=int(data["page"]), top=int(data["top"]), done=bool(data["done"]),
                   size=int(data.get("size") or 0))


class Discovery:
    """Polls, back-fills, sweeps and listens; every recording found goes into the ledger."""

    def __init__(self, cfg: DiscoverConfig, client: PbxClient, ledger: Ledger, clock: Clock,
                 notify: Callable[[], None], loops: Loops | None = None, identity: PbxIdentity | None = None) -> None:
        self.cfg = cfg
        self.client = client
        self.ledger = ledger
        self.clock = clock
        self.notify = notify
        self.loops = loops or Loops(clock)
        self.page_size = cfg.page_size     # lowered to what the PBX really gives, once seen
        self._backfill_short: int | None = None  # the back-fill's last page count, when short
        self._poke = asyncio.Event()
        self.polls = 0
        self.stop: asyncio.Event | None = None   # a listing ends at the page where this is set
        # Ids are only unique within one PBX: nothing is written to the ledger before its serial is checked.
        self.identity = identity

    # ---------------------------------------------------------------- ledger state
    async def _kv(self, key: str) -> str | None:
        return await self.ledger.call(lambda db: db.kv_get(key))

    async def _set(self, key: str, value: str) -> None:
        await self.ledger.call(lambda db: db.kv_set(key, value))

    async def _enqueue(self, items: list[dict[str, Any]], source: str) -> int:
        refs = [ref for item in items if wanted(item, self.cfg) and (ref := item_ref(item)) is not None]
        if not refs:
            return 0
        now = self.clock.wall()
        added = await self.ledger.call(lambda db: db.enqueue(refs, source=source, now=now))
        if added:
            self.notify()
        return added

    async def start(self) -> None:
        """Check which PBX this is; on the very first run (or the first on a new PBX): remember the
        newest id as the high-water mark and plan the back-fill."""
        if self.identity is not None:
            await self.identity.ensure()
        if await self._kv(KV_HIGH_WATER) is not None:
            return
        page = await self.client.list_recordings(page=1, page_size=1, sort_by="id", order_by="desc")
        top = page.items[0]["id"] if page.items else 0
        await self._set(KV_BACKFILL, Backfill(page=1, top=top, done=top == 0, size=self.page_size).dump())
        await self._set(KV_HIGH_WATER, str(top))
        log.info("discover.initialised", newest_id=str(top), recordings=page.total)

    # ---------------------------------------------------------------- paging
    async def _page(self, page_no: int, short: int | None = None) -> tuple[list[dict[str, Any]], bool, int]:
        """One page of ``recording/list`` by id, newest first, as (items, capped). ``capped``: the PBX
        gave fewer items than asked while it holds more — it caps page_size (the maximum is not
        documented), and from now on pages are asked for in its size, so that page numbers mean the
        same to both sides. Newest first, because Auto Cleanup deletes the oldest: that shifts no
        earlier page, where oldest-first paging would skip what slides past it."""
        size = self.page_size
        page = await self.client.list_recordings(page=page_no, page_size=size, sort_by="id", order_by="desc")
        capped = page_capped(page_no, size, len(page.items), page.total, short)
        if not capped and page_no == 1 and page.total <= 0 and 0 < len(page.items) < size:
            # A short first page and no total: all there is, or a cap? Page 2 in that size tells (a
            # PBX that offsets pages by the asked size would answer an empty page 2 in ours).
            probe = await self.client.list_recordings(page=2, page_size=len(page.items), sort_by="id",
                                                      order_by="desc")
            capped = bool([i for i in probe.items if i["id"] < min(j["id"] for j in page.items)])
        if capped:
            # The PBX's size: this page's, or (detected one page late, with no total) the short one's.
            self.page_size = len(page.items) if len(page.items) < size else (short or size)
            log.warning("pbx.page_size_capped", asked=size, got=self.page_size,
                        action=f"paging by {self.page_size} from now on")
        return page.items, capped, page.total

    async def _walk(self, *, first_page: int = 1, floor: int | None = None) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages newest first, each id once, down to an empty page (never "fewer than asked": a capped
        PBX gives fewer on every page) or to a page reaching ``floor``."""
        seen_below: int | None = None  # the lowest id seen: anything at or above it came already
        page_no = first_page
        stale = 0                      # pages in a row that brought nothing new
        short: int | None = None       # the previous page's count, when it was short (cap detection)
        while self.stop is None or not self.stop.is_set():
            items, capped, _total = await self._page(page_no, short)
            short = len(items) if 0 < len(items) < self.page_size and not capped else None
            if capped:
                page_no = 1 if first_page == 1 else max(1, page_no - 1)  # start over in the PBX's size
                continue
            if not items:
                return
            fresh = [i for i in items if seen_below is None or i["id"] < seen_below]
            if fresh:
                stale = 0
                seen_below = min(i["id"] for i in fresh)
                yield fresh
            else:
                # Newer recordings push older ones down a page now and then; page after page of
                # nothing new is a PBX that ignores ``page`` (it never answers an empty one).
                stale += 1
                if stale >= STALE_PAGES:
                    log.warning("pbx.paging_stuck", page=page_no, action="ending this listing; the next one "
                                "starts from the newest again")
                    return
            if floor is not None and any(i["id"] <= floor for i in items):
                return
            page_no += 1

    # ---------------------------------------------------------------- polling
    async def poll_new(self) -> int:
        """Enqueue recordings newer than the high-water mark (minus the overlap). Returns how many were new."""
        high = int(await self._kv(KV_HIGH_WATER) or 0)
        floor = high - self.cfg.overlap_ids
        newest, added, pages = high, 0, 0
        async for items in self._walk(floor=floor):
            pages += 1
            fresh = [item for item in items if item["id"] > floor]
            added += await self._enqueue(fresh, "discover")
            newest = max([newest, *(item["id"] for item in fresh)])
        if newest > high:
            await self._set(KV_HIGH_WATER, str(newest))
        await self._set(KV_LAST_POLL, str(self.clock.wall()))
        self.polls += 1
        log.info("discover.polled", added=added, high_water=newest, pages=pages)
        return added

    # ---------------------------------------------------------------- back-fill
    async def backfill_step(self) -> bool:
        """One page of the back-fill, its progress persisted. True once the back-fill is complete."""
        state = Backfill.load(await self._kv(KV_BACKFILL))
        if state is None or state.done:
            return True
        if state.size == 0:            # written by an older version, which paged by the configured size
            state.size = self.cfg.page_size
        if state.size < self.page_size and self.page_size == self.cfg.page_size:
            # A new process resuming a back-fill paged in a cap learnt before: keep paging in it.
            self.page_size = state.size
        if state.size != self.page_size:
            # Pages were counted in another size (a capped PBX, a changed page_size): start over,
            # by id; what was enqueued already is known to the ledger.
            state.page, state.size = 1, self.page_size
        items, capped, total = await self._page(state.page, self._backfill_short if state.page > 1 else None)
        self._backfill_short = len(items) if 0 < len(items) < self.page_size and not capped else None
        if capped:
            state.page, state.size = 1, self.page_size
            await self._set(KV_BACKFILL, state.dump())
            return False
        # Newer than the start: the poll covers those. Older than since_id: not wanted, and nothing
        # further down is either, so the back-fill is over.
        wanted_items = [item for item in items if item["id"] <= state.top]
        added = await self._enqueue(wanted_items, "backfill")
        below_since = self.cfg.since_id is not None and any(item["id"] < self.cfg.since_id for item in items)
        # Pages past the PBX's own count (with room for recordings added meanwhile): a PBX that ignores
        # ``page`` never answers an empty one, and the back-fill must still end.
        # A total no bigger than a later page's own items is no count of the whole (some firmware gives
        # the page's own count): it ends nothing.
        whole = not (state.page > 1 and total <= len(items))
        beyond = total > 0 and whole and (state.page - STALE_PAGES) * state.size >= total
        if beyond and items:
            log.warning("pbx.paging_stuck", page=state.page, total=total, action="ending the back-fill")
        state.done = below_since or not items or beyond
        state.page += 1
        await self._set(KV_BACKFILL, state.dump())
        if state.done:
            await self._set(KV_LAST_SWEEP, str(self.clock.wall()))  # the back-fill was a full listing
        log.info("discover.backfill_page", page=state.page - 1, added=added, done=state.done)
        return state.done

    async def resume_backfill(self) -> None:
        """After a restart, step back one page: recordings deleted meanwhile shift the rest up."""
        state = Backfill.load(await self._kv(KV_BACKFILL))
        if state is not None and not state.done and state.page > 1:
            state.page -= 1
            await self._set(KV_BACKFILL, state.dump())
            log.info("discover.backfill_resumed", page=state.page)

    # ---------------------------------------------------------------- sweep
    async def sweep(self) -> tuple[int, int]:
        """List everything; enqueue what the ledger lacks; mark missing what vanished unarchived — but
        only once ``recording/search?ids=`` confirms, id by id, that the PBX no longer has it (a
        listing that Auto Cleanup ran through is no proof). Returns (added, vanished)."""
        present: set[int] = set()
        added = 0
        async for items in self._walk():
            present.update(item["id"] for item in items)
            added += await self._enqueue(items, "sweep")
        now = self.clock.wall()

        def unlisted(db: Any) -> list[Any]:
            return [row for state in ("pending", "failed") for row in db.rows(state)
                    if row.rec_id is not None and row.rec_id not in present]
        candidates = await self.ledger.call(unlisted)
        still_there = await self.confirm_present([row.rec_id for row in candidates])
        gone = [row for row in candidates if row.rec_id not in still_there]

        def mark(db: Any) -> None:
            for row in gone:
                db.finish(row.key, state="missing", error="vanished from the PBX before it was archived", now=now)
        if gone:
            await self.ledger.call(mark)
        for row in gone:
            log.warning("discover.vanished", recording=row.ref, action="marked missing")
        await self._set(KV_LAST_SWEEP, str(now))
        log.info("discover.swept", listed=len(present), added=added, vanished=len(gone),
                 unlisted_but_present=len(candidates) - len(gone))
        return added, len(gone)

    async def confirm_present(self, ids: list[int]) -> set[int]:
        """The ids among ``ids`` the PBX still has, asked ``SEARCH_BATCH`` at a time — no more per
        page than the PBX is known to give, and page by page while an answer comes back full (a PBX
        that caps page_size would otherwise leave present ids unconfirmed, and they would be marked
        missing)."""
        found: set[int] = set()
        per_page = max(1, min(SEARCH_BATCH, self.page_size))
        for n in range(0, len(ids), SEARCH_BATCH):
            batch = ids[n:n + SEARCH_BATCH]
            wanted = set(batch)
            for page_no in range(1, len(batch) + 2):
                page = await self.client.search_recordings(page=page_no, page_size=per_page,
                                                           ids=",".join(str(i) for i in batch))
                listed = {item["id"] for item in page.items}
                if listed - wanted:
                    # The PBX ignored ids= (it answered others): nothing can be confirmed gone this way.
                    log.warning("pbx.search_ignores_ids", action="marking nothing missing in this sweep")
                    return set(ids)
                found |= listed
                more = len(page.items) >= per_page or page.total > page_no * per_page
                if not page.items or wanted <= found or not more:
                    break
        return found

    # ---------------------------------------------------------------- events
    async def on_event(self, event: dict[str, Any]) -> None:
        await self._set(KV_LAST_EVENT, str(self.clock.wall()))
        file = event_recording(event)
        if file is None:
            return
        item = event_item(file)
        log.info("discover.event", recording=file)
        # The minimum duration cannot be judged from a name: leave those to the poll, woken now.
        if wanted(item, self.cfg) and not self.cfg.min_duration_s:
            added = await self.ledger.call(lambda db: db.enqueue([Ref(file=file)], source="event",
                                                                 now=self.clock.wall()))
            if added:
                self.notify()
        self._poke.set()

    async def listen(self, stop: asyncio.Event) -> None:
        """Keep a WebSocket subscription up; reconnect with back-off and a fresh token."""
        backoff = 1.0
        while not stop.is_set():
            try:
                async for event in self.client.events([EVENT_NEW_CDR], heartbeat_s=self.cfg.heartbeat_s,
                                                      on_subscribed=lambda: self.loops.ok("discover.events")):
                    backoff = 1.0
                    try:
                        await self.on_event(event)
                        self.loops.ok("discover.events")
                    except ArchiverError as exc:
                        # The ledger could not take it (a full disk, say): the poll finds it later.
                        self.loops.failed("discover.events", exc)
                        log.warning("discover.event_not_saved", error=str(exc), action="left to the poll")
                        self._poke.set()
            except ArchiverError as exc:
                self.loops.failed("discover.events", exc)
                log.warning("discover.events_lost", error=str(exc), retry_in_s=round(backoff, 1))
                if await sleep_or_stop(self.clock, backoff * (0.5 + random.random() / 2), stop):
                    return
                backoff = min(backoff * 2, 60.0)

    # ---------------------------------------------------------------- lifecycles
    async def run_once(self, stop: asyncio.Event | None = None) -> bool:
        """``once``: poll and back-fill to the end, so that everything the PBX holds is queued. False
        when ``stop`` came first (the back-fill resumes where it stopped next time)."""
        self.stop = stop
        await self.start()
        await self.resume_backfill()
        await self.poll_new()
        while not await self.backfill_step():
            if stop is not None and stop.is_set():
                return False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """``run``: the poll loop, the back-fill, the sweep loop and (if enabled) the event listener."""
        self.stop = stop
        while not stop.is_set():
            try:
                await self.start()
                await self.resume_backfill()
                break
            except FatalAuthError as exc:
                self.loops.failed("discover.poll", exc)
                # 70004 with block_expire_time: when the PBX lifts its IP block, not the full interval.
                wait = self.client.cfg.auth_retry_interval_s if exc.retry_after_s is None else \
                    exc.retry_after_s + BLOCK_LIFT_MARGIN_S
                if await sleep_or_stop(self.clock, wait, stop):
                    return
            except ArchiverError as exc:
                self.loops.failed("discover.poll", exc)
                log.warning("discover.start_failed", error=str(exc))
                if await sleep_or_stop(self.clock, min(self.cfg.interval_s, 30.0), stop):
                    return
        tasks = [asyncio.create_task(self._poll_loop(stop), name="discover-poll"),
                 asyncio.create_task(self._backfill_loop(stop), name="discover-backfill"),
                 asyncio.create_task(self._sweep_loop(stop), name="discover-sweep")]
        if self.cfg.events:
            tasks.append(asyncio.create_task(self.listen(stop), name="discover-events"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._poke.clear()
            wait = self.cfg.interval_s
            try:
                await self.poll_new()
                self.loops.ok("discover.poll")
            except ArchiverError as exc:
                failures = self.loops.failed("discover.poll", exc)
                # Sooner than the interval while it fails, so that a passing fault costs little.
                wait = min(self.cfg.interval_s, 2.0 ** min(failures, 6))
                log.warning("discover.poll_failed", error=str(exc), retry_in_s=wait)
            await sleep_or_stop(self.clock, wait, stop, self._poke)

    async def _backfill_loop(self, stop: asyncio.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            try:
                if await self.backfill_step():
                    self.loops.ok("discover.backfill")
                    return
                self.loops.ok("discover.backfill")
                backoff = 1.0
            except ArchiverError as exc:
                self.loops.failed("discover.backfill", exc)
                log.warning("discover.backfill_failed", error=str(exc), retry_in_s=round(backoff, 1))
                await sleep_or_stop(self.clock, backoff, stop)
                backoff = min(backoff * 2, self.cfg.interval_s)

    async def _sweep_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                last = float(await self._kv(KV_LAST_SWEEP) or 0)
                due_in = last + self.cfg.sweep_interval_s - self.clock.wall()
                if due_in <= 0:
                    state = Backfill.load(await self._kv(KV_BACKFILL))
                    if state is None or state.done:  # the back-fill lists everything anyway
                        await self.sweep()
                        self.loops.ok("discover.sweep")
                        continue
                    due_in = min(self.cfg.interval_s, self.cfg.sweep_interval_s)
                self.loops.ok("discover.sweep")
            except ArchiverError as exc:
                self.loops.failed("discover.sweep", exc)
                log.warning("discover.sweep_failed", error=str(exc))
                due_in = min(self.cfg.interval_s, self.cfg.sweep_interval_s)
            await sleep_or_stop(self.clock, min(due_in, 3600.0), stop)
