"""The off-box copy in S3-compatible storage, and `verify`, against real servers on loopback (moto's and
rclone's), with real files, a real ledger and the simulator as the PBX."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.archive import Naming, final_relpath
from daemon.config import load_config
from daemon.destinations import expected_etag, multipart_etag, object_key, part_md5s, s3_error_for
from daemon.errors import (
    DestinationConfigError,
    DestinationFullError,
    DestinationRefusedError,
    DestinationUnavailableError,
    PermanentError,
    RetryableError,
)
from daemon.ledger import LedgerDb, Ref
from daemon.logs import configure_logging
from daemon.runner import RunResult, run_pipeline
from daemon.simulator import SimOptions, make_recordings, recording_bytes
from tests.conftest import REPO, SimFactory, archive_files, cli_env, run_cli, simulator_subprocess, write_config
from tests.s3servers import BUCKET, SECRET_KEY, S3Server, s3_server

SERVERS = ["moto", "rclone"]
LAYOUT = "{year}/{month}/{day}/{file}"


def _rel(rec: Any) -> str:
    return str(final_relpath(LAYOUT, Naming(rec.id, rec.file, rec.call_type), dt.datetime.now(dt.UTC)))


async def _once(cfg: Path) -> RunResult:
    return await run_pipeline(load_config(cfg), asyncio.Event(), once=True)


def _copies(cfg: Path) -> dict[str, dict[str, Any]]:
    db = LedgerDb(load_config(cfg).state.path)
    try:
        return {r.key: c for r in db.rows() for c in db.copies_of(r.key)}
    finally:
        db.close()


def _assert_both_hold(server: S3Server, cfg_path: Path, expected: dict[str, bytes], *, local: bool = True) -> None:
    """I1/I3 on both destinations: each recording once, byte-identical, sidecar beside it; I4: the ledger
    says done with each copy's key and ETag."""
    cfg = load_config(cfg_path)
    objects = server.objects()
    recordings = {k: v for k, v in objects.items() if not k.endswith(".json")}
    assert recordings == expected
    assert {k for k in objects if k.endswith(".json")} == {k + ".json" for k in expected}
    prefix = cfg.archive.s3.prefix  # type: ignore[union-attr]
    assert archive_files(cfg.archive.dir) == ({k.removeprefix(prefix): v for k, v in expected.items()} if local
                                              else {})
    db = LedgerDb(cfg.state.path)
    try:
        rows = db.rows()
        assert {r.state for r in rows} == {"done"}
        for r in rows:
            (copy,) = db.copies_of(r.key)
            data = expected[copy["object_key"]]
            assert copy["state"] == "done" and copy["size"] == len(data)
            parts = part_md5s_of(data, cfg.archive.s3.part_size_bytes)  # type: ignore[union-attr]
            assert copy["etag"] in (expected_etag(parts), _md5(data).hex())
            assert r.sha256 == hashlib.sha256(data).hexdigest() and bool(r.local_kept) == local
    finally:
        db.close()


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()  # noqa: S324 - S3's ETag


def part_md5s_of(data: bytes, part: int) -> list[bytes]:
    return [_md5(data[i:i + part]) for i in range(0, len(data), part)] or [_md5(b"")]


# ---------------------------------------------------------------- pure decisions
@pytest.mark.parametrize(("code", "status", "kind"), [
    ("NoSuchBucket", 404, DestinationConfigError),
    ("AccessDenied", 403, DestinationRefusedError),
    ("InvalidAccessKeyId", 403, DestinationRefusedError),
    ("SignatureDoesNotMatch", 403, DestinationRefusedError),
    ("", 403, DestinationRefusedError),
    ("SlowDown", 503, DestinationUnavailableError),
    ("InternalError", 500, DestinationUnavailableError),
    ("", 502, DestinationUnavailableError),
    ("QuotaExceeded", 403, DestinationFullError),
    ("XMinioStorageFull", 507, DestinationFullError),
    ("XMinioAdminBucketQuotaExceeded", 400, DestinationFullError),
    ("ExpiredToken", 400, DestinationRefusedError),
    ("RequestTimeTooSkewed", 403, DestinationRefusedError),
    ("SlowDown", 429, DestinationUnavailableError),
    ("IncompleteBody", 400, RetryableError),
    ("BadDigest", 400, RetryableError),
    ("EntityTooLarge", 400, PermanentError),
])
def test_every_s3_error_carries_its_decision(code: str, status: int, kind: type) -> None:
    assert type(s3_error_for(code, status, "x", what="put object")) is kind


