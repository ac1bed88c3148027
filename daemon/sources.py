"""Where recordings to archive come from: config ids, the tailed queue file, and ``enqueue`` refs."""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.clock import Clock, sleep_or_stop
from daemon.errors import ArchiverError
from daemon.ledger import Ref
from daemon.supervise import Loops, restart_delay

log = structlog.get_logger("daemon.sources")

MAX_REF_CHARS = 1024
MAX_LINE_BYTES = 4096      # a queue line longer than this is not a recording; it is never buffered whole
ONCE_ENQUEUE_TRIES = 5
READ_BYTES = 1024 * 1024   # per poll: a million-line queue file is taken in bounded bites
_COMMENT = re.compile(r"\s#")
OVERLONG = "\x00overlong"   # stands for a skipped line longer than MAX_LINE_BYTES


def ref_problem(text: str) -> str | None:
    """Why ``text`` is not a recording ref (None when it is one). Pure; the CLI and the queue share it."""
    if not text or len(text) > MAX_REF_CHARS:
        return "not a recording id or .wav/.mp3 file name"
    # C0 and C1 controls (NUL included): a PBX file name never has them; a log or a terminal chokes on them.
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in text):
        return "control characters, not a PBX file name"
    if text.isascii() and text.isdigit():
        return None if int(text) > 0 else "a recording id must be a positive number"
    if "/" in text or "\\" in text or text.startswith(".") or ".." in text:
        return "a path, not a PBX file name (no /, \\, .. or leading .)"
    if text.lower().endswith((".wav", ".mp3")) and len(text) > 4:
        return None
    return "not a recording id or .wav/.mp3 file name"


def parse_ref(text: str) -> Ref | None:
    """A queue line or CLI argument as a recording: a positive id, or a file name ending .wav/.mp3.
    Path-like names are refused here, at the edge, before they reach the PBX or the archive."""
    text = text.strip()
    if ref_problem(text) is not None:
        return None
    return Ref(rec_id=int(text)) if text.isascii() and text.isdigit() else Ref(file=text)


def strip_comment(line: str) -> str:
    """A queue line without its trailing ``# comment`` (a ``#`` after whitespace) and surrounding blanks."""
    line = line.strip()
    if line.startswith("#"):
        return ""
    return _COMMENT.split(line, maxsplit=1)[0].strip()


@dataclass
class QueueLines:
    """What one read of the queue file gave: refs, and the malformed lines by line number."""

    refs: list[Ref] = field(default_factory=list)
    bad: list[tuple[int, str, str]] = field(default_factory=list)   # (line number, text, why)


def parse_lines(lines: list[str], first_lineno: int) -> QueueLines:
    """Parse queue-file lines; blank lines and ``#`` comments (whole or trailing) are skipped. Pure."""
    out = QueueLines()
    for n, raw in enumerate(lines, start=first_lineno):
        if raw == OVERLONG:
            out.bad.append((n, "", f"longer than {MAX_LINE_BYTES} bytes"))
            continue
        line = strip_comment(raw)
        if not line:
            continue
        why = ref_problem(line)
        ref = parse_ref(line) if why is None else None
        if ref is None:
            out.bad.append((n, line[:120], why or "malformed"))
        else:
            out.refs.append(ref)
    return out


