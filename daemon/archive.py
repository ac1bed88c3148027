"""The archive on disk: safe names, the layout, and the no-clobber commit that never follows a symlink.

Every path below ``archive.dir`` is opened one component at a time with ``O_NOFOLLOW`` relative to
its parent's descriptor, so a symlink planted anywhere in the tree is refused, never followed. The
downloader keeps the last few folders open (``open_dir_cached``) and uses one again only while the
kernel still places it at the very path that walk found.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.errors import StorageError, WrongArchiveError

SAFE_NAME = re.compile(r"^[A-Za-z0-9._+@-]+$")
AUDIO_EXTS = (".wav", ".mp3")
MAX_NAME = 200
CALL_TYPES = frozenset({"Inbound", "Outbound", "Internal"})
_DATE_PREFIX = re.compile(r"^(\d{4})(\d{2})(\d{2})\d{6}-")
# errnos that mean "the archive cannot take writes now": pause everything, not one item.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})
FILE_MODE = 0o640
DIR_MODE = 0o750
STATE_DIR_MODE = 0o700
MARKER_DIR = ".yeastar-archiver"
MARKER_FILE = "archive-id"
HOOKS_DIR = "hooks"   # in MARKER_DIR: the names running hooks read a recording by (keep_local: false)
MAX_COMPONENT = 255
DIR_CACHE_SIZE = 8   # open folder descriptors kept: a day's folder, and the days either side


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


def sniff_format(head: bytes) -> str | None:
    """``wav`` for a RIFF/WAVE header, ``mp3`` for an ID3 tag or an MPEG audio frame sync, else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0):
        return "mp3"
    return None


def looks_like_audio(head: bytes) -> bool:
    """True for a RIFF/WAVE header, an ID3 tag or an MPEG audio frame sync."""
    return sniff_format(head) is not None


_CONTENT_TYPES = {"audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mpeg3": "mp3", "audio/x-mpeg-3": "mp3",
                  "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav"}


def served_format(head: bytes, content_type: str | None, hint: str | None) -> str | None:
    """The format of what the PBX served: its first bytes say it best, then its Content-Type, then
    ``hint`` (the download URL's or the told name's extension). Pure."""
    return sniff_format(head) or _CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower()) or hint


def with_format(name: str, fmt: str | None) -> str:
    """``name`` with the extension of ``fmt``: a PBX that stores wav and serves mp3 tells the .wav
    name, and the archived file is named by what it holds. Pure."""
    if fmt not in ("wav", "mp3") or not name or audio_ext(name, default="") == fmt:
        return name
    stem = name[:-4] if name.lower().endswith(AUDIO_EXTS) else name
    return f"{stem}.{fmt}"


@dataclass(frozen=True)
class Naming:
    """What the layout needs to know of a recording."""

    rec_id: int | None
    file: str | None
    call_type: str | None = None
    pbx_sn: str | None = None


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
        "pbx_sn": naming.pbx_sn if naming.pbx_sn and SAFE_NAME.match(naming.pbx_sn) and naming.pbx_sn[0] != "."
        else "unknown-pbx",
    }
    rel = PurePosixPath(layout.format(**values))
    parts = rel.parts
    if rel.is_absolute() or not parts or any(p in ("", ".", "..") or "\x00" in p or len(p) > 255 for p in parts):
        raise ValueError(f"layout produced an unsafe path: {str(rel)!r}")
    return rel


SIDECAR_META = ("uid", "time", "call_from", "call_to", "call_type", "duration")


def sidecar_data(*, rec_id: int | None, file: str | None, size: int, sha256: str, archived_at: float,
                 meta: dict[str, Any], pbx_sn: str | None = None) -> dict[str, Any]:
    """The sidecar JSON of an archived recording: what is known of it, nothing made up. Pure."""
    known: dict[str, Any] = {
        "id": rec_id, "file": file, "size": size, "sha256": sha256, "pbx_sn": pbx_sn,
        "archived_at": dt.datetime.fromtimestamp(archived_at, dt.UTC).isoformat(timespec="seconds"),
        **{k: meta.get(k) for k in SIDECAR_META},
    }
    return {k: v for k, v in known.items() if v is not None}


