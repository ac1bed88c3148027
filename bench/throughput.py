"""Throughput and memory of `yeastar-archiver once` against the bundled simulator on loopback.

Scenarios: (A) 24 x 24 MiB, (B) 2,000 x 64 KiB, 4 workers, fsync and a ledger commit per file.
The simulator and the archiver run as separate processes. The archiver's peak RSS is read from its
own ``VmHWM`` in /proc while it runs: ``ru_maxrss`` would also count the parent's pages that a
spawned child shares until exec. Every archived file is checked byte for byte, block by block,
against the simulator's contents.

    .venv/bin/python bench/throughput.py            # both scenarios, median of 3
    .venv/bin/python bench/throughput.py --runs 1 --scenario B
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.simulator import BLOCK, SimOptions, make_recordings, recording_block  # noqa: E402

SCENARIOS = {
    "A": {"count": 24, "size": 24 * 1024 * 1024},
    "B": {"count": 2000, "size": 64 * 1024},
}


def start_simulator(count: int, size: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "simulate", "--port", "0", "--count", str(count),
         "--size-min", str(size), "--size-max", str(size)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"simulator did not start: {line!r}")
    return proc, match.group(1)


def write_config(work: Path, base_url: str, ids: list[int]) -> Path:
    (work / "secret").write_text(SimOptions.client_secret + "\n")
    (work / "secret").chmod(0o600)
    (work / "queue.txt").write_text("".join(f"{i}\n" for i in ids))
    cfg = work / "config.yaml"
    cfg.write_text(
        f"pbx:\n  base_url: {base_url}\n  client_id: {SimOptions.client_id}\n  client_secret_file: secret\n"
        "  requests_per_second: 1000\n"
        "sources:\n  queue_file: queue.txt\n"
        "archive:\n  dir: archive\n  min_free_bytes: 0\n"
        "downloads:\n  workers: 4\n"
        "service:\n  listen: null\n"
        "logging:\n  format: json\n  level: warning\n")
    return cfg


def vm_hwm(pid: int) -> int | None:
    """The process's resident high-water mark in bytes (this exec image only), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def run_once(cfg: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of one `once` run."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid) or 0)
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    return elapsed, peak, proc.returncode


def verify(work: Path, opts: SimOptions) -> None:
    files = {p.name: p for p in (work / "archive").rglob("*.wav")}
    recs = make_recordings(opts)
    assert len(files) == len(recs), f"{len(files)} files for {len(recs)} recordings"
    for rec in recs:
        with files[rec.file].open("rb") as f:
            for k in range((rec.size + BLOCK - 1) // BLOCK):
                assert f.read(BLOCK) == recording_block(opts.seed, opts.format, rec, k), rec.file
            assert f.read(1) == b"", rec.file


def scenario(name: str, runs: int) -> dict[str, object]:
    count, size = SCENARIOS[name]["count"], SCENARIOS[name]["size"]
    sim, base_url = start_simulator(count, size)
    results = []
    try:
        for _ in range(runs):
            work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
            try:
                cfg = write_config(work, base_url, [r.id for r in make_recordings(SimOptions(count=count))])
                elapsed, rss, code = run_once(cfg)
                if code != 0:
                    raise SystemExit(f"scenario {name}: once exited {code}")
                verify(work, SimOptions(count=count, size_min=size, size_max=size))
                results.append((elapsed, rss))
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=10)
    wall = statistics.median(r[0] for r in results)
    total = count * size
    return {
        "scenario": name, "files": count, "file_bytes": size, "runs": runs,
        "wall_s_median": round(wall, 3), "mb_per_s": round(total / wall / 1e6, 1),
        "files_per_s": round(count / wall, 1), "peak_rss_mib_max": round(max(r[1] for r in results) / 2**20, 1),
        "wall_s_all": [round(r[0], 3) for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args()
    for name in args.scenario or sorted(SCENARIOS):
        print(json.dumps(scenario(name, args.runs)), flush=True)


if __name__ == "__main__":
    main()
