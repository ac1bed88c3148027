"""Start-up cost of the light commands: `health` (a container HEALTHCHECK runs it every 30 s), `status`
and `--version`, each the median of several runs, with the peak RSS of one run.

They run against a real `run` (and the bundled simulator) on 127.0.0.1, so `health` asks a live
/livez and `status` reads a live ledger, as they would in production.

    .venv/bin/python bench/startup.py [--runs 21] [--cmd "yeastar-archiver"]

``--cmd`` is the command line that starts the archiver (default: the console script beside this
Python); figures go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """(wall seconds, exit code, peak RSS in KiB) of one run."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, proc.returncode, usage.ru_maxrss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--cmd", default=str(Path(sys.executable).with_name("yeastar-archiver")))
    args = parser.parse_args()
    cmd = shlex.split(args.cmd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("YEASTAR_ARCHIVER")}

    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        work = Path(tmp)
        sim = subprocess.Popen([sys.executable, "-m", "daemon", "simulate", "--port", "0", "--count", "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
        assert sim.stdout is not None
        match = re.search(r"http://127\.0\.0\.1:\d+", sim.stdout.readline())
        assert match, "the simulator did not start"
        port = free_port()
        (work / "secret").write_text("sim-secret-please-change\n")
        (work / "secret").chmod(0o600)
        (work / "archive").mkdir()
        cfg = work / "config.yaml"
        cfg.write_text(f"pbx: {{base_url: {match.group(0)}, client_id: archiver, client_secret_file: secret}}\n"
                       f"sources: {{ids: [{', '.join(str(i) for i in range(1000, 1020))}]}}\n"
                       "archive: {dir: archive, min_free_bytes: 0}\n"
                       f"service: {{listen: '127.0.0.1:{port}'}}\nlogging: {{format: json}}\n")
        run = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("run did not come up") from None
                    time.sleep(0.1)
            rows = []
            for name, extra in (("--version", ["--version"]), ("health", ["health", "-c", str(cfg)]),
                                ("status", ["status", "-c", str(cfg)]),
                                ("status --json", ["status", "--json", "-c", str(cfg)])):
                timed([*cmd, *extra], env)  # warm the page cache and the .pyc files
                results = [timed([*cmd, *extra], env) for _ in range(args.runs)]
                codes = {code for _, code, _ in results}
                assert codes == {0}, f"{name} exited {codes}"
                walls = sorted(w for w, _, _ in results)
                rss = statistics.median(r for _, _, r in results)
                rows.append((name, statistics.median(walls), walls[0], walls[-1], rss))
        finally:
            run.send_signal(signal.SIGTERM)
            run.wait(timeout=30)
            sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=10)
    baseline = [timed([sys.executable, "-c", "pass"], env)[0] for _ in range(args.runs)]
    print(f"{args.runs} runs each, `{' '.join(cmd)}`; a bare `python -c pass` takes "
          f"{statistics.median(baseline) * 1000:.0f} ms here\n")
    print("| command | median | min | max | peak RSS |")
    print("|---|---|---|---|---|")
    for name, median, low, high, rss in rows:
        ms = " | ".join(f"{t * 1000:.0f} ms" for t in (median, low, high))
        print(f"| `{name}` | {ms} | {rss / 1024:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