def test_etags_and_keys() -> None:
    a, b = _md5(b"a"), _md5(b"b")
    assert expected_etag([a]) == a.hex()
    assert multipart_etag([a, b]) == _md5(a + b).hex() + "-2"
    assert object_key("recordings/", "2022/x.wav") == "recordings/2022/x.wav"


def test_part_md5s_reads_in_parts(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert part_md5s(tmp_path / "f", 100_000) == part_md5s_of(data, 100_000)
    (tmp_path / "e").write_bytes(b"")
    assert part_md5s(tmp_path / "e", 10) == [_md5(b"")]


# ---------------------------------------------------------------- the copy
@pytest.mark.parametrize("kind", SERVERS)
async def test_once_archives_to_disk_and_to_the_bucket_both_verified(start_sim: SimFactory, tmp_path: Path,
                                                                      kind: str) -> None:
    sim = await start_sim(count=6, size_min=20_000, size_max=7_000_000)
    with s3_server(kind, tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"s3": server.config(part_size_bytes=5 * 1024 * 1024, prefix="pbx1/")}})
        logs = io.StringIO()
        configure_logging("json", "debug", stream=logs)
        result = await _once(cfg)
        assert result.counts["done"] == 6 and result.copy_stats is not None and result.copy_stats.copied == 6
        expected = {f"pbx1/{_rel(r)}": sim.content(r) for r in sim.recordings}
        _assert_both_hold(server, cfg, {k: v for k, v in expected.items()})
        assert SECRET_KEY not in logs.getvalue()
        status = json.loads((await asyncio.to_thread(run_cli, "status", "--json", "-c", str(cfg))).stdout)
        assert status["counts"]["done"] == 6 and status["counts"]["copying"] == 0
        # A second once finds everything done: no transfer, no upload.
        again = await _once(cfg)
        assert again.stats.downloaded == 0 and again.copy_stats is not None and again.copy_stats.copied == 0


@pytest.mark.parametrize("kind", SERVERS)
async def test_keep_local_false_leaves_the_bucket_as_the_archive(start_sim: SimFactory, tmp_path: Path,
                                                                 kind: str) -> None:
    sim = await start_sim(count=4)
    with s3_server(kind, tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"keep_local": False, "s3": server.config()}})
        result = await _once(cfg)
        assert result.counts["done"] == 4
        _assert_both_hold(server, cfg, {_rel(r): sim.content(r) for r in sim.recordings}, local=False)
        # A crash between the two removals: the file went, its sidecar stayed. The next start finishes it.
        left_behind = load_config(cfg).archive.dir / f"{_rel(sim.recordings[0])}.json"
        left_behind.write_text("{}")
        again = await _once(cfg)     # reconciliation must not call the removed files vanished
        assert again.reconcile.vanished == [] and again.stats.downloaded == 0
        assert not left_behind.exists()


@pytest.mark.parametrize("kind", SERVERS)
async def test_an_object_with_other_bytes_at_the_key_is_never_overwritten(start_sim: SimFactory, tmp_path: Path,
                                                                          kind: str) -> None:
    """Also on rclone, which overwrites despite If-None-Match: the HEAD before every write sees it."""
    sim = await start_sim(count=1)
    rec = sim.recordings[0]
    with s3_server(kind, tmp_path / "s3") as server:
        server.client().put_object(Bucket=BUCKET, Key=_rel(rec), Body=b"RIFF somebody else's bytes")
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]},
                                                          "archive": {"s3": server.config()}})
        result = await _once(cfg)
        assert result.counts["done"] == 1
        objects = server.objects()
        assert objects[_rel(rec)] == b"RIFF somebody else's bytes"
        alternate = _rel(rec).replace(".wav", f"~{rec.id}.wav")
        assert objects[alternate] == sim.content(rec)
        assert next(iter(_copies(cfg).values()))["object_key"] == alternate


