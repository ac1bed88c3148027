"""Crash soak: `run` against a faulty simulator, SIGKILLed at random moments N times, then restarted.

Afterwards the invariants are checked: every recording archived exactly once and byte-identical
(I1), nothing outside the archive (I2), no partial file under a final name (I3), the ledger agrees
with the disk (I4). Redundant downloads are counted (a recording the simulator served in full more
than once), and so are all bytes served per byte archived (cut and resumed transfers included).
Exit 0 when every check holds.

    .venv/bin/python bench/soak.py --kills 10             # the short form (make test runs a 5-kill pytest instead)
    .venv/bin/python bench/soak.py --kills 200 --seed 3   # the long form for docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.simulator import SimOptions, make_recordings, recording_bytes  # noqa: E402


def counters(base_url: str) -> dict[str, object]:
    with urllib.request.urlopen(f"{base_url}/_sim/counters", timeout=5) as r:  # noqa: S310 - loopback
        data: dict[str, object] = json.loads(r.read())
        return data


def status(cfg: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "daemon", "status", "--json", "-c", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    counts: dict[str, int] = json.loads(out)["counts"]
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--recordings", type=int, default=0, help="default: 12 per kill, at least 60")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=600, help="give up after this long")
    args = parser.parse_args()
    count = args.recordings or max(60, 12 * args.kills)
    rng = random.Random(args.seed)
    opts = SimOptions(count=count, size_min=100_000, size_max=1_500_000, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    sim = subprocess.Popen(
        [sys.executable, "-m", "daemon", "simulate", "--port", "0", "--count", str(count), "--seed", str(args.seed),
         "--size-min", str(opts.size_min), "--size-max", str(opts.size_max), "--bytes-per-second", "2000000",
         "--cut-rate", "0.02", "--http500-rate", "0.01", "--errcode-rate", "0.01", "--json-body-rate", "0.01",
         "--token-lifetime", "20", "--url-lifetime", "15"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert sim.stdout is not None
    base_url = re.search(r"http://127\.0\.0\.1:\d+", sim.stdout.readline()).group(0)  # type: ignore[union-attr]
    secret = work / "secret"
    secret.write_text(opts.client_secret + "\n")
    secret.chmod(0o600)
    (work / "queue.txt").write_text("".join(f"{r.id}\n" for r in make_recordings(opts)))
    (work / "archive").mkdir()   # run never creates archive.dir
    cfg = work / "config.yaml"
    cfg.write_text(f"pbx:\n  base_url: {base_url}\n  client_id: archiver\n  client_secret_file: secret\n"
                   "  requests_per_second: 500\nsources:\n  queue_file: queue.txt\n  queue_poll_interval_s: 0.2\n"
                   "archive:\n  dir: archive\n  min_free_bytes: 0\n"
                   "downloads:\n  backoff_base_s: 0.05\n  backoff_max_s: 0.5\n  pause_max_s: 0.5\n"
                   "  checkpoint_bytes: 262144\n  url_lifetime_s: 15\n"
                   "service:\n  listen: null\nlogging:\n  format: json\n  level: warning\n")
    started = time.monotonic()
    kills, mid_work = 0, 0
    try:
        while kills < args.kills and time.monotonic() - started < args.max_seconds:
            proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 1.5))
            proc.kill()
            proc.wait()
            kills += 1
            left = status(cfg)
            mid_work += left["done"] + left["missing"] + left["failed"] < count
        # The last life runs to the end; its READY=1 (sd_notify) says its SIGTERM handler is in place.
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(work / "notify.sock"))
        notify.settimeout(60)
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "NOTIFY_SOCKET": str(work / "notify.sock")})
        while b"READY=1" not in notify.recv(4096):
            pass
        notify.close()
        while status(cfg)["done"] < count and time.monotonic() - started < args.max_seconds:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        final = status(cfg)
        sim_counters = counters(base_url)
        files = {p.relative_to(work / "archive"): p for p in (work / "archive").rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(work / "archive").parts)}
        audio = {rel: p for rel, p in files.items() if rel.suffix == ".wav"}
        want = {r.file: recording_bytes(opts.seed, opts.format, r) for r in make_recordings(opts)}
        wrong = [str(rel) for rel, p in audio.items() if want.get(rel.name) != p.read_bytes()]
        dup = len(audio) - len({rel.name for rel in audio})
        outside = [str(p) for p in work.rglob("*") if p.is_file() and (work / "archive") not in p.parents
                   and p.name not in ("secret", "queue.txt", "config.yaml", "notify.sock")]
        import sqlite3
        conn = sqlite3.connect(work / "archive" / ".yeastar-archiver" / "ledger.db")
        done_rows = dict(conn.execute("SELECT final_path, sha256 FROM recordings WHERE state = 'done'"))
        conn.close()
        disagree = [rel for rel in map(str, audio) if rel not in done_rows] + \
                   [rel for rel, sha in done_rows.items() if hashlib.sha256((work / "archive" / rel).read_bytes())
                    .hexdigest() != sha]
        per_id: dict[str, int] = sim_counters["transfers_completed"]  # type: ignore[assignment]
        # A recording transferred in full more than once: the crash cost a whole download again.
        redundant = sum(max(0, n - 1) for n in per_id.values())
        total_bytes = sum(len(b) for b in want.values())
        report = {
            "kills": kills, "kills_mid_work": mid_work, "recordings": count, "done": final["done"],
            "failed": final["failed"], "files": len(audio), "wrong_bytes": len(wrong), "duplicates": dup,
            "outside_archive": len(outside), "ledger_disagrees": len(disagree),
            "redundant_downloads": redundant, "redundant_per_kill": round(redundant / max(kills, 1), 3),
            "bytes_served_per_byte_archived": round(int(sim_counters["bytes_served"]) / total_bytes, 3),  # type: ignore[call-overload]
            "logins": sim_counters["logins"], "token_limit_hits": sim_counters["token_limit_hits"],
            "final_exit": proc.returncode, "seconds": round(time.monotonic() - started, 1),
        }
        print(json.dumps(report), flush=True)
        ok = (final["done"] == count and not wrong and not dup and not outside and not disagree
              and len(audio) == count and proc.returncode == 0)
        if not ok:
            print(err[-3000:], file=sys.stderr)
        return 0 if ok else 1
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
