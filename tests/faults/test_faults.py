"""Every fault of spec/reliability.md injected on loopback, each followed by the invariants I1-I5.

Each test runs with a unique canary client secret and searches every log line (rendered through the
production redactor, tracebacks included) and the status output for it and for every token issued.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
import trustme

from daemon.config import load_config
from daemon.ledger import LedgerDb, Ref
from tests.faults.conftest import FaultRun

pytestmark = pytest.mark.faults

FIRST = 1000


@pytest.mark.parametrize("fault", ["close", "rst", "cl_short", "chunked_no_end"])
async def test_a_broken_body_never_becomes_a_file_and_is_retried(fault_run: FaultRun, fault: str) -> None:
    """Row 1: body cut (FIN, RST), fewer bytes than Content-Length, chunked body without its last chunk."""
    fault_run.raw.script[FIRST] = [fault, fault]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    assert fault_run.raw.file_requests[FIRST] == 3
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


async def test_a_short_content_length_is_caught_by_the_listing_size(fault_run: FaultRun) -> None:
    """Row 1: the server declares fewer bytes than the recording has; the listing's size exposes it."""
    rec = fault_run.sim.recordings[0]
    fault_run.raw.script[FIRST] = ["cl_long"]
    cfg = fault_run.config(ids=[])
    db = LedgerDb(load_config(cfg).state.path)
    db.enqueue([Ref(rec_id=rec.id, file=rec.file, meta=(("size", rec.size),))], source="discover", now=0)
    db.close()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1 and fault_run.raw.file_requests[FIRST] == 2
    fault_run.assert_invariants(cfg, done={FIRST})


@pytest.mark.parametrize("fault", ["silence", "trickle"])
async def test_a_stalled_or_trickling_transfer_is_aborted_and_retried(fault_run: FaultRun, fault: str) -> None:
    """Row 2: headers then silence (read timeout); 10 bytes/s (minimum throughput)."""
    fault_run.raw.script[FIRST] = [fault]
    cfg = fault_run.config(downloads={"read_timeout_s": 0.5, "min_bytes_per_second": 1000,
                                      "throughput_window_s": 0.5})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3 and fault_run.raw.file_requests[FIRST] == 2
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


@pytest.mark.parametrize(("fault", "wait_s"), [("503_seconds", 1.0), ("429_seconds", 1.0), ("503_date", 1.0)])
async def test_retry_after_is_honoured(fault_run: FaultRun, fault: str, wait_s: float) -> None:
    """Row 5: 429/503 with Retry-After in seconds or as an HTTP date."""
    fault_run.raw.script[FIRST] = [fault]
    cfg = fault_run.config(downloads={"backoff_base_s": 0.01, "backoff_max_s": 0.02})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    first, second = fault_run.raw.request_times[FIRST][:2]
    assert second - first >= wait_s * 0.9   # a lower bound: waiting longer is allowed, shorter is not
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


@pytest.mark.parametrize("fault", ["html", "empty", "json_10004"])
async def test_a_body_that_is_not_the_recording_is_never_stored(fault_run: FaultRun, fault: str) -> None:
    """Row 10: HTML, zero bytes, a JSON envelope (10004: the token is renewed and the request retried)."""
    fault_run.raw.script[FIRST] = [fault]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})
    if fault == "json_10004":
        assert fault_run.sim.counters.refreshes == 1


async def test_a_json_not_found_in_place_of_audio_ends_missing(fault_run: FaultRun) -> None:
    """Rows 10 and 12: errcode 60001 where the audio should be: state missing, not retried forever."""
    fault_run.raw.script[FIRST] = ["json_60001"]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["missing"] == 1 and result.counts["done"] == 2
    assert fault_run.raw.file_requests[FIRST] == 1
    fault_run.assert_invariants(cfg, done={1001, 1002})


@pytest.mark.parametrize("answer", ["range_ignored", "range_wrong", "416"])
async def test_resume_never_splices_two_attempts(fault_run: FaultRun, answer: str) -> None:
    """Row 11: a resumed transfer meets a server that ignores Range, answers the wrong range, or 416."""
    # First transfer cut after a checkpoint; the second (a Range request) gets the answer under test.
    fault_run.raw.script[FIRST] = ["close", answer]
    cfg = fault_run.config(ids=[FIRST], downloads={"checkpoint_bytes": 65536})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1
    assert fault_run.raw.ranges, "the second attempt should have asked for a range"
    fault_run.assert_invariants(cfg, done={FIRST})


