"""status's daemon probe reads /proc/locks, which the kernel filters by PID namespace."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.ledger import RunLock, run_lock_held


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_v3_status_in_another_pid_namespace_says_not_running_while_a_run_holds_the_lock(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    lock = RunLock(ledger)
    lock.acquire()   # what `run` holds for its whole life
    assert run_lock_held(ledger) is True
    # `docker run --rm -v state:/var/lib/... image status` / `docker compose run archiver status` /
    # a k8s sidecar: same volume, another PID namespace.
    code = ("from daemon.ledger import run_lock_held; from pathlib import Path; "
            f"print(run_lock_held(Path({str(ledger)!r})))")
    out = subprocess.run(["unshare", "-Urpf", "--mount-proc", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip(f"unshare not permitted here: {out.stderr}")
    assert out.stdout.strip() != "False", "status would print daemon: not running while a run holds the lock"