class QueueTail:
    """Follows a queue file like ``tail -F``: appended lines, truncation, rotation and absence.

    Only newline-terminated lines count: a writer caught between two writes (``17`` now, ``27\\n``
    later) is read as 1727, never as 17 and 27. ``once`` takes an unfinished last line at the end of
    the file, because it reads the file as it stands. The file is opened, then checked (``fstat``)
    and kept open, so a rotation between a check and an open cannot mix two files; the old file is
    read to its end before the new one. A line longer than ``MAX_LINE_BYTES`` is reported and skipped
    without ever being held in memory whole.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._offset = 0
        self._lineno = 0
        self._partial = b""
        self._overlong = False         # inside a line past MAX_LINE_BYTES: drop bytes up to its newline
        self._head = b""
        self._last = b""               # the bytes just before ``_offset``: a rewrite in place changes them
        self._mtime_ns = 0
        self._missing_logged = False
        self.behind = False  # the last poll stopped at READ_BYTES: poll again at once
        self._logged_bad: set[tuple[tuple[int, int] | None, int]] = set()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _reset(self, reason: str | None) -> None:
        if reason is not None:
            log.info("queue.reopened", path=str(self.path), reason=reason)
        self._offset, self._lineno, self._partial, self._head, self._overlong = 0, 0, b"", b"", False
        self._last = b""

    def _open(self) -> bool:
        """(Re)open the path; False when it is absent."""
        try:
            # Non-blocking: a FIFO at the path must not hang the process (reads never block on files).
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("queue.missing", path=str(self.path))
                self._missing_logged = True
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if not self._missing_logged:
                log.warning("queue.not_a_file", path=str(self.path), action="skipped until it is a regular file")
                self._missing_logged = True
            return False
        self._missing_logged = False
        self.close()
        self._fd = fd
        inode = (st.st_dev, st.st_ino)
        if inode != self._inode:
            self._reset("rotated" if self._inode is not None else None)
            self._inode = inode
        self._mtime_ns = st.st_mtime_ns
        return True

    def _rewritten(self) -> str | None:
        """Why the open file must be read again from its start: "truncated", "rewritten", or None."""
        assert self._fd is not None
        st = os.fstat(self._fd)
        why = None
        if st.st_size < self._offset:
            why = "truncated"
        elif st.st_mtime_ns != self._mtime_ns and self._head and (
                os.pread(self._fd, len(self._head), 0) != self._head
                or os.pread(self._fd, len(self._last), self._offset - len(self._last)) != self._last):
            # Truncated and written again between two polls, perhaps to a larger size: the first bytes,
            # or those just before where reading stopped, tell (an append changes neither).
            # Re-reading is harmless; the ledger knows what it has.
            why = "rewritten"
        self._mtime_ns = st.st_mtime_ns
        return why

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def poll(self, *, final: bool = False) -> list[Ref]:
        """Read what is new since the last poll (blocking I/O; run it in a thread).

        ``final`` takes an unfinished last line at once (``once`` reads the file as it stands)."""
        if self._fd is None and not self._open():
            return []
        assert self._fd is not None
        why = self._rewritten()
        if why is not None:
            self._reset(why)
        data = os.pread(self._fd, READ_BYTES, self._offset)
        if not data and self._rotated():
            # The old file is read to its end (just now); the new one starts from its first byte.
            if not self._open():
                return []
            data = os.pread(self._fd, READ_BYTES, self._offset)
        self.behind = len(data) == READ_BYTES
        if len(self._head) < 64:
            self._head = (self._head + data)[:64]
        self._last = (self._last + data)[-64:]
        self._offset += len(data)
        lines = self._lines(data, take_tail=final and not self.behind)
        parsed = parse_lines(lines, self._lineno + 1)
        self._lineno += len(lines)
        for lineno, text, reason in parsed.bad:
            if (self._inode, lineno) not in self._logged_bad:
                self._logged_bad.add((self._inode, lineno))
                log.warning("queue.malformed_line", path=str(self.path), line=lineno, text=text, reason=reason)
        return parsed.refs

    def _lines(self, data: bytes, *, take_tail: bool) -> list[str]:
        """Complete lines out of the bytes read so far; an overlong line comes out as one marker line."""
        out: list[str] = []
        pieces = data.split(b"\n")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self._overlong:
                if not last:
                    self._overlong = False
                    out.append(OVERLONG)
                continue
            self._partial += piece
            if len(self._partial) > MAX_LINE_BYTES:
                self._partial = b""
                if last:
                    self._overlong = True
                else:
                    out.append(OVERLONG)
                continue
            if not last:
                out.append(self._partial.decode("utf-8", "replace"))
                self._partial = b""
        if take_tail and (self._partial or self._overlong):
            out.append(self._partial.decode("utf-8", "replace") if not self._overlong else OVERLONG)
            self._partial, self._overlong = b"", False
        return out


async def follow_queue(tail: QueueTail, enqueue: Callable[[list[Ref]], Awaitable[int]], clock: Clock,
                       interval_s: float, stop: asyncio.Event, *, once: bool = False,
                       loops: Loops | None = None, name: str = "queue") -> None:
    """Poll the queue file every ``interval_s`` and hand new refs to ``enqueue`` until ``stop``.

    Refs the ledger could not take (a full disk, a lock held too long) are kept and offered again
    after a back-off: the file has been read past them, so dropping them would lose them."""
    loops = loops or Loops(clock)
    loops.register(name)
    loop = asyncio.get_running_loop()
    unreadable = False
    waiting: list[Ref] = []
    failures = 0
    try:
        while not stop.is_set():
            if not waiting:
                try:
                    waiting = await loop.run_in_executor(None, functools.partial(tail.poll, final=once))
                    unreadable = False
                except OSError as exc:
                    if not unreadable:
                        log.warning("queue.unreadable", path=str(tail.path), error=str(exc))
                    unreadable = True
            if waiting:
                try:
                    added = await enqueue(waiting)
                except ArchiverError as exc:
                    failures = loops.failed(name, exc)
                    if once and failures >= ONCE_ENQUEUE_TRIES:
                        raise
                    delay = restart_delay(failures, random.random())
                    log.warning("queue.enqueue_failed", lines=len(waiting), error=str(exc), retry_in_s=round(delay, 1))
                    if await sleep_or_stop(clock, delay, stop):
                        return
                    continue
                log.info("queue.read", lines=len(waiting), added=added)
                waiting = []
            loops.ok(name)
            if tail.behind:
                continue
            if once or await sleep_or_stop(clock, interval_s, stop):
                return
    finally:
        tail.close()
