"""Service plumbing for unattended runs: sd_notify and its watchdog, health and metrics over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.clock import Clock, sleep_or_stop
from daemon.discovery import KV_LAST_POLL, KV_LAST_SWEEP
from daemon.hooks import OUTCOMES as HOOK_OUTCOMES
from daemon.logs import redact_text
from daemon.supervise import Loops
from daemon.verify import KV_LAST_REPORT, KV_LAST_RUN

if TYPE_CHECKING:
    from daemon.ledger import Ledger, LedgerDb
    from daemon.live import Pipeline

log = structlog.get_logger("daemon.service")

# The reasons a pause is reported under, in /metrics (``paused{reason}``) and the alert rules. A fixed
# set: a new exception class must never turn into a new, unalerted label value.
PAUSE_REASONS = ("pbx_unreachable", "pbx_busy", "certificate", "token_limit", "credentials", "storage", "other")
PBX_PAUSES = frozenset({"pbx_unreachable", "pbx_busy", "certificate", "token_limit", "credentials"})
_PAUSE_LABELS = {
    "PbxUnavailableError": "pbx_unreachable",
    "PbxBusyError": "pbx_busy",
    "PbxServerError": "pbx_busy",  # a 5xx: the same alert as busy, the documented label set unchanged
    "TlsError": "certificate",
    "TokenLimitError": "token_limit",
    "FatalAuthError": "credentials",
    "StorageError": "storage",
    "LedgerError": "storage",      # the ledger's disk full, or a lock held too long
}


def pause_label(reason: str | None) -> str:
    """The documented reason value for the scheduler's ``pause_reason`` (an exception class name):
    one of PAUSE_REASONS, or ``none`` when not paused. Pure; tested as a table."""
    if reason is None:
        return "none"
    return _PAUSE_LABELS.get(reason, "other")


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


# While the start-up reconcile runs (it walks the whole archive: long on a big one) systemd is asked for
# this much more time, again every START_EXTEND_INTERVAL_S: TimeoutStartSec= then only has to cover the
# rest of the start. Three intervals, so that one late message never lets the timeout strike.
START_EXTEND_INTERVAL_S = 20.0
START_EXTEND_S = 3 * START_EXTEND_INTERVAL_S


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares ``MONOTONIC_USEC=`` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading_fields(now_usec: int) -> tuple[str, str]:
    """What a reload announces before it starts (Type=notify-reload semantics): ``READY=1`` ends it."""
    return "RELOADING=1", f"MONOTONIC_USEC={now_usec}"


def extend_timeout_field(seconds: float) -> str:
    """``EXTEND_TIMEOUT_USEC=``: systemd's start (or stop) timeout becomes now plus ``seconds``."""
    return f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}"


