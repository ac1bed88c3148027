"""How a hook run is counted when it ends near a deadline, or where the system has no pidfd, on either
loop (found by an adversarial read of the hooks' spawn; each failed before the fix):

- a hook that exits before its timeout, leaving a helper that holds its stderr, is counted by its exit
  code, not `timeout` (the stderr drain after the exit is not the hook's time);
- a hook that exited 0 by itself during the shutdown grace is `ok`, not `killed`, though the kill
  comes while its stderr is still drained;
- with no pidfd (an old kernel, a seccomp filter) a run is waited for, not killed at once."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon import hooks
from daemon.hooks import HookJob, HookRunner
from tests.perf_review.hookrun import LOOPS, run_hooks


def _job(tmp: Path, i: int) -> HookJob:
    return HookJob(recording=str(i), path=tmp / f"{i}.wav", sha256="0" * 64, sidecar=b'{"id": %d}' % i)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(("code", "want"), [(0, "ok"), (3, "failed")])
def test_a_hook_that_exits_before_its_timeout_is_counted_by_its_exit_code(tmp_path: Path, loop: str, code: int,
                                                                          want: str) -> None:
    # Exits 0.5 s before timeout_s; the helper it leaves holds stderr for longer than the drain.
    argv = ["/bin/sh", "-c", f"sleep 30 & sleep 1.5; echo why >&2; exit {code}"]
    assert run_hooks(loop, argv, [_job(tmp_path, 1)], timeout_s=2.0, max_concurrent=2) == [want]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_hook_that_exited_by_itself_in_the_grace_is_not_counted_killed(tmp_path: Path, loop: str) -> None:
    # Exits 0 at 0.8 s; the grace (1 s from the stop at 0.1 s) ends while its stderr is still drained.
    async def stop_soon(_runner: HookRunner, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.1)
        stop.set()
    argv = ["/bin/sh", "-c", "sleep 30 & sleep 0.8; exit 0"]
    assert run_hooks(loop, argv, [_job(tmp_path, 1)], timeout_s=20, grace_s=1.0, during=stop_soon) == ["ok"]


@pytest.mark.parametrize("loop", LOOPS)
def test_without_a_pidfd_a_run_is_waited_for(tmp_path: Path, loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "_pidfd_open", None)
    marker = tmp_path / "m"
    outcomes = run_hooks(loop, ["/bin/sh", "-c", f"sleep 0.3; echo x >> {marker}; exit 3"], [_job(tmp_path, 1)])
    assert outcomes == ["failed"] and marker.read_text() == "x\n"
