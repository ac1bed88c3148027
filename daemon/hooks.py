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
import os
import signal
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def hook_env(base: Mapping[str, str], job: HookJob) -> dict[str, str]:
    """The environment of one hook run: the daemon's own, less its settings and systemd's notify
    channel, plus the recording's three variables; ValueError for a NUL in any of it. Pure."""
    kept = {k: v for k, v in base.items() if not k.startswith(_NOT_INHERITED_PREFIXES)}
    env = {**kept, ENV_PATH: str(job.path), ENV_RECORDING: job.recording, ENV_SHA256: job.sha256}
    # asyncio's spawn refuses a NUL in the environment; uvloop's would cut the value at it, and the hook
    # would be told another recording's name (names from the PBX's events are not checked). Refused
    # here, for every loop alike.
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
        self._procs: set[asyncio.subprocess.Process] = set()
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
            # A session of its own: a timeout or the shutdown kills the hook's children too.
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=hook_env(os.environ, job), start_new_session=True)
        except (OSError, ValueError) as exc:   # ValueError: a NUL or an unencodable character in the env
            error = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            log.error("hook.spawn_failed", recording=job.recording, command=argv[0], error=error,
                      action="check hooks.on_archived")
            self.count(SPAWN_ERROR)
            return
        self._procs.add(proc)
        timed_out = False
        started = asyncio.get_running_loop().time()
        try:
            try:
                async with asyncio.timeout(self.cfg.timeout_s):
                    stderr = await _talk(proc, job.sidecar)
            except TimeoutError:
                timed_out = True
                _kill_group(proc)
                await proc.wait()
                stderr = b""
        except BaseException:
            _kill_group(proc)   # cancelled: no hook outlives the daemon
            raise
        finally:
            self._procs.discard(proc)
        elapsed = round(asyncio.get_running_loop().time() - started, 3)
        result = outcome(proc.returncode if proc.returncode is not None else -1, timed_out=timed_out,
                         killed=self._killing)
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
                        stderr=stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL_BYTES:])

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


@contextlib.contextmanager
def _pipe_closed_by_hook(pipe: asyncio.StreamWriter) -> Iterator[None]:
    """Swallow what writing to a hook that closed its stdin (or exited) raises: asyncio's loop raises
    BrokenPipeError or ConnectionResetError, uvloop RuntimeError ("the handler is closed") once its
    transport has closed. Any other RuntimeError goes on."""
    try:
        yield
    except (BrokenPipeError, ConnectionResetError):
        pass
    except RuntimeError:
        if not pipe.is_closing():
            raise


async def _talk(proc: asyncio.subprocess.Process, stdin: bytes) -> bytes:
    """Feed the sidecar, read stderr keeping only its tail (bounded memory), wait for the exit."""
    assert proc.stdin is not None
    assert proc.stderr is not None
    # A hook that never reads stdin is fine: a closed pipe is its choice.
    with _pipe_closed_by_hook(proc.stdin):
        proc.stdin.write(stdin)
        await proc.stdin.drain()
    with _pipe_closed_by_hook(proc.stdin):
        proc.stdin.close()
    tail = b""
    stream = proc.stderr

    async def drain() -> None:
        nonlocal tail
        while chunk := await stream.read(65536):
            tail = (tail + chunk)[-STDERR_TAIL_BYTES:]
    reader = asyncio.ensure_future(drain())
    try:
        # Not proc.wait(): asyncio's wait also waits for the pipes, which a child the hook left in the
        # background may hold open for ever. Read what the hook itself wrote, for a moment after.
        await _exited(proc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), STDERR_DRAIN_S)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    # The hook has exited: what it left running in its group goes with it, so that no child outlives
    # the daemon and the slot is free when the hook is done.
    _kill_group(proc)
    await proc.wait()
    return tail


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Return once the process itself has exited (a pidfd becomes readable), whoever holds its pipes."""
    if proc.returncode is not None:
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return   # exited and reaped already
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


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the hook's whole process group (its own session: pgid == pid), also when the hook itself
    has exited and only what it started remains."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
