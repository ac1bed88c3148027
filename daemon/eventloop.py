"""The event loop `run` and `once` run on: uvloop when it is installed and not turned off, else asyncio's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:   # `health` and `status` read the config, which names these: no asyncio for them
    import asyncio

EventLoopChoice = Literal["auto", "uvloop", "asyncio"]
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


@dataclass(frozen=True)
class LoopPick:
    """Which loop, why, and (``error``) why the configured one cannot be had."""

    name: Literal["uvloop", "asyncio"]
    reason: str
    error: str | None = None


def pick_loop(choice: EventLoopChoice, uvloop_version: str | None) -> LoopPick:
    """The loop for ``service.event_loop``, given the installed uvloop's version (None: not importable).
    Pure.

    uvloop (libuv, in C) does the sockets' reads and writes without giving the GIL up around each one;
    on the 2,000 small recordings of the bench it took 12 % off both wall time and CPU (docs/benchmarks.md)."""
    if choice == "asyncio":
        return LoopPick("asyncio", "service.event_loop is asyncio")
    if uvloop_version is not None:
        return LoopPick("uvloop", f"uvloop {uvloop_version} is installed"
                        + (" (service.event_loop: auto)" if choice == "auto" else ""))
    if choice == "uvloop":
        return LoopPick("asyncio", "uvloop is not installed",
                        error="service.event_loop: uvloop is not installed in this Python environment "
                              "(pip install uvloop), or set it to auto or asyncio")
    return LoopPick("asyncio", "uvloop is not installed (service.event_loop: auto)")


def uvloop_version() -> str | None:
    """The importable uvloop's version, or None."""
    try:
        import uvloop
    except ImportError:
        return None
    return str(getattr(uvloop, "__version__", "?"))


def loop_factory(pick: LoopPick) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What ``asyncio.Runner`` makes its loop with (None: asyncio's default)."""
    if pick.name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return None
