"""Operator hooks: ``hooks.on_archived`` run for each archived recording, bounded, never blocking the archive.

Each run gets the recording's sidecar JSON on stdin and ``YEASTAR_ARCHIVER_PATH`` (the archived file),
``YEASTAR_ARCHIVER_RECORDING`` (its id, or its file name when the id is unknown) and
``YEASTAR_ARCHIVER_SHA256`` in its environment. At most ``hooks.max_concurrent`` run at once, each for
at most ``hooks.timeout_s`` (then its whole process group is killed); at most ``hooks.max_queued`` wait
for a slot, and a run that finds the backlog full is dropped with ``hook.dropped``. Runs are never
retried and the backlog is not kept across restarts: a hook runs at most once per archived recording.
A job may carry a ``release``: called once no run will read the file any more, whatever became of the
run (with ``archive.keep_local: false`` the hook's own name for the file goes then).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from daemon.archive import sidecar_bytes
from daemon.config import HooksConfig

log = structlog.get_logger("daemon.hooks")

ENV_PATH = "YEASTAR_ARCHIVER_PATH"
ENV_RECORDING = "YEASTAR_ARCHIVER_RECORDING"
ENV_SHA256 = "YEASTAR_ARCHIVER_SHA256"
STDERR_TAIL_BYTES = 2000   # what a failing hook said, for the log line; the rest is read and discarded
STDERR_DRAIN_S = 1.0   # after the hook exits, how long its stderr is read on (a child may hold it)

# Outcomes, the label values of the hook-runs counter.
OK, FAILED, TIMEOUT, SPAWN_ERROR, DROPPED, KILLED = "ok", "failed", "timeout", "spawn_error", "dropped", "killed"
OUTCOMES = (OK, FAILED, TIMEOUT, SPAWN_ERROR, DROPPED, KILLED)


@dataclass(frozen=True)
class HookJob:
    """One archived recording, as a hook is told about it."""

    recording: str
    path: Path
    sha256: str
    sidecar: bytes
    # Blocking (run in a thread), called exactly once when no hook will read ``path`` any more: after
    # the run, or when the run is dropped or cannot start. Its errors are logged, never raised.
    release: Callable[[], None] | None = None

    @classmethod
    def archived(cls, archive_dir: Path, ref: str, final_path: str, sha256: str,
                 record: dict[str, Any] | None) -> HookJob:
        """The job for a recording committed at ``final_path`` (relative to ``archive_dir``). Pure."""
        return cls(recording=ref, path=archive_dir / final_path, sha256=sha256,
                   sidecar=sidecar_bytes(record if record is not None else {"sha256": sha256}))


# Not passed on: the daemon's own settings (environment overrides may carry a secret) and systemd's
# channel to the daemon (a hook must not speak for it: READY=1, WATCHDOG=1).
# The daemon's settings (an override may carry a secret), systemd's channels to the service (notify,
# watchdog, socket activation) and its credentials folder (LoadCredential=: the PBX secret is there).
_NOT_INHERITED_PREFIXES = ("YEASTAR_ARCHIVER_", "NOTIFY_SOCKET", "WATCHDOG_", "CREDENTIALS_DIRECTORY",
                           "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


# The exit of a run is awaited on a pidfd when the system has one (None: it has not; a seam for tests).
_pidfd_open: Callable[[int], int] | None = getattr(os, "pidfd_open", None)


def hook_env(base: Mapping[str, str], job: HookJob) -> dict[str, str]:
    """The environment of one hook run: the daemon's own, less its settings and systemd's notify
    channel, plus the recording's three variables; ValueError for a NUL in any of it. Pure."""
    kept = {k: v for k, v in base.items() if not k.startswith(_NOT_INHERITED_PREFIXES)}
    env = {**kept, ENV_PATH: str(job.path), ENV_RECORDING: job.recording, ENV_SHA256: job.sha256}
    # A NUL would cut the value short in a C environment, and the hook be told another recording's name
    # (names from the PBX's events are not checked): refused here, whoever spawns (uvloop's spawn did
    # not refuse it; Popen does, with a less telling message).
    if any("\0" in k or "\0" in v for k, v in env.items()):
        raise ValueError("a NUL in the hook's environment (the recording's name or path)")
    return env


