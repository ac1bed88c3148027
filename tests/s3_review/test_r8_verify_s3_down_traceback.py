"""R8: `verify` while the bucket is unreachable (or refuses the credentials) dies with a Python traceback
(an uncaught DestinationUnavailableError / DestinationRefusedError from the first HEAD) instead of
reporting the problem: the spec's exit codes for verify are 0 all good / 1 any problem; the walk records
no report (status' verify line and the verify_problems metric keep the old, good, result)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, simulator_subprocess, write_config
from tests.s3servers import s3_server


@pytest.mark.parametrize("fault", ["down", "refused"])
def test_verify_with_the_bucket_in_trouble_reports_it(tmp_path: Path, fault: str) -> None:
    with s3_server("rclone", tmp_path / "s3") as server, simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001]},
                                                      "archive": {"s3": server.config(timeout_s=1)}})
        assert run_cli("once", "-c", str(cfg)).returncode == 0
        assert run_cli("verify", "-c", str(cfg)).returncode == 0
        if fault == "down":
            server.stop()
        else:
            cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000, 1001]}, "archive": {
                "s3": server.config(timeout_s=1, secret_access_key="rotated-secret-000000")}})
        v = run_cli("verify", "--json", "-c", str(cfg))
        print(v.returncode, v.stdout[-300:], v.stderr[-600:])
        assert "Traceback" not in v.stderr, v.stderr[-400:]
        assert v.returncode == 1
        status = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)
        assert status["verify"]["problems"] > 0, "the last verify report still says all is well"
