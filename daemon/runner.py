"""The lifecycle of ``run`` and ``once``: startup → main loop → one shutdown sequence → one summary."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.archive import ArchiveDir
from daemon.client import PbxClient
from daemon.clock import Clock, SystemClock, sleep_or_stop
from daemon.config import LIVE_KEYS, Config, changed_keys, load_config, with_keys
from daemon.discovery import Discovery
from daemon.downloader import Downloader
from daemon.errors import ArchiverError, ConfigError, FatalAuthError
from daemon.ledger import Ledger, Ref, RunLock
from daemon.live import Pipeline
from daemon.logs import set_level
from daemon.notify import Notifier
from daemon.reconcile import ReconcileReport, reconcile
from daemon.resolver import RequestGate, Resolver
from daemon.scheduler import RunStats, Scheduler
from daemon.service import Health, HealthServer, Metrics, SdNotify, feed_watchdog
from daemon.sources import QueueTail, follow_queue

log = structlog.get_logger("daemon.runner")

DISCOVER_ONCE_TRIES = 5
STATUS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class RunResult:
    stats: RunStats
    counts: dict[str, int]
    reconcile: ReconcileReport
    fatal: FatalAuthError | None
    elapsed_s: float
    gave_up: bool = False


ProgressHook = Callable[[Pipeline, asyncio.Event], Coroutine[Any, Any, None]]


async def run_pipeline(cfg: Config, stop: asyncio.Event, *, once: bool, clock: Clock | None = None,
                       progress: ProgressHook | None = None, notify: SdNotify | None = None,
                       health: Health | None = None, reload: asyncio.Event | None = None) -> RunResult:
    """Archive until ``stop`` (``run``) or until everything queued has ended (``once``).

    ``run`` also serves health and metrics on ``service.listen`` and speaks sd_notify. Resources are
    closed in reverse order whatever happens. Raises StorageError when the archive or the ledger
    cannot be opened (or another runner holds it), ConfigError when ``service.listen`` is taken.
    """
    clock = clock or SystemClock()
    notify = notify or SdNotify()
    health = health or Health(clock)
    metrics = Metrics(health)
    started = clock.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        background = TaskSet()
        stack.push_async_callback(background.close)
        if not once:
            if cfg.service.listen:
                server = HealthServer(health, metrics)
                try:
                    await server.start(cfg.service.listen)
                except OSError as exc:
                    await server.stop()
                    raise ConfigError([f"service.listen: cannot listen on {cfg.service.listen!r}: "
                                       f"{exc.strerror or exc}"]) from exc
                stack.push_async_callback(server.stop)
            if notify.watchdog_s is not None:
                window = notify.watchdog_s
                background.start(feed_watchdog(notify, lambda: health.alive(window), clock, stop), "watchdog")
        archive = ArchiveDir(cfg.archive.dir)
        await asyncio.to_thread(archive.ensure_root)
        lock = RunLock(cfg.state.path)
        lock.acquire()
        stack.callback(lock.release)
        ledger = await stack.enter_async_context(Ledger(cfg.state.path))
        report = await ledger.call(lambda db: reconcile(db, archive, now=clock.wall(), skip=cfg.state.path.parent,
                                                        sidecars=cfg.archive.sidecar))
        if cfg.sources.ids:
            refs = [Ref(rec_id=i) for i in cfg.sources.ids]
            added = await ledger.call(lambda db: db.enqueue_many(refs, source="config", now=clock.wall()))
            log.info("sources.config_ids", ids=len(refs), added=added)
        client = await stack.enter_async_context(PbxClient(
            cfg.pbx, clock=clock, read_timeout_s=cfg.downloads.read_timeout_s,
            url_lifetime_s=cfg.downloads.url_lifetime_s, token_store=token_store_path(cfg)))
        gate = RequestGate(cfg.pbx.recording_format)
        resolver = Resolver(client, clock, gate, cfg.downloads.url_refresh_margin_s,
                            on_resolve=metrics.resolve_seconds.observe)
        downloader = Downloader(cfg, client, resolver, gate, ledger, clock, archive)
        scheduler = Scheduler(cfg, ledger, downloader, client, clock, stop, once=once,
                              on_archived=metrics.download_seconds.observe)
        pipeline = Pipeline(ledger, scheduler, downloader)
        await _refresh_counts(health, ledger)  # before the pipeline shows: no scrape sees "never archived"
        health.pipeline = pipeline
        # Ready once the local prerequisites hold (config, ledger, archive): never wait for the PBX,
        # so that a PBX outage cannot turn into a start-up timeout and a restart loop.
        notify.send("READY=1", f"STATUS={_status_line(health)}")
        log.info("service.ready", once=once)
        if not once:
            background.start(_watch_stop(stop, health, notify), "stop-watch")
            background.start(_report_status(health, ledger, notify, clock, stop), "status")
            background.start(_probe_pbx(client, cfg.service.pbx_probe_interval_s, clock, stop), "pbx-probe")
        queue = QueueSource(ledger, scheduler, clock, stop)
        if once:
            await queue.read_once(cfg)
        else:
            queue.follow(cfg)
            stack.push_async_callback(queue.close)
        if reload is not None and not once:
            background.start(_reload_on_signal(reload, cfg, scheduler, client, queue), "reload")
        discovery_fatal = None
        if cfg.sources.discover.enabled:
            discovery = Discovery(cfg.sources.discover, client, ledger, clock, scheduler.notify)
            if once:
                discovery_fatal = await _discover_once(discovery, clock, stop)
            else:
                background.start(_guarded(discovery.run(stop)), "discovery")
        done = asyncio.Event()
        finishing = []  # tasks that get to finish their work after the scheduler, not a cancellation
        if progress is not None:
            finishing.append(asyncio.create_task(progress(pipeline, done), name="progress"))
        if cfg.notify.url is not None:
            notifier = Notifier(cfg.notify, health, clock, cfg.pbx.user_agent)
            finishing.append(asyncio.create_task(notifier.run(done), name="notifier"))
        try:
            stats = await scheduler.run()
        finally:
            health.stopping = True
            await background.close()
            done.set()  # the reporter draws its final line, the notifier sends what is queued
            await asyncio.gather(*finishing, return_exceptions=True)
        fatal = scheduler.fatal or discovery_fatal
        counts = await ledger.call(lambda db: db.counts())
    elapsed = clock.monotonic() - started
    log.info("run.summary", archived=stats.archived, downloaded=stats.downloaded, adopted=stats.adopted,
             failed=stats.failed, missing=stats.missing, retries=stats.retried, pauses=stats.pauses,
             bytes=stats.bytes, errors=stats.errors, elapsed_s=round(elapsed, 2), ledger=counts)
    return RunResult(stats=stats, counts=counts, reconcile=report, fatal=fatal, elapsed_s=elapsed,
                     gave_up=scheduler.gave_up)


def token_store_path(cfg: Config) -> Path:
    """Where a run keeps its PBX token between processes: beside the ledger, mode 0600."""
    return cfg.state.path.with_name(cfg.state.path.name + ".token")


class TaskSet:
    """Background tasks owned by the runner: cancelled and awaited together, exactly once."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def adopt(self, task: asyncio.Task[None]) -> None:
        self._tasks.append(task)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _status_line(health: Health) -> str:
    c = health.counts
    p = health.pipeline
    line = (f"done {c.get('done', 0)}, pending {c.get('pending', 0)}, in progress {c.get('in_progress', 0)}, "
            f"failed {c.get('failed', 0)}, missing {c.get('missing', 0)}")
    if p is not None and p.scheduler.paused:
        line += f"; paused: {p.scheduler.pause_reason}"
    return line


