"""The lifecycle of ``run`` and ``once``: startup → main loop → one shutdown sequence → one summary."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.archive import ArchiveDir, storage_error
from daemon.client import PbxClient
from daemon.clock import Clock, SystemClock, sleep_or_stop
from daemon.config import LIVE_KEYS, MAX_PREFETCH_URLS, MAX_WORKERS, Config, changed_keys, load_config, with_keys
from daemon.copier import Copier, CopyStats
from daemon.discovery import Discovery
from daemon.downloader import Downloader
from daemon.errors import (
    ArchiverError,
    ConfigError,
    FatalAuthError,
    LedgerError,
    PauseError,
    RetryableError,
    StorageError,
    TlsError,
)
from daemon.hooks import HookJob, HookRunner
from daemon.identity import PbxIdentity
from daemon.ledger import Ledger, LedgerDb, Ref, RunLock, check_state_access
from daemon.live import Pipeline
from daemon.logins import LoginMemory, login_memory_path
from daemon.logs import set_level
from daemon.notify import Notifier
from daemon.preflight import NO_SOURCE, configured_sources
from daemon.reconcile import ReconcileReport, check_identity, reconcile
from daemon.resolver import RequestGate, Resolver
from daemon.scheduler import RunStats, Scheduler, pause_delay
from daemon.service import (
    Health,
    HealthServer,
    Metrics,
    SdNotify,
    extend_start_timeout,
    feed_watchdog,
    monotonic_usec,
    reloading_fields,
)
from daemon.sources import QueueTail, follow_queue
from daemon.supervise import Loops, restart_delay, supervise
from daemon.verify import Verifier, verify_loop

log = structlog.get_logger("daemon.runner")

DISCOVER_ONCE_TRIES = 5
STATUS_INTERVAL_S = 5.0
# After the grace time, everything left (the notifier's last messages, revoking the token, closing
# the ledger) shares this much more: the whole stop stays below the unit's TimeoutStopSec.
STOP_TAIL_S = 10.0


@dataclass(frozen=True)
class RunResult:
    stats: RunStats
    counts: dict[str, int]
    reconcile: ReconcileReport
    fatal: FatalAuthError | None
    elapsed_s: float
    gave_up: bool = False
    untrusted: TlsError | None = None   # the PBX's certificate was rejected (``once``: exit 4)
    interrupted: bool = False           # stopped by a signal before the queue was drained
    discovery_incomplete: bool = False  # once: discovery could not list everything the PBX holds
    copy_error: ArchiverError | None = None  # the off-box copy refused (credentials, bucket): exit 3 / 2
    copy_gave_up: bool = False          # once: the off-box copy's endpoint stayed unreachable (exit 4)
    copy_stats: CopyStats | None = None
    copies_failed: int = 0              # off-box copies that failed for good (``retry`` after a fix): exit 1

    @property
    def left(self) -> int:
        """Recordings still to do (archived locally but not copied off-box yet included)."""
        return self.counts.get("pending", 0) + self.counts.get("in_progress", 0) + self.counts.get("copying", 0)


ProgressHook = Callable[[Pipeline, asyncio.Event], Coroutine[Any, Any, None]]


async def run_pipeline(cfg: Config, stop: asyncio.Event, *, once: bool, clock: Clock | None = None,
                       progress: ProgressHook | None = None, notify: SdNotify | None = None,
                       health: Health | None = None, reload: asyncio.Event | None = None,
                       hurry: asyncio.Event | None = None, new_pbx: bool = False) -> RunResult:
    """Archive until ``stop`` (``run``) or until everything queued has ended (``once``).

    ``run`` also serves health and metrics on ``service.listen`` and speaks sd_notify. Resources are
    closed in reverse order whatever happens; the whole stop takes at most ``shutdown_grace_s`` (less
    when ``hurry`` is set) plus ``STOP_TAIL_S``. Raises WrongArchiveError when ``archive.dir`` is missing
    or not the ledger's archive, StorageError when the ledger cannot be opened (or another runner
    holds it), ConfigError when ``service.listen`` is taken or this user may not write ``state.path``.
    """
    clock = clock or SystemClock()
    notify = notify or SdNotify()
    health = health or Health(clock)
    loops = health.loops
    metrics = Metrics(health)
    started = clock.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        background = TaskSet()
        stack.push_async_callback(background.close)
        archive = ArchiveDir(cfg.archive.dir)
        stack.callback(archive.close)
        await asyncio.to_thread(archive.check_root)
        # A state folder this user may not write is a set-up mistake (exit 2), not a disk fault to wait out.
        await asyncio.to_thread(check_state_access, cfg.state.path, write=True)
        # The lock before the port: a second run is told "another run is using the ledger", the
        # true reason, not "address already in use".
        lock = RunLock(cfg.state.path)
        try:
            lock.acquire()
        except OSError as exc:
            raise LedgerError(f"cannot take the ledger lock {str(lock.path)!r}: {exc.strerror or exc}") from exc
        stack.callback(lock.release)
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
        opened = await _open_and_reconcile(cfg, archive, clock, stop, notify, loops, once=once)
        if opened is None:  # stopped while the ledger could not be opened or reconciled
            return RunResult(stats=RunStats(), counts={}, reconcile=ReconcileReport(), fatal=None,
                             elapsed_s=clock.monotonic() - started, interrupted=True)
        ledger, report = opened
        stack.push_async_callback(ledger.close)
        if not configured_sources(cfg.sources):
            # Only what `enqueue` puts in the ledger will be archived (`once` exits 2 when that is nothing).
            log.warning("sources.none_configured", message=NO_SOURCE)
        client = await stack.enter_async_context(PbxClient(
            cfg.pbx, clock=clock, read_timeout_s=cfg.downloads.read_timeout_s,
            url_lifetime_s=cfg.downloads.url_lifetime_s, token_store=token_store_path(cfg),
            logins=LoginMemory(login_memory_path(cfg.state.path), cfg.pbx.base_url, clock),
            # Sized for the most workers a reload may ask for, and the URLs resolved ahead of them: a pool
            # wait counts against the connect timeout.
            workers=MAX_WORKERS + MAX_PREFETCH_URLS))
        copier: Copier | None = None
        if cfg.archive.s3 is not None:
            from daemon.destinations import S3Destination
            dest = await stack.enter_async_context(S3Destination(cfg.archive.s3))
            dests = (dest.name,)
            # From now on a recording archived locally is "copying" until its off-box copy is verified.
            await ledger.call(lambda db: setattr(db, "destinations", dests))
            copier = Copier(cfg, ledger, dest, archive, clock, stop, once=once)
            if report.vanished:
                try:
                    restored = await Verifier(ledger, archive, clock, dest=dest).restore_vanished(report.vanished)
                except ArchiverError as exc:    # the bucket is down: they stay queued for a download
                    log.warning("reconcile.restore_postponed", error=str(exc))
                else:
                    report.restored = restored
        gate = RequestGate(cfg.pbx.recording_format)
        resolver = Resolver(client, clock, gate, cfg.downloads.url_refresh_margin_s,
                            on_resolve=metrics.resolve_seconds.observe)
        identity = PbxIdentity(client, ledger, layout_needs_sn="{pbx_sn}" in cfg.archive.layout, accept_new=new_pbx)
        if new_pbx:
            # The old PBX's ids are retired before anything is queued, so that the configured ids (and
            # whatever discovery finds) are the new PBX's: wait for it to answer system/information.
            await _identify_new_pbx(identity, cfg, clock, stop, once=once)
        if cfg.sources.ids:
            refs = [Ref(rec_id=i) for i in cfg.sources.ids]
            added = await ledger.call(lambda db: db.enqueue_many(refs, source="config", now=clock.wall()))
            log.info("sources.config_ids", ids=len(refs), added=added)
        downloader = Downloader(cfg, client, resolver, gate, ledger, clock, archive, identity)
        scheduler = Scheduler(cfg, ledger, downloader, client, clock, stop, once=once,
                              on_archived=metrics.download_seconds.observe)
        if hurry is not None:
            scheduler.hurry = hurry
        hooks = HookRunner(cfg.hooks, lambda result: metrics.hook_runs.labels(outcome=result).inc(),
                           grace_s=cfg.service.shutdown_grace_s, stop=stop, hurry=scheduler.hurry)
        # A hook of an earlier process is not waited for: the names it read recordings by go.
        await asyncio.to_thread(archive.clear_hook_names)
        if hooks.enabled:
            hooks.start()
            stack.push_async_callback(hooks.close, drain=False)   # an error on the way: kill what runs
            if copier is None:
                archive_root = cfg.archive.dir
                scheduler.on_done = lambda row, result: hooks.submit(HookJob.archived(
                    archive_root, row.ref, result.final_path, result.sha256, result.record))
            else:
                # With an off-box copy a recording is archived once that copy is verified: the hook runs then.
                copier.hooks = hooks
        pipeline = Pipeline(ledger, scheduler, downloader, copier)
        await _refresh_counts(health, ledger)  # before the pipeline shows: no scrape sees "never archived"
        health.pipeline = pipeline
        # Ready once the local prerequisites hold (config, ledger, archive): never wait for the PBX,
        # so that a PBX outage cannot turn into a start-up timeout and a restart loop.
        notify.send("READY=1", f"STATUS={_status_line(health)}")
        log.info("service.ready", once=once)
        if not once:
            background.start(_watch_stop(stop, health, notify), "stop-watch")
            background.start(supervise("status", lambda: _report_status(health, ledger, notify, clock, stop),
                                       loops, clock, stop), "status")
            background.start(supervise("pbx.probe", lambda: _probe_pbx(client, cfg.service.pbx_probe_interval_s,
                                                                         clock, stop), loops, clock, stop),
                             "pbx-probe")
        queue = QueueSource(ledger, scheduler, clock, stop, loops)
        if once:
            await queue.read_once(cfg)
        else:
            queue.follow(cfg)
            stack.push_async_callback(queue.close)
        copying: asyncio.Task[None] | None = None
        if copier is not None:
            copying = asyncio.create_task(copier.run(), name="copier")
        if cfg.verify.interval_s > 0 and not once:
            verifier = Verifier(ledger, archive, clock, dest=copier.dest if copier is not None else None,
                                postpone_on_outage=True)
            interval, rate = cfg.verify.interval_s, cfg.verify.max_bytes_per_second
            background.start(supervise("verify", lambda: verify_loop(verifier, interval, rate, clock, stop),
                                       loops, clock, stop), "verify")
        if reload is not None and not once:
            background.start(supervise("reload", lambda: _reload_on_signal(reload, cfg, scheduler, client, queue,
                                                                         notify),
                                       loops, clock, stop), "reload")
        discovered = DiscoverOnce()
        if cfg.sources.discover.enabled:
            discovery = Discovery(cfg.sources.discover, client, ledger, clock, scheduler.notify, loops, identity)
            if once:
                discovered = await _discover_once(discovery, clock, stop)
            else:
                background.start(supervise("discovery", lambda: discovery.run(stop), loops, clock, stop),
                                 "discovery")
        done = asyncio.Event()
        finishing = []  # tasks that get to finish their work after the scheduler, not a cancellation
        if progress is not None:
            finishing.append(asyncio.create_task(progress(pipeline, done), name="progress"))
        if cfg.notify.url is not None:
            notifier = Notifier(cfg.notify, health, clock, cfg.pbx.user_agent)
            finishing.append(asyncio.create_task(notifier.run(done), name="notifier"))
        try:
            if discovered.stop is not None or stop.is_set():
                stats = scheduler.stats   # the PBX refused us or is untrusted: nothing to try
            else:
                stats = await scheduler.run()
            if copier is not None and copying is not None:
                # once: the copies of what was archived are made before it ends; run: it stops with it.
                copier.scheduler_done.set()
                await copying
        finally:
            if copying is not None and not copying.done():
                copying.cancel()
                await asyncio.gather(copying, return_exceptions=True)
            health.stopping = True
            # once: the hooks of what was archived run before it ends; a stop gives them the grace.
            await hooks.close(drain=once and not stop.is_set())
            tail_deadline = clock.monotonic() + STOP_TAIL_S
            await background.close()
            done.set()  # the reporter draws its final line, the notifier sends what is queued
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*finishing, return_exceptions=True),
                                       max(0.1, tail_deadline - clock.monotonic()))
            client.close_timeout_s = max(0.1, min(cfg.pbx.timeout_s, tail_deadline - clock.monotonic()))
        fatal = scheduler.fatal or (discovered.stop if isinstance(discovered.stop, FatalAuthError) else None)
        untrusted = scheduler.untrusted or (discovered.stop if isinstance(discovered.stop, TlsError) else None)
        counts = await ledger.call(lambda db: db.counts())
        copies_failed = sum(states.get("failed", 0) for states in
                            (await ledger.call(lambda db: db.copy_counts())).values())
    elapsed = clock.monotonic() - started
    if copier is not None:
        log.info("copy.summary", copied=copier.stats.copied, adopted=copier.stats.adopted, bytes=copier.stats.bytes,
                 failed=copier.stats.failed, local_removed=copier.stats.local_removed)
    log.info("run.summary", archived=stats.archived, downloaded=stats.downloaded, adopted=stats.adopted,
             merged=stats.merged, failed=stats.failed, missing=stats.missing, missing_recordings=stats.missing_refs,
             retries=stats.retried, pauses=stats.pauses, bytes=stats.bytes, errors=stats.errors,
             elapsed_s=round(elapsed, 2), ledger=counts)
    return RunResult(stats=stats, counts=counts, reconcile=report, fatal=fatal, elapsed_s=elapsed,
                     gave_up=scheduler.gave_up, untrusted=untrusted, interrupted=stop.is_set(),
                     discovery_incomplete=discovered.incomplete,
                     copy_error=copier.fatal if copier is not None else None,
                     copy_gave_up=copier.gave_up if copier is not None else False,
                     copy_stats=copier.stats if copier is not None else None, copies_failed=copies_failed)


async def _identify_new_pbx(identity: PbxIdentity, cfg: Config, clock: Clock, stop: asyncio.Event, *,
                            once: bool) -> None:
    """``--new-pbx``: learn the new PBX's serial (retiring the old one's ids) before anything else, with
    the pipeline's back-off while it does not answer; ``once`` gives up after ``downloads.once_give_up_s``."""
    started, streak = clock.monotonic(), 0
    while not stop.is_set():
        try:
            await identity.ensure()
            return
        except FatalAuthError:
            raise
        except ArchiverError as exc:
            if once and clock.monotonic() - started > cfg.downloads.once_give_up_s:
                raise
            streak += 1
            retry = exc.retry_after_s if isinstance(exc, PauseError | RetryableError) else None
            delay = pause_delay(streak, retry, cfg.downloads.pause_max_s, random.random())
            log.warning("pbx.identify_waiting", error=str(exc), retry_in_s=round(delay, 2),
                        action="--new-pbx: nothing is queued before the new PBX tells its serial")
            await sleep_or_stop(clock, delay, stop)


