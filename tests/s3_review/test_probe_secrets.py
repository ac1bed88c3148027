"""Probe (held up if it passes): the S3 secret and access key id never in logs, status, ledger."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli, simulator_subprocess, write_config
from tests.s3servers import ACCESS_KEY, SECRET_KEY, s3_server


def test_no_secret_anywhere(tmp_path: Path) -> None:
    with s3_server("rclone", tmp_path / "s3") as server, simulator_subprocess("--count", "2") as base_url:
        for secret in ("wrong-secret-canary-XYZ-123456", SECRET_KEY):
            cfg = write_config(tmp_path, base_url, extra={
                "sources": {"ids": [1000, 1001]}, "logging": {"format": "json", "level": "debug"},
                "archive": {"s3": server.config(secret_access_key=secret)}})
            outs = [run_cli("check", "-c", str(cfg)), run_cli("once", "-c", str(cfg)),
                    run_cli("status", "--json", "-c", str(cfg)), run_cli("status", "-c", str(cfg)),
                    run_cli("verify", "--json", "--read-data", "-c", str(cfg))]
            text = "".join(o.stdout + o.stderr for o in outs)
            assert secret not in text
            assert ACCESS_KEY not in text, [ln for ln in text.splitlines() if ACCESS_KEY in ln][:3]
            for p in (tmp_path / "archive").rglob("*"):
                if p.is_file():
                    data = p.read_bytes()
                    assert secret.encode() not in data and ACCESS_KEY.encode() not in data, p
            print([o.returncode for o in outs])