async def _refresh_counts(health: Health, ledger: Ledger) -> None:
    try:
        await health.refresh(ledger)
        health.counts_ok = True
    except Exception as exc:  # the ledger is unreadable: readiness says so
        health.counts_ok = False
        log.warning("ledger.unreadable", error=str(exc))


async def _report_status(health: Health, ledger: Ledger, notify: SdNotify, clock: Clock,
                         stop: asyncio.Event) -> None:
    """Refresh the queue depth for metrics and readiness, and tell systemd how things stand."""
    while not await sleep_or_stop(clock, STATUS_INTERVAL_S, stop):
        await _refresh_counts(health, ledger)
        notify.send(f"STATUS={_status_line(health)}")


async def _watch_stop(stop: asyncio.Event, health: Health, notify: SdNotify) -> None:
    await stop.wait()
    health.stopping = True
    notify.send("STOPPING=1", "STATUS=stopping: finishing in-flight downloads")
    log.info("service.stopping")


async def _probe_pbx(client: PbxClient, interval_s: float, clock: Clock, stop: asyncio.Event) -> None:
    """When nothing else talked to the PBX lately, list one recording: readiness must follow the PBX
    (down, and back) even while the queue is empty."""
    while not await sleep_or_stop(clock, interval_s, stop):
        if client.tokens.fatal is not None or clock.monotonic() - client.health.last_at < interval_s:
            continue
        try:
            await client.check()
        except ArchiverError as exc:
            log.info("pbx.probe_failed", error=str(exc))


