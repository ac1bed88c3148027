"""What a compliance request asks of the archive: find recordings, export copies, forget and erase them.

Blocking ledger access (``LedgerDb``) from a one-shot command; S3 only through ``S3Destination``.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import pwd
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from daemon.archive import ArchiveDir, alternate_name, part_name, sidecar_bytes, sidecar_data
from daemon.errors import ArchiverError, ConfigError
from daemon.ledger import ARCHIVED, KV_PBX_SN, LedgerDb, Row

if TYPE_CHECKING:
    from daemon.destinations import S3Destination

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Filters:
    """``find``'s filters (and ``export``'s). Dates are YYYY-MM-DD, inclusive."""

    since: str | None = None
    until: str | None = None
    caller: str | None = None
    callee: str | None = None
    call_type: str | None = None
    state: str | None = None


def parse_day(text: str, what: str) -> str:
    """``YYYY-MM-DD`` as given, checked; raises ConfigError naming the option. Pure."""
    try:
        return dt.date.fromisoformat(text).isoformat() if len(text) == 10 else _bad_day(text, what)
    except ValueError:
        return _bad_day(text, what)


def _bad_day(text: str, what: str) -> str:
    raise ConfigError([f"{what}: {text!r} is not a date YYYY-MM-DD"])


def find(db: LedgerDb, filters: Filters, *, states: Iterable[str] = ()) -> Iterator[Row]:
    return db.search(since=filters.since, until=filters.until, caller=filters.caller, callee=filters.callee,
                     call_type=filters.call_type, state=filters.state, states=tuple(states))


def row_json(row: Row, archive_dir: Path) -> dict[str, Any]:
    """One recording as ``find --json`` prints it. Pure."""
    return {"key": row.key, "id": row.rec_id, "file": row.file, "state": row.state,
            "path": str(archive_dir / row.final_path) if row.final_path else None,
            "local": bool(row.final_path and row.local_kept), **{k: row.meta.get(k) for k in
                                                                   ("time", "call_from", "call_to", "call_type",
                                                                    "duration", "size")},
            "bytes": row.bytes, "sha256": row.sha256}


def row_line(row: Row, archive_dir: Path) -> str:
    """One recording as ``find`` prints it: path, time, from, to, duration, state (tab-separated). Pure."""
    path = str(archive_dir / row.final_path) if row.final_path else f"({row.ref})"
    duration = row.meta.get("duration")
    return "\t".join([path, str(row.meta.get("time") or "-"), str(row.meta.get("call_from") or "-"),
                      str(row.meta.get("call_to") or "-"), f"{duration}s" if duration is not None else "-",
                      row.state])


# ---------------------------------------------------------------- export
@dataclass
class ExportReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)       # an identical file was there already
    problems: list[str] = field(default_factory=list)      # recordings that could not be exported


class _Target:
    """A file being written below the export folder: hidden temp, hashed while written, then linked
    to its final name (never over an existing file)."""

    def __init__(self, root: Path, rel: PurePosixPath) -> None:
        self.folder = root / rel.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.name = rel.name
        self.part = part_name(rel.name)
        self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640,
                          dir_fd=self.dir_fd)
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view):]

    def discard(self) -> None:
        os.close(self.fd)
        os.unlink(self.part, dir_fd=self.dir_fd)
        os.close(self.dir_fd)

    def commit(self, tag: str) -> tuple[str, str]:
        """Link under the final name; identical bytes there already: ``("skipped", name)``; other bytes:
        under ``stem~tag.ext`` (``("copied", that name)``)."""
        os.fsync(self.fd)
        os.close(self.fd)
        try:
            for name in (self.name, alternate_name(self.name, tag)):
                try:
                    os.link(self.part, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd, follow_symlinks=False)
                    return "copied", name
                except FileExistsError:
                    if _sha256_at(self.dir_fd, name) == self.digest.hexdigest():
                        return "skipped", name
            raise FileExistsError(errno.EEXIST, f"{self.name!r} and its alternate name hold other bytes")
        finally:
            os.unlink(self.part, dir_fd=self.dir_fd)
            os.fsync(self.dir_fd)
            os.close(self.dir_fd)


def _sha256_at(dir_fd: int, name: str) -> str | None:
    try:
        return ArchiveDir.hash_file(dir_fd, name)[1]
    except OSError:
        return None


def _write_sidecar(folder: Path, name: str, body: bytes) -> None:
    """The sidecar beside an exported file; an existing one is left as it is (never overwritten)."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(f"{name}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640,
                     dir_fd=dir_fd)
    except FileExistsError:
        return
    finally:
        os.close(dir_fd)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)


def _local_chunks(archive: ArchiveDir, rel: PurePosixPath) -> Iterator[bytes]:
    dir_fd = archive.open_dir(rel.parent, create=False)
    try:
        fd = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.ELOOP, f"{str(rel)!r} is not a regular file")
        while chunk := os.read(fd, CHUNK_BYTES):
            yield chunk
    finally:
        os.close(fd)


def _sidecar_for(db: LedgerDb, archive: ArchiveDir, row: Row) -> bytes:
    """The archive's own sidecar when it is there, else one made from the ledger."""
    assert row.final_path is not None
    if row.local_kept:
        body = ArchiveDir.read_regular(archive.root / f"{row.final_path}.json")
        if body is not None:
            return body
    return sidecar_bytes(sidecar_data(rec_id=row.rec_id, file=row.file, size=row.bytes or 0, sha256=row.sha256 or "",
                                      archived_at=row.done_at or 0.0, meta=row.meta, pbx_sn=db.kv_get(KV_PBX_SN)))


