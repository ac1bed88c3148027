"""Shared fixtures: the simulator as a real server on loopback, configs pointing at it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.clock import Clock
from daemon.config import PbxConfig, Secret, TlsConfig
from daemon.logs import reset_logging
from daemon.simulator import SimOptions, Simulator


def pytest_configure(config: pytest.Config) -> None:
    # asyncio.get_event_loop() makes a loop the first time it is called in the main thread while no loop
    # was ever set; pytest-asyncio calls it around each async test and keeps that loop (never closed) as
    # "the previous one". The first asyncio.run() of a later sync test drops it, and its ResourceWarning
    # fails whichever test the garbage collector happens to run in. Saying "no loop" once stops that.
    asyncio.set_event_loop(None)

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
def _reset_logging() -> Iterator[None]:
    yield
    reset_logging()


def cli_env(**extra: str) -> dict[str, str]:
    # STATE_DIRECTORY too: under a systemd unit it would move every test's ledger into the unit's folder.
    env = {k: v for k, v in os.environ.items() if not k.startswith("YEASTAR_ARCHIVER") and k != "STATE_DIRECTORY"}
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m daemon ARGS`` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(), cwd=cwd or REPO, check=False)


def write_config(tmp_path: Path, base_url: str, *, secret: str = SimOptions.client_secret,
                 extra: dict[str, Any] | None = None) -> Path:
    """A complete config file for the simulator at ``base_url``, archive under ``tmp_path/archive``.

    ``extra`` merges per section, e.g. ``{"downloads": {"workers": 2}}``."""
    import yaml
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    data: dict[str, Any] = {
        "pbx": {"base_url": base_url, "client_id": SimOptions.client_id, "client_secret_file": "client_secret",
                "requests_per_second": 1000, "timeout_s": 5},
        "archive": {"dir": "archive", "min_free_bytes": 0},
        "downloads": {"backoff_base_s": 0.05, "backoff_max_s": 0.3, "pause_max_s": 0.5, "read_timeout_s": 5},
        "service": {"listen": None, "shutdown_grace_s": 5},
        "logging": {"format": "json", "level": "info"},
    }
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    # archive.dir must exist: run and once never create it (an unmounted disk must not become an archive).
    archive_dir = Path(data["archive"]["dir"])
    (archive_dir if archive_dir.is_absolute() else tmp_path / archive_dir).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def archive_files(root: Path) -> dict[str, bytes]:
    """Every regular audio file below ``root`` (relative path -> bytes), hidden files and the ledger excluded."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in rel.parts) \
                and p.suffix in (".wav", ".mp3"):
            out[str(rel)] = p.read_bytes()
    return out


@contextlib.contextmanager
def simulator_subprocess(*args: str) -> Iterator[str]:
    """`yeastar-archiver simulate --port 0 ARGS` as a real subprocess; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "simulate", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=cli_env())
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.match(r"simulator listening on (http://127\.0\.0\.1:\d+)", first)
    assert match, first + (proc.stderr.read() if proc.stderr else "")
    credentials = [proc.stdout.readline() for _ in range(2)]
    assert "client_id:     archiver" in credentials[0]
    assert "client_secret: " in credentials[1]
    try:
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # Never leave it running with open pipes: their warnings would land in a later test.
            proc.kill()
            proc.communicate()
            raise AssertionError("the simulator did not stop within 30 s of SIGTERM") from None
        assert proc.returncode == 0


def sim_counters(base_url: str) -> dict[str, Any]:
    """The simulator's counters, over HTTP."""
    with urllib.request.urlopen(f"{base_url}/_sim/counters", timeout=5) as r:  # noqa: S310 - loopback only
        data: dict[str, Any] = json.loads(r.read())
        return data


async def serve_on_loopback(handler: Any) -> tuple[Any, str]:
    """A one-route aiohttp server on 127.0.0.1 (any method, any path): (runner to clean up, base URL)."""
    from aiohttp import web
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[-1][1]}"
