"""Running as a service: sd_notify and its watchdog, /livez /readyz /metrics, the health command."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from daemon.clock import SystemClock
from daemon.config import load_config
from daemon.runner import run_pipeline
from daemon.service import Health, SdNotify
from tests.conftest import REPO, SimFactory, cli_env, run_cli, simulator_subprocess, write_config


class NotifySocket:
    """A real datagram socket standing in for systemd: records (time, message) as they arrive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def lines(self) -> list[str]:
        return [line for _, msg in self.messages for line in msg.splitlines()]

    def times_of(self, line: str) -> list[float]:
        return [t for t, msg in self.messages if line in msg.splitlines()]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def _wait(predicate, limit_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_run_speaks_sd_notify_ready_watchdog_stopping_in_order(tmp_path: Path, notify_socket: NotifySocket) -> None:
    with simulator_subprocess("--count", "3") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001, 1002]}})
        env = cli_env(NOTIFY_SOCKET=str(notify_socket.path), WATCHDOG_USEC="400000")
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait(lambda: len(notify_socket.times_of("WATCHDOG=1")) >= 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = notify_socket.lines()
    first = {key: next(i for i, ln in enumerate(lines) if ln == key) for key in ("READY=1", "WATCHDOG=1",
                                                                              "STOPPING=1")}
    assert first["READY=1"] < first["STOPPING=1"]
    assert any(ln.startswith("STATUS=done") for ln in lines)
    pings = notify_socket.times_of("WATCHDOG=1")
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0  # fed at half the interval


async def test_the_watchdog_pings_stop_while_the_event_loop_is_blocked(start_sim: SimFactory, tmp_path: Path,
                                                                      notify_socket: NotifySocket) -> None:
    sim = await start_sim(count=1)
    cfg = write_config(tmp_path, sim.base_url)
    notify = SdNotify({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"})
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False, notify=notify))
    while len(notify_socket.times_of("WATCHDOG=1")) < 3:
        await asyncio.sleep(0.02)
    blocked_at = time.monotonic()
    time.sleep(1.0)  # the point: a blocked event loop
    unblocked_at = time.monotonic()
    while not [t for t in notify_socket.times_of("WATCHDOG=1") if t > unblocked_at]:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 20)
    during = [t for t in notify_socket.times_of("WATCHDOG=1") if blocked_at + 0.05 < t < unblocked_at]
    assert during == []
    assert notify_socket.lines().count("STOPPING=1") == 1


def test_the_watchdog_is_withheld_when_the_scheduler_stops_turning() -> None:
    clock = SystemClock()
    health = Health(clock)
    assert health.alive(1.0)  # starting

    class Stuck:
        paused = False
        last_turn_at = clock.monotonic() - 10
    class Idle:
        last_chunk_at = 0.0
    health.pipeline = type("P", (), {"scheduler": Stuck(), "downloader": Idle()})()  # type: ignore[assignment]
    assert not health.alive(1.0)
    Stuck.paused = True  # paused by choice (PBX down): still alive
    assert health.alive(1.0)


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        return r.status, await r.text()


