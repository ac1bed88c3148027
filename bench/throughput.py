"""Throughput, CPU and memory of `yeastar-archiver once` against aria2c, and queue-file ingest at 1M ids.

Scenarios (4 workers; the archiver fsyncs every file and commits the ledger per file):
  A  24 x 24 MiB        B  2,000 x 64 KiB        (archiver vs aria2c -j4 -x1, A/B alternating)
  C  1,000,000 ids in the queue file: time until all are in the ledger, peak RSS, `status` latency
  L  B with the simulator answering recording/download after 50 ms, against B without (archiver
     only, alternating): how much of the API latency the archiver hides

The simulator runs as its own process. aria2c gets the same recordings from the same simulator:
their download URLs (with a token) are resolved first and handed over in an input file, so its
time is the transfers alone; the archiver's includes login, resolving, verifying and committing.
Peak RSS is the child's VmHWM, sampled from /proc while it runs (ru_maxrss would also count the
parent's pages a spawned child shares until exec); CPU is the child's user+system time (wait4).
Every archived file is checked byte for byte, block by block.

    .venv/bin/python bench/throughput.py                  # A, B and C; median of 3
    .venv/bin/python bench/throughput.py --scenario B --runs 1
    .venv/bin/python bench/throughput.py --scenario A --scenario B --dir /dev/shm   # on tmpfs: no fsync cost
    .venv/bin/python bench/throughput.py --scenario A --scenario B --files nginx --dir /dev/shm

`--files nginx` puts nginx in front of the simulator, as a PBX's own web server is: every request goes
to nginx, which passes it to the simulator; a file request the simulator accepts (token, the URL's
life) is answered with X-Accel-Redirect, and nginx sends the bytes from static files written out once
per scenario. Both the archiver and aria2c then get every file's bytes from nginx. (L and C ignore it.)
aria2c's URLs are resolved with 4 threads, as a script feeding it would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.simoptions import SimOptions  # noqa: E402
from daemon.simulator import BLOCK, make_recordings, recording_block, recording_bytes  # noqa: E402

SCENARIOS = {"A": (24, 24 * 1024 * 1024), "B": (2000, 64 * 1024)}
GIB = 1024 ** 3


RESOLVE_DELAY_S = 0.05
WORK_DIR: str | None = None   # --dir: where the archives go (tmpfs takes the fsync cost out)
FILES = "simulator"           # --files: who serves the recordings' bytes (simulator or nginx)
RESOLVE_THREADS = 4

NGINX_CONF = """\
worker_processes 2;
{user}
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp; fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
    types {{ audio/x-wav wav; audio/mpeg mp3; }}
    upstream sim {{ server {sim}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        # The simulator checks each file request (token, the URL's 30 minutes) and names the file;
        # nginx serves its bytes from disk, as the PBX's own web server does.
        location /_files/ {{ internal; alias {files}/; }}
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def ensure_nginx() -> str:
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx"], check=True, stdout=subprocess.DEVNULL)
        path = shutil.which("nginx") or "/usr/sbin/nginx"
    return path


class NginxFront:
    """nginx on a free loopback port: the recordings of ``opts`` as static files, the API passed to the
    simulator at ``sim_url``."""

    def __init__(self, opts: SimOptions, sim_url: str) -> None:
        import socket
        self.prefix = Path(tempfile.mkdtemp(prefix="bench-nginx-", dir=WORK_DIR))
        files = self.prefix / "files"
        files.mkdir()
        for rec in make_recordings(opts):
            (files / rec.file).write_bytes(recording_bytes(opts.seed, opts.format, rec))
        (self.prefix / "tmp").mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (self.prefix / "nginx.conf").write_text(NGINX_CONF.format(
            # As root, nginx's workers would run as nobody, who cannot enter the 0700 temp folder.
            user="user root;" if os.geteuid() == 0 else "", prefix=self.prefix, sim=sim_url.removeprefix("http://"),
            port=port, files=files))
        self.proc = subprocess.Popen([ensure_nginx(), "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise SystemExit(f"nginx did not start: {err}") from exc
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)   # graceful stop
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.prefix, ignore_errors=True)


def start_simulator(count: int, size: int, resolve_delay_s: float = 0.0,
                    accel: bool = False) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "simulate", "--port", "0", "--count", str(count),
         "--size-min", str(size), "--size-max", str(size),
         *(["--resolve-delay", str(resolve_delay_s)] if resolve_delay_s else []),
         *(["--accel-redirect", "/_files/"] if accel else [])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert proc.stdout is not None
    match = re.search(r"(http://127\.0\.0\.1:\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit("the simulator did not start")
    return proc, match.group(1)


def write_config(work: Path, base_url: str, ids: list[int] | None, *, queue: bool = True) -> Path:
    (work / "secret").write_text(SimOptions.client_secret + "\n")
    (work / "secret").chmod(0o600)
    if ids is not None:
        (work / "queue.txt").write_text("".join(f"{i}\n" for i in ids))
    (work / "archive").mkdir(exist_ok=True)   # once never creates archive.dir
    cfg = work / "config.yaml"
    cfg.write_text(
        f"pbx:\n  base_url: {base_url}\n  client_id: {SimOptions.client_id}\n  client_secret_file: secret\n"
        "  requests_per_second: 1000\n  timeout_s: 2\n"
        + ("sources:\n  queue_file: queue.txt\n" if queue else "")
        + "archive:\n  dir: archive\n  min_free_bytes: 0\n"
        "downloads:\n  workers: 4\n"
        "service:\n  listen: null\n"
        "logging:\n  format: json\n  level: warning\n")
    return cfg


def vm_hwm(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def measure(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS of one child process; raises if it fails."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, vm_hwm(proc.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[0]} exited {code}: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss": peak}


def resolve_urls(base_url: str, ids: list[int]) -> tuple[list[str], str]:
    """Log in and resolve every recording's URL, as aria2c cannot speak the PBX API. Returns (urls, token)."""
    def call(path: str, body: dict[str, object] | None = None) -> dict[str, object]:
        req = urllib.request.Request(f"{base_url}/openapi/v1.0/{path}", headers={"User-Agent": "bench"},  # noqa: S310
                                     data=json.dumps(body).encode() if body is not None else None,
                                     method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - loopback
            data: dict[str, object] = json.loads(r.read())
            return data
    token = str(call("get_token", {"username": SimOptions.client_id, "password": SimOptions.client_secret})
                ["access_token"])
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        return f"{base_url}{call(f'recording/download?id={i}&access_token={token}')['download_resource_url']}" \
            f"?access_token={token}"
    with ThreadPoolExecutor(RESOLVE_THREADS) as pool:
        urls = list(pool.map(one, ids))
    return urls, token


def verify(files: list[Path], opts: SimOptions, by: str) -> None:
    recs = {r.file: r for r in make_recordings(opts)}
    assert len(files) == len(recs), f"{by}: {len(files)} files for {len(recs)} recordings"
    for path in files:
        rec = recs.get(path.name) if by == "archiver" else None
        with path.open("rb") as f:
            if rec is None:  # aria2c names files by URL: compare sizes and the first block
                assert path.stat().st_size == opts.size_min, path
                continue
            for k in range((rec.size + BLOCK - 1) // BLOCK):
                assert f.read(BLOCK) == recording_block(opts.seed, opts.format, rec, k), path.name
            assert f.read(1) == b""


def ensure_aria2c() -> str:
    path = shutil.which("aria2c")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "aria2"], check=True, stdout=subprocess.DEVNULL)
        path = shutil.which("aria2c")
    assert path is not None
    return path


def transfer_scenario(name: str, runs: int, aria2c: str) -> dict[str, object]:
    count, size = SCENARIOS[name]
    opts = SimOptions(count=count, size_min=size, size_max=size)
    ids = [r.id for r in make_recordings(opts)]
    sim, base_url = start_simulator(count, size, accel=FILES == "nginx")
    front = NginxFront(opts, base_url) if FILES == "nginx" else None
    if front is not None:
        base_url = front.base_url
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    resolve_s: list[float] = []
    try:
        for _ in range(runs):
            work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=WORK_DIR))
            try:
                cfg = write_config(work, base_url, ids)
                ours.append(measure([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], REPO))
                verify([p for p in (work / "archive").rglob("*.wav")], opts, "archiver")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-aria-", dir=WORK_DIR))
            try:
                t0 = time.perf_counter()
                urls, _ = resolve_urls(base_url, ids)
                resolve_s.append(time.perf_counter() - t0)
                (work / "urls.txt").write_text("\n".join(f"{u}\n  out={i}.wav" for i, u in zip(ids, urls, strict=True)))
                theirs.append(measure([aria2c, "-q", "-i", "urls.txt", "-d", "out", "-j4", "-x1", "-s1",
                                       "--file-allocation=none", "--allow-overwrite=true",
                                       "--auto-file-renaming=false", "--user-agent=bench"], work))
                verify(list((work / "out").glob("*.wav")), opts, "aria2c")
            finally:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if front is not None:
            front.close()
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=10)
    total = count * size

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        wall = statistics.median(r["wall_s"] for r in rows)
        cpu = statistics.median(r["cpu_s"] for r in rows)
        return {"wall_s": round(wall, 3), "mb_per_s": round(total / wall / 1e6, 1),
                "files_per_s": round(count / wall, 1), "cpu_s_per_gib": round(cpu / (total / GIB), 2),
                "cpu_ms_per_recording": round(cpu / count * 1000, 2),
                "peak_rss_mib": round(max(r["rss"] for r in rows) / 2**20, 1)}
    a, b = summary(ours), summary(theirs)
    return {"scenario": name, "files": count, "file_bytes": size, "runs": runs, "served_by": FILES,
            "archiver": a, "aria2c": b,
            "throughput_ratio": round(b["wall_s"] / a["wall_s"], 2),
            # aria2c cannot ask the PBX for URLs; with the one recording/download call per file that
            # any client must make (here from this script, 4 threads), the comparison is end to end.
            "aria2c_resolve_s": round(statistics.median(resolve_s), 3),
            "throughput_ratio_with_resolve": round((b["wall_s"] + statistics.median(resolve_s)) / a["wall_s"], 2),
            "archiver_wall_s_all": [round(r["wall_s"], 3) for r in ours],
            "aria2c_wall_s_all": [round(r["wall_s"], 3) for r in theirs]}


def latency_scenario(runs: int) -> dict[str, object]:
    """L: B against a simulator whose recording/download answers after 50 ms, alternating with B
    against one that answers at once; the archiver only. ``rate_ratio`` is the share of its
    no-latency rate that it keeps (target >= 0.8)."""
    count, size = SCENARIOS["B"]
    opts = SimOptions(count=count, size_min=size, size_max=size)
    ids = [r.id for r in make_recordings(opts)]
    sims = {delay: start_simulator(count, size, delay) for delay in (0.0, RESOLVE_DELAY_S)}
    rows: dict[float, list[dict[str, float]]] = {0.0: [], RESOLVE_DELAY_S: []}
    try:
        for _ in range(runs):
            for delay, (_, base_url) in sims.items():
                work = Path(tempfile.mkdtemp(prefix="bench-L-", dir=WORK_DIR))
                try:
                    cfg = write_config(work, base_url, ids)
                    rows[delay].append(measure([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], REPO))
                    verify([p for p in (work / "archive").rglob("*.wav")], opts, "archiver")
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        for sim, _ in sims.values():
            sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=10)
    walls = {d: statistics.median(r["wall_s"] for r in rs) for d, rs in rows.items()}
    return {"scenario": "L", "files": count, "file_bytes": size, "runs": runs,
            "resolve_delay_s": RESOLVE_DELAY_S,
            "files_per_s_no_delay": round(count / walls[0.0], 1),
            "files_per_s_delayed": round(count / walls[RESOLVE_DELAY_S], 1),
            "rate_ratio": round(walls[0.0] / walls[RESOLVE_DELAY_S], 2),
            "wall_s_all_no_delay": [round(r["wall_s"], 3) for r in rows[0.0]],
            "wall_s_all_delayed": [round(r["wall_s"], 3) for r in rows[RESOLVE_DELAY_S]]}


