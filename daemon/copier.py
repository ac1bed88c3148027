"""The off-box copier: each recording archived locally is copied to every destination and verified
before it is done, and its ``hooks.on_archived`` run starts then; with ``archive.keep_local: false``
the local copy then goes.

It runs beside the scheduler and never touches the PBX. The ledger holds each copy's state (table
``copies``), so a crash between "archived locally" and "copied" resumes the copy, never the download.
An outage of the destination pauses the copies (no recording is marked failed for it); refused
credentials or a missing bucket stop them until an operator acts; a problem with one object retries
that object with back-off.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import structlog

from daemon.archive import ArchiveDir, sidecar_bytes, sidecar_data
from daemon.clock import Clock, sleep_or_stop
from daemon.config import Config
from daemon.destinations import S3Destination, upload_hashes
from daemon.errors import (
    ArchiverError,
    DestinationConfigError,
    DestinationRefusedError,
    PauseError,
    PermanentError,
)
from daemon.hooks import HookJob, HookRunner
from daemon.ledger import KV_PBX_SN, DueCopy, Ledger, LedgerDb, Row
from daemon.scheduler import backoff_delay, pause_delay

log = structlog.get_logger("daemon.copier")

_T = TypeVar("_T")

IDLE_POLL_S = 1.0
READ_BYTES = 1024 * 1024


@dataclass
class CopyStats:
    copied: int = 0
    adopted: int = 0
    bytes: int = 0
    failed: int = 0
    local_removed: int = 0


class Copier:
    """Workers that copy archived recordings to one destination."""

    def __init__(self, cfg: Config, ledger: Ledger, dest: S3Destination, archive: ArchiveDir, clock: Clock,
                 stop: asyncio.Event, *, once: bool, rand: Callable[[], float] = random.random) -> None:
        assert cfg.archive.s3 is not None
        self.cfg = cfg
        self.ledger = ledger
        self.dest = dest
        dest.ledger = ledger            # the journal of multipart uploads begun and not ended
        self.archive = archive
        self.clock = clock
        self.stop = stop
        self.once = once
        self.rand = rand
        self.stats = CopyStats()
        self.fatal: ArchiverError | None = None   # refused credentials, a missing bucket: an operator's turn
        self.paused_until = 0.0
        self.pause_reason: str | None = None
        self.paused_since: float | None = None
        self.gave_up = False
        self.last_error: str | None = None
        self.scheduler_done = asyncio.Event()   # once: no more recordings will be archived locally
        self._finished = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._busy: set[str] = set()
        self._claiming = asyncio.Lock()
        self._pause_streak = 0
        self._stale_aborted = False
        self.hooks: HookRunner | None = None   # told of each recording its copies made done

    @property
    def paused(self) -> bool:
        return self.clock.monotonic() < self.paused_until

    def notify(self) -> None:
        """A recording was archived locally: wake idle workers."""
        self._wakeup.set()

    async def run(self) -> None:
        """Copy until stopped (``run``) or until nothing is left to copy (``once``)."""
        workers = [asyncio.create_task(self._worker(n), name=f"copier-{n}")
                   for n in range(self.cfg.archive.s3.workers if self.cfg.archive.s3 else 1)]
        stopper = asyncio.ensure_future(self.stop.wait())
        finisher = asyncio.ensure_future(self._finished.wait())
        try:
            await asyncio.wait([stopper, finisher, *workers], return_when=asyncio.FIRST_COMPLETED)
            running = [w for w in workers if not w.done()]
            if running and self.stop.is_set():
                # Copies in flight get the grace time; a cut upload is simply made again next time.
                await asyncio.wait(running, timeout=self.cfg.service.shutdown_grace_s)
        finally:
            for task in (*workers, stopper, finisher):
                task.cancel()
            await asyncio.gather(*workers, stopper, finisher, return_exceptions=True)

    async def _worker(self, n: int) -> None:
        dest = self.dest.name
        while not self.stop.is_set() and not self._finished.is_set():
            if self.once and self.paused_since is not None and \
                    self.clock.monotonic() - self.paused_since > self.cfg.downloads.once_give_up_s:
                log.error("copier.gave_up", reason=self.pause_reason, error=self.last_error)
                self.gave_up = True
                self._finished.set()
                return
            if self.paused:
                await sleep_or_stop(self.clock, self.paused_until - self.clock.monotonic(), self.stop, self._finished)
                continue
            if self.fatal is not None:
                if self.once:
                    self._finished.set()
                    return
                self.fatal = None   # run: one more try after the long pause that came with it
            try:
                if not self._stale_aborted:
                    self._stale_aborted = True    # before the await: one worker does it, not each
                    try:
                        await self.dest.abort_stale_uploads()
                    except BaseException:
                        self._stale_aborted = False
                        raise
                now = self.clock.wall()
                async with self._claiming:   # one claim at a time: two workers never take the same copy
                    busy = set(self._busy)
                    due = await self.ledger.call(functools.partial(_due, dest=dest, now=now, busy=busy))
                    if due:
                        self._busy.add(due[0].row.key)
                if not due:
                    left, next_at = await self.ledger.call(lambda db: db.next_copy_due(dest))
                    if self.once and self.scheduler_done.is_set() and left == 0 and not self._busy:
                        self._finished.set()
                        return
                    wait = IDLE_POLL_S if next_at is None else min(IDLE_POLL_S, max(0.0, next_at - now))
                    await sleep_or_stop(self.clock, wait, self.stop, self._finished, self._wakeup)
                    self._wakeup.clear()
                    continue
                copy = due[0]
                try:
                    await self._copy(copy.row, copy.object_key, repair=copy.state == "repair", attempts=copy.attempts)
                finally:
                    self._busy.discard(copy.row.key)
            except (DestinationRefusedError, DestinationConfigError) as exc:
                self._on_fatal(exc)
            except PauseError as exc:
                self._pause(exc)
            except ArchiverError as exc:   # the ledger, most likely: pause, never lose a worker
                self._pause(exc)
            except Exception as exc:
                log.exception("copier.error", worker=n)
                self._pause(exc)

    async def _copy(self, row: Row, chosen: str | None, *, repair: bool, attempts: int) -> None:
        dest = self.dest.name
        rel = PurePosixPath(str(row.final_path))
        local = self.archive.root / rel
        present = await asyncio.to_thread(self.archive.exists, rel)
        if not present:
            # Nothing to copy from: the recording must be fetched again (its sha256 stays as evidence).
            now = self.clock.wall()
            await self.ledger.call(lambda db: db.requeue(row.key, reason=f"the local copy {str(rel)!r} vanished "
                                                         "before it was copied off-box", now=now))
            log.warning("copy.local_vanished", recording=row.ref, path=str(rel), action="re-queued")
            return
        size = row.bytes or 0
        try:
            hashes = await asyncio.to_thread(upload_hashes, local, self.dest.cfg.part_size_bytes)
        except OSError as exc:
            await self._later(row, exc, attempts)
            return
        sha = hashes.sha256
        if sha != row.sha256:
            # Damaged on the local disk since it was archived: never copy damage off-box.
            await self._local_damaged(row, rel)
            return
        stored = await self._object_step(row, attempts, self.dest.store(
            local, rel, size=size, recording=row.ref, tag=str(row.rec_id) if row.rec_id is not None else sha[:12],
            chosen_key=chosen, overwrite_key=chosen if repair else None, hashes=hashes))
        if stored is None:
            return
        if stored.key != chosen:
            key = stored.key
            await self.ledger.call(lambda db: db.copy_chosen(row.key, dest, key))
        sidecar: bytes | None = None
        if self.cfg.archive.sidecar:
            # A sidecar the server refuses is this copy's trouble too: the copy is not done without it.
            sidecar = await self._sidecar(row, local)
            if await self._object_step(row, attempts, self.dest.put_small(stored.key + ".json", sidecar,
                                                                           recording=row.ref)) is None:
                return
        hooks = self.hooks if self.hooks is not None and self.hooks.enabled and not repair else None
        if hooks is not None and sidecar is None:
            sidecar = await self._sidecar(row, local)     # what the hook gets on stdin, sidecars on or off
        remove = not self.cfg.archive.keep_local
        now = self.clock.wall()
        state, first = await self.ledger.call(lambda db: db.copy_done(
            row.key, dest, object_key=stored.key, size=size, etag=stored.etag, now=now, local_removed=remove))
        if hooks is not None and first and sidecar is not None:
            # Archived now, off-box and verified: the hook's moment (once: a copy made again is no news).
            await self._hook(hooks, row, rel, local, sidecar, staged=remove)
        if remove:
            # The ledger said "removed" first: a crash before this line is finished by reconcile.
            await asyncio.to_thread(_remove_local, local)
            self.stats.local_removed += 1
        self.stats.adopted += stored.adopted
        self.stats.copied += not stored.adopted
        self.stats.bytes += 0 if stored.adopted else size
        self._pause_streak = 0
        if self.pause_reason is not None:
            log.info("copier.resumed", after=self.pause_reason)
            self.pause_reason, self.paused_since, self.last_error = None, None, None
        log.info("copy.completed", recording=row.ref, dest=dest, key=stored.key, size=size, adopted=stored.adopted,
                 etag=stored.etag, state=state, local_removed=remove)

    async def _hook(self, hooks: HookRunner, row: Row, rel: PurePosixPath, local: Path, sidecar: bytes, *,
                    staged: bool) -> None:
        """Hand the recording to ``hooks.on_archived``. When the local copy goes (``staged``), the hook
        reads it by a name of its own (a hard link beside the marker), which goes when the run is
        over: neither the removal nor whatever comes to the archive path later touches it."""
        path, release = local, None
        if staged:
            try:
                path = await asyncio.to_thread(self.archive.stage_for_hook, rel)
            except OSError as exc:
                hooks.drop(row.ref, f"the hook's own name for the file could not be made: {exc.strerror or exc}")
                return
            release = functools.partial(self.archive.unstage, path)
        hooks.submit(HookJob(recording=row.ref, path=path, sha256=row.sha256 or "", sidecar=sidecar, release=release))

    async def _object_step(self, row: Row, attempts: int, step: Awaitable[_T]) -> _T | None:
        """One request about this recording's objects. Its own trouble (the server refuses this object,
        or answers something worth a retry) is this copy's — failed, or again later — and gives None;
        the destination's (a pause, refused credentials, a missing bucket) goes up to the worker."""
        try:
            return await step
        except PermanentError as exc:
            await self._failed(row, exc)
        except (PauseError, DestinationRefusedError, DestinationConfigError):
            raise
        except ArchiverError as exc:
            await self._later(row, exc, attempts)
        return None

    async def _sidecar(self, row: Row, local: Path) -> bytes:
        """The local sidecar, or — when its write failed or has not happened yet — the same one made
        from the ledger (what reconciliation would write): every object gets its sidecar."""
        found = await asyncio.to_thread(ArchiveDir.read_regular, local.with_name(local.name + ".json"))
        if found is not None:
            return found
        pbx_sn = await self.ledger.call(lambda db: db.kv_get(KV_PBX_SN))
        return sidecar_bytes(sidecar_data(rec_id=row.rec_id, file=row.file, size=row.bytes or 0,
                                          sha256=row.sha256 or "", archived_at=row.done_at or self.clock.wall(),
                                          meta=row.meta, pbx_sn=pbx_sn))

    async def _local_damaged(self, row: Row, rel: PurePosixPath) -> None:
        from daemon.verify import keep_aside_local
        aside = await asyncio.to_thread(keep_aside_local, self.archive, rel, self.clock.wall())
        now = self.clock.wall()
        await self.ledger.call(lambda db: db.requeue(row.key, reason=f"the local copy was damaged (kept as {aside})",
                                                     now=now))
        log.error("copy.local_damaged", recording=row.ref, path=str(rel), kept_as=aside, action="re-queued")

    async def _failed(self, row: Row, exc: BaseException) -> None:
        now, error, dest = self.clock.wall(), str(exc), self.dest.name
        await self.ledger.call(lambda db: db.copy_later(row.key, dest, error=error, next_at=now, now=now,
                                                        failed=True))
        self.stats.failed += 1
        log.error("copy.failed", recording=row.ref, dest=dest, reason=error, action="fix it, then run retry")

    async def _later(self, row: Row, exc: BaseException, attempts: int) -> None:
        """This copy went wrong (one object's trouble, not the destination's): again after a back-off,
        ``downloads.max_attempts`` times at most, then failed. Copies never burn the recording's
        attempts: the bytes are safe on the local disk."""
        dest = self.dest.name
        delay = backoff_delay(attempts + 1, self.cfg.downloads.backoff_base_s, self.cfg.downloads.backoff_max_s,
                              self.rand())
        now = self.clock.wall()
        error = f"{type(exc).__name__}: {exc}"
        most = self.cfg.downloads.max_attempts
        state = await self.ledger.call(lambda db: db.copy_later(row.key, dest, error=error, next_at=now + delay,
                                                                now=now, max_attempts=most))
        if state == "failed":
            self.stats.failed += 1
            log.error("copy.failed", recording=row.ref, dest=dest, reason=error, attempts=most,
                      action="fix it, then run retry")
        else:
            log.warning("copy.retry", recording=row.ref, dest=dest, retry_in_s=round(delay, 2), reason=error)

    def _pause(self, exc: BaseException) -> None:
        now = self.clock.monotonic()
        self.last_error = str(exc)
        if now < self.paused_until:
            return
        self._pause_streak += 1
        if self.paused_since is None:
            self.paused_since = now
        retry_after = exc.retry_after_s if isinstance(exc, PauseError) else None
        delay = pause_delay(self._pause_streak, retry_after, self.cfg.downloads.pause_max_s, self.rand())
        self.paused_until = now + delay
        self.pause_reason = type(exc).__name__
        log.warning("copier.paused", reason=self.pause_reason, retry_in_s=round(delay, 2), error=str(exc))

    def _on_fatal(self, exc: ArchiverError) -> None:
        self.fatal = exc
        self.last_error = str(exc)
        self.pause_reason = type(exc).__name__
        if self.paused_since is None:
            self.paused_since = self.clock.monotonic()
        log.error("copier.refused", reason=str(exc),
                  action="stopping" if self.once else f"trying again in {self.cfg.pbx.auth_retry_interval_s:.0f} s")
        self.paused_until = self.clock.monotonic() + (0 if self.once else self.cfg.pbx.auth_retry_interval_s)


def _due(db: LedgerDb, *, dest: str, now: float, busy: set[str]) -> list[DueCopy]:
    return db.due_copies(dest, 1, now=now, exclude=busy)


def _remove_local(path: Path) -> None:
    """The local copy and its sidecar go once the off-box copy is verified (``keep_local: false``)."""
    for p in (path, path.with_name(path.name + ".json")):
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
        except FileNotFoundError:
            pass