async def _open_and_reconcile(cfg: Config, archive: ArchiveDir, clock: Clock, stop: asyncio.Event,
                              notify: SdNotify, loops: Loops, *, once: bool) -> tuple[Ledger, ReconcileReport] | None:
    """Open the ledger, check that archive.dir is its archive, and reconcile the two. While the disk or
    the ledger cannot be written (full, read-only, a lock held too long) this is retried with back-off
    — ``run`` telling systemd it needs longer to start, ``once`` for at most ``downloads.once_give_up_s``.
    None when stopped before it succeeded. Raises WrongArchiveError (exit 6) at once."""
    loops.register("reconcile")
    started = clock.monotonic()
    ledger: Ledger | None = None

    def agree(db: LedgerDb) -> ReconcileReport:
        try:
            check_identity(db, archive)
            return reconcile(db, archive, now=clock.wall(), skip=cfg.state.path.parent, sidecars=cfg.archive.sidecar)
        except OSError as exc:
            raise storage_error(exc, "reconciling the archive") or StorageError(
                f"reconciling the archive: {exc}") from exc
    try:
        while True:
            try:
                if ledger is None:
                    ledger = await Ledger(cfg.state.path).__aenter__()
                reconciled = asyncio.Event()
                extending = asyncio.create_task(extend_start_timeout(notify, clock, reconciled))
                try:
                    report = await ledger.call(agree)
                finally:
                    reconciled.set()
                    await extending
                loops.ok("reconcile")
                opened, ledger = ledger, None
                return opened, report
            except StorageError as exc:
                failures = loops.failed("reconcile", exc)
                if once and clock.monotonic() - started > cfg.downloads.once_give_up_s:
                    raise
                delay = restart_delay(failures, 0.5, cap_s=cfg.downloads.pause_max_s)
                log.error("reconcile.failed", error=str(exc), retry_in_s=round(delay, 1))
                notify.send(f"EXTEND_TIMEOUT_USEC={int((delay + 30) * 1e6)}",
                            f"STATUS=waiting for the archive or the ledger: {exc.message}")
                if await sleep_or_stop(clock, delay, stop):
                    return None
    finally:
        if ledger is not None:  # not handed over: stopped, or an error that ends the start
            await ledger.close()


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

    def __init__(self, ledger: Ledger, scheduler: Scheduler, clock: Clock, stop: asyncio.Event,
                 loops: Loops) -> None:
        self.ledger = ledger
        self.scheduler = scheduler
        self.clock = clock
        self.stop = stop
        self.loops = loops
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
                               cfg.sources.queue_poll_interval_s, self.stop, once=True, loops=self.loops)

    def follow(self, cfg: Config) -> None:
        if cfg.sources.queue_file is not None:
            path, interval = cfg.sources.queue_file, cfg.sources.queue_poll_interval_s

            def tail() -> Awaitable[None]:
                # A fresh tail on each (re)start: reading the file again is harmless, the ledger knows.
                return follow_queue(QueueTail(path), self._enqueue, self.clock, interval, self.stop, loops=self.loops)
            self._task = asyncio.create_task(supervise("queue", tail, self.loops, self.clock, self.stop),
                                             name="queue-tail")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def restart(self, cfg: Config) -> None:
        await self.close()
        self.follow(cfg)