def ingest_scenario(count: int = 1_000_000) -> dict[str, object]:
    """C: `run` with a million ids in the queue file and no PBX to talk to (nothing downloads)."""
    import socket
    work = Path(tempfile.mkdtemp(prefix="bench-C-"))
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        cfg = write_config(work, f"http://127.0.0.1:{closed_port}", list(range(1, count + 1)))
        ledger = work / "archive" / ".yeastar-archiver" / "ledger.db"
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = 0
        ingest_s = None
        import sqlite3
        while time.perf_counter() - started < 300:
            peak = max(peak, vm_hwm(proc.pid))
            if ledger.exists():
                try:
                    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1)
                    n = conn.execute("SELECT COUNT(*) FROM recordings").fetchone()[0]
                    conn.close()
                except sqlite3.Error:
                    n = 0
                if n >= count:
                    ingest_s = time.perf_counter() - started
                    break
            time.sleep(0.1)
        latencies = []
        for _ in range(5):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "-c", str(cfg)], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout
            latencies.append(time.perf_counter() - t)
            peak = max(peak, vm_hwm(proc.pid))
        counts = json.loads(out)["counts"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        return {"scenario": "C", "ids": count, "ingest_s": None if ingest_s is None else round(ingest_s, 2),
                "peak_rss_mib": round(peak / 2**20, 1), "status_s_median": round(statistics.median(latencies), 3),
                "status_counts": counts}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenario", choices=["A", "B", "C", "L"], action="append")
    parser.add_argument("--dir", help="where the archives and aria2c's files go [the system's temp folder]")
    parser.add_argument("--files", choices=["simulator", "nginx"], default="simulator",
                        help="who serves the recordings in A and B: the simulator, or nginx in front of it")
    args = parser.parse_args()
    global WORK_DIR, FILES
    WORK_DIR, FILES = args.dir, args.files
    chosen = args.scenario or ["A", "B", "C", "L"]
    aria2c = ensure_aria2c() if {"A", "B"} & set(chosen) else ""
    for name in chosen:
        result = ingest_scenario() if name == "C" else latency_scenario(args.runs) if name == "L" else \
            transfer_scenario(name, args.runs, aria2c)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
