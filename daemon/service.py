"""Service plumbing for unattended runs: sd_notify and its watchdog, health and metrics over HTTP."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.clock import Clock, sleep_or_stop
from daemon.logs import redact_text

if TYPE_CHECKING:
    from daemon.live import Pipeline

log = structlog.get_logger("daemon.service")

PBX_PAUSE_REASONS = frozenset({"PbxUnavailableError", "TlsError", "TokenLimitError", "PbxBusyError",
                               "FatalAuthError"})


class SdNotify:
    """The sd_notify protocol: datagrams to ``$NOTIFY_SOCKET`` (a path, or ``@abstract``). No-op without it."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + path[1:]) if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        for_us = not pid or (pid.isdigit() and int(pid) == os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and for_us else None

    def send(self, *fields: str) -> None:
        """Send ``READY=1``, ``STATUS=...`` etc.; a failure is logged, never raised."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall("\n".join(fields).encode())
        except OSError as exc:
            log.warning("sd_notify.failed", error=str(exc))


async def feed_watchdog(notify: SdNotify, alive: Callable[[], bool], clock: Clock, stop: asyncio.Event) -> None:
    """``WATCHDOG=1`` at half the watchdog interval, only while ``alive()``. A blocked event loop cannot
    run this task, so the pings stop and systemd restarts the service."""
    if notify.watchdog_s is None:
        return
    interval = notify.watchdog_s / 2
    while not stop.is_set():
        if alive():
            notify.send("WATCHDOG=1")
        else:
            log.warning("watchdog.withheld", reason="the scheduler has made no progress")
        await sleep_or_stop(clock, interval, stop)


@dataclass
class Health:
    """What the health endpoints and the watchdog read; the runner fills it in as it goes."""

    clock: Clock
    pipeline: Pipeline | None = None
    counts: dict[str, int] = field(default_factory=dict)
    counts_ok: bool = False
    stopping: bool = False
    listen_port: int = 0

    def alive(self, window_s: float) -> bool:
        """The scheduler turned, moved bytes, or is paused or idle by choice, within ``window_s``."""
        p = self.pipeline
        if p is None:
            return True  # starting: reconciliation runs on the ledger thread, the loop is free
        last = max(p.scheduler.last_turn_at, p.downloader.last_chunk_at)
        return p.scheduler.paused or self.clock.monotonic() - last < window_s

    def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """(ready, checks): ledger open, archive writable, PBX authenticated and answering."""
        p = self.pipeline
        if p is None or self.stopping:
            reason = "shutting down" if self.stopping else "starting"
            return False, {"pipeline": {"ok": False, "reason": reason}}
        checks: dict[str, dict[str, Any]] = {}
        checks["ledger"] = {"ok": self.counts_ok}
        writable = os.access(p.downloader.archive.root, os.W_OK)
        disk_paused = p.scheduler.paused and p.scheduler.pause_reason == "StorageError"
        checks["archive"] = {"ok": writable and not disk_paused,
                             **({"reason": "the archive cannot be written (disk full or read-only)"}
                                if not writable or disk_paused else {})}
        client = p.downloader.client
        fatal = client.tokens.fatal or p.scheduler.fatal
        pbx_ok = fatal is None and client.health.ok and not (
            p.scheduler.paused and p.scheduler.pause_reason in PBX_PAUSE_REASONS)
        pbx: dict[str, Any] = {"ok": pbx_ok, "authenticated": client.tokens.authenticated}
        if fatal is not None:
            pbx["reason"] = redact_text(str(fatal))
        elif not pbx_ok:
            pbx["reason"] = redact_text(client.health.error or f"paused: {p.scheduler.pause_reason}")
        checks["pbx"] = pbx
        return all(c["ok"] for c in checks.values()), checks


class PipelineCollector(Collector):
    """Prometheus metrics read from the live pipeline at scrape time."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        p = self.health.pipeline
        if p is None:
            return
        stats = p.scheduler.stats
        results = CounterMetricFamily("yeastar_archiver_recordings", "Recordings by result in this process",
                                      labels=["result"])
        for result, value in (("downloaded", stats.downloaded), ("adopted", stats.adopted),
                              ("failed", stats.failed), ("missing", stats.missing), ("retried", stats.retried)):
            results.add_metric([result], value)
        yield results
        yield CounterMetricFamily("yeastar_archiver_archived_bytes", "Bytes archived by this process",
                                  value=stats.bytes)
        depth = GaugeMetricFamily("yeastar_archiver_queue_depth", "Ledger rows by state", labels=["state"])
        for state, n in self.health.counts.items():
            depth.add_metric([state], n)
        yield depth
        yield GaugeMetricFamily("yeastar_archiver_transfers_in_flight", "File transfers running now",
                                value=p.downloader.in_flight)
        client = p.downloader.client
        yield CounterMetricFamily("yeastar_archiver_token_refreshes", "Access tokens renewed by refresh",
                                  value=client.tokens.refreshes)
        yield CounterMetricFamily("yeastar_archiver_logins", "Fresh logins (get_token)", value=client.tokens.logins)
        errors = CounterMetricFamily("yeastar_archiver_pbx_errors", "PBX answers with a non-zero errcode",
                                     labels=["errcode"])
        for errcode, n in sorted(client.errcodes.items()):
            errors.add_metric([str(errcode)], n)
        yield errors
        yield GaugeMetricFamily("yeastar_archiver_last_success_timestamp_seconds",
                                "Unix time of the last recording archived", value=p.scheduler.last_success_wall)
        paused = GaugeMetricFamily("yeastar_archiver_paused", "1 while the pipeline is paused, by reason",
                                   labels=["reason"])
        paused.add_metric([p.scheduler.pause_reason or "none"], 1 if p.scheduler.paused else 0)
        yield paused
        ready, _ = self.health.readiness()
        yield GaugeMetricFamily("yeastar_archiver_ready", "1 when /readyz says ready", value=1 if ready else 0)


class Metrics:
    """One registry per process (not the global one: tests run many pipelines in one interpreter)."""

    def __init__(self, health: Health) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PipelineCollector(health))
        self.resolve_seconds = Histogram(
            "yeastar_archiver_resolve_seconds", "recording/download calls (download URL), seconds",
            registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.download_seconds = Histogram(
            "yeastar_archiver_download_seconds", "One recording from claim to commit, seconds",
            registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/livez``, ``/readyz`` and ``/metrics`` on ``service.listen``. Bodies carry no secret."""

    def __init__(self, health: Health, metrics: Metrics) -> None:
        self.health = health
        self.metrics = metrics
        app = web.Application()
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/healthz", self.livez)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.port = 0

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), int(port))
        await site.start()
        self.port = self._runner.addresses[-1][1]
        self.health.listen_port = self.port
        log.info("service.listening", listen=f"{host}:{self.port}")

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def livez(self, _request: web.Request) -> web.Response:
        # Answering at all proves the event loop turns; that is what liveness means here.
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        ready, checks = self.health.readiness()
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics_handler(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
