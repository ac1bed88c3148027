"""Hooks that do not read their stdin, and names with a NUL, on either loop. Under uvloop, when hooks were
spawned by the loop, a hook that had exited before the sidecar was written to its stdin pipe made the
write raise RuntimeError (not BrokenPipeError): the run was logged `hook.error` and counted
`spawn_error` though the hook ran. And a recording name with a NUL (a 30012 event's name) reached the
hook cut at the NUL under uvloop, where asyncio's spawn refused it: the hook was told another name."""
from __future__ import annotations

from pathlib import Path

import pytest

from daemon.hooks import ENV_RECORDING, HookJob
from tests.perf_review.hookrun import LOOPS, run_hooks


@pytest.mark.parametrize("loop", LOOPS)
def test_a_hook_that_does_not_read_stdin_counts_ok(tmp_path: Path, loop: str) -> None:
    # A hook that exits at once without reading its stdin (e.g. it only needs the environment), with a
    # sidecar big enough that the write meets the closed pipe.
    jobs = [HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b"{" + b" " * 300_000 + b"}")
            for i in range(40)]
    outcomes = run_hooks(loop, ("/bin/true",), jobs)
    assert len(outcomes) == 40
    assert set(outcomes) == {"ok"}, {o: outcomes.count(o) for o in set(outcomes)}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_name_with_a_nul_is_never_passed_cut_short(tmp_path: Path, loop: str) -> None:
    seen = tmp_path / "seen"
    job = HookJob(recording="20240101-1001\x00-other.wav", path=tmp_path / "x.wav", sha256="0" * 64, sidecar=b"{}")
    run_hooks(loop, ("/bin/sh", "-c", f'printf "%s" "${ENV_RECORDING}" > {seen}'), [job])
    told = seen.read_text() if seen.exists() else None
    assert told is None or told == job.recording, f"the hook was told {told!r} for {job.recording!r}"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_quick_failing_hook_is_counted_failed_not_spawn_error(tmp_path: Path, loop: str) -> None:
    # A hook that checks something and exits 3 at once, its stdin unread: `hook.failed` (exit code, stderr
    # tail) is what the operator needs; a `spawn_error` says the command could not start at all.
    jobs = [HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b'{"id": 1}')
            for i in range(20)]
    outcomes = run_hooks(loop, ("/bin/sh", "-c", "echo no CRM token >&2; exit 3"), jobs)
    assert outcomes.count("failed") == 20, {o: outcomes.count(o) for o in set(outcomes)}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_hook_that_ignores_stdin_is_not_killed(tmp_path: Path, loop: str) -> None:
    marker = tmp_path / "m"
    jobs = [HookJob(recording=str(i), path=tmp_path / f"{i}.wav", sha256="0" * 64, sidecar=b'{"id": 1}')
            for i in range(4)]
    outcomes = run_hooks(loop, ("/bin/sh", "-c", f"exec 0<&-; sleep 0.5; echo x >> {marker}"), jobs)
    assert outcomes.count("ok") == 4 and marker.read_text().count("x") == 4, outcomes
