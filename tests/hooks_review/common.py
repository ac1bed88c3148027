"""What the hooks review's live runs share: a clock that makes the background verify's walks come
soon, and a bounded wait for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from daemon.clock import SystemClock

VERIFY_INTERVAL = 61.0   # the smallest the config allows is 60 s; the clock below makes it short


class FastVerifyClock(SystemClock):
    """The real clock, except that the background verify's wait between walks is 0.3 s."""

    async def sleep(self, seconds: float) -> None:
        await super().sleep(0.3 if seconds == VERIFY_INTERVAL else seconds)


async def until(what: Callable[[], bool], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
