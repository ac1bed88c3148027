"""Where recordings to archive come from: config ids, the tailed queue file, and ``enqueue`` refs."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.clock import Clock, sleep_or_stop
from daemon.ledger import Ref

log = structlog.get_logger("daemon.sources")

MAX_REF_CHARS = 1024
READ_BYTES = 1024 * 1024  # per poll: a million-line queue file is taken in bounded bites


def parse_ref(text: str) -> Ref | None:
    """A queue line or CLI argument as a recording: a positive id, or a file name ending .wav/.mp3."""
    text = text.strip()
    if not text or len(text) > MAX_REF_CHARS or "\x00" in text:
        return None
    if text.isascii() and text.isdigit():
        n = int(text)
        return Ref(rec_id=n) if n > 0 else None
    if text.lower().endswith((".wav", ".mp3")) and len(text) > 4:
        return Ref(file=text)
    return None


@dataclass
class QueueLines:
    """What one read of the queue file gave: refs, and the malformed lines by line number."""

    refs: list[Ref] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)


def parse_lines(lines: list[str], first_lineno: int) -> QueueLines:
    """Parse queue-file lines; blank lines and ``#`` comments are skipped. Pure."""
    out = QueueLines()
    for n, raw in enumerate(lines, start=first_lineno):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        ref = parse_ref(line)
        if ref is None:
            out.bad.append((n, line[:120]))
        else:
            out.refs.append(ref)
    return out


class QueueTail:
    """Follows a queue file like ``tail -F``: appended lines, truncation, rotation and absence.

    Only whole lines are taken; a last line without its newline is taken once it has stayed
    unchanged for one more poll (an operator's ``echo -n``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: tuple[int, int] | None = None
        self._offset = 0
        self._lineno = 0
        self._partial = b""
        self._head = b""
        self._mtime_ns = 0
        self._missing_logged = False
        self.behind = False  # the last poll stopped at READ_BYTES: poll again at once
        self._logged_bad: set[tuple[tuple[int, int] | None, int]] = set()

    def poll(self, *, final: bool = False) -> list[Ref]:
        """Read what is new since the last poll (blocking I/O; run it in a thread).

        ``final`` takes an unfinished last line at once (``once`` reads the file as it stands)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not self._missing_logged:
                log.warning("queue.missing", path=str(self.path))
                self._missing_logged = True
            return []
        self._missing_logged = False
        inode = (st.st_dev, st.st_ino)
        rewritten = False
        if inode == self._inode and st.st_mtime_ns != self._mtime_ns and self._head:
            # Truncated and written again between two polls, perhaps to the same size: the first
            # bytes tell. Re-reading is harmless; the ledger knows what it has.
            with open(self.path, "rb") as f:
                rewritten = f.read(len(self._head)) != self._head
        self._mtime_ns = st.st_mtime_ns
        if inode != self._inode or st.st_size < self._offset or rewritten:
            if self._inode is not None:
                log.info("queue.reopened", path=str(self.path),
                         reason="rotated" if inode != self._inode else "truncated")
            self._inode, self._offset, self._lineno, self._partial, self._head = inode, 0, 0, b"", b""
        if st.st_size == self._offset and not self._partial:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(READ_BYTES)
        self.behind = len(data) == READ_BYTES
        if len(self._head) < 64:
            self._head = (self._head + data)[:64]
        self._offset += len(data)
        chunk = self._partial + data
        *complete, tail = chunk.split(b"\n")
        if tail and ((final and not self.behind) or not data):
            complete.append(tail)
            tail = b""
        self._partial = tail
        lines = [c.decode("utf-8", "replace") for c in complete]
        parsed = parse_lines(lines, self._lineno + 1)
        self._lineno += len(lines)
        for lineno, text in parsed.bad:
            if (self._inode, lineno) not in self._logged_bad:
                self._logged_bad.add((self._inode, lineno))
                log.warning("queue.malformed_line", path=str(self.path), line=lineno, text=text)
        return parsed.refs


async def follow_queue(tail: QueueTail, enqueue: Callable[[list[Ref]], Awaitable[int]], clock: Clock,
                       interval_s: float, stop: asyncio.Event, *, once: bool = False) -> None:
    """Poll the queue file every ``interval_s`` and hand new refs to ``enqueue`` until ``stop``."""
    loop = asyncio.get_running_loop()
    unreadable = False
    while not stop.is_set():
        try:
            refs = await loop.run_in_executor(None, functools.partial(tail.poll, final=once))
            unreadable = False
        except OSError as exc:
            if not unreadable:
                log.warning("queue.unreadable", path=str(tail.path), error=str(exc))
            unreadable, refs = True, []
        if refs:
            added = await enqueue(refs)
            log.info("queue.read", lines=len(refs), added=added)
        if tail.behind:
            continue
        if once or await sleep_or_stop(clock, interval_s, stop):
            return
