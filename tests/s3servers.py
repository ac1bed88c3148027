"""Real S3-compatible servers on loopback for the tests: moto's and rclone's, as subprocesses.

They differ where it matters: moto honours If-None-Match and keeps user metadata but does not check
Content-MD5; rclone checks Content-MD5 but overwrites despite If-None-Match and drops metadata. The
archiver must be right against both.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import REPO

BIN = REPO / ".venv" / "bin"
ACCESS_KEY = "AKIATESTARCHIVER0001"
SECRET_KEY = "s3-canary-secret-0123456789abcdefghij"
BUCKET = "call-recordings"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    # The venv's own first: a tool of the same name elsewhere on PATH may be another version.
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


@dataclass
class S3Server:
    kind: str
    root: Path
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.kind == "moto":
            cmd = [_tool("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        else:
            (self.root / "data").mkdir(parents=True, exist_ok=True)
            cmd = [_tool("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--auth-key",
                   f"{ACCESS_KEY},{SECRET_KEY}", "--config", str(self.root / "rclone.conf"),
                   str(self.root / "data")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        try:
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
                assert self.proc.poll() is None, f"{self.kind} server did not start"
                assert time.monotonic() < deadline, f"{self.kind} server did not listen"
                time.sleep(0.05)
        except BaseException:
            self.stop()      # never leave a server process behind a failed start
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self, secret: str = SECRET_KEY) -> Any:
        """A plain boto3 client for the test's own looking (never the archiver's code)."""
        import boto3
        from botocore.config import Config

        from daemon.destinations import checksum_options
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=secret,
                            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1},
                                          **checksum_options()))

    def objects(self, bucket: str = BUCKET) -> dict[str, bytes]:
        c = self.client()
        out: dict[str, bytes] = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                out[item["Key"]] = c.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def config(self, **extra: Any) -> dict[str, Any]:
        """The ``archive.s3`` section for this server."""
        return {"endpoint_url": self.endpoint_url, "bucket": BUCKET, "access_key_id": ACCESS_KEY,
                "secret_access_key": SECRET_KEY, "addressing_style": "path", "timeout_s": 5, **extra}


@contextlib.contextmanager
def s3_server(kind: str, root: Path, *, lock: bool = False) -> Iterator[S3Server]:
    server = S3Server(kind, root)
    server.start()
    try:
        kwargs: dict[str, Any] = {"Bucket": BUCKET}
        if lock:
            kwargs["ObjectLockEnabledForBucket"] = True
        server.client().create_bucket(**kwargs)
        yield server
    finally:
        server.stop()
