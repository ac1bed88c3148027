"""Upload throughput of the off-box copy: `once` local-only against `once` with `archive.s3`, alternating.

The same recordings from the same simulator, 4 download workers; with S3, the copier's workers
(archive.s3.workers) upload each file after it is archived and verified locally, and `once` ends
when every copy is verified (HEAD: size and ETag). The bucket is rclone's S3 server (Go, files on
local disk) on loopback, which checks Content-MD5 as real providers do; moto's server keeps
objects in Python memory and would measure itself. Every object is checked byte for byte.

    .venv/bin/python bench/s3.py                     # A' 8 x 24 MiB (multipart) and B' 500 x 64 KiB; median of 3
    .venv/bin/python bench/s3.py --scenario B --runs 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.throughput import measure, start_simulator, write_config  # noqa: E402
from daemon.simulator import SimOptions, make_recordings, recording_bytes  # noqa: E402
from tests.s3servers import BUCKET, S3Server  # noqa: E402

SCENARIOS = {"A": (8, 24 * 1024 * 1024), "B": (500, 64 * 1024)}


def s3_section(server: S3Server, *, workers: int) -> str:
    c = server.config()
    return ("  s3:\n" + "".join(f"    {k}: {v}\n" for k, v in c.items() if k != "secret_access_key")
            + f"    secret_access_key_file: s3secret\n    workers: {workers}\n")


def check_bucket(server: S3Server, opts: SimOptions) -> None:
    want = {hashlib.sha256(recording_bytes(opts.seed, "wav", r)).hexdigest() for r in make_recordings(opts)}
    got = {hashlib.sha256(v).hexdigest() for k, v in server.objects().items() if not k.endswith(".json")}
    if got != want:
        raise SystemExit(f"the bucket does not hold the recordings: {len(got & want)} of {len(want)}")


def scenario(name: str, runs: int, workers: int) -> dict[str, object]:
    count, size = SCENARIOS[name]
    opts = SimOptions(count=count, size_min=size, size_max=size)
    ids = [r.id for r in make_recordings(opts)]
    sim, base_url = start_simulator(count, size)
    local: list[dict[str, float]] = []
    s3: list[dict[str, float]] = []
    try:
        for _ in range(runs):
            for kind in ("local", "s3"):
                work = Path(tempfile.mkdtemp(prefix=f"bench-s3-{name}-"))
                server = S3Server("rclone", work / "s3")
                try:
                    cfg = write_config(work, base_url, ids)
                    if kind == "s3":
                        server.start()
                        server.client().create_bucket(Bucket=BUCKET)
                        (work / "s3secret").write_text(server.config()["secret_access_key"] + "\n")
                        (work / "s3secret").chmod(0o600)
                        text = cfg.read_text().replace("archive:\n  dir: archive\n",
                                                       "archive:\n  dir: archive\n" + s3_section(server,
                                                                                                 workers=workers))
                        cfg.write_text(text)
                    row = measure([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], REPO)
                    (local if kind == "local" else s3).append(row)
                    if kind == "s3":
                        check_bucket(server, opts)
                finally:
                    server.stop()
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=10)
    total = count * size

    def summary(rows: list[dict[str, float]]) -> dict[str, float]:
        wall = statistics.median(r["wall_s"] for r in rows)
        return {"wall_s": round(wall, 3), "mb_per_s": round(total / wall / 1e6, 1),
                "cpu_s": round(statistics.median(r["cpu_s"] for r in rows), 2),
                "peak_rss_mib": round(max(r["rss"] for r in rows) / 2**20, 1),
                "wall_s_all": [round(r["wall_s"], 3) for r in rows]}
    a, b = summary(local), summary(s3)
    return {"scenario": name, "files": count, "file_bytes": size, "runs": runs, "copier_workers": workers,
            "local_only": a, "with_s3": b, "s3_over_local_wall": round(b["wall_s"] / a["wall_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenario", choices=list(SCENARIOS), action="append")
    parser.add_argument("--workers", type=int, default=4, help="archive.s3.workers")
    args = parser.parse_args()
    for name in args.scenario or list(SCENARIOS):
        print(json.dumps(scenario(name, args.runs, args.workers)), flush=True)


if __name__ == "__main__":
    main()
