"""Review V9: failed logins recorded by several processes at once are all counted."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from daemon.clock import SystemClock
from daemon.logins import LoginMemory


def _fail(path: str, barrier: mp.synchronize.Barrier) -> None:  # type: ignore[name-defined]
    mem = LoginMemory(Path(path), "https://127.0.0.1:8088", SystemClock())
    barrier.wait()
    mem.failed("id", "wrong-secret")


def test_v9_concurrent_failures_are_lost(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db.logins"
    lost_rounds = 0
    for _ in range(5):
        path.unlink(missing_ok=True)
        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_fail, args=(str(path), barrier)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        if len(json.loads(path.read_text())["failures"]) < 4:
            lost_rounds += 1
    assert lost_rounds == 0, f"in {lost_rounds} of 5 rounds, 4 concurrent failed logins were recorded as fewer"
