"""verify: re-read every archived copy — local and off-box — and compare it with what the ledger recorded.

A copy that vanished or whose bytes changed (bit rot, a truncation, a hand) is reported, kept aside
(``<name>.damaged-<UTC time>``: nothing is ever deleted, not even damage) and mended from the copy that
is still good — the other destination, or the PBX (the recording goes back to ``pending``; if the
PBX no longer holds it, it ends ``missing`` with the damaged copy kept). ``run`` walks the archive in
the background every ``verify.interval_s``, at most ``verify.max_bytes_per_second``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

import structlog

from daemon.archive import ArchiveDir, part_name
from daemon.clock import Clock, sleep_or_stop
from daemon.destinations import S3Destination
from daemon.errors import ArchiverError, DestinationConfigError, DestinationRefusedError, PauseError
from daemon.ledger import ARCHIVED, Ledger, LedgerDb, Row

log = structlog.get_logger("daemon.verify")

KV_LAST_RUN = "verify.last_run_at"
KV_LAST_REPORT = "verify.last_report"
READ_BYTES = 1024 * 1024


def aside_name(name: str, now_wall: float) -> str:
    """``<name>.damaged-<UTC time>``: where a damaged copy is kept. Pure."""
    return f"{name}.damaged-{dt.datetime.fromtimestamp(now_wall, dt.UTC):%Y%m%dT%H%M%SZ}"


def keep_aside_local(archive: ArchiveDir, rel: PurePosixPath, now_wall: float) -> str:
    """Move a damaged local copy out of its final name, never over another file (blocking).
    Returns the archive path it is kept at."""
    fd = archive.open_dir(rel.parent, create=False)
    try:
        base = aside_name(rel.name, now_wall)
        for n in range(100):
            aside = base if n == 0 else f"{base}.{n}"
            try:
                os.link(rel.name, aside, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                continue
            os.unlink(rel.name, dir_fd=fd)
            os.fsync(fd)
            return str(rel.parent / aside)
        raise OSError(f"no free name to keep {str(rel)!r} aside")
    finally:
        os.close(fd)


@dataclass
class Problem:
    recording: str
    copy: str            # "local" or a destination's name
    kind: str            # vanished, damaged, unreadable
    where: str
    detail: str
    action: str = ""


@dataclass
class VerifyReport:
    checked: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = True     # False: problems reported only (another run held the ledger)

    def as_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "bytes_read": self.bytes_read, "repaired": self.repaired,
                "problems": [asdict(p) for p in self.problems]}


class _Pace:
    """At most ``rate`` bytes a second, measured on the injected clock."""

    def __init__(self, clock: Clock, rate: int | None) -> None:
        self.clock = clock
        self.rate = rate
        self.started = clock.monotonic()
        self.bytes = 0

    async def took(self, n: int) -> None:
        self.bytes += n
        if self.rate:
            ahead = self.bytes / self.rate - (self.clock.monotonic() - self.started)
            if ahead > 0:
                await self.clock.sleep(ahead)


class Verifier:
    """Checks and mends the copies of archived recordings."""

    def __init__(self, ledger: Ledger, archive: ArchiveDir, clock: Clock, *, dest: S3Destination | None = None,
                 repair: bool = True, postpone_on_outage: bool = False) -> None:
        self.ledger = ledger
        self.archive = archive
        self.clock = clock
        self.dest = dest
        self.repair = repair
        self.postpone_on_outage = postpone_on_outage

    async def restore_vanished(self, paths: list[str]) -> int:
        """Local copies that start-up reconciliation found gone (and re-queued): restored from their
        verified off-box copy when there is one, instead of fetched from a PBX that may no longer hold
        them. Returns how many; the others stay queued for a download."""
        if self.dest is None or not paths:
            return 0
        dest = self.dest.name
        wanted = set(paths)

        def candidates(db: LedgerDb) -> list[tuple[Row, str]]:
            out = []
            for row in db.rows("pending"):
                if row.final_path in wanted and row.sha256:
                    good = [c for c in db.copies_of(row.key) if c["dest"] == dest and c["state"] == "done"]
                    if good:
                        out.append((row, str(good[0]["object_key"])))
            return out
        restored = 0
        for row, key in await self.ledger.call(candidates):
            rel = PurePosixPath(str(row.final_path))
            try:
                await self._restore(row, rel, key)
            except (ArchiverError, OSError) as exc:
                log.warning("verify.restore_failed", recording=row.ref, key=key, error=str(exc),
                            action="left queued for a download")
                continue
            await self.ledger.call(functools.partial(LedgerDb.restored, key=row.key, now=self.clock.wall()))
            restored += 1
            log.info("verify.restored", recording=row.ref, path=str(rel), source=f"{dest} ({key})")
        return restored

    async def run(self, keys: list[str] | None = None, *, read_data: bool = False, rate: int | None = None,
                  stop: asyncio.Event | None = None) -> VerifyReport:
        """Verify the archived recordings (all, or ``keys``); returns what was found and done."""
        report = VerifyReport(repaired=self.repair)
        pace = _Pace(self.clock, rate)

        def archived(db: LedgerDb) -> list[tuple[Row, list[dict[str, Any]]]]:
            rows = [r for state in ARCHIVED for r in db.rows(state) if keys is None or r.key in keys]
            return [(r, db.copies_of(r.key)) for r in rows]
        unreachable: ArchiverError | None = None
        unchecked = 0
        for row, copies in await self.ledger.call(archived):
            if stop is not None and stop.is_set():
                break
            report.checked += 1
            local_ok = await self._local(row, report, pace) if row.local_kept else None
            for copy in copies:
                if copy["state"] == "done" and self.dest is not None and copy["dest"] == self.dest.name:
                    if unreachable is not None:
                        unchecked += 1
                        continue
                    try:
                        await self._remote(row, copy, local_ok, report, pace, read_data)
                    except (PauseError, DestinationRefusedError, DestinationConfigError) as exc:
                        if self.postpone_on_outage:
                            raise        # the background walk tries again at its next turn
                        unreachable, unchecked = exc, unchecked + 1
        if unreachable is not None and self.dest is not None:
            counted = f"{unchecked} off-box cop{'y' if unchecked == 1 else 'ies'}"
            problem = Problem(recording="*", copy=self.dest.name, kind="unreachable", where=self.dest.cfg.bucket,
                              detail=str(unreachable),
                              action=f"{counted} not checked; run verify again when the bucket answers")
            report.problems.append(problem)
            log.warning("verify.problem", **asdict(problem))
        report.bytes_read = pace.bytes
        now = self.clock.wall()
        summary = json.dumps({"at": now, "checked": report.checked, "problems": len(report.problems)})
        def record(db: LedgerDb) -> None:
            db.kv_set(KV_LAST_RUN, str(now))
            db.kv_set(KV_LAST_REPORT, summary)
        with contextlib.suppress(ArchiverError):
            await self.ledger.call(record)
        log.info("verify.done", checked=report.checked, problems=len(report.problems), bytes_read=report.bytes_read,
                 repaired=self.repair)
        return report

    # ------------------------------------------------------------ local
    async def _local(self, row: Row, report: VerifyReport, pace: _Pace) -> bool:
        """True when the local copy is whole; a problem is reported and mended otherwise."""
        rel = PurePosixPath(str(row.final_path))
        try:
            size, sha = await self._hash_local(rel, pace)
        except FileNotFoundError:
            fresh = await self.ledger.call(lambda db: db.get(row.key))
            if fresh is None or not fresh.local_kept or fresh.final_path != row.final_path \
                    or fresh.state not in ARCHIVED:
                # Since this walk began, the copier removed it after its verified off-box copy
                # (keep_local: false), or the recording moved on: not a loss.
                return True
            return await self._local_problem(row, rel, report, "vanished", "the file is gone")
        except OSError as exc:
            return await self._local_problem(row, rel, report, "unreadable", str(exc))
        if size != row.bytes or sha != row.sha256:
            return await self._local_problem(row, rel, report, "damaged",
                                             f"{size} bytes, sha256 {sha[:16]}… (the ledger says {row.bytes} bytes, "
                                             f"sha256 {str(row.sha256)[:16]}…)")
        return True

    async def _hash_local(self, rel: PurePosixPath, pace: _Pace) -> tuple[int, str]:
        fd = await asyncio.to_thread(_open_regular, self.archive, rel)
        try:
            digest = hashlib.sha256()
            size = 0
            while chunk := await asyncio.to_thread(os.read, fd, READ_BYTES):
                digest.update(chunk)
                size += len(chunk)
                await pace.took(len(chunk))
            return size, digest.hexdigest()
        finally:
            os.close(fd)

    async def _local_problem(self, row: Row, rel: PurePosixPath, report: VerifyReport, kind: str, detail: str) -> bool:
        problem = Problem(recording=row.ref, copy="local", kind=kind, where=str(rel), detail=detail)
        report.problems.append(problem)
        if not self.repair:
            problem.action = "reported (another run holds the ledger; run `verify` again when it is stopped)"
        else:
            if kind == "damaged":
                aside = await asyncio.to_thread(keep_aside_local, self.archive, rel, self.clock.wall())
                problem.action = f"kept aside as {aside}; "
            problem.action += await self._refetch(row, rel)
        log.warning("verify.problem", **asdict(problem))
        return False

    async def _refetch(self, row: Row, rel: PurePosixPath) -> str:
        """Mend a lost local copy: from a verified off-box copy if there is one, else from the PBX."""
        copies = await self.ledger.call(lambda db: db.copies_of(row.key))
        good = [c for c in copies if c["state"] == "done" and self.dest is not None and c["dest"] == self.dest.name]
        if good and self.dest is not None:
            try:
                await self._restore(row, rel, str(good[0]["object_key"]))
                return f"restored from {self.dest.name} ({good[0]['object_key']})"
            except (ArchiverError, OSError) as exc:
                log.warning("verify.restore_failed", recording=row.ref, error=str(exc))
        now = self.clock.wall()
        await self.ledger.call(lambda db: db.requeue(row.key, reason="verify: the local copy was lost or damaged",
                                                     now=now))
        return "re-queued: fetched again while the PBX holds it"

    async def _restore(self, row: Row, rel: PurePosixPath, key: str) -> None:
        assert self.dest is not None
        dir_fd = await asyncio.to_thread(self.archive.open_dir, rel.parent, create=True)
        part = part_name(rel.name)
        try:
            fd = await asyncio.to_thread(ArchiveDir.open_part, dir_fd, part, keep=0)
            digest = hashlib.sha256()
            try:
                async for chunk in self.dest.chunks(key):
                    digest.update(chunk)
                    await asyncio.to_thread(os.write, fd, chunk)
                if digest.hexdigest() != row.sha256:
                    raise OSError(f"the copy at {key!r} is not the recording either")
                await asyncio.to_thread(os.fsync, fd)
                written = os.fstat(fd)
                if not await asyncio.to_thread(ArchiveDir.commit, dir_fd, part, rel.name, written):
                    raise OSError(f"{str(rel)!r} is taken")
            finally:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    # ------------------------------------------------------------ off-box
    async def _remote(self, row: Row, copy: dict[str, Any], local_ok: bool | None, report: VerifyReport,
                      pace: _Pace, read_data: bool) -> None:
        assert self.dest is not None
        key = str(copy["object_key"])
        found = await self.dest.head(key)
        kind, detail = None, ""
        if found is None:
            kind, detail = "vanished", "no object at the key"
        elif found.size != copy["size"] or found.etag != copy["etag"]:
            kind, detail = "damaged", (f"{found.size} bytes, ETag {found.etag} (the ledger says {copy['size']} "
                                       f"bytes, ETag {copy['etag']})")
        elif read_data:
            digest = hashlib.sha256()
            async for chunk in self.dest.chunks(key):
                digest.update(chunk)
                await pace.took(len(chunk))
            if digest.hexdigest() != row.sha256:
                kind, detail = "damaged", f"its bytes' sha256 is {digest.hexdigest()[:16]}…, not the recording's"
        if kind is None:
            return
        problem = Problem(recording=row.ref, copy=self.dest.name, kind=kind, where=key, detail=detail)
        report.problems.append(problem)
        if not self.repair:
            problem.action = "reported (another run holds the ledger)"
        else:
            if kind == "damaged":
                aside = aside_name(key, self.clock.wall())
                await self.dest.keep_aside(key, aside)
                problem.action = f"kept aside as {aside}; "
            dest, now = self.dest.name, self.clock.wall()
            if local_ok or (local_ok is None and row.local_kept):
                state = "repair" if kind == "damaged" else "pending"
                await self.ledger.call(lambda db: db.copy_again(row.key, dest, state=state, now=now))
                problem.action += "copied again from the local copy"
            else:
                damaged = kind == "damaged"

                def again(db: LedgerDb) -> None:
                    if damaged:   # kept aside: the object at the key is ours to write over once re-fetched
                        db.copy_again(row.key, dest, state="repair", now=now)
                    db.requeue(row.key, reason=f"verify: the {dest} copy was lost", now=now)
                await self.ledger.call(again)
                problem.action += "re-queued: fetched again while the PBX holds it"
        log.warning("verify.problem", **asdict(problem))


def _open_regular(archive: ArchiveDir, rel: PurePosixPath) -> int:
    dir_fd = archive.open_dir(rel.parent, create=False)
    try:
        fd = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{str(rel)!r} is not a regular file")
    return fd


async def verify_loop(verifier: Verifier, interval_s: float, rate: int, clock: Clock, stop: asyncio.Event,
                      on_report: Any = None) -> None:
    """``run``'s background walk: a verify every ``interval_s``, reading at most ``rate`` bytes a second."""
    while not await sleep_or_stop(clock, interval_s, stop):
        try:
            report = await verifier.run(rate=rate, stop=stop)
        except PauseError as exc:
            log.warning("verify.postponed", error=str(exc))
            continue
        if on_report is not None:
            on_report(report)
