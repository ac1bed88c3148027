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
        with pytest.raises(FileExistsError):   # a fresh start never unlinks what stands at its name
            ArchiveDir.open_part(fd, ".x.wav.part", keep=0)
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
        assert tail.poll() == []                         # and in run it never counts without one
        with path.open("a") as f:
            f.write("\n3\nx.wav\n")
        assert tail.poll() == [Ref(rec_id=2), Ref(rec_id=3), Ref(file="x.wav")]
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


def test_each_attempt_has_its_own_temp_file_and_only_the_file_written_is_linked(tmp_path: Path) -> None:
    """Row 25: two attempts at one final name never share a temp file; a temp name that no longer is the
    file written through the descriptor is never linked to the final name."""
    from daemon.archive import is_part_name, part_name
    root = tmp_path / "archive"
    root.mkdir()
    a, b = part_name("x.wav"), part_name("x.wav")
    assert a != b and is_part_name(a) and is_part_name(b) and a.startswith(".x.wav.")
    assert len(part_name("y" * 251 + ".wav")) <= 255
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        mine = ArchiveDir.open_part(fd, a, keep=0)
        os.write(mine, b"RIFF mine")
        written = os.fstat(mine)
        # Someone swaps another file in under the temp name (another attempt, an older version).
        os.unlink(a, dir_fd=fd)
        (root / a).write_bytes(b"RIFF growing, not mine")
        with pytest.raises(OSError, match="no longer the file that was written"):
            ArchiveDir.commit(fd, a, "x.wav", written)
        os.close(mine)
        assert not (root / "x.wav").exists()
    finally:
        os.close(fd)


def test_a_half_written_queue_line_is_one_recording_not_two(tmp_path: Path) -> None:
    """Row 30: a writer flushing "17" then "27\\n" enqueues 1727 — never 17 and 27."""
    path = tmp_path / "queue.txt"
    path.write_text("")
    tail = QueueTail(path)
    with path.open("a") as f:
        f.write("17")
        f.flush()
        assert tail.poll() == []
        assert tail.poll() == []
        f.write("27\n")
        f.flush()
        assert tail.poll() == [Ref(rec_id=1727)]


def test_a_megabyte_line_is_skipped_without_being_held_in_memory(tmp_path: Path) -> None:
    """Row 30: a 50 MB line is reported by line number and skipped; the tail never buffers more than a line cap."""
    import tracemalloc

    import daemon.sources as sources
    path = tmp_path / "queue.txt"
    with path.open("w") as f:
        f.write("1\n")
        for _ in range(50):
            f.write("9" * (1024 * 1024))
        f.write("\n2\n")
    tail = QueueTail(path)
    refs: list[Ref] = []
    tracemalloc.start()
    with structlog.testing.capture_logs() as logs:
        while True:
            refs += tail.poll()
            assert len(tail._partial) <= sources.MAX_LINE_BYTES
            if not tail.behind:
                break
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert refs == [Ref(rec_id=1), Ref(rec_id=2)]
    assert peak < 8 * 1024 * 1024          # one read of READ_BYTES and its split, never the line
    bad = [e for e in logs if e["event"] == "queue.malformed_line"]
    assert [(e["line"], e["reason"]) for e in bad] == [(2, f"longer than {sources.MAX_LINE_BYTES} bytes")]


def test_queue_lines_may_carry_trailing_comments_and_path_like_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "queue.txt"
    path.write_text("1007 # from the CRM\nx.wav\t# tab too\n../../etc/x.wav\na/b.wav\n.hidden.wav\nc#d.wav\n"
                    "a..b.wav\nnul\x00.wav\nc1\x85.wav\n")
    with structlog.testing.capture_logs() as logs:
        refs = QueueTail(path).poll()
    assert refs == [Ref(rec_id=1007), Ref(file="x.wav"), Ref(file="c#d.wav")]
    bad = {e["line"]: e for e in logs if e["event"] == "queue.malformed_line"}
    assert set(bad) == {3, 4, 5, 7, 8, 9}
    assert all(e["path"] == str(path) for e in bad.values())       # the line names its file and line number
    assert all("path" in bad[n]["reason"] for n in (3, 4, 5, 7))
    assert all("control characters" in bad[n]["reason"] for n in (8, 9))


def test_lines_appended_to_the_old_file_before_a_rotation_are_not_lost(tmp_path: Path) -> None:
    """Row 23/30: the file is kept open; at a rotation the old file is read to its end before the new one."""
    path = tmp_path / "queue.txt"
    path.write_text("1\n")
    tail = QueueTail(path)
    assert tail.poll() == [Ref(rec_id=1)]
    with path.open("a") as f:
        f.write("2\n")                      # written just before the rotation, never polled before it
    path.rename(tmp_path / "queue.txt.1")
    path.write_text("3\n")
    assert tail.poll() + tail.poll() == [Ref(rec_id=2), Ref(rec_id=3)]
    tail.close()


def _ino(fd: int) -> int:
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def test_a_kept_folder_is_used_again_only_while_it_is_still_at_its_path(tmp_path: Path) -> None:
    """The folder descriptors kept open for speed keep the walk's guarantees: a day folder swapped for a
    symlink after its first use is refused, not written through; one deleted or moved away is made
    again at its path, never written into where it went."""
    from pathlib import PurePosixPath
    root = tmp_path / "archive"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = ArchiveDir(root)
    day = PurePosixPath("2026/12/02")
    try:
        first = _ino(archive.open_dir_cached(day))
        assert _ino(archive.open_dir_cached(day)) == first == (root / "2026/12/02").stat().st_ino
        # Deleted: made again, at its path.
        os.rmdir(root / "2026/12/02")
        again = _ino(archive.open_dir_cached(day))
        assert again == (root / "2026/12/02").stat().st_ino
        # Moved out of the archive and replaced by a symlink to where it went: refused.
        os.rename(root / "2026/12/02", outside / "02")
        (root / "2026/12/02").symlink_to(outside / "02")
        with pytest.raises(OSError):
            archive.open_dir_cached(day)
        # A month folder swapped for a symlink above a kept day: refused too.
        os.unlink(root / "2026/12/02")
        assert _ino(archive.open_dir_cached(day)) == (root / "2026/12/02").stat().st_ino   # kept again
        os.rename(root / "2026/12", outside / "12")
        (root / "2026/12").symlink_to(outside / "12")
        with pytest.raises(OSError):
            archive.open_dir_cached(day)
    finally:
        archive.close()
    assert not list((outside / "02").iterdir()) and not list((outside / "12" / "02").iterdir())
