"""The archive on disk: safe names, the layout, and the no-clobber commit that never follows a symlink.

Every path below ``archive.dir`` is opened one component at a time with ``O_NOFOLLOW`` relative to
its parent's descriptor, so a symlink planted anywhere in the tree is refused, never followed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.errors import StorageError

SAFE_NAME = re.compile(r"^[A-Za-z0-9._+@-]+$")
AUDIO_EXTS = (".wav", ".mp3")
MAX_NAME = 200
CALL_TYPES = frozenset({"Inbound", "Outbound", "Internal"})
_DATE_PREFIX = re.compile(r"^(\d{4})(\d{2})(\d{2})\d{6}-")
# errnos that mean "the archive cannot take writes now": pause everything, not one item.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})
FILE_MODE = 0o640
DIR_MODE = 0o750


def is_safe_name(name: str) -> bool:
    """A PBX file name usable as-is: plain characters, one .wav/.mp3 extension, <= 200 characters."""
    if not name or len(name) > MAX_NAME or not SAFE_NAME.match(name) or name[0] in ".-":
        return False
    stem, ext = os.path.splitext(name)
    return ext in AUDIO_EXTS and bool(stem) and not stem.lower().endswith(AUDIO_EXTS)


def audio_ext(name: str | None, default: str = "wav") -> str:
    """``wav`` or ``mp3`` from a file name, whatever else it holds."""
    lower = (name or "").lower()
    for ext in AUDIO_EXTS:
        if lower.endswith(ext):
            return ext[1:]
    return default


def looks_like_audio(head: bytes) -> bool:
    """True for a RIFF/WAVE header, an ID3 tag or an MPEG audio frame sync."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return True
    if head[:3] == b"ID3":
        return True
    return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


@dataclass(frozen=True)
class Naming:
    """What the layout needs to know of a recording."""

    rec_id: int | None
    file: str | None
    call_type: str | None = None


def final_relpath(layout: str, naming: Naming, now_utc: dt.datetime) -> PurePosixPath:
    """The archive-relative final path of a recording. Pure; never leaves the archive.

    ``{file}`` is the PBX name only when ``is_safe_name``; otherwise ``{id}.{ext}`` (or a digest of
    the name when no id is known). The date comes from the name's YYYYMMDDhhmmss prefix, else now.
    """
    ext = audio_ext(naming.file)
    if naming.file and is_safe_name(naming.file):
        file = naming.file
    elif naming.rec_id is not None:
        file = f"{naming.rec_id}.{ext}"
    else:
        digest = hashlib.sha256((naming.file or "").encode("utf-8", "surrogatepass")).hexdigest()[:16]
        file = f"file-{digest}.{ext}"
    year, month, day = f"{now_utc:%Y}", f"{now_utc:%m}", f"{now_utc:%d}"
    m = _DATE_PREFIX.match(naming.file or "")
    if m:
        try:
            dt.date(int(m[1]), int(m[2]), int(m[3]))
            year, month, day = m[1], m[2], m[3]
        except ValueError:
            pass
    values = {
        "file": file, "stem": file.rsplit(".", 1)[0], "ext": file.rsplit(".", 1)[1],
        "id": str(naming.rec_id) if naming.rec_id is not None else file.rsplit(".", 1)[0],
        "year": year, "month": month, "day": day,
        "call_type": naming.call_type if naming.call_type in CALL_TYPES else "unknown",
    }
    rel = PurePosixPath(layout.format(**values))
    parts = rel.parts
    if rel.is_absolute() or not parts or any(p in ("", ".", "..") or "\x00" in p or len(p) > 255 for p in parts):
        raise ValueError(f"layout produced an unsafe path: {str(rel)!r}")
    return rel


SIDECAR_META = ("uid", "time", "call_from", "call_to", "call_type", "duration")


def sidecar_data(*, rec_id: int | None, file: str | None, size: int, sha256: str, archived_at: float,
                 meta: dict[str, Any]) -> dict[str, Any]:
    """The sidecar JSON of an archived recording: what is known of it, nothing made up. Pure."""
    known: dict[str, Any] = {
        "id": rec_id, "file": file, "size": size, "sha256": sha256,
        "archived_at": dt.datetime.fromtimestamp(archived_at, dt.UTC).isoformat(timespec="seconds"),
        **{k: meta.get(k) for k in SIDECAR_META},
    }
    return {k: v for k, v in known.items() if v is not None}


