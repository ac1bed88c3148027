"""The lifecycle of ``run`` and ``once``: startup → main loop → one shutdown sequence → one summary."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.archive import ArchiveDir
from daemon.client import PbxClient
from daemon.clock import Clock, SystemClock, sleep_or_stop
from daemon.config import Config
from daemon.discovery import Discovery
from daemon.downloader import Downloader
from daemon.errors import ArchiverError, FatalAuthError
from daemon.ledger import Ledger, Ref, RunLock
from daemon.reconcile import ReconcileReport, reconcile
from daemon.resolver import RequestGate, Resolver
from daemon.scheduler import RunStats, Scheduler
from daemon.sources import QueueTail, follow_queue

log = structlog.get_logger("daemon.runner")

DISCOVER_ONCE_TRIES = 5


@dataclass(frozen=True)
class RunResult:
    stats: RunStats
    counts: dict[str, int]
    reconcile: ReconcileReport
    fatal: FatalAuthError | None
    elapsed_s: float


@dataclass
class Pipeline:
    """The live parts of a run, for progress reporting (and, later, health and metrics)."""

    ledger: Ledger
    scheduler: Scheduler
    downloader: Downloader


ProgressHook = Callable[[Pipeline, asyncio.Event], Coroutine[Any, Any, None]]


async def run_pipeline(cfg: Config, stop: asyncio.Event, *, once: bool, clock: Clock | None = None,
                       progress: ProgressHook | None = None) -> RunResult:
    """Archive until ``stop`` (``run``) or until everything queued has ended (``once``).

    Raises StorageError when the archive or the ledger cannot be opened (or another runner holds it).
    """
    clock = clock or SystemClock()
    started = clock.monotonic()
    archive = ArchiveDir(cfg.archive.dir)
    await asyncio.to_thread(archive.ensure_root)
    lock = RunLock(cfg.state.path)
    lock.acquire()
    try:
        async with Ledger(cfg.state.path) as ledger:
            report = await ledger.call(lambda db: reconcile(db, archive, now=clock.wall(),
                                                            skip=cfg.state.path.parent, sidecars=cfg.archive.sidecar))
            if cfg.sources.ids:
                refs = [Ref(rec_id=i) for i in cfg.sources.ids]
                added = await ledger.call(lambda db: db.enqueue_many(refs, source="config", now=clock.wall()))
                log.info("sources.config_ids", ids=len(refs), added=added)
            async with PbxClient(cfg.pbx, clock=clock, read_timeout_s=cfg.downloads.read_timeout_s,
                                 url_lifetime_s=cfg.downloads.url_lifetime_s) as client:
                gate = RequestGate(cfg.pbx.recording_format)
                resolver = Resolver(client, clock, gate, cfg.downloads.url_refresh_margin_s)
                downloader = Downloader(cfg, client, resolver, gate, ledger, clock, archive)
                scheduler = Scheduler(cfg, ledger, downloader, client, clock, stop, once=once)
                background = await _start_sources(cfg, ledger, scheduler, clock, stop, once=once)
                discovery_fatal = None
                if cfg.sources.discover.enabled:
                    discovery = Discovery(cfg.sources.discover, client, ledger, clock, scheduler.notify)
                    if once:
                        discovery_fatal = await _discover_once(discovery, clock, stop)
                    else:
                        background.append(asyncio.create_task(_guarded(discovery.run(stop)), name="discovery"))
                done = asyncio.Event()
                reporter = None if progress is None else asyncio.create_task(
                    progress(Pipeline(ledger, scheduler, downloader), done), name="progress")
                try:
                    stats = await scheduler.run()
                finally:
                    for task in background:
                        task.cancel()
                    await asyncio.gather(*background, return_exceptions=True)
                    done.set()  # the reporter draws its final line, then ends
                    if reporter is not None:
                        await asyncio.gather(reporter, return_exceptions=True)
                fatal = scheduler.fatal or discovery_fatal
            counts = await ledger.call(lambda db: db.counts())
    finally:
        lock.release()
    elapsed = clock.monotonic() - started
    log.info("run.summary", archived=stats.archived, downloaded=stats.downloaded, adopted=stats.adopted,
             failed=stats.failed, missing=stats.missing, retries=stats.retried, pauses=stats.pauses,
             bytes=stats.bytes, elapsed_s=round(elapsed, 2), ledger=counts)
    return RunResult(stats=stats, counts=counts, reconcile=report, fatal=fatal, elapsed_s=elapsed)


async def _start_sources(cfg: Config, ledger: Ledger, scheduler: Scheduler, clock: Clock, stop: asyncio.Event, *,
                         once: bool) -> list[asyncio.Task[None]]:
    """Read the queue file (once: as it stands, before work starts; run: tailed in the background)."""
    if cfg.sources.queue_file is None:
        return []
    tail = QueueTail(cfg.sources.queue_file)

    async def enqueue(refs: list[Ref]) -> int:
        added = await ledger.call(lambda db: db.enqueue_many(refs, source="queue", now=clock.wall()))
        if added:
            scheduler.notify()
        return added

    if once:
        await follow_queue(tail, enqueue, clock, cfg.sources.queue_poll_interval_s, stop, once=True)
        return []
    return [asyncio.create_task(_guarded(follow_queue(tail, enqueue, clock, cfg.sources.queue_poll_interval_s,
                                                      stop)), name="queue-tail")]


async def _discover_once(discovery: Discovery, clock: Clock, stop: asyncio.Event) -> FatalAuthError | None:
    """Queue everything the PBX holds before ``once`` works it off; PBX trouble is retried a few times."""
    for attempt in range(1, DISCOVER_ONCE_TRIES + 1):
        try:
            await discovery.run_once()
            return None
        except FatalAuthError as exc:
            return exc
        except ArchiverError as exc:
            log.warning("discover.once_failed", attempt=attempt, error=str(exc))
            if attempt == DISCOVER_ONCE_TRIES or await sleep_or_stop(clock, 2.0 ** attempt, stop):
                log.error("discover.gave_up", action="archiving what is queued so far")
                return None
    return None


async def _guarded(coro: Awaitable[None]) -> None:
    """A source must never take the daemon down: log and give up on it, the pipeline goes on."""
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await coro
        except Exception:
            log.exception("sources.failed")
