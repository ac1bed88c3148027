"""Disk-side behaviour: resume from a checkpoint, Range ignored, symlinks refused, the queue file tail."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import structlog

from daemon.archive import ArchiveDir
from daemon.config import load_config
from daemon.ledger import Ref
from daemon.runner import RunResult, run_pipeline
from daemon.sources import QueueTail
from tests.conftest import SimFactory, archive_files, write_config


async def _once(cfg_path: Path) -> RunResult:
    return await run_pipeline(load_config(cfg_path), asyncio.Event(), once=True)


async def test_a_cut_transfer_resumes_from_its_checkpoint_with_range(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1, size_min=2_000_000, size_max=2_000_000)
    sim.control(options={"cut_rate": 1.0})
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000]},
                                                      "downloads": {"checkpoint_bytes": 65536, "max_attempts": 3}})

    async def heal() -> None:
        # Let the first transfer be cut halfway, then let the PBX behave.
        while sim.counters.faults["cut"] < 1:
            await asyncio.sleep(0.005)
        sim.control(options={"cut_rate": 0.0})
    result, _ = await asyncio.gather(_once(cfg), heal())
    assert result.counts["done"] == 1
    assert sim.counters.range_requests >= 1
    rec = sim.recordings[0]
    assert sim.counters.bytes_served < 2 * rec.size  # the second attempt did not start from zero
    assert next(iter(archive_files(tmp_path / "archive").values())) == sim.content(rec)


async def test_a_server_that_ignores_range_is_restarted_from_zero(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1, size_min=1_000_000, size_max=1_000_000, range_support=False)
    sim.control(options={"cut_rate": 1.0})
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000]},
                                                      "downloads": {"checkpoint_bytes": 65536}})

    async def heal() -> None:
        while sim.counters.faults["cut"] < 1:
            await asyncio.sleep(0.005)
        sim.control(options={"cut_rate": 0.0})
    with structlog.testing.capture_logs() as logs:
        result, _ = await asyncio.gather(_once(cfg), heal())
    assert result.counts["done"] == 1
    assert any(e["event"] == "download.restart_from_zero" for e in logs)
    assert next(iter(archive_files(tmp_path / "archive").values())) == sim.content(sim.recordings[0])


async def test_a_symlink_planted_in_the_archive_is_never_followed(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "2022").symlink_to(elsewhere, target_is_directory=True)
    cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [1000, 1001]}})
    result = await _once(cfg)
    assert list(elsewhere.iterdir()) == []
    assert result.counts["failed"] == 2
    from daemon.ledger import LedgerDb
    db = LedgerDb(load_config(cfg).state.path)
    try:
        assert all("symlink" in (r.last_error or "") for r in db.rows())
    finally:
        db.close()


def test_a_symlink_at_the_temp_path_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    root = tmp_path / "archive"
    (root / "d").mkdir(parents=True)
    (root / "d" / ".x.wav.part").symlink_to(victim)
    archive = ArchiveDir(root)
    fd = archive.open_dir(Path("d"), create=False)  # type: ignore[arg-type]
    try:
        with pytest.raises(OSError):
            ArchiveDir.open_part(fd, ".x.wav.part", keep=10)
        new = ArchiveDir.open_part(fd, ".x.wav.part", keep=0)  # a fresh start replaces the link itself
        os.write(new, b"data")
        os.close(new)
    finally:
        os.close(fd)
    assert victim.read_bytes() == b"precious"


def test_commit_never_clobbers_an_existing_file(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    root.mkdir()
    (root / "final.wav").write_bytes(b"first")
    (root / ".final.wav.part").write_bytes(b"second")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert ArchiveDir.commit(fd, ".final.wav.part", "final.wav") is False
        assert ArchiveDir.commit(fd, ".final.wav.part", "other.wav") is True
    finally:
        os.close(fd)
    assert (root / "final.wav").read_bytes() == b"first"
    assert (root / "other.wav").read_bytes() == b"second"
    assert not (root / ".final.wav.part").exists()


def test_queue_tail_follows_appends_rotation_truncation_and_absence(tmp_path: Path) -> None:
    path = tmp_path / "queue.txt"
    tail = QueueTail(path)
    with structlog.testing.capture_logs() as logs:
        assert tail.poll() == []
        assert tail.poll() == []
        path.write_text("1\n# comment\n\nbad line\n2")
        assert tail.poll() == [Ref(rec_id=1)]            # "2" has no newline yet
        assert tail.poll() == [Ref(rec_id=2)]            # unchanged for a poll: taken
        with path.open("a") as f:
            f.write("\n3\nx.wav\n")
        assert tail.poll() == [Ref(rec_id=3), Ref(file="x.wav")]
        assert tail.poll() == []
        path.rename(tmp_path / "queue.txt.1")
        path.write_text("4\n")
        assert tail.poll() == [Ref(rec_id=4)]
        path.write_text("5\n")                            # truncated and rewritten to the same size
        assert tail.poll() == [Ref(rec_id=5)]
        path.write_text("bad line\n")
        tail.poll()
        tail.poll()
    events = [(e["event"], e.get("line")) for e in logs]
    assert events.count(("queue.missing", None)) == 1
    assert ("queue.malformed_line", 4) in events
    assert events.count(("queue.malformed_line", 1)) == 1
    assert sum(1 for e, _ in events if e == "queue.reopened") == 3


def test_queue_tail_once_takes_an_unfinished_last_line(tmp_path: Path) -> None:
    path = tmp_path / "queue.txt"
    path.write_text("7\n8")
    assert QueueTail(path).poll(final=True) == [Ref(rec_id=7), Ref(rec_id=8)]


def test_a_large_queue_file_is_read_in_bounded_bites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.sources as sources
    monkeypatch.setattr(sources, "READ_BYTES", 64)
    path = tmp_path / "queue.txt"
    path.write_text("".join(f"{i}\n" for i in range(1, 101)) + "101")
    tail = QueueTail(path)
    refs: list[Ref] = []
    polls = 0
    while True:
        refs += tail.poll(final=True)
        polls += 1
        if not tail.behind:
            break
    assert refs == [Ref(rec_id=i) for i in range(1, 102)]
    assert polls >= 5  # 295 bytes in 64-byte bites
