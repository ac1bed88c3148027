"""A hook inherits descriptors 0-2 and nothing else, on either loop: none the daemon opened (ledger, queue
file, health server, PBX sockets, pidfds, other hooks' pipes), none it was started with, and no copies of
its own stdio (uvloop's spawn leaves those open in the child, so hooks are not spawned by the loop)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, simulator_subprocess, write_config

FD = 77


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_what_a_hook_inherits(tmp_path: Path, loop: str) -> None:
    out = tmp_path / "fds"
    queue = tmp_path / "queue.txt"
    queue.write_text("1002\n1003\n")
    code = ("import os, time\nfds = os.listdir('/proc/self/fd')\nlines = []\n"
            "for fd in fds:\n    try:\n        lines.append(fd + ' ' + os.readlink('/proc/self/fd/' + fd))\n"
            "    except OSError:\n        pass\n"
            f"time.sleep(0.2)\nopen({str(out)!r}, 'a').write('\\n'.join(lines) + '\\n---\\n')\n")
    with simulator_subprocess("--count", "6") as base_url:
        cfg = write_config(tmp_path, base_url, extra={
            "sources": {"ids": [1000, 1001], "queue_file": str(queue)},
            "hooks": {"on_archived": [sys.executable, "-c", code], "max_concurrent": 4},
            "service": {"event_loop": loop, "listen": f"127.0.0.1:{_free_port()}"}})
        r, w = os.pipe()
        os.dup2(w, FD)
        os.close(w)
        try:
            proc = subprocess.run([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], pass_fds=(FD,),
                                  capture_output=True, text=True, cwd=REPO, env=cli_env(), timeout=60)
        finally:
            os.close(FD)
            os.close(r)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [b for b in out.read_text().split("---\n") if b.strip()]
    assert len(runs) == 4, out.read_text()
    extra = set()
    for block in runs:
        for line in block.splitlines():
            num = line.partition(" ")[0]
            if int(num) > 2:
                extra.add(line)
    assert not extra, (sorted(extra), out.read_text())