def sidecar_bytes(data: dict[str, Any]) -> bytes:
    """A sidecar as written to disk and to the bucket. Pure."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def part_name(final_name: str, tag: str | None = None) -> str:
    """A hidden temp file beside a final file, unique to one attempt (``tag``: random by default).

    Two attempts never share a temp file, so one can never unlink, extend or link the other's bytes."""
    tag = tag or secrets.token_hex(6)
    stem = final_name[: MAX_COMPONENT - len(tag) - 8]
    return f".{stem}.{tag}.part"


def is_part_name(name: str) -> bool:
    """True for the name of a temp file (a recording's or a sidecar's)."""
    return name.startswith(".") and name.endswith(".part")


def alternate_name(final_name: str, tag: str) -> str:
    """A second name for a different recording whose final name is taken: ``stem~tag.ext``."""
    stem, ext = os.path.splitext(final_name)
    return f"{stem}~{tag}{ext}"


def storage_error(exc: OSError, what: str) -> StorageError | None:
    """A StorageError for errnos that mean the archive is unwritable; None for others."""
    if exc.errno in STORAGE_ERRNOS:
        return StorageError(f"{what}: {os.strerror(exc.errno or 0)}")
    return None


def _same_file(a: os.stat_result | None, b: os.stat_result) -> bool:
    return a is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class ArchiveDir:
    """The archive root, and the symlink-safe operations the downloader needs below it (blocking I/O:
    call from a worker thread)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._root_fd: int | None = None   # the root as last opened, and where the kernel placed it
        self._root_path = ""
        self._dirs: OrderedDict[PurePosixPath, int] = OrderedDict()

    def open_dir_cached(self, rel_dir: PurePosixPath) -> int:
        """``open_dir(rel_dir, create=True)``, from a few folders kept open: a descriptor the caller
        owns (a duplicate). A kept folder is used only while ``archive.dir`` still names the same
        directory and the kernel's own path of the folder (``/proc/self/fd``) is still the root's
        plus ``rel_dir``: a folder moved, deleted or swapped for a symlink since is walked again
        (and a symlink refused). Without ``/proc``, every call walks."""
        with self._lock:
            try:
                fd = self._kept(rel_dir)
            except OSError:
                fd = None
            if fd is not None:
                return os.dup(fd)
        fd = self.open_dir(rel_dir, create=True)
        with self._lock, contextlib.suppress(OSError):   # not kept: the next call walks again
            self._keep(rel_dir, fd)
        return fd

    def _kept(self, rel_dir: PurePosixPath) -> int | None:
        fd = self._dirs.get(rel_dir)
        if fd is None or self._root_fd is None:
            return None
        root_st, kept_st = os.stat(self.root), os.fstat(self._root_fd)
        if (root_st.st_dev, root_st.st_ino) != (kept_st.st_dev, kept_st.st_ino) or \
                os.readlink(f"/proc/self/fd/{fd}") != os.path.join(self._root_path, *rel_dir.parts):
            self._forget()
            return None
        self._dirs.move_to_end(rel_dir)
        return fd

    def _keep(self, rel_dir: PurePosixPath, fd: int) -> None:
        if self._root_fd is None:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._root_path = os.readlink(f"/proc/self/fd/{root_fd}")
            except OSError:
                os.close(root_fd)
                raise
            self._root_fd = root_fd
        old = self._dirs.pop(rel_dir, None)
        if old is not None:
            os.close(old)
        self._dirs[rel_dir] = os.dup(fd)
        while len(self._dirs) > DIR_CACHE_SIZE:
            os.close(self._dirs.popitem(last=False)[1])

    def _forget(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def close(self) -> None:
        """Close the folders kept open."""
        with self._lock:
            self._forget()

    def check_root(self) -> None:
        """Refuse a root that is missing or not a directory. Never creates it: an unmounted disk must
        not quietly become a fresh archive on the root filesystem."""
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise WrongArchiveError(
                f"archive.dir {str(self.root)!r} {what}: create it (or mount the archive disk) first; "
                "run and once never create it")

    def read_marker(self) -> str | None:
        """The archive's identity (``.yeastar-archiver/archive-id``), or None when it has none."""
        try:
            fd = self.open_dir(PurePosixPath(MARKER_DIR), create=False)
        except FileNotFoundError:
            return None
        try:
            try:
                mfd = os.open(MARKER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=fd)
            except FileNotFoundError:
                return None
            try:
                if not stat.S_ISREG(os.fstat(mfd).st_mode):
                    return None
                text = os.read(mfd, 4096).decode("utf-8", "replace").strip()
            finally:
                os.close(mfd)
        finally:
            os.close(fd)
        return text or None

    def write_marker(self) -> str:
        """Give the archive a new identity and return it (fsynced: the ledger will record it)."""
        ident = str(uuid.uuid4())
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.root / MARKER_DIR, STATE_DIR_MODE)
        fd = self.open_dir(PurePosixPath(MARKER_DIR), create=False)
        try:
            tmp = f".{MARKER_FILE}.{secrets.token_hex(6)}.part"
            mfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                          dir_fd=fd)
            try:
                os.write(mfd, f"{ident}\n".encode())
                os.fsync(mfd)
            finally:
                os.close(mfd)
            # link, never rename: a marker another process wrote first is never replaced.
            try:
                os.link(tmp, MARKER_FILE, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            finally:
                os.unlink(tmp, dir_fd=fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        return ident

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

        Created with O_EXCL and never through a symlink; an existing file is never unlinked (the name
        is unique to one attempt, so an existing one belongs to somebody else)."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if keep > 0:
            fd = os.open(name, flags, dir_fd=dir_fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.ELOOP, f"refusing a non-regular temp file {name!r}")
            os.ftruncate(fd, keep)
            os.lseek(fd, keep, os.SEEK_SET)
            return fd
        return os.open(name, flags | os.O_CREAT | os.O_EXCL, FILE_MODE, dir_fd=dir_fd)

    @staticmethod
    def commit(dir_fd: int, part: str, final: str, written: os.stat_result | None = None) -> bool:
        """Link the fsynced temp file to its final name without clobbering, then drop the temp name.

        ``written`` is the fstat of the descriptor the bytes went through: the name is linked only
        while it still is that very file, and the final name is checked to be it afterwards.
        Returns False when the final name already exists (the temp file is left for the caller)."""
        if written is not None and not _same_file(ArchiveDir.lstat(dir_fd, part), written):
            raise OSError(errno.ESTALE, f"the temp file {part!r} is no longer the file that was written")
        try:
            os.link(part, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        if written is not None and not _same_file(ArchiveDir.lstat(dir_fd, final), written):
            # Swapped between the check and the link: take back the name we just made.
            os.unlink(final, dir_fd=dir_fd)
            raise OSError(errno.ESTALE, f"the temp file {part!r} was replaced while it was linked")
        os.unlink(part, dir_fd=dir_fd)
        os.fsync(dir_fd)
        return True

    @staticmethod
    def hash_file(dir_fd: int, name: str) -> tuple[int, str, bytes]:
        """(size, sha256, first 64 bytes) of a regular file, opened without following a symlink (and
        without blocking: a FIFO planted at the name must not hang the process)."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
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
    def read_regular(path: Path, limit: int = 1024 * 1024) -> bytes | None:
        """The bytes of a small regular file (a sidecar), or None: never follows the last symlink, never
        blocks on a FIFO, never reads more than ``limit``."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return os.read(fd, limit)
        finally:
            os.close(fd)

    @staticmethod
    def write_sidecar(dir_fd: int, final: str, data: dict[str, Any]) -> None:
        """Write ``<final>.json`` atomically (temp + rename within the folder, no symlink followed).

        Not fsynced: the ledger is the durable record, and start-up reconciliation rewrites a sidecar
        that a crash lost. Two fsyncs per recording saved."""
        name = f"{final}.json"
        tmp = part_name(name)
        body = sidecar_bytes(data)
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

    def walk(self, onerror: Callable[[OSError], None] | None = None) -> Iterator[tuple[PurePosixPath, list[str]]]:
        """(relative folder, file names) for every real folder below the root; symlinks are skipped,
        and so are the hooks' own names (``stage_for_hook``). A folder that cannot be listed goes to
        ``onerror``."""
        for folder, dirs, files in os.walk(self.root, followlinks=False, onerror=onerror):
            rel = PurePosixPath(Path(folder).relative_to(self.root).as_posix())
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))
                       and rel / d != PurePosixPath(MARKER_DIR, HOOKS_DIR)]
            yield rel, [f for f in files if not os.path.islink(os.path.join(folder, f))]

    def stage_for_hook(self, rel: PurePosixPath) -> Path:
        """A name of the hook's own for the recording at ``rel``: a hard link (else a copy) in a new
        folder under ``.yeastar-archiver/hooks/``. The archive path may go (``keep_local: false``) or
        be taken by another recording while the hook runs; this name stays until ``unstage``. Every
        folder on the way is opened without following a symlink: the name never leaves the archive."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.root / MARKER_DIR, STATE_DIR_MODE)
        hooks_fd = self._hooks_dir(create=True)
        assert hooks_fd is not None
        try:
            token = secrets.token_hex(8)
            os.mkdir(token, STATE_DIR_MODE, dir_fd=hooks_fd)
            try:
                folder_fd = os.open(token, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                    dir_fd=hooks_fd)
                try:
                    self._link_or_copy(rel, folder_fd)
                finally:
                    os.close(folder_fd)
            except BaseException:
                shutil.rmtree(token, dir_fd=hooks_fd, ignore_errors=True)
                raise
        finally:
            os.close(hooks_fd)
        return self.root / MARKER_DIR / HOOKS_DIR / token / rel.name

    def _link_or_copy(self, rel: PurePosixPath, folder_fd: int) -> None:
        src_dir = self.open_dir(rel.parent, create=False)
        try:
            try:
                os.link(rel.name, rel.name, src_dir_fd=src_dir, dst_dir_fd=folder_fd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                # A filesystem without hard links: a copy, made without following a symlink.
                src = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
                dst = os.open(rel.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                              dir_fd=folder_fd)
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1024 * 1024)
        finally:
            os.close(src_dir)

    def _hooks_dir(self, *, create: bool) -> int | None:
        """``.yeastar-archiver/hooks`` opened without following a symlink (None when it is not there);
        a symlink or a file standing there is removed first — the folder is the archiver's own."""
        marker_fd = self.open_dir(PurePosixPath(MARKER_DIR), create=False)
        try:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISDIR(os.lstat(HOOKS_DIR, dir_fd=marker_fd).st_mode):
                    os.unlink(HOOKS_DIR, dir_fd=marker_fd)
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(HOOKS_DIR, STATE_DIR_MODE, dir_fd=marker_fd)
            try:
                return os.open(HOOKS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=marker_fd)
            except FileNotFoundError:
                return None
        finally:
            os.close(marker_fd)

    def unstage(self, staged: Path) -> None:
        """The hook is done with its name for a recording (``stage_for_hook``): it goes."""
        folder = staged.parent
        if folder.parent != self.root / MARKER_DIR / HOOKS_DIR:   # never anything but a folder we made
            return
        with contextlib.suppress(FileNotFoundError):
            hooks_fd = self._hooks_dir(create=False)
            if hooks_fd is not None:
                try:
                    shutil.rmtree(folder.name, dir_fd=hooks_fd, ignore_errors=True)
                finally:
                    os.close(hooks_fd)

    def clear_hook_names(self) -> None:
        """At start: no hook of an earlier process is ours to wait for; the names it read by go."""
        with contextlib.suppress(FileNotFoundError):
            hooks_fd = self._hooks_dir(create=False)
            if hooks_fd is not None:
                try:
                    for name in os.listdir(hooks_fd):
                        shutil.rmtree(name, dir_fd=hooks_fd, ignore_errors=True)
                        with contextlib.suppress(OSError):
                            os.unlink(name, dir_fd=hooks_fd)   # a file or symlink, not a folder of ours
                finally:
                    os.close(hooks_fd)

    def exists(self, rel: PurePosixPath) -> bool | None:
        """Is ``rel`` a regular file below the root? Looked up without following any symlink; None when
        a symlink or non-directory stands in the way (the answer would come from outside the archive)."""
        try:
            fd = self.open_dir(rel.parent, create=False)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                return None
            raise
        try:
            st = self.lstat(fd, rel.name)
        finally:
            os.close(fd)
        return st is not None and stat.S_ISREG(st.st_mode)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize
