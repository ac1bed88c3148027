"""Item 3, subprocess usage: asyncio's create_subprocess_exec closes every descriptor but 0-2 in the
child (close_fds=True); uvloop does not implement close_fds ("TODO" in uvloop's loop.pyx) and libuv only
closes O_CLOEXEC ones. So under uvloop a hook inherits every inheritable descriptor the daemon was
started with. The usual cron pattern `flock -n 9 yeastar-archiver once 9>/run/lock/archiver` then hands
the lock to each hook; a hook that leaves a helper behind in its own session (setsid; the kill of the
hook's process group cannot reach it) keeps the lock after `once` has exited, and every later cron run's
`flock -n` skips: archiving silently stops. On asyncio the hook never sees the descriptor."""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, simulator_subprocess, write_config

FD = 87   # as `flock -n 87 ... 87>lock`; a number nothing else in the test process uses


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_hook_does_not_inherit_the_daemons_descriptors(tmp_path: Path, loop: str) -> None:
    lock = tmp_path / "archiver.lock"
    seen = tmp_path / "hook-fds.txt"
    helper = tmp_path / "helper.pid"
    hook = tmp_path / "hook.sh"
    # A hook that notes its descriptors and starts a helper in a session of its own (as `nohup setsid`
    # helpers, daemonising uploaders, do), which outlives the hook's process group.
    hook.write_text(f"#!/bin/sh\nls /proc/self/fd > {seen}\n"
                    f"setsid sleep 15 </dev/null >/dev/null 2>&1 &\necho $! > {helper}\nexit 0\n")
    hook.chmod(0o755)
    with simulator_subprocess("--count", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]},
                                                      "hooks": {"on_archived": [str(hook)]},
                                                      "service": {"event_loop": loop}})
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # what `flock -n 9 ... 9>lock` does
        os.dup2(fd, FD)
        os.close(fd)
        try:
            proc = subprocess.run([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], pass_fds=(FD,),
                                  capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=60)
        finally:
            os.close(FD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f'"loop": "{loop}"' in proc.stderr
    fds = seen.read_text().split()
    again = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
    finally:
        os.close(again)
        if helper.exists():   # the helper this test's hook started, by its pid
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(helper.read_text()), signal.SIGKILL)
    problems = []
    if str(FD) in fds:
        problems.append(f"the hook inherited the daemon's fd {FD} (its fds: {fds})")
    if not free:
        problems.append("the lock is still held after `once` exited (by the hook's helper): the next "
                        "`flock -n` cron run would skip")
    assert not problems, problems
