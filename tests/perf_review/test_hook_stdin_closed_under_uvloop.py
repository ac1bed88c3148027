"""Item 3, subprocess usage: hooks.py `_talk` says "A hook that never reads stdin is fine: a closed pipe is
its choice" and suppresses BrokenPipeError/ConnectionResetError around the sidecar write. Under uvloop a
hook that has already exited (or closed its stdin) when the sidecar is written makes
`proc.stdin.write` raise RuntimeError("unable to perform operation on <WriteUnixTransport closed=True>;
the handler is closed"): the run escapes `_talk`, is logged as `hook.error` with a traceback and counted
`spawn_error` — although the hook ran and exited 0. On asyncio every run counts `ok`.

Also: a recording name with a NUL (a 30012 event's name; see tests/ops_review/test_v_hook_worker_dies.py)
is refused by asyncio's spawn (ValueError -> spawn_error, the hook does not run) but under uvloop the hook
runs with YEASTAR_ARCHIVER_RECORDING cut at the NUL: it is told another recording's name."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from daemon.config import HooksConfig
from daemon.hooks import ENV_RECORDING, HookJob, HookRunner


def _run(loop: str, argv: tuple[str, ...], jobs: list[HookJob], wait_s: float) -> list[str]:
    outcomes: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        r = HookRunner(HooksConfig(on_archived=argv, max_concurrent=4, timeout_s=5.0), outcomes.append,
                       grace_s=1.0, stop=stop)
        r.start()
        for job in jobs:
            r.submit(job)
        await r.close(drain=True)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        runner.run(main())
    return outcomes


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_hook_that_does_not_read_stdin_counts_ok(tmp_path: Path, loop: str) -> None:
    # A hook that exits at once without reading its stdin (e.g. it only needs the environment), with a
    # sidecar big enough that the write meets the closed pipe.
    jobs = [HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b"{" + b" " * 300_000 + b"}")
            for i in range(40)]
    outcomes = _run(loop, ("/bin/true",), jobs, 5)
    assert len(outcomes) == 40
    assert set(outcomes) == {"ok"}, {o: outcomes.count(o) for o in set(outcomes)}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_name_with_a_nul_is_never_passed_cut_short(tmp_path: Path, loop: str) -> None:
    seen = tmp_path / "seen"
    job = HookJob(recording="20240101-1001\x00-other.wav", path=tmp_path / "x.wav", sha256="0" * 64, sidecar=b"{}")
    _run(loop, ("/bin/sh", "-c", f'printf "%s" "${ENV_RECORDING}" > {seen}'), [job], 3)
    told = seen.read_text() if seen.exists() else None
    assert told is None or told == job.recording, f"the hook was told {told!r} for {job.recording!r}"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_quick_failing_hook_is_counted_failed_not_spawn_error(tmp_path: Path, loop: str) -> None:
    # A hook that checks something and exits 3 at once, its stdin unread: `hook.failed` (exit code, stderr
    # tail) is what the operator needs; a `spawn_error` says the command could not start at all.
    jobs = [HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b'{"id": 1}')
            for i in range(20)]
    outcomes = _run(loop, ("/bin/sh", "-c", "echo no CRM token >&2; exit 3"), jobs, 5)
    assert outcomes.count("failed") == 20, {o: outcomes.count(o) for o in set(outcomes)}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_slow_hook_that_ignores_stdin_is_not_killed(tmp_path: Path, loop: str) -> None:
    marker = tmp_path / "m"
    jobs = [HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b'{"id": 1}')
            for i in range(4)]
    outcomes = _run(loop, ("/bin/sh", "-c", f"exec 0<&-; sleep 0.5; echo x >> {marker}"), jobs, 5)
    assert outcomes.count("ok") == 4 and marker.read_text().count("x") == 4, outcomes
