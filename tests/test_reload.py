"""SIGHUP: the config is re-read; safe changes apply live, others are reported; nothing in flight is dropped."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import structlog
import yaml

from daemon.clock import SystemClock
from daemon.config import changed_keys, load_config, parse_config, with_keys
from daemon.ledger import LedgerDb
from daemon.runner import run_pipeline
from daemon.service import Health
from tests.conftest import REPO, SimFactory, cli_env, simulator_subprocess, write_config


def test_changed_keys_lists_dotted_paths() -> None:
    base = {"pbx": {"base_url": "https://a", "client_id": "x", "client_secret": "y"}, "archive": {"dir": "/a"}}
    other = yaml.safe_load(yaml.safe_dump(base))
    other["downloads"] = {"workers": 2}
    other["archive"]["layout"] = "{id}.{ext}"
    old, new = parse_config(base, base_dir=Path("/")), parse_config(other, base_dir=Path("/"))
    assert changed_keys(old, new) == ["archive.layout", "downloads.workers"]
    assert changed_keys(old, old) == []
    applied = with_keys(old, new, ["downloads.workers"])   # what a reload applies live; the rest stays
    assert changed_keys(applied, new) == ["archive.layout"]


def _rewrite(path: Path, **sections: dict[str, object]) -> None:
    data = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(data))


async def test_reload_applies_safe_changes_live_without_dropping_downloads(start_sim: SimFactory,
                                                                           tmp_path: Path) -> None:
    sim = await start_sim(count=16, size_min=300_000, size_max=300_000, bytes_per_second=1_500_000)
    cfg_path = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                           "downloads": {"workers": 1}})
    health = Health(SystemClock())
    stop, reload = asyncio.Event(), asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(run_pipeline(load_config(cfg_path), stop, once=False, health=health,
                                                reload=reload))
        while health.pipeline is None or health.pipeline.downloader.in_flight == 0:
            await asyncio.sleep(0.01)
        (tmp_path / "queue.txt").write_text("")
        _rewrite(cfg_path, downloads={"workers": 4}, pbx={"requests_per_second": 50},
                 archive={"layout": "{id}.{ext}"}, sources={"queue_file": "queue.txt"})
        reload.set()
        while not any(e["event"] == "config.reloaded" for e in logs):
            await asyncio.sleep(0.01)
        assert health.pipeline.scheduler.workers == 4
        while health.pipeline.downloader.in_flight < 2:
            await asyncio.sleep(0.01)
        _rewrite(cfg_path, downloads={"workers": 0})          # invalid: the running config stays
        reload.set()
        while not any(e["event"] == "config.reload_failed" for e in logs):
            await asyncio.sleep(0.01)
        _rewrite(cfg_path, downloads={"workers": 2})
        reload.set()
        while health.pipeline.scheduler.workers != 2:
            await asyncio.sleep(0.01)
        while health.counts.get("done", 0) < 16:
            await asyncio.sleep(0.05)
        stop.set()
        result = await asyncio.wait_for(task, 30)
    reloaded = [e for e in logs if e["event"] == "config.reloaded"]
    assert sorted(reloaded[0]["applied"]) == ["downloads.workers", "pbx.requests_per_second", "sources.queue_file"]
    restart = [e for e in logs if e["event"] == "config.restart_required"]
    assert restart[0]["keys"] == ["archive.layout"]
    assert any("downloads.workers" in p for e in logs if e["event"] == "config.reload_failed" for p in e["problems"])
    assert result.counts["done"] == 16 and result.counts["failed"] == 0 and result.stats.retried == 0


def test_sighup_to_a_running_daemon_reloads_and_keeps_running(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        db_path = load_config(cfg).state.path
        deadline = time.monotonic() + 20
        while not db_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (tmp_path / "queue.txt").write_text("1001\n")
        _rewrite(cfg, sources={"queue_file": "queue.txt", "queue_poll_interval_s": 0.1}, logging={"level": "debug"})
        proc.send_signal(signal.SIGHUP)  # its handlers are in place before the ledger is created
        while True:
            assert time.monotonic() < deadline + 10
            db = LedgerDb(db_path)
            try:
                if db.counts()["done"] == 2:
                    break
            finally:
                db.close()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "config.reloaded" in events
