"""The scheduler: claims due recordings, drives resolver and downloader, decides retry, pause and stop.

Item trouble burns that item's attempts with exponential back-off and full jitter, and moves it behind
the others. PBX-wide or disk trouble pauses every worker with a growing back-off and burns nothing;
"PBX-wide" for answers like HTTP 500 means several *different* recordings failing in a row, so a few
recordings that always fail can never starve the healthy ones. A refused login stops all PBX calls:
``once`` ends (exit 3), ``run`` stays up and tries again only on a long interval; an untrusted
certificate ends ``once`` at once (exit 4) and keeps ``run`` up, not ready.

A ledger write that fails (a full disk, a lock held too long) is kept in memory and applied before any
new work is claimed, so that no row is left in progress for the life of the process.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.client import BLOCK_LIFT_MARGIN_S, PbxClient
from daemon.clock import Clock, sleep_or_stop
from daemon.config import Config
from daemon.downloader import Archived, CommitNotRecorded, Downloader
from daemon.errors import (
    ArchiverError,
    DeferredError,
    FatalAuthError,
    LedgerError,
    PauseError,
    PbxBusyError,
    PermanentError,
    RecordingMissingError,
    RetryableError,
    StorageError,
    TlsError,
    UrlExpiredError,
)
from daemon.ledger import Ledger, LedgerDb, Row
from daemon.logs import debug_enabled

log = structlog.get_logger("daemon.scheduler")

LEASE_S = 3600.0
IDLE_POLL_S = 1.0            # how soon an idle worker notices rows another process enqueued
BUSY_BURST = 3               # different recordings failing in a row with PBX-busy answers: "the PBX", not them
PAUSE_BASE_S = 1.0
URL_EXPIRED_DELAY_S = 1.0
# A real expiry happens once in 30 minutes; a PBX whose every fresh URL is refused (each archive_row
# call tries a few) must not be retried for ever at no cost: after this many such turns in a row,
# the recording burns an attempt.
URL_EXPIRED_FREE_TURNS = 5
MAX_AUTH_RETRIES = 3         # automatic logins after a refusal; never near the PBX's 5-failure IP block


def backoff_delay(attempt: int, base_s: float, cap_s: float, rand: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))]; ``rand`` in [0, 1). Pure."""
    return rand * min(cap_s, base_s * 2.0 ** max(0, attempt - 1))


def retry_decision(state: str | None, *, burn: bool) -> str:
    """What rescheduling a recording decided, as debug names it: ``give_up`` (its attempts are used up,
    it ended ``failed``), ``retry`` (an attempt counted, tried again after a back-off), ``wait`` (tried
    later, no attempt counted: an expired URL, a twin transferring it, "not ready yet"). ``state`` is
    None when the ledger write was deferred: the row is retried once the ledger works. Pure."""
    if state == "failed":
        return "give_up"
    return "retry" if burn else "wait"


def pause_delay(streak: int, retry_after_s: float | None, cap_s: float, rand: float) -> float:
    """How long a PBX-wide or disk pause lasts: doubling per consecutive pause, half of it jittered,
    never shorter than the server's Retry-After (itself capped by the client). Pure."""
    grown = min(cap_s, PAUSE_BASE_S * 2.0 ** max(0, streak - 1))
    return max(retry_after_s or 0.0, grown * (0.5 + rand / 2))

MISSING_NAMED = 10   # once's summary names this many recordings that ended missing, then "+K more"


@dataclass
class RunStats:
    """What this process did, for the progress line and the summary."""

    archived: int = 0
    downloaded: int = 0
    adopted: int = 0
    failed: int = 0
    missing: int = 0
    # The first few that ended missing, for once's summary (bounded: run lives for months).
    missing_refs: list[str] = field(default_factory=list)
    retried: int = 0
    merged: int = 0
    bytes: int = 0
    pauses: int = 0
    errors: dict[str, int] = field(default_factory=dict)


