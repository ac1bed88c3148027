"""/metrics as an operator alerts on it: every series from a live scrape of a real run, honest names,
a fixed set of pause reasons, and figures that survive a restart."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from daemon import __version__
from daemon.clock import ManualClock, SystemClock
from daemon.config import NotifyConfig, load_config
from daemon.ledger import LedgerDb, Ref
from daemon.notify import Notifier
from daemon.runner import run_pipeline
from daemon.service import PAUSE_REASONS, Health, pause_label
from daemon.simulator import Simulator
from daemon.verify import Verifier
from tests.conftest import REPO, SimFactory, serve_on_loopback, write_config
from tests.s3servers import s3_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text scrape: (name, labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def _until(predicate: Callable[[], Awaitable[bool]], limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@dataclass
class LiveRun:
    """A real `run` pipeline serving /metrics on loopback, against the simulator."""

    sim: Simulator
    health: Health
    stop: asyncio.Event
    task: asyncio.Task[Any]
    http: aiohttp.ClientSession

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.health.listen_port}"

    async def scrape(self) -> str:
        async with self.http.get(f"{self.base}/metrics") as r:
            assert r.status == 200
            return await r.text()

    async def samples(self) -> Samples:
        return parse_samples(await self.scrape())


async def start_live_run(sim: Simulator, tmp_path: Path, **extra: Any) -> LiveRun:
    sections: dict[str, Any] = {
        "sources": {"ids": [r.id for r in sim.recordings]},
        "service": {"listen": "127.0.0.1:0", "pbx_probe_interval_s": 0.2},
        "downloads": {"workers": 2, "pause_max_s": 0.3}}
    for key, values in extra.items():
        sections.setdefault(key, {}).update(values)
    cfg = write_config(tmp_path, sim.base_url, extra=sections)
    health = Health(SystemClock())
    stop = asyncio.Event()
    task = asyncio.create_task(run_pipeline(load_config(cfg), stop, once=False, health=health))
    while health.listen_port == 0 or health.pipeline is None:
        assert not task.done(), task
        await asyncio.sleep(0.02)
    return LiveRun(sim, health, stop, task, aiohttp.ClientSession())


@pytest.fixture
async def hook() -> AsyncIterator[str]:
    """A webhook receiver on loopback that accepts everything."""
    async def accept(_request: web.Request) -> web.Response:
        return web.Response(status=204)
    runner, base = await serve_on_loopback(accept)
    yield f"{base}/hook"
    await runner.cleanup()


async def stop_live_run(live: LiveRun) -> None:
    live.stop.set()
    await asyncio.wait_for(live.task, 30)
    await live.http.close()


@pytest.mark.parametrize(("reason", "label"), [
    (None, "none"),
    ("PbxUnavailableError", "pbx_unreachable"),
    ("PbxBusyError", "pbx_busy"),
    ("TlsError", "certificate"),
    ("TokenLimitError", "token_limit"),
    ("FatalAuthError", "credentials"),
    ("StorageError", "storage"),
    ("SomeFutureError", "other"),    # a new exception class never becomes a new label value
])
def test_pause_reasons_map_to_a_fixed_documented_set(reason: str | None, label: str) -> None:
    assert pause_label(reason) == label
    assert label == "none" or label in PAUSE_REASONS


def test_every_pause_reason_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert all(f"`{reason}`" in readme for reason in PAUSE_REASONS)


async def test_a_live_scrape_carries_every_series_an_operator_alerts_on(
        start_sim: SimFactory, tmp_path: Path, hook: str) -> None:
    sim = await start_sim(count=6, size_min=100_000, size_max=100_000)
    sim.control(options={"cut_rate": 1.0})    # every transfer is cut until we have seen retries
    live = await start_live_run(sim, tmp_path, sources={"discover": {"enabled": True, "events": True,
                                                                     "interval_s": 1}},
                                notify={"url": hook})
    try:
        async def retried() -> bool:
            return value(await live.samples(), "yeastar_archiver_retries_total") >= 1
        await _until(retried)
        sim.control(options={"cut_rate": 0.0})

        async def settled() -> bool:
            s = await live.samples()
            return (value(s, "yeastar_archiver_recordings_archived") == 6
                    and ("yeastar_archiver_events_connected", frozenset()) in s
                    and value(s, "yeastar_archiver_events_connected") == 1
                    and "yeastar_archiver_discovery_last_poll_timestamp_seconds" in names(s))
        await _until(settled)
        s = await live.samples()
        now = time.time()
        assert value(s, "yeastar_archiver_build_info", version=__version__) == 1
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                "process_open_fds", "python_info"} <= names(s)
        # Outcomes and retries are separate series; "retried" is no outcome.
        assert value(s, "yeastar_archiver_recordings_total", result="downloaded") == 6
        assert ("yeastar_archiver_recordings_total", frozenset({("result", "retried")})) not in s
        assert value(s, "yeastar_archiver_retries_total") >= 1
        # The queue holds what is not archived; everything ever archived is its own gauge.
        assert {dict(labels)["state"] for name, labels in s if name == "yeastar_archiver_queue_depth"} == {
            "pending", "in_progress", "failed", "missing"}
        assert value(s, "yeastar_archiver_queue_depth", state="pending") == 0
        assert value(s, "yeastar_archiver_oldest_pending_age_seconds") == 0
        assert value(s, "yeastar_archiver_archive_free_bytes") > 0
        assert value(s, "yeastar_archiver_archive_min_free_bytes") == 0
        assert value(s, "yeastar_archiver_pbx_up") == 1
        assert value(s, "yeastar_archiver_pbx_connection_errors_total") == 0
        assert now + 1700 < value(s, "yeastar_archiver_token_expiry_timestamp_seconds") < now + 1801
        assert now - 60 < value(s, "yeastar_archiver_discovery_last_poll_timestamp_seconds") <= now
        assert now - 60 < value(s, "yeastar_archiver_discovery_last_sweep_timestamp_seconds") <= now
        assert now - 60 < value(s, "yeastar_archiver_last_success_timestamp_seconds") <= now
        assert value(s, "yeastar_archiver_notify_failures_total") == 0
        assert [value(s, "yeastar_archiver_paused", reason=r) for r in PAUSE_REASONS] == [0] * len(PAUSE_REASONS)
        assert value(s, "yeastar_archiver_ready") == 1

        # The PBX goes away while there is work: reachability, connection errors and the pause follow.
        await sim.stop()
        pipeline = live.health.pipeline
        assert pipeline is not None
        await pipeline.ledger.call(lambda db: db.enqueue([Ref(rec_id=4242)], source="test", now=time.time()))
        pipeline.scheduler.notify()

        async def down() -> bool:
            s = await live.samples()
            return (value(s, "yeastar_archiver_pbx_up") == 0
                    and value(s, "yeastar_archiver_paused", reason="pbx_unreachable") == 1)
        await _until(down)
        s = await live.samples()
        assert value(s, "yeastar_archiver_pbx_connection_errors_total") >= 1
        assert value(s, "yeastar_archiver_ready") == 0
        assert value(s, "yeastar_archiver_events_connected") == 0
    finally:
        await stop_live_run(live)


async def test_last_success_and_the_archived_count_survive_a_restart(start_sim: SimFactory, tmp_path: Path) -> None:
    """A staleness alert must not fire after every restart: the figure comes from the ledger."""
    sim = await start_sim(count=3, size_min=50_000, size_max=50_000)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000, 1001]}})
    await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
    db = LedgerDb(load_config(cfg).state.path)
    try:
        archived_at = db.last_done_at()
        db.enqueue([Ref(rec_id=1002)], source="test", now=time.time() - 120)   # waiting for two minutes
    finally:
        db.close()
    assert archived_at is not None
    await sim.stop()   # the PBX is away after the restart: nothing new is archived, 1002 keeps waiting
    live = await start_live_run(sim, tmp_path, sources={"ids": []})
    try:
        s = await live.samples()
        assert value(s, "yeastar_archiver_last_success_timestamp_seconds") == pytest.approx(archived_at)
        assert value(s, "yeastar_archiver_recordings_archived") == 2
        assert 119 < value(s, "yeastar_archiver_oldest_pending_age_seconds") < 600
        assert value(s, "yeastar_archiver_recordings_total", result="downloaded") == 0   # this process: none yet
    finally:
        await stop_live_run(live)


async def test_a_webhook_given_up_on_is_counted(tmp_path: Path) -> None:
    async def refuse(_request: web.Request) -> web.Response:
        return web.Response(status=503)
    runner, base = await serve_on_loopback(refuse)
    clock = ManualClock()   # the back-off between tries passes in virtual time
    health = Health(clock)
    notifier = Notifier(NotifyConfig(url=f"{base}/hook", timeout_s=5), health, clock, "test")
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run(stop))
    try:
        notifier.emit("summary", archived=1, failed=0, missing=0, pending=0)
        deadline = time.monotonic() + 20
        while health.notify_failures == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert health.notify_failures == 1 and notifier.sent == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await runner.cleanup()


# ---------------------------------------------------------------- the dashboard against a live scrape
PROMQL_FUNCTIONS = frozenset({
    "abs", "absent", "avg_over_time", "ceil", "changes", "clamp_min", "count_over_time", "delta", "deriv",
    "floor", "histogram_quantile", "idelta", "increase", "irate", "label_replace", "label_values",
    "max_over_time", "min_over_time", "predict_linear", "rate", "resets", "round", "sort", "time", "timestamp",
    "vector", "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile"})
PROMQL_WORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                          "bool", "offset"})


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression (or a Grafana label_values() query) reads. Raises
    AssertionError for an unknown function, so that a typo cannot pass as "no series"."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)               # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                                # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                              # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\blabel_values\s*\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,[^)]*\)", r"label_values(\1)", text)
    out = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if call:
            assert name in PROMQL_FUNCTIONS or name in PROMQL_WORDS, f"unknown function {name}() in {expr!r}"
        elif name not in PROMQL_WORDS:
            out.add(name)
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    panels = [p for p in dashboard["panels"]]
    panels += [inner for p in dashboard["panels"] for inner in p.get("panels", [])]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


@pytest.mark.parametrize(("expr", "series"), [
    ('sum by (instance, le) (rate(a_b_bucket{x="y", z=~"$v"}[5m]))', {"a_b_bucket"}),
    ("time() - last_ts{instance=~\"$instance\"}", {"last_ts"}),
    ("label_values(build_info, instance)", {"build_info"}),
    ("x and on (instance) y > 3600", {"x", "y"}),
    ("histogram_quantile(0.95, sum by (le) (rate(h_bucket[1h])))", {"h_bucket"}),
])
def test_series_are_read_out_of_promql(expr: str, series: set[str]) -> None:
    assert series_in(expr) == series


async def test_every_dashboard_expression_names_a_series_a_live_run_exports(
        start_sim: SimFactory, tmp_path: Path, hook: str) -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "yeastar-archiver.json").read_text())
    wanted = {name for expr in dashboard_queries(dashboard) for name in series_in(expr)}
    assert len(wanted) > 20
    sim = await start_sim(count=3, size_min=50_000, size_max=50_000)
    # Every optional part on, so that every series it can export is there: discovery, events, webhook,
    # the off-box copy and a verify walk; and one id the PBX does not have, for an errcode (60001).
    with s3_server("rclone", tmp_path / "s3") as server:
        live = await start_live_run(sim, tmp_path, sources={"discover": {"enabled": True, "events": True},
                                                            "ids": [1000, 1001, 1002, 424242]},
                                    notify={"url": hook}, archive={"s3": server.config()},
                                    verify={"interval_s": 3600})
        try:
            walked = False

            async def complete() -> bool:
                nonlocal walked
                s = await live.samples()
                p = live.health.pipeline
                if value(s, "yeastar_archiver_recordings_archived") == 3 and not walked and p is not None:
                    # The walk the background loop makes every verify.interval_s, made now.
                    assert p.copier is not None
                    await Verifier(p.ledger, p.downloader.archive, SystemClock(), dest=p.copier.dest).run()
                    walked = True
                return walked and wanted <= names(s)
            try:
                await _until(complete, 30)
            except AssertionError:
                raise AssertionError(f"not exported: {sorted(wanted - names(await live.samples()))}") from None
            text = await live.scrape()
        finally:
            await stop_live_run(live)
    promtool = shutil.which("promtool")
    if promtool is not None:   # the exposition itself, linted as Prometheus's own tool does
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