@pytest.mark.parametrize("kind", SERVERS)
async def test_an_identical_object_already_there_is_adopted_not_sent_again(start_sim: SimFactory, tmp_path: Path,
                                                                           kind: str) -> None:
    sim = await start_sim(count=1)
    rec = sim.recordings[0]
    with s3_server(kind, tmp_path / "s3") as server:
        server.client().put_object(Bucket=BUCKET, Key=_rel(rec), Body=sim.content(rec))
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [rec.id]},
                                                          "archive": {"s3": server.config()}})
        result = await _once(cfg)
        assert result.copy_stats is not None and result.copy_stats.adopted == 1 and result.copy_stats.copied == 0


async def test_an_s3_outage_mid_run_pauses_the_copies_and_fails_nothing(start_sim: SimFactory, tmp_path: Path) -> None:
    """The server stopped while recordings are archived, then restarted on the same port: every copy is
    made, nothing is failed, nothing downloaded twice."""
    sim = await start_sim(count=8, size_min=100_000, size_max=200_000)
    with s3_server("rclone", tmp_path / "s3") as server:
        cfg = load_config(write_config(tmp_path, sim.base_url, extra={
            "sources": {"ids": [r.id for r in sim.recordings]},
            "archive": {"s3": server.config(timeout_s=1)}, "downloads": {"pause_max_s": 0.5}}))
        server.stop()
        stop = asyncio.Event()
        from daemon.service import Health
        health = Health(__import__("daemon.clock", fromlist=["SystemClock"]).SystemClock())
        task = asyncio.create_task(run_pipeline(cfg, stop, once=False, health=health))
        deadline = time.monotonic() + 30
        while health.counts.get("copying", 0) < 8:
            assert time.monotonic() < deadline, health.counts
            await asyncio.sleep(0.1)
        ready, checks = health.readiness()
        assert not ready and not checks["s3"]["ok"]
        server.start()
        while health.counts.get("done", 0) < 8:
            assert time.monotonic() < deadline + 30, health.counts
            await asyncio.sleep(0.1)
        stop.set()
        result = await asyncio.wait_for(task, 30)
        assert result.counts["failed"] == 0 and sum(sim.counters.transfers_completed.values()) == 8
        _assert_both_hold(server, Path(str(cfg.source_path)), {_rel(r): sim.content(r) for r in sim.recordings})


@pytest.mark.parametrize("kind", SERVERS)
def test_wrong_s3_credentials_are_exit_3_for_check_and_once_and_nothing_is_lost(tmp_path: Path, kind: str) -> None:
    if kind == "moto":
        pytest.skip("moto accepts any credentials")
    with s3_server(kind, tmp_path / "s3") as server, simulator_subprocess("--count", "2") as base_url:
        cfg = write_config(tmp_path, base_url, extra={
            "sources": {"ids": [1000, 1001]},
            "archive": {"s3": server.config(secret_access_key="not-the-secret-key-000")}})
        check = run_cli("check", "-c", str(cfg))
        assert check.returncode == 3, check.stderr
        once = run_cli("once", "-c", str(cfg), timeout=60)
        assert once.returncode == 3, once.stderr
        assert "not-the-secret-key-000" not in once.stderr + check.stderr + check.stdout
        counts = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]
        assert counts["copying"] == 2 and counts["failed"] == 0      # archived locally, waiting for a copy
        assert len(archive_files(tmp_path / "archive")) == 2


