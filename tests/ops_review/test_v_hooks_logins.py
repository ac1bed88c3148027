"""Review of the operator's-day work (V1, V8): a hook's background children, the hook's environment."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import pytest

from daemon.config import HooksConfig
from daemon.hooks import OK, HookJob, HookRunner

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # zombie?
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_v1_backgrounded_hook_child_survives_and_fire_and_forget_hook_is_a_timeout(tmp_path: Path) -> None:
    """A hook that starts a background job and exits 0 at once (a common `cmd &` hook): the daemon
    waits on stderr EOF, so it counts a timeout, and the killpg is skipped because the leader is
    already reaped: the background child survives the timeout and the daemon's close()."""
    pidfile = tmp_path / "child.pid"
    script = f"sleep 30 & echo $! > {pidfile}; exit 0"
    outcomes: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        r = HookRunner(HooksConfig(on_archived=("/bin/sh", "-c", script), max_concurrent=1, timeout_s=2.0),
                       outcomes.append, grace_s=1.0, stop=stop)
        r.start()
        r.submit(HookJob(recording="1", path=tmp_path / "x.wav", sha256="0" * 64, sidecar=b"{}"))
        await asyncio.sleep(3.0)
        stop.set()
        await r.close(drain=False)

    asyncio.run(main())
    pid = int(pidfile.read_text())
    try:
        alive = _alive(pid)
        assert (outcomes, alive) == ([OK], False), \
            f"the hook exited 0 at once, yet counted {outcomes}; its background child alive after close: {alive}"
        assert not alive, "the hook's background child outlived its timeout and the daemon's close()"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_v8_hook_env_keeps_the_credentials_directory(tmp_path: Path) -> None:
    from daemon.hooks import hook_env
    env = hook_env({"CREDENTIALS_DIRECTORY": "/run/credentials/yeastar-archiver.service", "PATH": "/bin"},
                   HookJob(recording="1", path=tmp_path / "1.wav", sha256="0" * 64, sidecar=b"{}"))
    assert "CREDENTIALS_DIRECTORY" not in env, "a hook is told where the PBX secret file is"