async def export(db: LedgerDb, archive: ArchiveDir, rows: Iterable[Row], to: Path,
                 dest: S3Destination | None) -> ExportReport:
    """Copy each archived row's recording (and sidecar) to ``to``/<its archive path>, never over an
    existing file, checking size and sha256 against the ledger as it goes. A row whose local copy was
    removed is read from ``dest`` (its object) when there is one, else reported."""
    report = ExportReport()
    for row in rows:
        if row.state not in ARCHIVED or not row.final_path or not row.sha256:
            continue
        rel = PurePosixPath(row.final_path)
        source: AsyncIterator[bytes] | Iterator[bytes]
        if row.local_kept:
            source = _local_chunks(archive, rel)
        else:
            objects = [str(c["object_key"]) for c in db.copies_of(row.key)
                       if c["state"] == "done" and c["object_key"] and dest is not None and c["dest"] == dest.name]
            if not objects:
                report.problems.append(f"{row.ref}: its local copy was removed (archive.keep_local: false) and no "
                                       "verified S3 copy is configured (archive.s3)")
                continue
            assert dest is not None
            source = dest.chunks(objects[0])
        try:
            target = _Target(to, rel)
        except OSError as exc:
            report.problems.append(f"{row.ref}: cannot write {str(to / rel)!r}: {exc.strerror or exc}")
            continue
        try:
            if isinstance(source, Iterator):
                for chunk in source:
                    target.write(chunk)
            else:
                async for chunk in source:
                    target.write(chunk)
        except (OSError, ArchiverError) as exc:
            target.discard()
            report.problems.append(f"{row.ref}: cannot read {row.final_path!r}: "
                                   f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
            continue
        if target.size != row.bytes or target.digest.hexdigest() != row.sha256:
            target.discard()
            report.problems.append(f"{row.ref}: {row.final_path!r} does not hold what was archived ({target.size} "
                                   f"bytes, sha256 {target.digest.hexdigest()[:12]}…; the ledger says {row.bytes} "
                                   f"bytes, {row.sha256[:12]}…): not exported; run verify")
            continue
        try:
            outcome, name = target.commit(str(row.rec_id) if row.rec_id is not None else row.sha256[:12])
        except OSError as exc:
            report.problems.append(f"{row.ref}: cannot write {str(to / rel)!r}: {exc.strerror or exc}")
            continue
        _write_sidecar(target.folder, name, _sidecar_for(db, archive, row))
        (report.skipped if outcome == "skipped" else report.copied).append(str(target.folder / name))
    return report


# ---------------------------------------------------------------- forget
def who() -> str:
    """Who asks, as the ledger records it: the user name and uid (and the sudo caller, when there is one)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    sudo = os.environ.get("SUDO_USER")
    return f"{name} (uid {uid})" + (f" via sudo by {sudo}" if sudo and uid == 0 else "")


@dataclass
class EraseResult:
    deleted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def erase_local(archive: ArchiveDir, row: Row) -> EraseResult:
    """Delete the recording's local file and sidecar (a missing one is no problem)."""
    out = EraseResult()
    if not row.final_path:
        return out
    rel = PurePosixPath(row.final_path)
    try:
        dir_fd = archive.open_dir(rel.parent, create=False)
    except FileNotFoundError:
        return out
    except OSError as exc:
        out.problems.append(f"cannot open {str(rel.parent)!r} in archive.dir: {exc.strerror or exc}")
        return out
    try:
        if not row.local_kept and row.sha256:
            # Its local copy was removed (keep_local: false): the path was free, and another recording
            # of the same name may be archived there now — its only copy, maybe. Only our own bytes go.
            try:
                ours = ArchiveDir.hash_file(dir_fd, rel.name)[1] == row.sha256
            except FileNotFoundError:
                ours = True     # nothing there; a sidecar left behind is ours
            except OSError as exc:
                out.problems.append(f"cannot read {str(archive.root / rel)!r}: {exc.strerror or exc}")
                return out
            if not ours:
                return out
        for name in (rel.name, f"{rel.name}.json"):
            try:
                os.unlink(name, dir_fd=dir_fd)
                out.deleted.append(str(archive.root / rel.parent / name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                out.problems.append(f"cannot delete {str(archive.root / rel.parent / name)!r}: "
                                    f"{exc.strerror or exc}")
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return out


async def erase_copies(db: LedgerDb, row: Row, dest: S3Destination | None) -> tuple[EraseResult, list[str]]:
    """Delete the recording's objects and their sidecars at ``dest``. Returns what was deleted, what
    could not be, and the destinations now free of it (whose ledger rows may go)."""
    out = EraseResult()
    gone: list[str] = []
    for copy in db.copies_of(row.key):
        if dest is None or copy["dest"] != dest.name:
            out.problems.append(f"a copy at {copy['dest']!r} ({copy['object_key']}) is not configured here "
                                "(archive.s3): delete it by hand")
            continue
        if not copy["object_key"]:
            gone.append(copy["dest"])
            continue
        key = str(copy["object_key"])
        failed = False
        for k in (key, f"{key}.json"):
            try:
                if await dest.erase(k):
                    out.deleted.append(f"s3://{dest.cfg.bucket}/{k}")
            except ArchiverError as exc:
                failed = True
                out.problems.append(f"the bucket refused to delete {k!r}: {exc} (Object Lock retention or a "
                                    "legal hold keep an object until they end; it stays there)")
        if not failed:
            gone.append(copy["dest"])
    return out, gone
