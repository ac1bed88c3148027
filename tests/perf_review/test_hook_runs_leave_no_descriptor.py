"""A hook run that leaves a helper behind (in its own session, 0-2 redirected) must not keep one of the
daemon's descriptors open for the helper's life: `run` lives for months. Under uvloop the helper holds
copies of the hook's own stdio (libuv leaves them open in the child), so the daemon's end of the stderr
pipe never sees an end of file; the run's pipes are closed when it is over."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from daemon.hooks import HookJob, HookRunner
from tests.perf_review.hookrun import LOOPS, run_hooks


@pytest.mark.parametrize("loop", LOOPS)
def test_runs_leaving_careful_helpers_do_not_leak_daemon_descriptors(tmp_path: Path, loop: str) -> None:
    pids = tmp_path / "pids"
    argv = ("/bin/sh", "-c", f"setsid sleep 20 </dev/null >/dev/null 2>&1 & echo $! >> {pids}; exit 0")
    counts: list[int] = []

    async def when_done(runner: HookRunner, _stop: asyncio.Event) -> None:
        # Before its first await, no run has started yet: the loop's own descriptors are the baseline.
        counts.append(len(os.listdir("/proc/self/fd")))
        await runner._queue.join()
        await asyncio.sleep(0.5)   # the descriptors a finished run would keep, counted after it
        counts.append(len(os.listdir("/proc/self/fd")))

    jobs = [HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b"{}") for i in range(20)]
    try:
        outcomes = run_hooks(loop, argv, jobs, max_concurrent=2, during=when_done)
    finally:
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    assert outcomes == ["ok"] * 20, outcomes
    assert counts[1] - counts[0] < 5, f"the daemon holds {counts[1] - counts[0]} more descriptors after 20 runs"
