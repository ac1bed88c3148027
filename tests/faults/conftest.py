"""The fault suite's harness: a byte-level faulty PBX, a canary secret, and the invariants I1-I5."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.archive import Naming, final_relpath
from daemon.config import load_config
from daemon.ledger import LedgerDb
from daemon.logs import configure_logging
from daemon.runner import RunResult, run_pipeline
from daemon.simulator import SimOptions, Simulator
from tests.conftest import archive_files, run_cli, write_config
from tests.faults.rawpbx import RawPbx


@dataclass
class FaultRun:
    sim: Simulator
    raw: RawPbx
    tmp: Path
    secret: str
    logs: io.StringIO = field(default_factory=io.StringIO)
    outputs: list[str] = field(default_factory=list)

    def config(self, ids: list[int] | None = None, **extra: Any) -> Path:
        sections: dict[str, Any] = {"sources": {"ids": ids if ids is not None else [r.id for r in self.sim.recordings]}}
        for key, value in extra.items():
            sections.setdefault(key, {}).update(value)
        return write_config(self.tmp, self.raw.base_url, secret=self.secret, extra=sections)

    async def once(self, cfg: Path) -> RunResult:
        # The production log pipeline (redaction included), rendered as JSON into a buffer we search.
        configure_logging("json", "debug", stream=self.logs)
        return await run_pipeline(load_config(cfg), asyncio.Event(), once=True)

    def expected(self, ids: set[int]) -> dict[str, bytes]:
        now = dt.datetime.now(dt.UTC)
        return {str(final_relpath("{year}/{month}/{day}/{file}", Naming(r.id, r.file, r.call_type), now)):
                self.sim.content(r) for r in self.sim.recordings if r.id in ids}

    def assert_invariants(self, cfg_path: Path, *, done: set[int]) -> None:
        cfg = load_config(cfg_path)
        root = cfg.archive.dir
        files = archive_files(root)
        # I1 + I3: each archived recording exactly once, byte-identical; nothing else under a final name.
        assert files == self.expected(done)
        # I2: nothing written outside archive.dir, but for the ledger's own folder (state.path).
        state = cfg.state.path.parent
        outside = [p for p in self.tmp.rglob("*") if p.is_file() and root not in p.parents
                   and state not in p.parents and p.name not in ("client_secret", "config.yaml", "queue.txt")]
        assert outside == []
        # I4: the ledger agrees with the disk.
        db = LedgerDb(cfg.state.path)
        try:
            rows = {r.final_path: r for r in db.rows("done")}
        finally:
            db.close()
        assert set(rows) == set(files)
        for rel, data in files.items():
            assert rows[rel].sha256 == hashlib.sha256(data).hexdigest() and rows[rel].bytes == len(data)
        # I5: no secret or token in logs or status output (tracebacks are in the logs).
        status = run_cli("status", "--json", "-c", str(cfg_path))
        self.outputs += [self.logs.getvalue(), status.stdout, status.stderr]
        self.assert_no_secrets()

    def assert_logs_are_json(self) -> None:
        """Logs are data: every line captured, the standard library's (aiohttp's) included, is one
        JSON object with an event, a level and the logger that wrote it."""
        for number, line in enumerate(self.logs.getvalue().splitlines(), 1):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                raise AssertionError(f"log line {number} is not JSON: {line[:200]!r}") from None
            assert isinstance(event, dict) and {"event", "level", "logger"} <= event.keys(), line[:200]

    def assert_no_secrets(self) -> None:
        secrets = [self.secret, *self.sim.tokens, *(t.refresh_token for t in self.sim.tokens.values())]
        text = "\n".join([self.logs.getvalue(), *self.outputs])
        leaked = [s for s in secrets if s in text]
        assert leaked == [], "a secret reached an output"


@pytest.fixture
async def fault_run(tmp_path: Path) -> AsyncIterator[FaultRun]:
    """A simulator behind the raw faulty front; a canary client secret unique to this test."""
    secret = f"canary-{uuid.uuid4().hex}"
    sim = Simulator(SimOptions(count=3, size_min=150_000, size_max=250_000, client_secret=secret))
    await sim.start()
    raw = RawPbx(sim)
    await raw.start()
    run = FaultRun(sim=sim, raw=raw, tmp=tmp_path, secret=secret)
    yield run
    await raw.stop()
    await sim.stop()
    run.assert_logs_are_json()