async def extend_start_timeout(notify: SdNotify, clock: Clock, done: asyncio.Event,
                               interval_s: float = START_EXTEND_INTERVAL_S) -> None:
    """Until ``done`` is set, ask systemd for three more ``interval_s`` every ``interval_s``: the first
    at once. Used around the start-up reconcile, which runs on the ledger's thread and leaves the event
    loop free to send these; a no-op outside systemd."""
    if not notify.address:
        return
    while True:
        notify.send(extend_timeout_field(3 * interval_s), "STATUS=reconciling the ledger with the archive")
        if await sleep_or_stop(clock, interval_s, done):
            return


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
    """What the health endpoints, the metrics and the watchdog read; the runner fills it in as it goes."""

    clock: Clock
    pipeline: Pipeline | None = None
    loops: Loops = field(init=False)
    counts: dict[str, int] = field(default_factory=dict)
    counts_ok: bool = False
    stopping: bool = False
    listen_port: int = 0
    # Read from the ledger, so that they survive a restart (a staleness alert must not fire after each).
    last_done_at: float | None = None          # the newest done_at when this process started
    oldest_waiting_at: float | None = None     # created_at of the longest-waiting row
    last_poll_at: float | None = None          # discovery, from its checkpoint
    last_sweep_at: float | None = None
    notify_failures: int = 0                   # webhook messages given up on after every try
    verify_last_run_at: float | None = None    # the last finished verify walk (any process), from the ledger
    verify_problems: int | None = None         # what that walk found
    verify_checked: int | None = None          # and how many recordings it checked
    copy_counts: dict[str, dict[str, int]] = field(default_factory=dict)   # destination -> copy state -> n
    _refreshed: bool = False

    async def refresh(self, ledger: Ledger) -> None:
        """Re-read the ledger's counts, the longest wait and discovery's checkpoints, in one trip to the
        ledger thread (a scan of the waiting rows, like the counts). Raises what the ledger raises."""
        first = self._refreshed is False

        def read(db: LedgerDb) -> dict[str, Any]:
            out: dict[str, Any] = {"counts": db.counts(), "oldest": db.oldest_waiting_since(),
                                   "poll": db.kv_get(KV_LAST_POLL), "sweep": db.kv_get(KV_LAST_SWEEP),
                                   "verified": db.kv_get(KV_LAST_RUN), "report": db.kv_get(KV_LAST_REPORT),
                                   "copies": db.copy_counts()}
            if first:  # done rows only grow: one scan at start; the scheduler tracks the rest
                out["last_done"] = db.last_done_at()
            return out
        facts = await ledger.call(read)
        self.counts = facts["counts"]
        self.oldest_waiting_at = facts["oldest"]
        self.last_poll_at = _float_or_none(facts["poll"])
        self.last_sweep_at = _float_or_none(facts["sweep"])
        self.verify_last_run_at = _float_or_none(facts["verified"])
        self.verify_problems = _report_figure(facts["report"], "problems")
        self.verify_checked = _report_figure(facts["report"], "checked")
        self.copy_counts = facts["copies"]
        if first:
            self.last_done_at = facts["last_done"]
            self._refreshed = True

    def pause(self) -> str:
        """The documented reason the pipeline is paused now (PAUSE_REASONS), or ``none``."""
        p = self.pipeline
        if p is None or not (p.scheduler.paused or p.scheduler.fatal is not None):
            return "none"
        return pause_label(p.scheduler.pause_reason or ("FatalAuthError" if p.scheduler.fatal else None))

    def __post_init__(self) -> None:
        self.loops = Loops(self.clock)

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
        ledger_paused = p.scheduler.paused and p.scheduler.pause_reason == "LedgerError"
        checks["ledger"] = {"ok": self.counts_ok and not ledger_paused,
                            **({"reason": "the ledger cannot be written (disk full, or locked too long)"}
                               if ledger_paused or not self.counts_ok else {})}
        writable = os.access(p.downloader.archive.root, os.W_OK)
        paused = self.pause()
        disk_paused = paused == "storage"
        checks["archive"] = {"ok": writable and not disk_paused,
                             **({"reason": "the archive cannot be written (disk full or read-only)"}
                                if not writable or disk_paused else {})}
        client = p.downloader.client
        fatal = client.tokens.fatal or p.scheduler.fatal
        pbx_ok = fatal is None and client.health.ok and paused not in PBX_PAUSES
        pbx: dict[str, Any] = {"ok": pbx_ok, "authenticated": client.tokens.authenticated}
        if fatal is not None:
            pbx["reason"] = redact_text(str(fatal))
        elif p.scheduler.paused and p.scheduler.pause_reason == "TlsError":
            pbx["reason"] = "certificate: the PBX's TLS certificate is not trusted (set pbx.tls.ca_file)"
        elif not pbx_ok:
            pbx["reason"] = redact_text(client.health.error or f"paused: {paused}")
        checks["pbx"] = pbx
        copier = p.copier
        if copier is not None:
            # Until a copy works again (the pause itself is short between two tries).
            trouble = copier.fatal is not None or copier.pause_reason is not None
            checks["s3"] = {"ok": not trouble, **({"reason": redact_text(copier.last_error or str(copier.pause_reason))}
                                                  if trouble else {})}
        failing = self.loops.failing()
        local = self.loops.failing(local_only=True)
        checks["loops"] = {"ok": not local,
                           **({"failing": {name: {"error": st.error, "failures": st.failures}
                                           for name, st in failing.items()}} if failing else {})}
        return all(c["ok"] for c in checks.values()), checks


def _float_or_none(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _report_figure(report: str | None, key: str) -> int | None:
    try:
        return int(json.loads(report or "")[key])
    except (ValueError, TypeError, KeyError):
        return None


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"yeastar_archiver_{name}", text, value=value)


class PipelineCollector(Collector):
    """Prometheus metrics read from the live pipeline at scrape time (on a worker thread)."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        version = GaugeMetricFamily("yeastar_archiver_build_info", "The archiver's version; always 1",
                                    labels=["version"])
        version.add_metric([__version__], 1)
        yield version
        p = self.health.pipeline
        if p is None:
            return
        cfg = p.scheduler.cfg
        stats = p.scheduler.stats
        now = self.health.clock.wall()
        results = CounterMetricFamily("yeastar_archiver_recordings",
                                      "Recordings that ended an attempt in this process, by outcome",
                                      labels=["result"])
        for result, value in (("downloaded", stats.downloaded), ("adopted", stats.adopted),
                              ("failed", stats.failed), ("missing", stats.missing)):
            results.add_metric([result], value)
        yield results
        yield CounterMetricFamily("yeastar_archiver_retries", "Attempts that failed and were scheduled again",
                                  value=stats.retried)
        yield CounterMetricFamily("yeastar_archiver_archived_bytes", "Bytes archived by this process",
                                  value=stats.bytes)
        counts = self.health.counts
        depth = GaugeMetricFamily("yeastar_archiver_queue_depth",
                                  "Ledger rows not archived, by state (failed and missing wait for an operator)",
                                  labels=["state"])
        for state in ("pending", "in_progress", "failed", "missing"):
            depth.add_metric([state], counts.get(state, 0))
        yield depth
        yield _gauge("recordings_archived", "Recordings archived in the ledger, all time", counts.get("done", 0))
        oldest = self.health.oldest_waiting_at
        yield _gauge("oldest_pending_age_seconds", "How long the longest-waiting recording has been queued (0: none)",
                     0.0 if oldest is None else max(0.0, now - oldest))
        yield _gauge("transfers_in_flight", "File transfers running now", p.downloader.in_flight)
        try:
            free = p.downloader.archive.free_bytes()
        except OSError:
            pass  # the archive is gone (unmounted): readiness says so; no number is better than a wrong one
        else:
            yield _gauge("archive_free_bytes", "Free bytes on the archive's file system", free)
        yield _gauge("archive_min_free_bytes", "archive.min_free_bytes: downloads pause below this",
                     cfg.archive.min_free_bytes)
        client = p.downloader.client
        up = client.health.up
        if up is not None:
            yield _gauge("pbx_up", "1 when the PBX answered since it was last unreachable", 1 if up else 0)
        yield CounterMetricFamily("yeastar_archiver_pbx_connection_errors",
                                  "Requests that could not reach the PBX (refused, DNS, timeout, TLS)",
                                  value=client.health.connection_errors)
        expires = client.tokens.expires_wall
        if expires is not None:
            yield _gauge("token_expiry_timestamp_seconds", "Unix time the current access token expires", expires)
        yield CounterMetricFamily("yeastar_archiver_token_refreshes", "Access tokens renewed by refresh",
                                  value=client.tokens.refreshes)
        yield CounterMetricFamily("yeastar_archiver_logins", "Fresh logins (get_token)", value=client.tokens.logins)
        errors = CounterMetricFamily("yeastar_archiver_pbx_errors", "PBX answers with a non-zero errcode",
                                     labels=["errcode"])
        for errcode, n in sorted(client.errcodes.items()):
            errors.add_metric([str(errcode)], n)
        yield errors
        last = max(self.health.last_done_at or 0.0, p.scheduler.last_success_wall)
        yield _gauge("last_success_timestamp_seconds", "Unix time the newest recording was archived (0: never)", last)
        paused = GaugeMetricFamily("yeastar_archiver_paused", "1 while the pipeline is paused for this reason",
                                   labels=["reason"])
        reason = self.health.pause()
        for label in PAUSE_REASONS:
            paused.add_metric([label], 1 if reason == label else 0)
        yield paused
        if cfg.sources.discover.enabled:
            if self.health.last_poll_at is not None:
                yield _gauge("discovery_last_poll_timestamp_seconds", "Unix time of the last recording/list poll",
                             self.health.last_poll_at)
            if self.health.last_sweep_at is not None:
                yield _gauge("discovery_last_sweep_timestamp_seconds",
                             "Unix time of the last full listing (sweep or finished back-fill)",
                             self.health.last_sweep_at)
            if cfg.sources.discover.events:
                yield _gauge("events_connected", "1 while the PBX event WebSocket is subscribed",
                             1 if client.events_connected else 0)
        if cfg.notify.url is not None:
            yield CounterMetricFamily("yeastar_archiver_notify_failures",
                                      "Webhook messages given up on after every try", value=self.health.notify_failures)
        yield from self._copies(p)
        yield from self._verify(cfg.verify.interval_s)
        ready, _ = self.health.readiness()
        yield _gauge("ready", "1 when /readyz says ready", 1 if ready else 0)
        loop_up = GaugeMetricFamily("yeastar_archiver_loop_up", "1 while a long-lived loop's last turn worked",
                                    labels=["loop"])
        loop_failures = CounterMetricFamily("yeastar_archiver_loop_failures",
                                            "Failed turns of a long-lived loop", labels=["loop"])
        for name, st in sorted(self.health.loops.states.items()):
            loop_up.add_metric([name], 1 if st.ok else 0)
            loop_failures.add_metric([name], st.failures_total)
        yield loop_up
        yield loop_failures


    def _copies(self, p: Pipeline) -> Iterator[Metric]:
        copier = p.copier
        if copier is None:
            return
        dest = copier.dest.name
        counts = self.health.copy_counts.get(dest, {})
        waiting = GaugeMetricFamily("yeastar_archiver_copies_waiting",
                                    "Off-box copies still to make, by destination and kind (pending: first copy, "
                                    "repair: verify found the copy damaged or gone)", labels=["destination", "state"])
        for state in ("pending", "repair"):
            waiting.add_metric([dest, state], counts.get(state, 0))
        yield waiting
        made = GaugeMetricFamily("yeastar_archiver_copies_verified",
                                 "Off-box copies verified in the destination, all time", labels=["destination"])
        made.add_metric([dest], counts.get("done", 0))
        yield made
        stats = copier.stats
        results = CounterMetricFamily("yeastar_archiver_copies",
                                      "Off-box copy attempts in this process, by outcome (adopted: the object "
                                      "was already there, byte for byte)", labels=["destination", "result"])
        for result, n in (("copied", stats.copied), ("adopted", stats.adopted), ("failed", stats.failed)):
            results.add_metric([dest, result], n)
        yield results
        sent = CounterMetricFamily("yeastar_archiver_copied_bytes", "Bytes uploaded to the destination by this "
                                   "process", labels=["destination"])
        sent.add_metric([dest], stats.bytes)
        yield sent
        up = GaugeMetricFamily("yeastar_archiver_destination_up",
                               "1 while the destination takes copies (0: unreachable, full, refused or "
                               "misconfigured; see /readyz)", labels=["destination"])
        up.add_metric([dest], 0 if copier.fatal is not None or copier.pause_reason is not None else 1)
        yield up

    def _verify(self, interval_s: float) -> Iterator[Metric]:
        if interval_s > 0:
            yield _gauge("verify_interval_seconds", "verify.interval_s: the background verify walk's period",
                         interval_s)
        if self.health.verify_last_run_at is not None:
            yield _gauge("verify_last_run_timestamp_seconds", "Unix time the last verify walk finished (any process)",
                         self.health.verify_last_run_at)
        if self.health.verify_problems is not None:
            yield _gauge("verify_problems", "Damaged or vanished copies the last verify walk found (each was kept "
                         "aside and mended where a good copy existed)", self.health.verify_problems)


class Metrics:
    """One registry per process (not the global one: tests run many pipelines in one interpreter),
    with the standard process_* and python_* collectors beside the archiver's own series."""

    def __init__(self, health: Health) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PipelineCollector(health))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.resolve_seconds = Histogram(
            "yeastar_archiver_resolve_seconds", "recording/download calls (download URL), seconds",
            registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.download_seconds = Histogram(
            "yeastar_archiver_download_seconds", "One recording from claim to commit, seconds",
            registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.hook_runs = Counter(
            "yeastar_archiver_hook_runs", "hooks.on_archived runs by outcome (dropped: the backlog was full)",
            ["outcome"], registry=self.registry)
        for name in HOOK_OUTCOMES:   # every series from the start: an alert on rate() needs the zero
            self.hook_runs.labels(outcome=name)

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