def outcome(returncode: int, *, timed_out: bool, killed: bool) -> str:
    """How one hook run that started went (a label of the counter). Pure."""
    if timed_out:
        return TIMEOUT
    if killed:
        return KILLED
    return OK if returncode == 0 else FAILED


def remaining_grace(grace_s: float, stopped_at: float | None, now: float) -> float:
    """Seconds running hooks may still take at shutdown: the grace counts from the stop, so that it
    runs beside the downloads' grace instead of after it (the unit's TimeoutStopSec holds both). Pure."""
    if stopped_at is None:
        return grace_s
    return max(0.0, grace_s - (now - stopped_at))


class HookRunner:
    """The pool of hook processes: ``submit`` never waits, ``close`` is the shutdown step.

    ``count`` is called with an outcome for every run that was submitted (the Prometheus counter)."""

    def __init__(self, cfg: HooksConfig, count: Callable[[str], None], *, grace_s: float,
                 stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
        self.cfg = cfg
        self.count = count
        self.grace_s = grace_s
        self.stop = stop
        self.hurry = hurry or asyncio.Event()
        self._queue: asyncio.Queue[HookJob] = asyncio.Queue(maxsize=max(1, cfg.max_queued))
        self._workers: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._stopped_at: float | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self._killing = False
        self._releasing: set[asyncio.Task[None]] = set()   # the releases of runs dropped by ``submit``

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.on_archived)

    def start(self) -> None:
        if not self.enabled:
            return
        self._workers = [asyncio.create_task(self._worker(), name=f"hook-{i}") for i in range(self.cfg.max_concurrent)]
        self._watch = asyncio.create_task(self._note_stop(), name="hook-stop-watch")

    async def _note_stop(self) -> None:
        await self.stop.wait()
        self._stopped_at = asyncio.get_running_loop().time()

    def submit(self, job: HookJob) -> None:
        """Queue one run; never waits. Dropped (logged, counted) when the backlog is full or stopping."""
        if not self.enabled:
            self._release_later(job)
            return
        # Not dropped for the stop alone: a recording archived within the stop's grace (a transfer or an
        # off-box copy let finish) is archived like any other; ``close`` gives its run what is left.
        reason = "stopping" if self._closing else None
        # max_queued 0: no backlog, a run starts only when a slot is free right now.
        if reason is None and self.cfg.max_queued == 0 and len(self._busy) + self._queue.qsize() >= len(self._workers):
            reason = "all hook slots busy"
        if reason is None:
            try:
                self._queue.put_nowait(job)
                return
            except asyncio.QueueFull:
                reason = "backlog full"
        self.drop(job.recording, reason)
        self._release_later(job)

    def drop(self, recording: str, reason: str) -> None:
        """A run that will not happen: logged and counted like a full backlog."""
        log.warning("hook.dropped", recording=recording, reason=reason, max_queued=self.cfg.max_queued,
                    action="the archive goes on; run the hook for this recording by hand if it matters")
        self.count(DROPPED)

    def _release_later(self, job: HookJob) -> None:
        if job.release is None:
            return
        task = asyncio.get_running_loop().create_task(_release(job), name="hook-release")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _worker(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._closing:   # closing: finish the current run, take no other
            job = await self._queue.get()
            self._busy.add(task)
            try:
                await self._run_one(job)
            except Exception:   # one bad run must not end this slot for the daemon's life
                log.exception("hook.error", recording=job.recording)
                self.count(SPAWN_ERROR)
            finally:
                try:
                    await _release(job)
                finally:
                    self._busy.discard(task)
                    self._queue.task_done()

    async def _run_one(self, job: HookJob) -> None:
        argv = self.cfg.on_archived
        try:
            proc, stderr = _spawn(argv, job)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:   # ValueError: a NUL in the env
            error = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            log.error("hook.spawn_failed", recording=job.recording, command=argv[0], error=error,
                      action="check hooks.on_archived")
            self.count(SPAWN_ERROR)
            return
        self._procs.add(proc)
        timed_out = False
        started = asyncio.get_running_loop().time()
        tail: _StderrTail | None = None
        try:
            tail = _StderrTail(stderr)
            try:
                # The timeout is the hook's own time: it ends when the hook exits, not when the
                # helpers it left behind let go of its stderr.
                async with asyncio.timeout(self.cfg.timeout_s):
                    await _exited(proc)
            except TimeoutError:
                timed_out = True
                _kill_group(proc)
                await _exited(proc)
            else:
                # Read what the hook itself wrote, for a moment after it exits: a child it left in
                # the background may hold its stderr open for ever.
                await tail.drained(STDERR_DRAIN_S)
            # What it left running in its group goes with it, so that no child outlives the daemon
            # and the slot is free when the hook is done. Killed before the reaping, while the hook's
            # pid (its group's id) cannot have been reused.
            _kill_group(proc)
            proc.wait()
        except BaseException:
            _kill_group(proc)   # cancelled: no hook outlives the daemon
            _reap_later(proc)
            raise
        finally:
            self._procs.discard(proc)
            if tail is not None:
                tail.close()   # also when a helper the hook left running still holds its other end
            else:
                stderr.close()
        said = tail.data
        elapsed = round(asyncio.get_running_loop().time() - started, 3)
        code = proc.returncode if proc.returncode is not None else -1
        # Killed by the shutdown only if our SIGKILL ended it: a hook that had exited by itself is
        # counted by its own exit code, however late its helpers let its stderr go.
        result = outcome(code, timed_out=timed_out, killed=self._killing and code == -signal.SIGKILL)
        self.count(result)
        if result == OK:
            log.info("hook.completed", recording=job.recording, elapsed_s=elapsed)
        elif result == TIMEOUT:
            log.warning("hook.timed_out", recording=job.recording, timeout_s=self.cfg.timeout_s,
                        action="killed its process group; raise hooks.timeout_s if it needs longer")
        elif result == KILLED:
            log.warning("hook.killed", recording=job.recording, reason="shutdown grace time over")
        else:
            log.warning("hook.failed", recording=job.recording, exit_code=proc.returncode, elapsed_s=elapsed,
                        stderr=said.decode("utf-8", "replace").strip()[-STDERR_TAIL_BYTES:])

    async def close(self, *, drain: bool) -> None:
        """The shutdown step. ``drain`` (``once`` at its end): run what is queued first, unless a stop
        comes. Then queued runs are dropped, running ones get what is left of the grace (from the stop),
        and are killed after it or at once on ``hurry``."""
        if not self._workers:
            await asyncio.gather(*self._releasing)
            return
        loop = asyncio.get_running_loop()
        if drain and not self.stop.is_set():
            await _first(self._queue.join(), self.stop.wait())
        self._closing = True
        while not self._queue.empty():
            job = self._queue.get_nowait()
            self._queue.task_done()
            log.warning("hook.dropped", recording=job.recording, reason="stopping",
                        action="the archive goes on; run the hook for this recording by hand if it matters")
            self.count(DROPPED)
            await _release(job)
        for task in self._workers:
            if task not in self._busy:
                task.cancel()
        busy = [t for t in self._workers if not t.done() and t in self._busy]
        if busy:
            grace = remaining_grace(self.grace_s, self._stopped_at, loop.time())
            if not self.hurry.is_set():
                await _first(asyncio.wait(busy, timeout=grace), self.hurry.wait())
            self._killing = True
            for proc in list(self._procs):
                _kill_group(proc)
        await asyncio.gather(*self._workers, return_exceptions=True)
        await asyncio.gather(*self._releasing)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self._workers = []


async def _release(job: HookJob) -> None:
    """Tell the job's owner that no hook reads its file any more (see ``HookJob.release``)."""
    if job.release is None:
        return
    try:
        await asyncio.to_thread(job.release)
    except Exception:   # the owner's trouble (a removal that failed): logged, never a hook's outcome
        log.exception("hook.release_failed", recording=job.recording)


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of ``aws`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _spawn(argv: tuple[str, ...], job: HookJob) -> tuple[subprocess.Popen[bytes], BinaryIO]:
    """Start one run: the sidecar on stdin (a memory file: a hook that never reads it cannot block the
    daemon's write, nor make it fail), stdout discarded, stderr a pipe whose read end is returned. In a
    session of its own (a timeout or the shutdown kills the hook's children too) and with no descriptor
    but 0-2 (``close_fds``).

    Popen, not the loop's subprocess: uvloop's spawn does not close descriptors and leaves copies of
    the child's stdio open in it (a helper the hook leaves running would hold them, and a cron
    wrapper's lock), and cuts an environment value at a NUL. Popen forks and execs as asyncio's own
    loop does, on this thread; the exit is awaited by pidfd (``_exited``), the reaping is ours."""
    env = hook_env(os.environ, job)
    sidecar = _memory_file(job.sidecar)
    try:
        read_end, write_end = os.pipe()
        try:
            proc = subprocess.Popen(argv, stdin=sidecar, stdout=subprocess.DEVNULL, stderr=write_end, env=env,  # noqa: S603 (the operator's argv, no shell)
                                    start_new_session=True, close_fds=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
    finally:
        os.close(sidecar)
    os.set_blocking(read_end, False)
    return proc, os.fdopen(read_end, "rb", buffering=0)


def _memory_file(data: bytes) -> int:
    """A descriptor of an unnamed file holding ``data``, at offset 0."""
    try:
        fd = os.memfd_create("yeastar-archiver-sidecar", os.MFD_CLOEXEC)
    except (AttributeError, OSError):   # no memfd (not Linux): an unlinked temp file
        fd, name = tempfile.mkstemp(prefix="yeastar-archiver-sidecar-")
        os.unlink(name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reap_later(proc: subprocess.Popen[bytes]) -> None:
    """Reap a killed run that has not exited yet without waiting for it here (cancelled: no await)."""
    if proc.poll() is None:
        threading.Thread(target=proc.wait, name="hook-reap", daemon=True).start()


class _StderrTail:
    """The last ``STDERR_TAIL_BYTES`` a run wrote to its stderr, read as it comes without blocking the
    loop (bounded memory, whatever the hook writes)."""

    def __init__(self, pipe: BinaryIO) -> None:
        self.data = b""
        self._pipe = pipe
        self._fd = pipe.fileno()
        self._eof = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = self._pipe.read(65536)
        except BlockingIOError:
            return
        if chunk is None:   # nothing yet (a non-blocking read)
            return
        if not chunk:
            self._loop.remove_reader(self._fd)
            self._eof.set()
            return
        self.data = (self.data + chunk)[-STDERR_TAIL_BYTES:]

    async def drained(self, timeout_s: float) -> None:
        """Wait for the end of the pipe, at most ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._eof.wait(), timeout_s)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        self._pipe.close()


async def _exited(proc: subprocess.Popen[bytes]) -> None:
    """Return once the process itself has exited (a pidfd becomes readable), whoever holds its pipes."""
    if proc.returncode is not None:
        return
    try:
        if _pidfd_open is None:
            raise OSError(errno.ENOSYS, "no pidfd_open")
        fd = _pidfd_open(proc.pid)
    except ProcessLookupError:
        return   # exited and reaped already
    except OSError:
        # No pidfd (a kernel before 5.3, a seccomp filter refusing it): ask every 50 ms whether it
        # has exited, without reaping it (WNOWAIT: its pid stays its own until we kill its group).
        try:
            # No event says a process exited without a pidfd or a SIGCHLD handler (the loop's own):
            # polling, non-blocking, is the fallback.
            while os.waitid(os.P_PID, proc.pid,  # noqa: ASYNC110, ASYNC222 (WNOHANG: never blocks)
                            os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                await asyncio.sleep(0.05)
        except ChildProcessError:
            pass   # reaped already
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    def readable() -> None:
        if not done.done():
            done.set_result(None)
    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the hook's whole process group (its own session: pgid == pid), also when the hook itself
    has exited and only what it started remains."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