async def _reload_on_signal(reload: asyncio.Event, cfg: Config, scheduler: Scheduler, client: PbxClient,
                            queue: QueueSource, notify: SdNotify) -> None:
    """SIGHUP: re-read the config; apply what is safe live, report the rest as needing a restart.
    In-flight downloads are never dropped (surplus workers retire after their current recording).
    systemd hears ``RELOADING=1`` first and ``READY=1`` when done, whatever the outcome, so that it
    knows when the new config is in force (or refused) and never sees a reload that does not end."""
    current = cfg
    while True:
        await reload.wait()
        reload.clear()
        notify.send(*reloading_fields(monotonic_usec()))
        try:
            current = await _reload_once(current, scheduler, client, queue)
        finally:
            notify.send("READY=1")


async def _reload_once(current: Config, scheduler: Scheduler, client: PbxClient, queue: QueueSource) -> Config:
    """One reload: the config now in force (``current`` itself when the file is refused)."""
    if current.source_path is None:
        log.warning("config.reload_failed", problems=["the configuration did not come from a file"])
        return current
    try:
        new = await asyncio.to_thread(load_config, current.source_path)
    except ConfigError as exc:
        log.error("config.reload_failed", problems=exc.problems, action="keeping the running configuration")
        return current
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
    applied: Config = with_keys(current, new, live)
    return applied


@dataclass(frozen=True)
class DiscoverOnce:
    """How ``once``'s discovery went: the error that must end ``once`` at once (refused credentials,
    an untrusted certificate), or whether it could not list everything (then ``once`` exits 5)."""

    stop: ArchiverError | None = None
    incomplete: bool = False


async def _discover_once(discovery: Discovery, clock: Clock, stop: asyncio.Event) -> DiscoverOnce:
    """Queue everything the PBX holds before ``once`` works it off; PBX trouble is retried a few times,
    a signal ends it between two pages."""
    for attempt in range(1, DISCOVER_ONCE_TRIES + 1):
        try:
            return DiscoverOnce(incomplete=not await discovery.run_once(stop))
        except (FatalAuthError, TlsError) as exc:
            return DiscoverOnce(stop=exc)
        except ArchiverError as exc:
            log.warning("discover.once_failed", attempt=attempt, error=str(exc))
            if attempt == DISCOVER_ONCE_TRIES or await sleep_or_stop(clock, 2.0 ** attempt, stop):
                log.error("discover.gave_up", action="archiving what is queued so far; run once again")
                return DiscoverOnce(incomplete=True)
    return DiscoverOnce(incomplete=True)