def claim_ahead_count(ahead: int, depth: int) -> int:
    """How many rows to claim ahead now, with ``ahead`` claimed and not yet taken and a window of
    ``depth`` (``downloads.prefetch_urls``): none until a quarter of the window (one row at least) has
    been taken, then enough to fill it. Refilling after every row took one ledger transaction per
    recording, each a wait for the ledger thread; a quarter keeps three quarters of the URLs resolving
    ahead. Pure."""
    if depth <= 0 or ahead > depth - max(1, depth // 4):
        return 0
    return depth - ahead


class Scheduler:
    """Runs ``downloads.workers`` workers until ``stop`` (``run``) or until nothing is left (``once``)."""

    def __init__(self, cfg: Config, ledger: Ledger, downloader: Downloader, client: PbxClient, clock: Clock,
                 stop: asyncio.Event, *, once: bool, rand: Callable[[], float] = random.random,
                 on_archived: Callable[[float], None] | None = None,
                 on_done: Callable[[Row, Archived], None] | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.downloader = downloader
        self.client = client
        self.clock = clock
        self.stop = stop
        self.once = once
        self.rand = rand
        self.stats = RunStats()
        self.on_archived = on_archived
        self.on_done = on_done   # must not wait: it is called in the worker's turn (the hooks' submit)
        self.last_turn_at = clock.monotonic()
        self.last_success_wall = 0.0
        self.fatal: FatalAuthError | None = None
        self.untrusted: TlsError | None = None   # once: the certificate was rejected (exit 4)
        self.hurry = asyncio.Event()             # a second SIGINT: end the grace wait at once
        self.paused_until = 0.0
        self.pause_reason: str | None = None
        self.paused_since: float | None = None
        self.gave_up = False
        self._pause_streak = 0
        self._probed_streak = 0
        self._busy_keys: list[str] = []   # different recordings in the current run of PBX-busy failures
        self._auth_failures = 0
        self._unsaved: dict[str, Callable[[], Awaitable[Any]]] = {}   # ledger writes to apply when it works
        self._saving = asyncio.Lock()
        self._url_turns: dict[str, int] = {}   # recording -> turns in a row that ended in expired URLs
        self._finished = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._retire = 0
        self.failures: deque[tuple[int, str, str]] = deque(maxlen=100)  # (sequence, recording, reason)
        self._failure_seq = 0
        # Rows claimed ahead, their URLs resolving while other recordings transfer (downloads.prefetch_urls).
        self._ahead: deque[Row] = deque()
        self._refill: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """New work was enqueued: wake idle workers."""
        self._wakeup.set()

    @property
    def paused(self) -> bool:
        return self.clock.monotonic() < self.paused_until

    async def run(self) -> RunStats:
        """Work until stopped or finished; on stop, in-flight downloads get ``shutdown_grace_s``."""
        self.set_workers(self.cfg.downloads.workers)
        stopper = asyncio.create_task(self.stop.wait(), name="stop-waiter")
        try:
            while not self.stop.is_set():
                running = [w for w in self._workers if not w.done()]
                if not running:
                    break
                await asyncio.wait([stopper, *running], return_when=asyncio.FIRST_COMPLETED)
            running = [w for w in self._workers if not w.done()]
            if running:
                log.info("shutdown.draining", grace_s=self.cfg.service.shutdown_grace_s,
                         in_flight=self.downloader.in_flight)
                # Until every worker is done, the grace time is over, or a second signal says hurry.
                drained = asyncio.ensure_future(asyncio.wait(running))
                hurry = asyncio.ensure_future(self.hurry.wait())
                try:
                    await asyncio.wait([drained, hurry], timeout=self.cfg.service.shutdown_grace_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    drained.cancel()
                    hurry.cancel()
                    await asyncio.gather(drained, hurry, return_exceptions=True)
                pending = {w for w in running if not w.done()}
                for task in pending:
                    task.cancel("shutdown grace time is over")
                if pending:
                    log.warning("shutdown.abandoned", transfers=self.downloader.in_flight)
        finally:
            stopper.cancel()
            for w in self._workers:
                w.cancel()
            await asyncio.gather(stopper, *self._workers, return_exceptions=True)
            await self._release_ahead()
        return self.stats

    @property
    def _prefetching(self) -> bool:
        """Claim ahead and resolve early only while more than one request may be in flight."""
        return self.cfg.downloads.prefetch_urls > 0 and self.downloader.gate.may_send_ahead

    def _top_up(self) -> None:
        """Claim more rows ahead (``claim_ahead_count``), in one ledger transaction at a time."""
        n = claim_ahead_count(len(self._ahead), self.cfg.downloads.prefetch_urls)
        if not self._prefetching or n == 0 or self.stop.is_set() or \
                (self._refill is not None and not self._refill.done()):
            return
        self._refill = asyncio.create_task(self._claim_ahead(n), name="claim-ahead")

    async def _claim_ahead(self, n: int) -> None:
        now = self.clock.wall()
        try:
            rows = await self.ledger.call(lambda db: db.claim(n, now=now, lease_s=LEASE_S))
        except LedgerError as exc:
            log.debug("prefetch.claim_failed", error=str(exc))   # the workers' own claims meet it too
            return
        for row in rows:
            self.downloader.resolver.prefetch(row.key, rec_id=row.rec_id, file=row.file)
        self._ahead.extend(rows)
        if rows:
            self._wakeup.set()

    async def _release_ahead(self) -> None:
        """Give back the rows claimed ahead that no worker took (the claim is never cancelled half-way:
        its rows are in progress in the ledger once it returns)."""
        if self._refill is not None:
            await asyncio.gather(self._refill, return_exceptions=True)
        await self.downloader.resolver.close()
        while self._ahead:
            await self._release(self._ahead.popleft())

    @property
    def workers(self) -> int:
        """Workers running now, retiring ones excluded."""
        return sum(not w.done() for w in self._workers) - self._retire

    def set_workers(self, n: int) -> None:
        """Grow or shrink the pool live (SIGHUP): new workers start at once; surplus ones retire after
        their current recording, so no in-flight download is dropped."""
        current = self.workers
        if n > current:
            cancel_retire = min(self._retire, n - current)
            self._retire -= cancel_retire
            for _ in range(n - current - cancel_retire):
                self._workers.append(asyncio.create_task(self._worker(len(self._workers)),
                                                         name=f"worker-{len(self._workers)}"))
        elif n < current:
            self._retire += current - n
        self._wakeup.set()

    async def _worker(self, n: int) -> None:
        while not self.stop.is_set() and not self._finished.is_set():
            if self._retire > 0:
                self._retire -= 1
                return
            try:
                await self._step()
            except LedgerError as exc:
                self._pause(exc, "LedgerError")
            except Exception as exc:
                # The archive failed outside any one recording, or a bug: pause everything rather than
                # lose a worker.
                log.exception("worker.error", worker=n)
                self._pause(StorageError(f"{type(exc).__name__}: {exc}"), "StorageError")

    async def _step(self) -> None:
        """One turn of a worker: wait out a pause, or claim and process one row, or idle briefly."""
        self.last_turn_at = self.clock.monotonic()
        if self.once and self.paused_since is not None and \
                self.last_turn_at - self.paused_since > self.cfg.downloads.once_give_up_s:
            # once is for cron and timers: an outage must end it, not hang it. Nothing is marked
            # failed; the next run picks the work up.
            log.error("once.gave_up", reason=self.pause_reason,
                      paused_s=round(self.last_turn_at - self.paused_since))
            self.gave_up = True
            self._finished.set()
            return
        if self.paused:
            if self.downloader.in_flight == 0:
                self.downloader.archive.close()   # as when idle: a paused archiver holds no folder open
            await sleep_or_stop(self.clock, self.paused_until - self.clock.monotonic(), self.stop, self._finished)
            self._after_pause()
            return
        if self._unsaved:
            await self._save_unsaved()
        row = self._ahead.popleft() if self._ahead else \
            await self.ledger.claim_one(now=self.clock.wall(), lease_s=LEASE_S)
        if row is not None:
            self._top_up()
            if debug_enabled():
                _state_changed(row, "pending", "in_progress", f"claimed (attempts so far {row.attempts})")
        if row is None:
            active, next_at = await self.ledger.call(lambda db: db.next_due())
            if self.once and active == 0:
                self._finished.set()
                return
            if self.downloader.in_flight == 0:
                # Nothing being written: let go of the archive folders kept open between files, so
                # that an idle archiver never holds the archive's disk busy (a plain umount works).
                self.downloader.archive.close()
            wait = IDLE_POLL_S if next_at is None else min(IDLE_POLL_S, max(0.0, next_at - self.clock.wall()))
            if debug_enabled() and active:
                log.debug("scheduler.idle", active=active, wait_s=round(wait, 3),
                          next_due_in_s=None if next_at is None else round(next_at - self.clock.wall(), 3),
                          reason="nothing due yet: every recording left waits out its back-off or is in progress")
            await sleep_or_stop(self.clock, wait, self.stop, self._finished, self._wakeup)
            self._wakeup.clear()
            return
        await self._process(row)

    async def _save_unsaved(self) -> None:
        """Apply the ledger writes that failed, oldest first, each exactly once (one worker at a time:
        a reschedule applied twice would burn two attempts). Raises LedgerError while it still fails."""
        async with self._saving:
            while self._unsaved:
                key, write = next(iter(self._unsaved.items()))
                await write()
                del self._unsaved[key]
                log.info("ledger.write_recovered", recording=key)

    async def _ledger_write(self, row: Row, fn: Callable[[LedgerDb], Any]) -> Any:
        """A ledger write for a claimed row; if the ledger fails, the write is kept for later and the
        pipeline pauses (the row must not stay in progress until a restart)."""
        try:
            return await asyncio.shield(self.ledger.call(fn))
        except LedgerError as exc:
            self._unsaved[row.key] = functools.partial(self.ledger.call, fn)
            self._pause(exc, "LedgerError")
            log.warning("ledger.write_deferred", recording=row.ref, error=str(exc))
            return None

    def _after_pause(self) -> None:
        self._busy_keys.clear()  # after a pause, it takes new evidence to call the PBX busy again
        if self.paused or self.pause_reason is None:
            return
        if self.fatal is not None and not self.once:
            if self._auth_failures > MAX_AUTH_RETRIES:
                return
            # One more login attempt, on a long interval: never a loop towards the PBX's IP block.
            self.client.tokens.clear_fatal()
            self.fatal = None
        if self._probed_streak != self._pause_streak:
            self._probed_streak = self._pause_streak
            log.info("pipeline.probing", after=self.pause_reason)

    async def _process(self, row: Row) -> None:
        started = self.clock.monotonic()
        try:
            result = await self.downloader.archive_row(row)
        except asyncio.CancelledError:
            await self._release(row)
            raise
        except FatalAuthError as exc:
            await self._release(row)
            self._on_fatal(exc)
        except CommitNotRecorded as exc:
            # The file is safely on disk; only its ledger row lags. Record it when the ledger works.
            self._unsaved[row.key] = functools.partial(self.downloader.complete_later, row, exc.completion)
            self._pause(exc, "LedgerError")
        except TlsError as exc:
            await self._release(row)
            self._on_untrusted(exc)
        except PauseError as exc:
            await self._release(row)
            self._pause(exc, type(exc).__name__)
        except UrlExpiredError as exc:
            turns = self._url_turns[row.key] = self._url_turns.get(row.key, 0) + 1
            burn = turns >= URL_EXPIRED_FREE_TURNS
            if burn:
                del self._url_turns[row.key]
            await self._reschedule(row, exc, exc.retry_after_s or URL_EXPIRED_DELAY_S, burn=burn)
        except DeferredError as exc:
            # Jittered: an id row and its name row claimed together both see the other in progress
            # and wait; deferred to the same moment they would meet (and wait) again for ever.
            delay = (exc.retry_after_s or 0.0) * (0.5 + self.rand())
            await self._reschedule(row, exc, delay, burn=False)
        except RecordingMissingError as exc:
            if await self._not_yet(row):
                # Announced (a 30012 event at call end, a name in the queue, a listing written at call
                # end) before the PBX can serve the file: "not found" means "not yet" for a while.
                await self._reschedule(row, exc, None, burn=False, grace=True)
            else:
                await self._finish_permanent(row, exc)
        except PermanentError as exc:
            await self._finish_permanent(row, exc)
        except PbxBusyError as exc:
            # This recording pays for it and goes behind the others; only several different
            # recordings failing in a row say the PBX itself is in trouble.
            await self._reschedule(row, exc, exc.retry_after_s, burn=True)
            if row.key not in self._busy_keys:
                self._busy_keys.append(row.key)
            if len(self._busy_keys) >= BUSY_BURST:
                if debug_enabled():
                    log.debug("scheduler.decision", recording=row.ref, decision="pause",
                              reason=f"{len(self._busy_keys)} different recordings in a row met "
                                     f"{type(exc).__name__}: the PBX, not them")
                self._pause(exc, type(exc).__name__)
        except RetryableError as exc:
            await self._reschedule(row, exc, exc.retry_after_s, burn=True)
        except ArchiverError as exc:
            await self._reschedule(row, exc, None, burn=True)
        except Exception as exc:  # a bug: log it fully, burn an attempt so that it cannot spin
            log.exception("download.unexpected_error", recording=row.ref)
            await self._reschedule(row, exc, None, burn=True)
        else:
            if debug_enabled():
                _state_changed(row, "in_progress", "done", "merged into another row" if result.merged else
                               "downloaded" if result.downloaded else "adopted a file already in the archive")
            self._busy_keys.clear()
            self._url_turns.pop(row.key, None)
            self._auth_failures = 0
            if self._pause_streak:
                log.info("pipeline.resumed", after=self.pause_reason)
                self._pause_streak = 0
                self.pause_reason = None
                self.paused_since = None
            if result.merged:
                self.stats.merged += 1
                return
            self.stats.archived += 1
            self.last_success_wall = self.clock.wall()
            if self.on_archived is not None:
                self.on_archived(self.clock.monotonic() - started)
            if self.on_done is not None:
                self.on_done(row, result)
            self.stats.bytes += result.size if result.downloaded else 0
            if result.downloaded:
                self.stats.downloaded += 1
            else:
                self.stats.adopted += 1

    async def _not_yet(self, row: Row) -> bool:
        """60001 for a recording first seen less than ``sources.missing_grace_s`` ago may mean "not ready
        yet": always for one announced by its file name (a 30012 event at call end, the queue); for an
        id only while ``recording/search?ids=`` still lists it (a PBX may list the CDR before the file
        is there), else the id is gone. A search that fails decides nothing yet."""
        first_seen = row.created_at if row.created_at is not None else self.clock.wall()
        if self.clock.wall() - first_seen >= self.cfg.sources.missing_grace_s:
            return False
        if row.rec_id is None:
            return True
        try:
            page = await self.client.search_recordings(page=1, page_size=1, ids=str(row.rec_id))
        except ArchiverError as exc:
            log.info("download.missing_unconfirmed", recording=row.ref, reason=str(exc), action="trying later")
            return True
        if any(item.get("id") != row.rec_id for item in page.items):
            return True      # the PBX ignored ids= (it answered others): no verdict from it
        return bool(page.items)

    async def _finish_permanent(self, row: Row, exc: PermanentError) -> None:
        now, state, error = self.clock.wall(), exc.state, str(exc)
        await self._ledger_write(row, lambda db: db.finish(row.key, state=state, error=error, now=now))
        if debug_enabled():
            _state_changed(row, "in_progress", state, error)
            log.debug("scheduler.decision", recording=row.ref, decision="give_up", reason=error,
                      permanent=True)
        if exc.state == "missing":
            self.stats.missing += 1
            if len(self.stats.missing_refs) < MISSING_NAMED:
                self.stats.missing_refs.append(row.ref)
            log.warning("download.missing", recording=row.ref, reason=str(exc))
        else:
            self.stats.failed += 1
            self._failed(row, str(exc))
            log.error("download.failed", recording=row.ref, reason=str(exc), permanent=True)

    async def _release(self, row: Row) -> None:
        now = self.clock.wall()
        await self._ledger_write(row, lambda db: db.release(row.key, now=now))
        if debug_enabled():
            _state_changed(row, "in_progress", "pending",
                           "given back untouched (a pause, a refusal or the shutdown); no attempt counted")

    async def _reschedule(self, row: Row, exc: BaseException, retry_after_s: float | None, *, burn: bool,
                          grace: bool = False) -> None:
        attempt = row.attempts + (1 if burn else 0)
        if grace:
            # Back off by how long it has been waiting, not by attempts (none are burnt).
            waited = self.clock.wall() - (row.created_at or self.clock.wall())
            delay = min(self.cfg.downloads.backoff_max_s, max(self.cfg.downloads.backoff_base_s, waited / 4))
        else:
            delay = backoff_delay(attempt, self.cfg.downloads.backoff_base_s, self.cfg.downloads.backoff_max_s,
                                  self.rand())
        delay = max(delay, retry_after_s or 0.0)
        now = self.clock.wall()
        error = f"{type(exc).__name__}: {exc}"
        name = type(exc).__name__
        self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
        state = await self._ledger_write(row, functools.partial(
            _reschedule_row, key=row.key, error=error, next_at=now + delay, burn=burn,
            max_attempts=self.cfg.downloads.max_attempts, now=now))
        if debug_enabled():
            if state is not None:
                _state_changed(row, "in_progress", state, error)
            log.debug("scheduler.decision", recording=row.ref, decision=retry_decision(state, burn=burn),
                      reason=error, attempt=attempt, max_attempts=self.cfg.downloads.max_attempts,
                      retry_in_s=round(delay, 3), grace=grace)
        if state == "failed":
            self.stats.failed += 1
            self._failed(row, error)
            log.error("download.failed", recording=row.ref, attempts=attempt, reason=error)
        elif burn:
            self.stats.retried += 1
            log.info("download.retry", recording=row.ref, attempt=attempt, retry_in_s=round(delay, 2),
                     reason=error)
        else:
            log.info("download.later", recording=row.ref, retry_in_s=round(delay, 2), reason=error)

    def _failed(self, row: Row, reason: str) -> None:
        self._failure_seq += 1
        self.failures.append((self._failure_seq, row.ref, reason))

    def _pause(self, exc: ArchiverError, reason: str) -> None:
        retry_after = exc.retry_after_s if isinstance(exc, PauseError | RetryableError) else None
        now = self.clock.monotonic()
        if now < self.paused_until:
            return  # already paused: one outage is one step of the back-off, whatever the worker count
        self._pause_streak += 1
        self.stats.pauses += 1
        if self.paused_since is None:
            self.paused_since = now
        delay = pause_delay(self._pause_streak, retry_after, self.cfg.downloads.pause_max_s, self.rand())
        self.paused_until = now + delay
        self.pause_reason = reason
        log.warning("pipeline.paused", reason=reason, retry_in_s=round(delay, 2), error=str(exc))

    def _on_untrusted(self, exc: TlsError) -> None:
        """The PBX's certificate is not trusted: only an operator can fix that (pbx.tls.ca_file).
        ``once`` ends now (exit 4); ``run`` pauses, not ready, and looks again on the pause back-off."""
        if self.once:
            if self.untrusted is None:
                self.untrusted = exc
                log.error("tls.untrusted_stop", reason=str(exc))
            self._finished.set()
            return
        self._pause(exc, "TlsError")

    def _on_fatal(self, exc: FatalAuthError) -> None:
        if self.fatal is not None:
            return
        self.fatal = exc
        self._auth_failures += 1
        if self.once:
            log.error("auth.fatal_stop", reason=str(exc))
            self._finished.set()
            return
        if self._auth_failures > MAX_AUTH_RETRIES:
            log.error("auth.gave_up", reason=str(exc), retries=MAX_AUTH_RETRIES,
                      action="no more logins until restart; fix the PBX side, then restart the service")
            self.paused_until = float("inf")
            self.pause_reason = "FatalAuthError"
            return
        interval = self.cfg.pbx.auth_retry_interval_s
        if exc.retry_after_s is not None:
            # The PBX said when its IP block lifts (70004's block_expire_time): the next login then.
            interval = exc.retry_after_s + BLOCK_LIFT_MARGIN_S
        self.paused_until = self.clock.monotonic() + interval
        self.pause_reason = "FatalAuthError"
        log.error("auth.refused", reason=str(exc), retry_in_s=round(interval, 1))


def _reschedule_row(db: LedgerDb, *, key: str, error: str, next_at: float, burn: bool, max_attempts: int,
                    now: float) -> str:
    return db.reschedule(key, error=error, next_at=next_at, burn=burn, max_attempts=max_attempts, now=now)


def _state_changed(row: Row, before: str, after: str, reason: str) -> None:
    """The debug event of a recording's ledger state change (callers test ``debug_enabled`` first)."""
    log.debug("ledger.state_changed", recording=row.ref, from_state=before, to_state=after, reason=reason)
