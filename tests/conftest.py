"""Shared fixtures: the simulator as a real server on loopback, configs pointing at it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon.clock import Clock
from daemon.config import PbxConfig, Secret, TlsConfig
from daemon.simulator import SimOptions, Simulator

REPO = Path(__file__).resolve().parent.parent


def pbx_config(base_url: str, *, secret: str = SimOptions.client_secret, client_id: str = SimOptions.client_id,
               **overrides: Any) -> PbxConfig:
    """A PbxConfig for the simulator: fast pacing, short timeouts."""
    fields: dict[str, Any] = {"requests_per_second": 1000.0, "timeout_s": 5.0, "tls": TlsConfig()}
    fields.update(overrides)
    return PbxConfig(base_url=base_url, client_id=client_id, client_secret=Secret(secret), **fields)


SimFactory = Callable[..., Any]


@pytest.fixture
async def start_sim() -> AsyncIterator[SimFactory]:
    """``await start_sim(clock=None, **options)`` -> a started Simulator on 127.0.0.1, stopped afterwards."""
    started: list[Simulator] = []

    async def start(clock: Clock | None = None, ssl_context: Any = None, **options: Any) -> Simulator:
        sim = Simulator(SimOptions(**options), clock=clock)
        await sim.start("127.0.0.1", 0, ssl_context=ssl_context)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.stop()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YEASTAR_ARCHIVER")}
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m daemon ARGS`` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(), cwd=cwd or REPO, check=False)
