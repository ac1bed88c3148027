"""A stateful property test of the whole path of a recording: random interleavings, invariants after every step.

Hypothesis drives the real ledger, a real archive folder (on a small tmpfs where the machine allows
it, so that the disk can really fill up) and the real pipeline against the simulator on loopback,
through random sequences of: the same recording arriving by id, by file name and with discovery's
metadata, duplicate and late enqueues (while a run is in flight), runs cut short at random moments
and abandoned (the process state dropped, everything reopened from disk), graceful stops, token and
URL expiry, cut bodies and error answers, files planted at final names (identical bytes, a stub that
merely looks like audio, other bytes of the same size), and a full disk. After every step:

- I2  nothing outside the test's folders; I3 every file under a final name is a whole recording or a
  file somebody else put there, untouched;
- I1  no recording twice; I4 every done row's file is on disk with its size and sha256, one row per
  recording;
and after a final drain every recording named is archived exactly once, byte-identical.

The budget is small in ``make test`` (profile ``ci``: 12 examples of 10 steps, ~15 s);
``YEASTAR_PROPERTY_PROFILE=long`` runs 200 examples of 25 steps (tens of minutes). A failure prints
the steps that reproduce it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from daemon.archive import Naming, final_relpath
from daemon.config import load_config
from daemon.ledger import LedgerDb, Ref
from daemon.logs import configure_logging
from daemon.runner import run_pipeline
from daemon.simulator import SimOptions, Simulator
from tests.conftest import write_config

settings.register_profile("ci", max_examples=12, stateful_step_count=10, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("long", max_examples=200, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
PROFILE = os.environ.get("YEASTAR_PROPERTY_PROFILE", "ci")

COUNT = 5
TICK_S = 0.02
DISK_BYTES = 16 * 1024 * 1024


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


class ArchiverMachine(RuleBasedStateMachine):
    """One archiver installation; each example is a fresh one."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="prop-"))
        self.mounted = False
        self.sim: Simulator | None = None
        self.named: set[int] = set()                 # recordings some source named
        self.foreign: dict[str, bytes] = {}          # files others put at final names: never touched
        self.planted: dict[str, int] = {}            # identical copies others put there (adopt, never copy)
        self.filler: Path | None = None
        self.runs = 0

    # ------------------------------------------------------------ set-up and tear-down
    @initialize(ledger_inside=st.booleans(), workers=st.sampled_from([1, 3]))
    def start(self, ledger_inside: bool, workers: int) -> None:
        disk = self.tmp / "disk"
        disk.mkdir()
        if _can_mount() and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                                            str(disk)], check=False).returncode == 0:
            self.mounted = True
        self.sim = Simulator(SimOptions(count=COUNT, size_min=20_000, size_max=400_000, seed=3))
        self.loop.run_until_complete(self.sim.start())
        extra: dict[str, Any] = {
            "archive": {"dir": str(disk / "archive")},
            "downloads": {"workers": workers, "checkpoint_bytes": 65536, "backoff_base_s": 0.01,
                          "backoff_max_s": 0.05, "pause_max_s": 0.05, "max_attempts": 1000,
                          "once_give_up_s": 60, "url_lifetime_s": 1800},
            "service": {"listen": None, "shutdown_grace_s": 2},
            "logging": {"format": "json", "level": "warning"},
        }
        if not ledger_inside:
            extra["state"] = {"path": str(self.tmp / "state" / "ledger.db")}
        self.cfg_path = write_config(self.tmp, self.sim.base_url, extra=extra)
        self.cfg = load_config(self.cfg_path)
        self.logs = io.StringIO()
        configure_logging("json", "error", stream=self.logs)

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            if self.sim is not None:
                self.loop.run_until_complete(self.sim.stop())
        self.loop.close()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.tmp / "disk")], check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        structlog.reset_defaults()

    # ------------------------------------------------------------ helpers
    def rec(self, i: int) -> Any:
        assert self.sim is not None
        return self.sim.recordings[i]

    def final(self, i: int) -> Path:
        r = self.rec(i)
        rel = final_relpath(self.cfg.archive.layout, Naming(r.id, r.file, r.call_type), dt.datetime.now(dt.UTC))
        return self.cfg.archive.dir / rel

    def contents(self) -> dict[str, int]:
        """sha256 of every recording's bytes -> its index."""
        assert self.sim is not None
        return {hashlib.sha256(self.sim.content(r)).hexdigest(): n for n, r in enumerate(self.sim.recordings)}

    def db(self) -> LedgerDb:
        return LedgerDb(self.cfg.state.path)

    def rows(self, state: str | None = None) -> list[Any]:
        """The ledger's rows, read-only (the disk may be full: the checker must not need to write)."""
        conn = sqlite3.connect(f"file:{self.cfg.state.path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'recordings'").fetchone() is None:
                return []        # created, but the disk filled up before its schema was written
            sql = "SELECT key, state, final_path, bytes, sha256 FROM recordings"
            return conn.execute(sql + (" WHERE state = ?" if state else ""), (state,) if state else ()).fetchall()
        finally:
            conn.close()

    def enqueue_now(self, i: int, how: str) -> None:
        r = self.rec(i)
        ref = {"id": Ref(rec_id=r.id), "name": Ref(file=r.file),
               "discovered": Ref(rec_id=r.id, file=r.file, meta=(("size", r.size), ("call_type", r.call_type)))}[how]
        try:
            db = self.db()
            try:
                if how == "id":
                    db.enqueue_many([ref], source="queue", now=time.time())
                else:
                    db.enqueue([ref], source="event" if how == "name" else "discover", now=time.time())
            finally:
                db.close()
        except (sqlite3.Error, OSError):
            return   # the disk is full: the operator's enqueue fails and says so; nothing was named
        self.named.add(i)

    async def _run(self, ticks: int, end: str, late: list[tuple[int, int, str]]) -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(run_pipeline(self.cfg, stop, once=False))
        for t in range(ticks):
            await asyncio.sleep(TICK_S)
            for at, i, how in late:
                if at == t:
                    await asyncio.to_thread(self.enqueue_now, i, how)
            if task.done():
                break
        if end == "stop":
            stop.set()
            await asyncio.wait_for(task, 30)
        else:
            # The process dies: its state is dropped where it stands; the next run reopens everything from disk.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.runs += 1

    # ------------------------------------------------------------ rules
    @rule(i=st.integers(0, COUNT - 1), how=st.sampled_from(["id", "name", "discovered"]))
    def enqueue(self, i: int, how: str) -> None:
        self.enqueue_now(i, how)

    @rule(i=st.integers(0, COUNT - 1), kind=st.sampled_from(["identical", "stub", "other"]))
    def plant(self, i: int, kind: str) -> None:
        target = self.final(i)
        if target.exists() or any(self.final(n) == target for n in range(COUNT) if n != i):
            return
        data = self.sim.content(self.rec(i))  # type: ignore[union-attr]
        body = {"identical": data, "stub": b"RIFF\x00\x04\x00\x00WAVEfmt " + bytes(1008),
                "other": data[:44] + bytes(len(data) - 44)}[kind]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
        except OSError:            # the disk is full: whatever was written is junk we remove again
            target.unlink(missing_ok=True)
            return
        rel = str(target.relative_to(self.cfg.archive.dir))
        if kind == "identical":
            self.planted[rel] = i
        else:
            self.foreign[rel] = body

    @rule(tokens=st.booleans(), urls=st.booleans())
    def expire(self, tokens: bool, urls: bool) -> None:
        assert self.sim is not None
        self.sim.control(expire_tokens=tokens, expire_urls=urls)

    @rule(cut=st.sampled_from([0.0, 0.3]), busy=st.sampled_from([0.0, 0.1]), expired=st.sampled_from([0.0, 0.2]))
    def faults(self, cut: float, busy: float, expired: float) -> None:
        assert self.sim is not None
        self.sim.control(options={"cut_rate": cut, "http500_rate": busy, "json_body_rate": busy / 2,
                                  "url_expired_rate": expired})

    @precondition(lambda self: self.mounted and self.filler is None)
    @rule()
    def fill_disk(self) -> None:
        self.filler = self.tmp / "disk" / "filler"
        with contextlib.suppress(OSError), self.filler.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()

    @precondition(lambda self: self.filler is not None)
    @rule()
    def free_disk(self) -> None:
        assert self.filler is not None
        self.filler.unlink()
        self.filler = None

    @rule(ticks=st.integers(1, 25), end=st.sampled_from(["crash", "crash", "stop"]),
          late=st.lists(st.tuples(st.integers(0, 24), st.integers(0, COUNT - 1),
                                  st.sampled_from(["id", "name", "discovered"])), max_size=2))
    def run_for(self, ticks: int, end: str, late: list[tuple[int, int, str]]) -> None:
        self.loop.run_until_complete(self._run(ticks, end, late))

    @rule()
    def drain(self) -> None:
        """Space back, faults off, one `once` to the end: everything named must now be archived once."""
        if self.filler is not None:
            self.free_disk()
        self.faults(0.0, 0.0, 0.0)
        result = self.loop.run_until_complete(run_pipeline(self.cfg, asyncio.Event(), once=True))
        assert result.counts["failed"] == 0 and result.counts["pending"] == 0, result.counts
        self.check_everything_named_is_archived_once()

    # ------------------------------------------------------------ invariants
    @invariant()
    def nothing_outside_and_no_partial_file_under_a_final_name(self) -> None:
        """I2 + I3 (and I1's "at most once")."""
        if self.sim is None:
            return
        allowed = {self.tmp / "disk", self.tmp / "state", self.tmp / "archive"}
        for p in self.tmp.rglob("*"):
            if p.is_file() and p.parent == self.tmp:
                assert p.name in ("client_secret", "config.yaml"), p
            elif p.is_file():
                assert any(a in p.parents for a in allowed), p
        contents = self.contents()
        seen: dict[int, str] = {}
        root = self.cfg.archive.dir
        if not root.exists():
            return
        for p in root.rglob("*"):
            rel = p.relative_to(root)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts) or p.suffix not in (".wav", ".mp3"):
                continue
            assert not p.is_symlink()
            data = p.read_bytes()
            if str(rel) in self.foreign:
                assert data == self.foreign[str(rel)], f"{rel}: somebody else's file was changed"
                continue
            n = contents.get(hashlib.sha256(data).hexdigest())
            assert n is not None, f"{rel}: {len(data)} bytes that are no recording (partial or corrupt)"
            assert n not in seen, f"recording {n} twice: {seen.get(n)} and {rel}"
            seen[n] = str(rel)

    @invariant()
    def every_done_row_has_its_file(self) -> None:
        """I4 (the half that must hold even right after a crash): done means on disk, verified."""
        if self.sim is None or not self.cfg.state.path.exists():
            return
        done = self.rows("done")
        shas = [r["sha256"] for r in done]
        assert len(shas) == len(set(shas)), "two done rows for one recording"
        contents = self.contents()
        for r in done:
            assert r["sha256"] in contents, f"done row {r['key']} holds bytes that are no recording"
            path = self.cfg.archive.dir / str(r["final_path"])
            assert path.is_file(), f"done row {r['key']} without its file {r['final_path']}"
            data = path.read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (r["bytes"], r["sha256"]), r["key"]

    def check_everything_named_is_archived_once(self) -> None:
        rows = self.rows()
        contents = self.contents()
        by_recording: dict[int, list[Any]] = {}
        for r in rows:
            n = contents.get(r["sha256"] or "")
            assert r["state"] == "done" and n is not None, (r["key"], r["state"])
            by_recording.setdefault(n, []).append(r)
        assert set(by_recording) == self.named
        for n, rs in by_recording.items():
            assert len(rs) == 1, f"recording {n} has {len(rs)} rows: {[r['key'] for r in rs]}"
        files = {str(p.relative_to(self.cfg.archive.dir)) for p in self.cfg.archive.dir.rglob("*")
                 if p.is_file() and p.suffix in (".wav", ".mp3") and not p.name.startswith(".")
                 and ".yeastar-archiver" not in p.parts} - set(self.foreign)
        # An identical copy somebody put there for a recording nobody named is theirs, not ours.
        files -= {rel for rel, n in self.planted.items() if n not in self.named}
        assert files == {str(r["final_path"]) for r in rows}


ArchiverMachine.TestCase.settings = settings.get_profile(PROFILE)
TestArchiverMachine = pytest.mark.timeout(300 if PROFILE == "ci" else 0)(ArchiverMachine.TestCase)