def _metric(text: str, name: str) -> float:
    """The value of the sample named exactly ``name`` (labels included) in Prometheus text."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in metrics")


async def test_health_and_metrics_move_during_a_real_run_and_readiness_follows_the_pbx(
        start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=12, size_min=200_000, size_max=200_000, bytes_per_second=1_000_000)
    port = int(sim.base_url.rsplit(":", 1)[1])
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [r.id for r in sim.recordings]}, "downloads": {"workers": 2, "pause_max_s": 0.3},
        "service": {"listen": "127.0.0.1:0", "pbx_probe_interval_s": 0.2}})
    health = Health(SystemClock())
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False, health=health))
    while health.listen_port == 0 or health.pipeline is None:
        await asyncio.sleep(0.02)
    base = f"http://127.0.0.1:{health.listen_port}"
    async with aiohttp.ClientSession() as http:
        assert (await _get(http, f"{base}/livez"))[0] == 200
        while True:
            status, first = await _get(http, f"{base}/metrics")
            if _metric(first, 'yeastar_archiver_recordings_total{result="downloaded"}') >= 2:
                break
            await asyncio.sleep(0.05)
        while True:
            _, second = await _get(http, f"{base}/metrics")
            if _metric(second, 'yeastar_archiver_recordings_total{result="downloaded"}') == 12:
                break
            await asyncio.sleep(0.05)
        assert _metric(second, "yeastar_archiver_archived_bytes_total") > _metric(
            first, "yeastar_archiver_archived_bytes_total")
        assert _metric(second, "yeastar_archiver_download_seconds_count") == 12
        assert _metric(second, "yeastar_archiver_resolve_seconds_count") >= 12
        assert "yeastar_archiver_queue_depth" in second and "yeastar_archiver_token_refreshes_total" in second
        status, body = await _get(http, f"{base}/readyz")
        assert status == 200 and json.loads(body)["ready"] is True

        await sim.stop()                                   # the PBX goes away
        while (await _get(http, f"{base}/readyz"))[0] != 503:
            await asyncio.sleep(0.05)
        status, body = await _get(http, f"{base}/readyz")
        reasons = json.loads(body)["checks"]
        assert reasons["pbx"]["ok"] is False and reasons["archive"]["ok"] is True and "reason" in reasons["pbx"]
        assert (await _get(http, f"{base}/livez"))[0] == 200   # not ready, but alive: no restart
        await sim.start("127.0.0.1", port)                  # and comes back
        while (await _get(http, f"{base}/readyz"))[0] != 200:
            await asyncio.sleep(0.05)
        bodies = [(await _get(http, f"{base}/{path}"))[1] for path in ("livez", "readyz", "metrics")]
    stop.set()
    await asyncio.wait_for(task, 20)
    secrets = [sim.opts.client_secret, *sim.tokens, *(t.refresh_token for t in sim.tokens.values())]
    assert not [s for s in secrets for b in bodies if s in b]


def test_health_command_exit_codes(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "1") as base_url:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = write_config(tmp_path, base_url, extra={"service": {"listen": f"127.0.0.1:{port}"}})
        assert run_cli("health", "-c", str(cfg)).returncode == 1       # nothing listens yet
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait(lambda: run_cli("health", "-c", str(cfg)).returncode == 0)
            (tmp_path / "second").mkdir()
            taken = run_cli("run", "-c", str(write_config(tmp_path / "second", base_url, extra={
                "service": {"listen": f"127.0.0.1:{port}"}, "archive": {"dir": str(tmp_path / "a2")}})))
            assert taken.returncode == 2 and "service.listen" in taken.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_notify_socket_addresses() -> None:
    assert SdNotify({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    assert SdNotify({"NOTIFY_SOCKET": "/run/x"}).address == "/run/x"
    assert SdNotify({}).address == ""
    assert SdNotify({"WATCHDOG_USEC": "4000000"}).watchdog_s == 4.0
    assert SdNotify({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s is None


def _first_after(lines: list[str], line: str, after: int) -> int:
    return next(i for i, ln in enumerate(lines) if i > after and ln == line)


def _notified_run(cfg: Path, notify_socket: NotifySocket) -> subprocess.Popen[str]:
    """A real ``run`` speaking sd_notify to ``notify_socket``, once it has said READY=1."""
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO,
                            env=cli_env(NOTIFY_SOCKET=str(notify_socket.path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: "READY=1" in notify_socket.lines())
    return proc


def test_sighup_reload_speaks_reloading_with_monotonic_usec_then_ready(tmp_path: Path,
                                                                     notify_socket: NotifySocket) -> None:
    """Type=notify-reload semantics: each SIGHUP is RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, µs,
    taken after the signal) and then READY=1 once the new config is in force, or refused: a refused file
    must not leave the unit "reloading" for good."""
    import yaml

    from daemon.service import monotonic_usec
    with simulator_subprocess("--count", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}})
        proc = _notified_run(cfg, notify_socket)
        data = yaml.safe_load(cfg.read_text())
        data["logging"]["level"] = "debug"
        cfg.write_text(yaml.safe_dump(data))
        before = monotonic_usec()
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: notify_socket.lines().count("READY=1") >= 2)
        after = monotonic_usec()
        cfg.write_text("pbx: [not, a, mapping\n")
        proc.send_signal(signal.SIGHUP)
        _wait(lambda: notify_socket.lines().count("READY=1") >= 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = notify_socket.lines()
    ready = lines.index("READY=1")
    reloads = [i for i, ln in enumerate(lines) if ln == "RELOADING=1"]
    assert len(reloads) == 2 and reloads[0] > ready
    for at in reloads:
        assert lines[at + 1].startswith("MONOTONIC_USEC=")   # in the same datagram, right after it
        assert _first_after(lines, "READY=1", at) < (reloads[1] if at == reloads[0] else len(lines))
    assert before <= int(lines[reloads[0] + 1].split("=", 1)[1]) <= after
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "config.reloaded" in events and "config.reload_failed" in events


def test_the_start_up_reconcile_asks_systemd_for_more_time_before_ready(tmp_path: Path,
                                                                       notify_socket: NotifySocket) -> None:
    """EXTEND_TIMEOUT_USEC= goes out as the start-up reconcile begins, so that TimeoutStartSec= need not
    cover a long walk over a big archive."""
    from daemon.service import START_EXTEND_S
    with simulator_subprocess("--count", "1") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}})
        proc = _notified_run(cfg, notify_socket)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = notify_socket.lines()
    extend = lines.index(f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_S * 1_000_000)}")
    assert extend < lines.index("READY=1")


def _datagrams(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.parametrize("turns", [0, 3])
async def test_extend_start_timeout_asks_for_three_intervals_every_interval_until_done(tmp_path: Path,
                                                                                      turns: int) -> None:
    """One request at once, one more each interval of the (virtual) clock, none after ``done``."""
    from daemon.clock import ManualClock
    from daemon.service import extend_start_timeout
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        clock, done = ManualClock(), asyncio.Event()
        if turns == 0:
            done.set()
        task = asyncio.create_task(extend_start_timeout(SdNotify({"NOTIFY_SOCKET": str(path)}), clock, done,
                                                        interval_s=5.0))
        start = clock.monotonic()
        while clock.monotonic() - start < turns * 5.0:
            await asyncio.sleep(0)
        done.set()
        await task
        elapsed_turns = round((clock.monotonic() - start) / 5.0)
        messages = _datagrams(sock)
    assert set(messages) == {"EXTEND_TIMEOUT_USEC=15000000\nSTATUS=reconciling the ledger with the archive"}
    assert elapsed_turns >= turns
    assert len(messages) in (elapsed_turns, elapsed_turns + 1)   # the last sleep may be cut short by done


async def test_extend_start_timeout_is_silent_outside_systemd() -> None:
    from daemon.clock import ManualClock
    from daemon.service import extend_start_timeout
    clock = ManualClock()
    await extend_start_timeout(SdNotify({}), clock, asyncio.Event())   # returns: never waits for done
    assert clock.monotonic() == 1000.0