def part_name(final_name: str) -> str:
    """The hidden temp file beside a final file."""
    return f".{final_name}.part"


def alternate_name(final_name: str, tag: str) -> str:
    """A second name for a different recording whose final name is taken: ``stem~tag.ext``."""
    stem, ext = os.path.splitext(final_name)
    return f"{stem}~{tag}{ext}"


def storage_error(exc: OSError, what: str) -> StorageError | None:
    """A StorageError for errnos that mean the archive is unwritable; None for others."""
    if exc.errno in STORAGE_ERRNOS:
        return StorageError(f"{what}: {os.strerror(exc.errno or 0)}")
    return None


class ArchiveDir:
    """The archive root, and the symlink-safe operations the downloader needs below it (blocking I/O:
    call from a worker thread)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure_root(self) -> None:
        """Create the root if missing; refuse a root that is not a directory."""
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        if not self.root.is_dir():
            raise StorageError(f"archive.dir {str(self.root)!r} is not a directory")

    def open_dir(self, rel_dir: PurePosixPath, *, create: bool) -> int:
        """A descriptor of ``rel_dir`` below the root, opened without following any symlink."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in rel_dir.parts:
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, DIR_MODE, dir_fd=fd)
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise OSError(errno.ELOOP, f"refusing a symlink or non-directory at {part!r}") from exc
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def lstat(dir_fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def open_part(dir_fd: int, name: str, *, keep: int) -> int:
        """Open the temp file for writing: keep its first ``keep`` bytes (resume) or create it afresh.

        Created with O_EXCL and never through a symlink."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if keep > 0:
            fd = os.open(name, flags, dir_fd=dir_fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.ELOOP, f"refusing a non-regular temp file {name!r}")
            os.ftruncate(fd, keep)
            os.lseek(fd, keep, os.SEEK_SET)
            return fd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return os.open(name, flags | os.O_CREAT | os.O_EXCL, FILE_MODE, dir_fd=dir_fd)

    @staticmethod
    def commit(dir_fd: int, part: str, final: str) -> bool:
        """Link the fsynced temp file to its final name without clobbering, then drop the temp name.

        Returns False when the final name already exists (the temp file is left for the caller)."""
        try:
            os.link(part, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        os.unlink(part, dir_fd=dir_fd)
        os.fsync(dir_fd)
        return True

    @staticmethod
    def hash_file(dir_fd: int, name: str) -> tuple[int, str, bytes]:
        """(size, sha256, first 64 bytes) of a regular file, opened without following a symlink."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, f"{name!r} is not a regular file")
            digest = hashlib.sha256()
            size = 0
            head = b""
            while chunk := os.read(fd, 1024 * 1024):
                if not head:
                    head = chunk[:64]
                digest.update(chunk)
                size += len(chunk)
            return size, digest.hexdigest(), head
        finally:
            os.close(fd)

    @staticmethod
    def write_sidecar(dir_fd: int, final: str, data: dict[str, Any]) -> None:
        """Write ``<final>.json`` atomically (temp + rename within the folder, no symlink followed).

        Not fsynced: the ledger is the durable record, and start-up reconciliation rewrites a sidecar
        that a crash lost. Two fsyncs per recording saved."""
        name = f"{final}.json"
        tmp = f".{name}.part"
        body = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE,
                     dir_fd=dir_fd)
        try:
            os.write(fd, body)
        except OSError:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        existing = ArchiveDir.lstat(dir_fd, name)
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            os.unlink(tmp, dir_fd=dir_fd)
            raise OSError(errno.ELOOP, f"refusing to replace non-regular {name!r}")
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def walk(self) -> Iterator[tuple[PurePosixPath, list[str]]]:
        """(relative folder, file names) for every real folder below the root; symlinks are skipped."""
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            rel = PurePosixPath(Path(folder).relative_to(self.root).as_posix())
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
            yield rel, [f for f in files if not os.path.islink(os.path.join(folder, f))]

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize
