"""Item 3, end to end: `once` (service.event_loop: auto -> uvloop, the shipped default) with a hook that
does not read its stdin (`/bin/true`): every run should be `hook.completed`; under uvloop most are
`hook.error` with a RuntimeError traceback (counted spawn_error), although each hook ran and exited 0."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, simulator_subprocess, write_config

N = 10


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_once_hook_that_ignores_stdin_completes(tmp_path: Path, loop: str) -> None:
    with simulator_subprocess("--count", str(N)) as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": list(range(1000, 1000 + N))},
                                                      "hooks": {"on_archived": ["/bin/true"]},
                                                      "service": {"event_loop": loop}})
        result = run_cli("once", "-c", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events if e["event"].startswith("hook.")]
    assert kinds.count("hook.completed") == N, {k: kinds.count(k) for k in set(kinds)}
