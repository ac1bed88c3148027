"""The injected clock: monotonic time for expiry and back-off, wall time for records."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What the archiver asks of time. Tests substitute ``ManualClock``."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; only differences mean anything."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch, for timestamps shown to people and stored on disk."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told to.

    With ``auto_advance`` (the default) ``sleep`` moves the clock forward itself and returns at once:
    virtual time, so that pacing and back-off never make a test wait. Without it, ``sleep`` returns
    once ``advance`` passes its deadline.
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0, *,
                 auto_advance: bool = True) -> None:
        self._now = start
        self._auto_advance = auto_advance
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0 or self._auto_advance:
            self.advance(max(0.0, seconds))
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._now += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self._now]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)


async def sleep_or_stop(clock: Clock, seconds: float, *events: asyncio.Event) -> bool:
    """Sleep ``seconds`` on ``clock``, returning early when any event is set. True if one was set."""
    if any(e.is_set() for e in events):
        return True
    waiters = {asyncio.ensure_future(e.wait()) for e in events}
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({sleeper, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, *waiters):
            task.cancel()
        await asyncio.gather(sleeper, *waiters, return_exceptions=True)
    return any(e.is_set() for e in events)