def test_check_reports_the_bucket_s_versioning_and_object_lock(tmp_path: Path) -> None:
    with s3_server("moto", tmp_path / "s3", lock=True) as server, simulator_subprocess("--count", "1") as base_url:
        server.client().put_object_lock_configuration(Bucket=BUCKET, ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 30}}})
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}, "archive": {"s3": server.config()}})
        result = run_cli("check", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "versioning Enabled" in result.stdout and "Object Lock COMPLIANCE 30 days" in result.stdout


def test_check_with_a_bucket_that_does_not_exist_is_exit_2_and_an_endpoint_that_is_down_exit_4(tmp_path: Path) -> None:
    with s3_server("moto", tmp_path / "s3") as server, simulator_subprocess("--count", "1") as base_url:
        # A source, so that the 2 is the bucket's, not check's "no source is configured".
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]},
                                                      "archive": {"s3": server.config(bucket="no-such-bucket")}})
        assert run_cli("check", "-c", str(cfg)).returncode == 2
        down = server.config(endpoint_url="http://127.0.0.1:9")
        cfg = write_config(tmp_path, base_url, extra={"sources": {"ids": [1000]}, "archive": {"s3": down}})
        assert run_cli("check", "-c", str(cfg)).returncode == 4


def test_sigkill_during_a_multipart_upload_resumes_the_copy_not_the_download(tmp_path: Path) -> None:
    """A crash between "archived locally" and "copied": the next start aborts the abandoned multipart
    upload and makes the copy again; the recording is not downloaded again."""
    opts = SimOptions(count=1, size_min=40_000_000, size_max=40_000_000)
    rec = make_recordings(opts)[0]
    with s3_server("moto", tmp_path / "s3") as server, \
            simulator_subprocess("--count", "1", "--size-min", "40000000", "--size-max", "40000000") as base_url:
        cfg = write_config(tmp_path, base_url, extra={
            "sources": {"ids": [rec.id]}, "archive": {"s3": server.config(part_size_bytes=5 * 1024 * 1024)}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "once", "-c", str(cfg)], cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not server.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["counts"]["copying"] == 1
        again = run_cli("once", "-c", str(cfg), timeout=120)
        assert again.returncode == 0, again.stderr
        assert not server.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads")
        from tests.conftest import sim_counters
        assert sum(sim_counters(base_url)["transfers_completed"].values()) == 1
        assert server.objects()[_rel(rec)] == recording_bytes(opts.seed, "wav", rec)


# ---------------------------------------------------------------- verify
@pytest.mark.parametrize("kind", SERVERS)
async def test_verify_finds_flipped_truncated_and_deleted_copies_keeps_them_aside_and_mends_them(
        start_sim: SimFactory, tmp_path: Path, kind: str) -> None:
    sim = await start_sim(count=5, size_min=30_000, size_max=60_000)
    recs = sim.recordings
    with s3_server(kind, tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in recs]},
                                                          "archive": {"s3": server.config()}})
        await _once(cfg)
        root = tmp_path / "archive"
        flipped, truncated, deleted = root / _rel(recs[0]), root / _rel(recs[1]), root / _rel(recs[2])
        data = bytearray(flipped.read_bytes())
        data[1000] ^= 0xFF
        flipped.write_bytes(bytes(data))
        truncated.write_bytes(truncated.read_bytes()[:5000])
        deleted.unlink()
        c = server.client()
        c.delete_object(Bucket=BUCKET, Key=_rel(recs[3]))                          # gone from the bucket
        c.put_object(Bucket=BUCKET, Key=_rel(recs[4]), Body=b"RIFF rotten bytes")   # damaged in the bucket
        first = await asyncio.to_thread(run_cli, "verify", "--json", "-c", str(cfg))
        assert first.returncode == 1 and first.stdout, first.stderr
        report = json.loads(first.stdout)
        found = {(p["recording"], p["copy"], p["kind"]) for p in report["problems"]}
        assert found == {(str(recs[0].id), "local", "damaged"), (str(recs[1].id), "local", "damaged"),
                         (str(recs[2].id), "local", "vanished"), (str(recs[3].id), "s3", "vanished"),
                         (str(recs[4].id), "s3", "damaged")}
        kept = sorted(p.name for p in root.rglob("*.damaged-*"))
        assert len(kept) == 2                                                   # damage is kept, never deleted
        status = json.loads((await asyncio.to_thread(run_cli, "status", "--json", "-c", str(cfg))).stdout)
        assert status["verify"]["checked"] == 5 and status["verify"]["problems"] == 5
        text = (await asyncio.to_thread(run_cli, "status", "-c", str(cfg))).stdout
        assert "verify: last walk" in text and "5 problem(s)" in text and "copies to s3:" in text
        assert any(".damaged-" in k for k in server.objects())                   # the bucket's too
        # The local copies were restored from the bucket at once; the bucket's are copied again by the copier.
        again = await _once(cfg)
        assert again.stats.downloaded == 0
        second = await asyncio.to_thread(run_cli, "verify", "--read-data", "-c", str(cfg))
        assert second.returncode == 0, second.stdout + second.stderr
        objects = server.objects()
        for r in recs:
            assert (root / _rel(r)).read_bytes() == sim.content(r)
            assert objects[_rel(r)] == sim.content(r)


async def test_the_copies_the_destination_and_verify_have_their_series(start_sim: SimFactory, tmp_path: Path) -> None:
    """What the alerts watch: verified and waiting copies, the destination going down and up, and the
    last verify walk's problems (from the ledger: a `verify` run by hand counts)."""
    from tests.test_metrics import start_live_run, stop_live_run, value
    sim = await start_sim(count=4, size_min=40_000, size_max=40_000)
    recs = sim.recordings
    with s3_server("rclone", tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in recs[:3]]},
                                                          "archive": {"s3": server.config()}})
        await _once(cfg)
        damaged = tmp_path / "archive" / _rel(recs[0])
        damaged.write_bytes(damaged.read_bytes()[:1000])
        walk = await asyncio.to_thread(run_cli, "verify", "-c", str(cfg))
        assert walk.returncode == 1, walk.stdout + walk.stderr
        live = await start_live_run(sim, tmp_path, sources={"ids": [r.id for r in recs[:3]]},
                                    archive={"s3": server.config(timeout_s=1)}, verify={"interval_s": 3600},
                                    downloads={"pause_max_s": 0.5})
        try:
            S3 = {"destination": "s3"}

            async def seen(*want: tuple[str, dict[str, str], float]) -> Any:
                deadline = time.monotonic() + 30
                while True:
                    s = await live.samples()
                    got = [s.get((name, frozenset(labels.items()))) for name, labels, _ in want]
                    if got == [v for _, _, v in want]:
                        return s
                    assert time.monotonic() < deadline, (want, got)
                    await asyncio.sleep(0.1)
            s = await seen(("yeastar_archiver_copies_verified", S3, 3), ("yeastar_archiver_destination_up", S3, 1),
                           ("yeastar_archiver_verify_problems", {}, 1))
            assert value(s, "yeastar_archiver_verify_interval_seconds") == 3600
            assert time.time() - 120 < value(s, "yeastar_archiver_verify_last_run_timestamp_seconds") <= time.time()
            assert value(s, "yeastar_archiver_copies_waiting", destination="s3", state="pending") == 0
            # The bucket goes away while a new recording arrives: it waits, the destination is down.
            server.stop()
            pipeline = live.health.pipeline
            assert pipeline is not None
            await pipeline.ledger.call(lambda db: db.enqueue([Ref(rec_id=recs[3].id)], source="test",
                                                             now=time.time()))
            pipeline.scheduler.notify()
            s = await seen(("yeastar_archiver_destination_up", S3, 0),
                           ("yeastar_archiver_copies_waiting", {**S3, "state": "pending"}, 1))
            assert value(s, "yeastar_archiver_ready") == 0
            server.start()
            s = await seen(("yeastar_archiver_destination_up", S3, 1), ("yeastar_archiver_copies_verified", S3, 4))
            assert value(s, "yeastar_archiver_copies_total", destination="s3", result="copied") == 1
            assert value(s, "yeastar_archiver_copied_bytes_total", destination="s3") == recs[3].size
        finally:
            await stop_live_run(live)