async def test_416_on_a_complete_temp_file_finishes_it(fault_run: FaultRun, tmp_path: Path) -> None:
    """Row 11: all bytes were on disk when the process died; the resume answers 416 and the file is
    verified and committed without transferring again."""
    rec = fault_run.sim.recordings[0]
    cfg = fault_run.config(ids=[FIRST], downloads={"checkpoint_bytes": 65536})
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1
    # Rebuild the crash: the file back in its temp name with a checkpoint at its full size.
    c = load_config(cfg)
    final = next(c.archive.dir.rglob(rec.file))
    part = final.with_name(f".{final.name}.part")
    final.rename(part)
    final.with_name(final.name + ".json").unlink()
    db = LedgerDb(c.state.path)
    db.conn.execute("UPDATE recordings SET state='pending', final_path=NULL, part_path=?, part_synced=? "
                    "WHERE rec_id=?", (str(part.relative_to(c.archive.dir)), rec.size, rec.id))
    db.close()
    before = fault_run.raw.file_requests[FIRST]
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 1
    assert fault_run.raw.file_requests[FIRST] == before + 1 and fault_run.raw.served["ok"] >= 2
    fault_run.assert_invariants(cfg, done={FIRST})


async def test_tokens_refused_by_every_file_url_cost_at_most_one_refresh_each(fault_run: FaultRun) -> None:
    """Row 6: the file URLs answer 10004 to several workers at once; each stale token is renewed once
    (strict single flight under 20 concurrent callers is pinned in tests/test_client.py)."""
    for rec in fault_run.sim.recordings:
        fault_run.raw.script[rec.id] = ["json_10004"]
    cfg = fault_run.config()
    result = await fault_run.once(cfg)
    assert result.counts["done"] == 3
    assert fault_run.sim.counters.refreshes <= 3   # one per stale token seen, never one per request storm
    fault_run.assert_invariants(cfg, done={1000, 1001, 1002})


async def test_a_read_only_archive_pauses_and_resumes(fault_run: FaultRun, tmp_path: Path) -> None:
    """Row 14: the archive's filesystem turns read-only (EROFS), then writable again."""
    import os
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs read-only")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cfg = fault_run.config(archive={"dir": str(disk / "archive")},
                               state={"path": str(tmp_path / "state" / "ledger.db")},
                               downloads={"pause_max_s": 0.3})
        (disk / "archive").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        import asyncio

        async def writable_later() -> None:
            while "StorageError" not in fault_run.logs.getvalue():
                await asyncio.sleep(0.02)
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        result, _ = await asyncio.gather(fault_run.once(cfg), writable_later())
        assert result.counts["done"] == 3 and result.counts["failed"] == 0
        assert '"event": "pipeline.paused"' in fault_run.logs.getvalue()
        files = {p.name for p in (disk / "archive").rglob("*.wav")}
        assert files == {r.file for r in fault_run.sim.recordings}
        fault_run.assert_no_secrets()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


async def test_an_expired_pbx_certificate_is_a_hard_failure(fault_run: FaultRun, tmp_path: Path) -> None:
    """Row 24: an expired certificate fails clearly; nothing falls back to no verification."""
    import datetime as dt

    from daemon.client import PbxClient
    from daemon.errors import TlsError
    from daemon.simulator import SimOptions, Simulator
    from tests.conftest import pbx_config
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                  not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC)).configure_cert(ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sim = Simulator(SimOptions(count=1))
    await sim.start(ssl_context=ctx)
    try:
        from daemon.config import TlsConfig
        async with PbxClient(pbx_config(sim.base_url, tls=TlsConfig(ca_file=ca_file))) as client:
            with pytest.raises(TlsError) as info:
                await client.check()
        assert "expired" in str(info.value).lower()
        assert sim.counters.logins == 0
    finally:
        await sim.stop()


def test_the_fault_server_knows_every_fault() -> None:
    from tests.faults.rawpbx import FAULTS
    assert len(set(FAULTS)) == len(FAULTS) == 18
    assert time.monotonic() > 0