class QueueSource:
    """The queue file: read as it stands (``once``) or followed in the background (``run``), and
    re-pointed live when SIGHUP brings a new ``sources.queue_file``."""

    def __init__(self, ledger: Ledger, scheduler: Scheduler, clock: Clock, stop: asyncio.Event) -> None:
        self.ledger = ledger
        self.scheduler = scheduler
        self.clock = clock
        self.stop = stop
        self._task: asyncio.Task[None] | None = None

    async def _enqueue(self, refs: list[Ref]) -> int:
        now = self.clock.wall()
        added = await self.ledger.call(lambda db: db.enqueue_many(refs, source="queue", now=now))
        if added:
            self.scheduler.notify()
        return added

    async def read_once(self, cfg: Config) -> None:
        if cfg.sources.queue_file is not None:
            await follow_queue(QueueTail(cfg.sources.queue_file), self._enqueue, self.clock,
                               cfg.sources.queue_poll_interval_s, self.stop, once=True)

    def follow(self, cfg: Config) -> None:
        if cfg.sources.queue_file is not None:
            tail = QueueTail(cfg.sources.queue_file)
            self._task = asyncio.create_task(_guarded(follow_queue(
                tail, self._enqueue, self.clock, cfg.sources.queue_poll_interval_s, self.stop)), name="queue-tail")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def restart(self, cfg: Config) -> None:
        await self.close()
        self.follow(cfg)


async def _reload_on_signal(reload: asyncio.Event, cfg: Config, scheduler: Scheduler, client: PbxClient,
                            queue: QueueSource) -> None:
    """SIGHUP: re-read the config; apply what is safe live, report the rest as needing a restart.
    In-flight downloads are never dropped (surplus workers retire after their current recording)."""
    current = cfg
    while True:
        await reload.wait()
        reload.clear()
        if current.source_path is None:
            log.warning("config.reload_failed", problems=["the configuration did not come from a file"])
            continue
        try:
            new = await asyncio.to_thread(load_config, current.source_path)
        except ConfigError as exc:
            log.error("config.reload_failed", problems=exc.problems, action="keeping the running configuration")
            continue
        changed = changed_keys(current, new)
        live = [k for k in changed if k in LIVE_KEYS]
        if "logging.level" in live:
            set_level(new.logging.level)
        if "pbx.requests_per_second" in live:
            client.pacer.set_rate(new.pbx.requests_per_second)
        if "downloads.workers" in live:
            scheduler.set_workers(new.downloads.workers)
        if "sources.queue_file" in live or "sources.queue_poll_interval_s" in live:
            await queue.restart(new)
        log.info("config.reloaded", applied=live)
        restart = [k for k in changed if k not in LIVE_KEYS]
        if restart:
            log.warning("config.restart_required", keys=restart,
                        action="these changes take effect at the next restart")
        # What was applied is now current; what needs a restart stays as running.
        current = with_keys(current, new, live)


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
