"""Long-lived loops: each says how it is doing, and one that fails is restarted with back-off, never lost.

Discovery, the queue tail, the status reporter and the PBX probe run for months. A loop reports each
turn (``Loops.ok`` / ``Loops.failed``); readiness, ``status`` and the metrics read the same registry,
so a loop that keeps failing (the ledger's disk full, a lock held too long, a bug) shows there at
once instead of dying silently until the next restart.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from daemon.clock import Clock, sleep_or_stop
from daemon.errors import PbxBusyError, PbxUnavailableError, TokenLimitError
from daemon.logs import redact_text

log = structlog.get_logger("daemon.supervise")

RESTART_BASE_S = 1.0
RESTART_MAX_S = 60.0


def restart_delay(failures: int, rand: float, cap_s: float = RESTART_MAX_S) -> float:
    """Back-off before restarting a loop after ``failures`` failures in a row: doubling, half jittered. Pure."""
    grown = min(cap_s, RESTART_BASE_S * 2.0 ** max(0, failures - 1))
    return grown * (0.5 + rand / 2)


@dataclass
class LoopState:
    """How one loop is doing."""

    ok: bool = True
    failures: int = 0              # in a row
    failures_total: int = 0
    failing_since: float | None = None
    error: str | None = None
    pbx: bool = False              # the last failure was the PBX's (readiness already says so)


class Loops:
    """The registry of long-lived loops and their health."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.states: dict[str, LoopState] = {}

    def register(self, name: str) -> None:
        self.states.setdefault(name, LoopState())

    def ok(self, name: str) -> None:
        state = self.states.setdefault(name, LoopState())
        if not state.ok:
            log.info("loop.recovered", loop=name, failures=state.failures)
        state.ok, state.failures, state.failing_since, state.error, state.pbx = True, 0, None, None, False

    def failed(self, name: str, exc: BaseException) -> int:
        """Record a failed turn; returns how many turns in a row have failed."""
        state = self.states.setdefault(name, LoopState())
        if state.ok:
            state.failing_since = self.clock.monotonic()
        state.ok = False
        state.failures += 1
        state.failures_total += 1
        state.error = redact_text(f"{type(exc).__name__}: {exc}")[:300]
        state.pbx = isinstance(exc, PbxUnavailableError | PbxBusyError | TokenLimitError)
        return state.failures

    def failing(self, *, local_only: bool = False) -> dict[str, LoopState]:
        """Loops whose last turn failed; ``local_only`` leaves out PBX trouble (the PBX check covers it)."""
        return {name: s for name, s in self.states.items() if not s.ok and not (local_only and s.pbx)}


async def supervise(name: str, make: Callable[[], Awaitable[None]], loops: Loops, clock: Clock,
                    stop: asyncio.Event, *, rand: Callable[[], float] = random.random) -> None:
    """Run ``make()`` until it returns or ``stop`` is set. An exception that escapes it is logged,
    shown in ``loops``, and the loop started again after a growing back-off: a source never dies."""
    loops.register(name)
    while not stop.is_set():
        try:
            await make()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures = loops.failed(name, exc)
            delay = restart_delay(failures, rand())
            log.exception("loop.failed", loop=name, failures=failures, restart_in_s=round(delay, 1))
            if await sleep_or_stop(clock, delay, stop):
                return
