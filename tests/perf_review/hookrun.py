"""Run a HookRunner to its end on asyncio's own loop or on uvloop, for the hook tests of this folder."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import uvloop

from daemon.config import HooksConfig
from daemon.hooks import HookJob, HookRunner

LOOPS = ["asyncio", "uvloop"]


def run_hooks(loop: str, argv: Sequence[str], jobs: list[HookJob], *, timeout_s: float = 5.0,
              grace_s: float = 1.0, max_concurrent: int = 4,
              during: Callable[[HookRunner, asyncio.Event], Awaitable[None]] | None = None) -> list[str]:
    """Submit ``jobs``, await ``during(runner, stop)`` if given, close with drain; the outcomes counted."""
    outcomes: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        r = HookRunner(HooksConfig(on_archived=tuple(argv), max_concurrent=max_concurrent, timeout_s=timeout_s),
                       outcomes.append, grace_s=grace_s, stop=stop)
        r.start()
        for job in jobs:
            r.submit(job)
        if during is not None:
            await during(r, stop)
        await r.close(drain=True)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        runner.run(main())
    return outcomes
