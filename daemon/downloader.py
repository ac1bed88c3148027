"""The downloader: one recording from URL to verified, committed file, by the restic-style protocol.

stream into a hidden ``.part`` beside the target (O_EXCL, a name unique to this attempt, no symlink
followed), hashing as it goes → verify length and that the body is audio → fsync(file) → link to the
final name, never clobbering, and only while the temp name is still the file written → fsync(dir) →
ledger done → sidecar. A failed fsync is never retried: the temp file is discarded.

Before any of it, the name the PBX serves is bound in the ledger (``LedgerDb.bind_name``): a recording
named twice (by id and by file name) has one transfer at a time and ends in one row.

The recording's bytes are written through ``aiofiles`` (the design card's writer for recordings:
an async file object whose writes run on its thread pool), one write per half MiB. Every other blocking
step here and in the rest of the package (open, hash, fsync, link, statvfs, the ledger) uses
``asyncio.to_thread`` or the ledger's own thread: the split is intended, not an accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import aiofiles
import structlog

from daemon.archive import (
    ArchiveDir,
    Naming,
    alternate_name,
    audio_ext,
    final_relpath,
    looks_like_audio,
    part_name,
    served_format,
    sidecar_data,
    storage_error,
    with_format,
)
from daemon.client import DownloadUrl, PbxClient
from daemon.clock import Clock
from daemon.config import Config
from daemon.errors import (
    ArchiverError,
    DeferredError,
    FatalAuthError,
    LedgerError,
    PauseError,
    PbxUnavailableError,
    PermanentError,
    RetryableError,
    StorageError,
    TransferError,
    UrlExpiredError,
)
from daemon.identity import PbxIdentity
from daemon.ledger import DEFER_S, Ledger, Row
from daemon.resolver import RequestGate, Resolver

log = structlog.get_logger("daemon.downloader")

CHUNK_BYTES = 256 * 1024
# Half a MiB per write: 1 MiB held ~1.2 MiB more per worker (A's peak RSS 62.4 -> 57.6 MiB at 512 KiB,
# for 4 % more CPU; 256 KiB cost 20 %): the RSS target is for any file size.
WRITE_BYTES = 512 * 1024
MAX_URL_ROUNDS = 3
CONFIRM_TRANSFERS = 3   # transfers in a row of a recording whose end nothing vouches for, to see two agree


@dataclass(frozen=True)
class Archived:
    """The outcome of one recording: where it is, and whether bytes crossed the network for it."""

    final_path: str
    size: int
    sha256: str
    downloaded: bool
    merged: bool = False   # archived under another ledger row for the same recording; this row is settled
    record: dict[str, Any] | None = None   # the sidecar's data (whether or not sidecars are written): for hooks


class CommitNotRecorded(LedgerError):
    """The recording is committed on disk, but the ledger could not record it: ``completion`` is the
    ledger update to apply once the ledger works again (so that the file is never downloaded twice)."""

    def __init__(self, cause: LedgerError, completion: dict[str, Any]) -> None:
        super().__init__(cause.message, recording=cause.recording)
        self.completion = completion


class ThroughputFloor:
    """Fed the size of every read of a transfer, envelope peek included; raises ``TransferError`` when a
    full window moved fewer bytes than ``min_bytes_per_second`` allows. A trickle cannot hold a slot
    (or, for mp3, the PBX's one request) for longer than a window or two."""

    def __init__(self, clock: Clock, min_bytes_per_second: int, window_s: float, recording: str) -> None:
        self._clock = clock
        self._min = min_bytes_per_second
        self._window_s = window_s
        self._recording = recording
        self._start = clock.monotonic()
        self._bytes = 0

    def __call__(self, n: int) -> None:
        now = self._clock.monotonic()
        self._bytes += n
        if too_slow(self._bytes, now - self._start, self._min, self._window_s):
            raise TransferError(f"the transfer is slower than downloads.min_bytes_per_second "
                                f"({self._bytes} bytes in {now - self._start:.0f} s)", recording=self._recording)
        if now - self._start >= self._window_s:
            self._start, self._bytes = now, 0


def too_slow(window_bytes: int, window_s: float, min_bytes_per_second: int,
             full_window_s: float = 30.0) -> bool:
    """True when a full throughput window moved fewer bytes than the floor allows. Pure."""
    return min_bytes_per_second > 0 and window_s >= full_window_s and \
        window_bytes < min_bytes_per_second * window_s


def gate_hint(content_type: str | None, url_hint: str | None) -> str | None:
    """What a file answer's headers may teach the one-request gate: only that it is mp3 (closing it),
    never wav (opening it) — a PBX that labels mp3 bytes audio/wav would let other requests in before
    the bytes show what they are. Pure."""
    fmt = served_format(b"", content_type, url_hint)
    return fmt if fmt == "mp3" else None


def wav_declared_size(head: bytes) -> int | None:
    """The file size a RIFF/WAVE header declares (its chunk size + 8); None for anything else, or for
    the 0 / 0xFFFFFFFF that streaming writers put there when they do not know it. Pure."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    riff = int.from_bytes(head[4:8], "little")
    return None if riff in (0, 0xFFFFFFFF) else riff + 8


def verification_problem(size: int, head: bytes, listing_size: int | None, *, length_known: bool = True
                         ) -> str | None:
    """Why a complete transfer is not the recording, or None when it is. Pure.

    ``length_known``: the answer declared its length (Content-Length or Content-Range). When it did
    not, a body that just stops (the PBX closed the connection) proves nothing about being whole:
    a WAV header that declares more bytes than arrived then says it was cut."""
    if size == 0:
        return "the PBX sent an empty body"
    if listing_size is not None and size != listing_size:
        return f"got {size} bytes but the PBX lists {listing_size}"
    if not looks_like_audio(head):
        return "the body is not audio (no RIFF/WAVE, ID3 or MPEG frame header)"
    return None


def unproven_end(size: int, head: bytes, listing_size: int | None, *, length_known: bool) -> str | None:
    """Why nothing vouches that a transfer that passed ``verification_problem`` is whole, or None. Pure.

    With neither a declared length (the PBX closed the connection after the body), nor a listing size
    for the served format, nor a WAV header that agrees, a cut transfer looks just like a whole one.
    The caller then fetches it again and commits only when two transfers agree byte for byte (a cut
    lands anywhere; a wrong but constant header, as some PBXs write, is the PBX's own file)."""
    if length_known or listing_size is not None:
        return None
    declared = wav_declared_size(head)
    if declared == size:
        return None
    if declared is not None:
        return f"the body ended at {size} bytes with no length declared, and its WAV header says {declared}"
    return f"the body ended at {size} bytes with no length declared and nothing in it says how long it is"


def expected_listing_size(row: Row, served_format: str | None) -> int | None:
    """The listing's size, when the listing describes the format being served (a PBX that stores wav
    and serves mp3 lists the wav's size). Pure."""
    size = row.meta.get("size")
    if not isinstance(size, int) or size <= 0 or not row.file or served_format is None:
        return None
    return size if audio_ext(row.file) == served_format else None


class _Unconfirmed(Exception):
    """This transfer may be cut and nothing says so: fetch it again, burn no attempt (yet)."""


@dataclass(frozen=True)
class _Body:
    """A transfer's outcome: its size, sha256, first bytes and the Content-Type it came with."""

    size: int
    sha256: str
    head: bytes
    content_type: str | None
    length_known: bool = True
    tail: bytes = b""   # the last bytes, not written yet: the commit writes them before its fsync


class _LazyWriter:
    """The aiofiles writer of a temp file, opened at its first write: a body that fits in one write
    never needs it (its bytes go out with the commit), and saves the open and close hops."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._out: Any = None

    @property
    def opened(self) -> bool:
        return self._out is not None

    async def write(self, data: bytes | bytearray) -> None:
        if self._out is None:
            self._out = await aiofiles.open(self._fd, "wb", closefd=False)
        await self._out.write(data)

    async def sync(self) -> None:
        if self._out is not None:
            await self._out.flush()
        await asyncio.to_thread(os.fsync, self._fd)

    async def close(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            await out.close()


class Downloader:
    """Archives one claimed ledger row at a time per caller; safe to call from many workers."""

    def __init__(self, cfg: Config, client: PbxClient, resolver: Resolver, gate: RequestGate, ledger: Ledger,
                 clock: Clock, archive: ArchiveDir, identity: PbxIdentity | None = None) -> None:
        self.cfg = cfg
        self.client = client
        self.resolver = resolver
        self.gate = gate
        self.ledger = ledger
        self.clock = clock
        self.archive = archive
        self.bytes_downloaded = 0
        self.in_flight = 0
        self.last_chunk_at = 0.0
        self.identity = identity
        self.pbx_sn: str | None = None   # for the layout's {pbx_sn} and the sidecar, once the PBX told it
        # key -> (size, sha256) of the last transfer whose end nothing vouched for (see unproven_end).
        self._unconfirmed: dict[str, tuple[int, str]] = {}
        self._range_ignored = False   # the PBX answered a Range request with the whole file

    async def archive_row(self, row: Row) -> Archived:
        """Resolve, fetch, verify and commit ``row``. Raises from ``errors``; UrlExpiredError only after
        the URL expired several times in a row, DeferredError while a twin row transfers the same
        recording (the caller must burn no attempt for either)."""
        if self.identity is not None:
            try:
                self.pbx_sn = await self.identity.ensure()
            except (FatalAuthError, PauseError):
                raise
            except ArchiverError as exc:
                # system/information is the PBX's question, not this recording's: whatever it answers
                # (busy, 40003, 60001) pauses the pipeline and decides nothing about the recording.
                retry = exc.retry_after_s if isinstance(exc, RetryableError) else None
                raise PbxUnavailableError(f"system/information: {exc}", retry_after_s=retry) from exc
        rounds = confirms = 0
        while rounds < MAX_URL_ROUNDS:
            url = await self.resolver.url_for(row.key, rec_id=row.rec_id, file=row.file)
            if rounds == 0 and confirms == 0:
                settled = await self._bind(row, url.file or row.file or "")
                if settled is not None:
                    self.resolver.forget(row.key)
                    return settled
            try:
                result = await self._fetch(row, url)
            except UrlExpiredError:
                self.resolver.forget(row.key)
                rounds += 1
                continue
            except _Unconfirmed as exc:
                # A fresh URL for the second look: some PBXs' download URLs serve once.
                self.resolver.forget(row.key)
                confirms += 1
                if confirms >= CONFIRM_TRANSFERS:
                    raise TransferError(f"{exc}; {CONFIRM_TRANSFERS} transfers in a row differed",
                                        recording=row.ref) from None
                continue
            self.resolver.forget(row.key)
            return result
        raise UrlExpiredError("the download URL expired again and again", recording=row.ref)

    async def _bind(self, row: Row, served: str) -> Archived | None:
        """One recording, one transfer: None to go on; an outcome when another row settled it."""
        if not served:
            return None
        outcome, other = await self.ledger.bind_name(row.key, served)
        if outcome == "wait":
            assert other is not None
            log.info("download.deferred", recording=row.ref, twin=other.ref, retry_in_s=DEFER_S)
            raise DeferredError(f"the same recording is being transferred as {other.ref!r}",
                                retry_after_s=DEFER_S, recording=row.ref)
        if outcome in ("done", "gone"):
            log.info("download.merged", recording=row.ref, into=other.ref if other else None,
                     path=other.final_path if other else None)
            return Archived(final_path=(other.final_path or "") if other else "",
                            size=(other.bytes or 0) if other else 0, sha256=(other.sha256 or "") if other else "",
                            downloaded=False, merged=True)
        return None

    def _relpath(self, row: Row, name: str) -> PurePosixPath:
        naming = Naming(rec_id=row.rec_id, file=name, call_type=row.meta.get("call_type"), pbx_sn=self.pbx_sn)
        return final_relpath(self.cfg.archive.layout, naming, dt.datetime.fromtimestamp(self.clock.wall(), dt.UTC))

    async def _fetch(self, row: Row, url: DownloadUrl) -> Archived:
        told = url.file or row.file or ""
        # What the PBX is about to serve, as far as it says: the URL's extension, else the told name's.
        expected = url.format_hint or audio_ext(told, default="") or None
        rel = self._relpath(row, with_format(told, expected))
        floor = self.cfg.archive.min_free_bytes
        need = floor + (expected_listing_size(row, expected) or 0)
        try:
            # One thread hop for the folder, the final name's status, the free space and, in the
            # common case (the final name is absent), the temp file.
            prep = await asyncio.to_thread(self._prepare, rel, self._resume_candidate(row, rel),
                                           need if floor > 0 else None)
        except OSError as exc:
            raise self._os_error(exc, f"cannot create {str(rel.parent)!r}", row) from exc
        dir_fd = prep.dir_fd
        try:
            if prep.final_st is not None:
                adopted = await self._adopt_existing(row, dir_fd, rel, told, prep.final_st)
                if adopted is not None:
                    return adopted
                await self._check_free_space(expected_listing_size(row, expected))
            elif prep.free is not None:
                raise StorageError(f"only {prep.free} bytes free in archive.dir (archive.min_free_bytes is {floor})")
            return await self._download(row, url, dir_fd, rel, told, expected, prep)
        finally:
            os.close(dir_fd)

    def _resume_candidate(self, row: Row, rel: PurePosixPath) -> tuple[str, int] | None:
        """(temp name, bytes fsynced) of this row's checkpointed temp file, when it may be resumed. Pure."""
        if row.part_path is not None and row.part_synced > 0:
            old = PurePosixPath(row.part_path)
            if old.parent == rel.parent and old.name.startswith(f".{rel.name}"[:40]):
                return old.name, row.part_synced
        return None

    def _prepare(self, rel: PurePosixPath, resume: tuple[str, int] | None, need: int | None) -> _Prepared:
        """The blocking start of a recording, in one thread: the folder, the final name's status, then
        (when it is absent and ``need`` bytes are free) the temp file, resumed or new."""
        dir_fd = self.archive.open_dir_cached(rel.parent)
        try:
            final_st = ArchiveDir.lstat(dir_fd, rel.name)
            if final_st is not None:
                return _Prepared(dir_fd, final_st)
            if need is not None:
                free = self.archive.free_bytes()
                if free < need:
                    return _Prepared(dir_fd, None, free=free)
            part, keep = _resume_point(dir_fd, rel, resume)
            try:
                fd = ArchiveDir.open_part(dir_fd, part, keep=keep)
            except OSError as exc:
                return _Prepared(dir_fd, None, part=part, keep=keep, open_error=exc)
            return _Prepared(dir_fd, None, part=part, keep=keep, fd=fd)
        except BaseException:
            os.close(dir_fd)
            raise

    def _os_error(self, exc: OSError, what: str, row: Row) -> Exception:
        err = storage_error(exc, what)
        if err is not None:
            return err
        if exc.errno == errno.ELOOP:
            return PermanentError(f"{what}: refused, a symlink or non-directory is in the way", recording=row.ref)
        return TransferError(f"{what}: {exc}", recording=row.ref)

    async def _check_free_space(self, expected: int | None) -> None:
        floor = self.cfg.archive.min_free_bytes
        if floor <= 0:
            return
        free = await asyncio.to_thread(self.archive.free_bytes)
        if free < floor + (expected or 0):
            raise StorageError(f"only {free} bytes free in archive.dir (archive.min_free_bytes is {floor})")

    async def _adopt_existing(self, row: Row, dir_fd: int, rel: PurePosixPath, served: str,
                              st: os.stat_result) -> Archived | None:
        """A file already under the final name is adopted without a download only when the ledger's
        sha256 for the recording (kept from an earlier archiving) proves it is the same bytes. Looking
        like audio proves nothing (an older script's stub), and neither does the right length (a
        downloader that preallocates leaves full-size files with a hole of zeros): without the sha256
        the recording is downloaded, and identical bytes are adopted then, other bytes kept beside
        them (``_commit_elsewhere``)."""
        if not stat.S_ISREG(st.st_mode) or row.sha256 is None or st.st_size != row.bytes:
            return None
        size, sha, head = await asyncio.to_thread(ArchiveDir.hash_file, dir_fd, rel.name)
        if sha != row.sha256 or not looks_like_audio(head):
            return None
        log.info("download.adopted", recording=row.ref, path=str(rel), size=size, proof="sha256")
        return await self._finish(row, dir_fd, rel, served, size, sha, downloaded=False)

    async def _download(self, row: Row, url: DownloadUrl, dir_fd: int, rel: PurePosixPath, told: str,
                        expected: str | None, prep: _Prepared) -> Archived:
        if prep.part is None:   # the final name was taken and nothing was adopted: open the temp file now
            part, keep = await asyncio.to_thread(_resume_point, dir_fd, rel, self._resume_candidate(row, rel))
            try:
                fd = await asyncio.to_thread(ArchiveDir.open_part, dir_fd, part, keep=keep)
            except OSError as exc:
                raise self._os_error(exc, f"cannot create {str(rel.parent / part)!r}", row) from exc
        else:
            part, keep = prep.part, prep.keep
            if prep.open_error is not None or prep.fd is None:
                cause = prep.open_error or OSError(errno.EBADF, "no temp file")
                raise self._os_error(cause, f"cannot create {str(rel.parent / part)!r}", row) from cause
            fd = prep.fd
        part_rel = str(rel.parent / part)
        if row.part_path is not None and row.part_path != part_rel:
            await self.ledger.call(lambda db: db.set_part(row.key, None, 0))  # a stale checkpoint elsewhere
        synced = [keep]  # what the ledger's checkpoint vouches for, as the transfer goes
        moved_fd: int | None = None
        try:
            try:
                body = await self._stream(row, url, fd, part_rel, keep, synced)
            except OSError as exc:
                await self._discard(row, dir_fd, part)
                raise self._os_error(exc, f"writing {part_rel!r} failed", row) from exc
            except BaseException:
                if synced[0] == 0:
                    # No checkpoint names this temp file: it can never be resumed, so it goes now.
                    await asyncio.shield(self._discard(row, dir_fd, part, checkpoint=False))
                raise
            fmt = served_format(body.head, body.content_type, expected)
            if fmt != expected and fmt is not None:
                # Named by what it holds: a PBX that lists and tells x.wav may serve mp3 bytes.
                log.info("download.format_learnt", recording=row.ref, told=told, served=fmt)
                new_rel = self._relpath(row, with_format(told, fmt))
                if new_rel.parent != rel.parent:
                    try:
                        new_fd, part = await asyncio.to_thread(self._move_part, dir_fd, part, new_rel)
                    except OSError as exc:
                        await self._discard(row, dir_fd, part)
                        raise self._os_error(exc, f"cannot create {str(new_rel.parent)!r}", row) from exc
                    dir_fd = moved_fd = new_fd
                rel = new_rel
            # A broken transfer keeps a checkpointed temp file: the ledger says how much of it to trust.
            listing = expected_listing_size(row, fmt)
            problem = verification_problem(body.size, body.head, listing, length_known=body.length_known)
            if problem is not None:
                await self._discard(row, dir_fd, part)
                raise TransferError(problem, recording=row.ref)
            unproven = unproven_end(body.size, body.head, listing, length_known=body.length_known)
            if unproven is not None:
                end = await self._probe_end(row, url, body.size)
                if end is False:
                    await self._discard(row, dir_fd, part)
                    raise TransferError(f"{unproven}, and the PBX holds bytes beyond it: the transfer was cut",
                                        recording=row.ref)
                if end is True:
                    unproven = None
                    log.info("download.end_confirmed", recording=row.ref, size=body.size,
                             reason="nothing beyond it (416 to a Range request)")
            if unproven is not None:
                if self._unconfirmed.get(row.key) != (body.size, body.sha256):
                    self._unconfirmed[row.key] = (body.size, body.sha256)
                    log.info("download.unconfirmed", recording=row.ref, size=body.size, reason=unproven,
                             action="fetching it again to compare")
                    await self._discard(row, dir_fd, part)
                    raise _Unconfirmed(unproven)
                declared = wav_declared_size(body.head)
                if declared is not None and declared > body.size:
                    # A header never updated, or a cut at the same byte every time (a proxy's limit):
                    # with no Range to ask, nothing tells which. Archived as served, and said loudly.
                    log.warning("download.shorter_than_its_header", recording=row.ref, size=body.size,
                                declared=declared, action="archived as the PBX serves it (twice the same)")
                log.info("download.confirmed", recording=row.ref, size=body.size,
                         reason="two transfers gave the same bytes")
            self._unconfirmed.pop(row.key, None)
        except BaseException:
            os.close(fd)
            if moved_fd is not None:
                os.close(moved_fd)
            raise
        now = self.clock.wall()
        # An id row's sidecar says nothing the ledger could still change: it goes out in the commit's
        # hop (unfsynced, as ever; reconciliation adopts a file from it only after checking its hash).
        side = self._sidecar(row, told or row.file, body.size, body.sha256, now) \
            if row.rec_id is not None else None
        try:
            try:
                linked, written, side_error = await asyncio.to_thread(
                    _seal_and_link, fd, dir_fd, part, rel.name, body.tail, side)
            except OSError as exc:
                # Never retry an fsync: the page cache may have dropped the data. Start over.
                await self._discard(row, dir_fd, part)
                raise self._os_error(exc, f"committing {str(rel.parent / part)!r} failed", row) from exc
            if side_error is not None:
                log.warning("archive.sidecar_failed", recording=row.ref, path=str(rel), error=str(side_error))
            final = rel if linked else await self._commit_elsewhere(row, dir_fd, rel, part, body.sha256, written)
            if row.sha256 is not None and row.sha256 != body.sha256:
                log.warning("download.content_changed", recording=row.ref, path=str(final), before=row.sha256,
                            now=body.sha256, reason="the PBX served other bytes than the copy archived earlier")
            return await self._finish(row, dir_fd, final, told, body.size, body.sha256, downloaded=True,
                                      now=now, sidecar_done=linked and side is not None)
        finally:
            if moved_fd is not None:
                os.close(moved_fd)

    def _move_part(self, dir_fd: int, part: str, new_rel: PurePosixPath) -> tuple[int, str]:
        """Move a temp file into the folder of another final name (a layout with ``{ext}``, when the
        served format turned out other than told): link it there, then drop the old name."""
        new_fd = self.archive.open_dir(new_rel.parent, create=True)
        try:
            new_part = part_name(new_rel.name)
            os.link(part, new_part, src_dir_fd=dir_fd, dst_dir_fd=new_fd, follow_symlinks=False)
            os.unlink(part, dir_fd=dir_fd)
        except BaseException:
            os.close(new_fd)
            raise
        return new_fd, new_part

    async def _discard(self, row: Row, dir_fd: int, part: str, *, checkpoint: bool = True) -> None:
        def unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part, dir_fd=dir_fd)
        await asyncio.to_thread(unlink)
        if checkpoint:
            # The checkpoint is recorded only once a transfer has fsynced one; clear it whatever it says.
            await self.ledger.call(lambda db: db.set_part(row.key, None, 0))

    async def _stream(self, row: Row, url: DownloadUrl, fd: int, part_rel: str, keep: int,
                      checkpointed: list[int]) -> _Body:
        """Write the body into ``fd`` from ``keep`` on. ``checkpointed[0]`` follows the bytes the
        ledger's checkpoint vouches for."""
        digest = hashlib.sha256()
        head = b""
        if keep:
            head, digest = await asyncio.to_thread(_hash_prefix, fd, keep)
            if row.part_sha256 is not None and digest.hexdigest() != row.part_sha256:
                # The temp file changed since its checkpoint (a disk fault, a hand): never splice it.
                log.warning("download.checkpoint_mismatch", recording=row.ref, kept=keep,
                            action="starting again from byte 0")
                await asyncio.to_thread(_truncate, fd)
                await self._checkpoint(row.key, None, 0)
                checkpointed[0] = 0
                keep, digest, head = 0, hashlib.sha256(), b""
        dl = self.cfg.downloads
        floor = ThroughputFloor(self.clock, dl.min_bytes_per_second, dl.throughput_window_s, row.ref)
        async with self.gate.slot(), self._counted(), \
                self.client.open_file(url.url, offset=keep, recording=row.ref, meter=floor,
                                      on_headers=lambda ctype: self._learn_from_headers(ctype, url)) as stream:
            if stream.status == 416:
                if keep and stream.total == keep:
                    return _Body(keep, digest.hexdigest(), head, None)
                raise TransferError("the server refused the resume offset (416)", recording=row.ref)
            if stream.start != keep:
                # The server ignored Range: start over so that two attempts' bytes are never spliced.
                log.info("download.restart_from_zero", recording=row.ref, had=keep)
                await asyncio.to_thread(_truncate, fd)
                keep, digest, head = 0, hashlib.sha256(), b""
                await self._checkpoint(row.key, None, 0)
                checkpointed[0] = 0
            size = keep
            synced = keep
            pending = bytearray()
            writer = _LazyWriter(fd)

            async def flush() -> None:
                # One write per WRITE_BYTES, not per network read; the hash runs in a worker thread beside
                # it (hashlib releases the GIL), so neither costs the event loop. The buffer itself is
                # handed over and a new one started: a bytes() copy held a second buffer per worker
                # (A's peak RSS 65.4 -> 61.1 MiB with 1 MiB writes, docs/benchmarks.md).
                nonlocal pending
                if pending:
                    data, pending = pending, bytearray()
                    await asyncio.gather(writer.write(data), asyncio.to_thread(digest.update, data))

            try:
                async for chunk in stream.chunks(CHUNK_BYTES):
                    if not head:
                        head = chunk[:64]
                        if keep == 0:
                            # What is served, not what is told, decides the one-request rule.
                            self.gate.learn(served_format(head, stream.content_type, url.format_hint))
                    pending += chunk
                    if len(pending) >= WRITE_BYTES:
                        await flush()
                    size += len(chunk)
                    self.bytes_downloaded += len(chunk)
                    self.last_chunk_at = self.clock.monotonic()
                    if size - synced >= dl.checkpoint_bytes:
                        await flush()
                        await writer.sync()
                        synced = size
                        await self._checkpoint(row.key, part_rel, synced, digest.copy().hexdigest())
                        checkpointed[0] = synced
                if writer.opened:
                    await flush()
                    tail = b""
                else:
                    # A body smaller than one write: hashed here (tens of microseconds), and written
                    # by the commit's own thread hop, right before its fsync.
                    tail = bytes(pending)
                    digest.update(tail)
            finally:
                await writer.close()
            expected = stream.total if stream.total is not None else (
                stream.start + stream.length if stream.length is not None else None)
        if expected is not None and size != expected:
            raise TransferError(f"the transfer ended at {size} of {expected} bytes", recording=row.ref)
        return _Body(size, digest.hexdigest(), head, stream.content_type,
                     length_known=expected is not None or stream.chunked, tail=tail)

    async def _probe_end(self, row: Row, url: DownloadUrl, size: int) -> bool | None:
        """Ask for the bytes after ``size`` (``Range: bytes=<size>-``): True when there are none (416),
        False when there are (206 from there: the transfer was cut), None when the PBX cannot say
        (Range ignored, the URL refused a second use, any error): then two transfers must agree."""
        if self._range_ignored:
            return None
        try:
            async with self.gate.slot(), self.client.open_file(url.url, offset=size, recording=row.ref,
                                                               meter=lambda n: None) as stream:
                if stream.status == 416:
                    return stream.total is None or stream.total == size
                if stream.status == 206 and stream.start == size:
                    return False
                if stream.status == 200:
                    self._range_ignored = True    # it would send the whole file each time: ask no more
                return None
        except ArchiverError as exc:
            log.info("download.end_probe_failed", recording=row.ref, reason=str(exc))
            return None

    def _learn_from_headers(self, content_type: str | None, url: DownloadUrl) -> None:
        self.gate.learn(gate_hint(content_type, url.format_hint))

    @contextlib.asynccontextmanager
    async def _counted(self) -> AsyncIterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _checkpoint(self, key: str, part_rel: str | None, synced: int, sha256: str | None = None) -> None:
        await self.ledger.call(lambda db: db.set_part(key, part_rel, synced, sha256))

    async def _commit_elsewhere(self, row: Row, dir_fd: int, rel: PurePosixPath, part: str,
                                sha: str, written: os.stat_result) -> PurePosixPath:
        """The final name was taken when the temp file (fsynced) was linked: identical bytes are adopted,
        different bytes go under an alternate name; nothing is ever clobbered."""
        name = rel.name
        for n, candidate in enumerate((name, alternate_name(name, str(row.rec_id) if row.rec_id is not None
                                                            else sha[:12]))):
            try:
                if n and await asyncio.to_thread(ArchiveDir.commit, dir_fd, part, candidate, written):
                    return rel.parent / candidate
                st = await asyncio.to_thread(ArchiveDir.lstat, dir_fd, candidate)
                # A folder, a symlink, a FIFO at the name: somebody else's, never opened, kept as it is.
                existing_sha = None if st is None or not stat.S_ISREG(st.st_mode) else \
                    (await asyncio.to_thread(ArchiveDir.hash_file, dir_fd, candidate))[1]
            except OSError as exc:
                raise self._os_error(exc, f"committing {str(rel.parent / candidate)!r} failed", row) from exc
            if existing_sha == sha:
                await self._discard(row, dir_fd, part)
                log.info("download.identical_exists", recording=row.ref, path=str(rel.parent / candidate))
                return rel.parent / candidate
            log.warning("archive.name_conflict", recording=row.ref, path=str(rel.parent / candidate),
                        action="kept the existing file; trying another name")
        await self._discard(row, dir_fd, part)
        raise PermanentError(f"both {name!r} and its alternate name hold other recordings", recording=row.ref)

    async def _finish(self, row: Row, dir_fd: int, rel: PurePosixPath, served: str, size: int, sha: str, *,
                      downloaded: bool, now: float | None = None, sidecar_done: bool = False) -> Archived:
        now = self.clock.wall() if now is None else now
        completion: dict[str, Any] = {"key": row.key, "final_path": str(rel), "size": size, "sha256": sha,
                                      "now": now, "file": served or row.file}
        try:
            rec_id = await self.ledger.complete(**completion)
        except LedgerError as exc:
            raise CommitNotRecorded(exc, completion) from exc
        if not sidecar_done:
            await self._write_sidecar(row, dir_fd, rel, completion, rec_id)
        log.info("download.completed", recording=row.ref, path=str(rel), size=size, fetched=downloaded)
        record = sidecar_data(rec_id=rec_id if rec_id is not None else row.rec_id, file=completion["file"], size=size,
                              sha256=sha, archived_at=now, meta=row.meta, pbx_sn=self.pbx_sn)
        return Archived(final_path=str(rel), size=size, sha256=sha, downloaded=downloaded, record=record)

    async def complete_later(self, row: Row, completion: dict[str, Any]) -> None:
        """Record a recording that was committed while the ledger could not take it, then write its
        sidecar (raises LedgerError while the ledger still fails)."""
        rec_id = await self.ledger.complete(**completion)
        rel = PurePosixPath(completion["final_path"])
        try:
            dir_fd = await asyncio.to_thread(self.archive.open_dir, rel.parent, create=False)
        except OSError as exc:
            log.warning("archive.sidecar_failed", recording=row.ref, path=str(rel), error=str(exc))
            return
        try:
            await self._write_sidecar(row, dir_fd, rel, completion, rec_id)
        finally:
            os.close(dir_fd)
        log.info("download.completed", recording=row.ref, path=str(rel), size=completion["size"], late=True)

    def _sidecar(self, row: Row, file: str | None, size: int, sha: str, now: float, *,
                 rec_id: int | None = None) -> dict[str, Any] | None:
        """The sidecar's data, or None when sidecars are off."""
        if not self.cfg.archive.sidecar:
            return None
        return sidecar_data(rec_id=rec_id if rec_id is not None else row.rec_id, file=file, size=size, sha256=sha,
                            archived_at=now, meta=row.meta, pbx_sn=self.pbx_sn)

    async def _write_sidecar(self, row: Row, dir_fd: int, rel: PurePosixPath, completion: dict[str, Any],
                             rec_id: int | None) -> None:
        data = self._sidecar(row, completion["file"], completion["size"], completion["sha256"], completion["now"],
                             rec_id=rec_id)
        if data is None:
            return
        try:
            await asyncio.to_thread(ArchiveDir.write_sidecar, dir_fd, rel.name, data)
        except OSError as exc:
            # The recording itself is safe; start-up reconciliation writes missing sidecars.
            log.warning("archive.sidecar_failed", recording=row.ref, path=str(rel), error=str(exc))


@dataclass(frozen=True)
class _Prepared:
    """What ``Downloader._prepare`` found and opened: the folder always; the final name's status;
    the free bytes when too few; the temp file (or why it could not be opened)."""

    dir_fd: int
    final_st: os.stat_result | None
    free: int | None = None
    part: str | None = None
    keep: int = 0
    fd: int | None = None
    open_error: OSError | None = None


def _resume_point(dir_fd: int, rel: PurePosixPath, resume: tuple[str, int] | None) -> tuple[str, int]:
    """(temp name, bytes to keep): the checkpointed temp file ``resume`` when it is still there and
    long enough, else a new temp name unique to this attempt. Blocking."""
    if resume is not None:
        name, synced = resume
        st = ArchiveDir.lstat(dir_fd, name)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size >= synced:
            return name, synced
    return part_name(rel.name), 0


def _hash_prefix(fd: int, length: int) -> tuple[bytes, Any]:
    """(first bytes, sha256 object) over the first ``length`` bytes of an open temp file."""
    digest = hashlib.sha256()
    head = b""
    offset = 0
    while offset < length:
        chunk = os.pread(fd, min(1024 * 1024, length - offset), offset)
        if not chunk:
            raise TransferError("the temp file is shorter than its checkpoint")
        if not head:
            head = chunk[:64]
        digest.update(chunk)
        offset += len(chunk)
    return head, digest


def _seal_and_link(fd: int, dir_fd: int, part: str, final: str, tail: bytes = b"",
                   sidecar: dict[str, Any] | None = None) -> tuple[bool, os.stat_result, OSError | None]:
    """Write ``tail``, fsync the temp file, link it to its final name and fsync the folder, then close
    it and write the ``sidecar`` (when given and linked), in one thread hop. The descriptor stays open
    until the link is checked, so its inode cannot be reused by another file meanwhile. Returns
    (linked, the written file's fstat, why the sidecar failed); not linked when the final name is
    taken (the temp file stays for the caller)."""
    try:
        view = memoryview(tail)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        written = os.fstat(fd)
        linked = ArchiveDir.commit(dir_fd, part, final, written)
    finally:
        os.close(fd)
    if not linked or sidecar is None:
        return linked, written, None
    try:
        ArchiveDir.write_sidecar(dir_fd, final, sidecar)
    except OSError as exc:
        return linked, written, exc
    return linked, written, None


def _truncate(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
