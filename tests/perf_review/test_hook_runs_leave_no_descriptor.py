"""A hook run that leaves a helper behind (in its own session, 0-2 redirected) must not keep one of the
daemon's descriptors open for the helper's life: `run` lives for months. Under uvloop the helper holds
copies of the hook's own stdio (libuv leaves them open in the child), so the daemon's end of the stderr
pipe never sees an end of file; the run's pipes are closed when it is over."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_runs_leaving_careful_helpers_do_not_leak_daemon_descriptors(tmp_path: Path, loop: str) -> None:
    """`run` lives for months: each hook run that leaves a helper (0-2 redirected) must not keep one of
    the daemon's descriptors open for the helper's life."""
    import asyncio

    import uvloop

    from daemon.config import HooksConfig
    from daemon.hooks import HookJob, HookRunner
    pids = tmp_path / "pids"
    argv = ("/bin/sh", "-c", f"setsid sleep 20 </dev/null >/dev/null 2>&1 & echo $! >> {pids}; exit 0")
    outcomes: list[str] = []
    counts: list[int] = []

    async def main() -> None:
        stop = asyncio.Event()
        r = HookRunner(HooksConfig(on_archived=argv, max_concurrent=2, timeout_s=5.0), outcomes.append,
                       grace_s=1.0, stop=stop)
        r.start()
        counts.append(len(os.listdir("/proc/self/fd")))
        for i in range(20):
            r.submit(HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b"{}"))
        await r._queue.join()
        await asyncio.sleep(0.5)
        counts.append(len(os.listdir("/proc/self/fd")))
        await r.close(drain=True)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
            runner.run(main())
    finally:
        for pid in pids.read_text().split() if pids.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    assert outcomes == ["ok"] * 20, outcomes
    assert counts[1] - counts[0] < 5, f"the daemon holds {counts[1] - counts[0]} more descriptors after 20 runs"
