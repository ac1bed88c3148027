"""The ledger's rules for one recording named twice, its evidence, its modes and its errors (real SQLite files)."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from daemon.errors import LedgerError
from daemon.ledger import KV_REBUILT, Ledger, LedgerDb, Ref, Row, name_hash

NAME = "20220112173629-1641980184.14-5566-5556-Internal.wav"


def _db(tmp_path: Path) -> LedgerDb:
    return LedgerDb(tmp_path / "state" / "ledger.db")


def _claim_all(db: LedgerDb) -> list[str]:
    return [r.key for r in db.claim(10, now=1.0, lease_s=60)]


def test_an_id_and_its_name_bind_into_one_row(tmp_path: Path) -> None:
    """Row 25: the id row learns its served name; the waiting name row for it goes, the id row transfers."""
    db = _db(tmp_path)
    db.enqueue_many([Ref(rec_id=7)], source="config", now=0)
    db.enqueue([Ref(file=NAME)], source="event", now=0)
    assert {r.key for r in db.rows()} == {"id:7", f"file:{NAME}"}
    assert db.claim(1, now=1.0, lease_s=60)[0].key == "id:7"
    assert db.bind_name("id:7", NAME) == ("proceed", None)
    assert [r.key for r in db.rows()] == ["id:7"] and db.get("id:7").file == NAME  # type: ignore[union-attr]
    # The same name arriving again later is the same recording: nothing new.
    assert db.enqueue([Ref(file=NAME)], source="event", now=0) == 0
    assert db.enqueue_many([Ref(file=NAME)], source="queue", now=0) == 0
    db.close()


def test_a_twin_in_transfer_makes_the_other_wait_and_hands_it_its_result(tmp_path: Path) -> None:
    """Row 25: never two transfers of one recording; the one that waited takes the result, one row stays."""
    db = _db(tmp_path)
    db.enqueue_many([Ref(rec_id=7)], source="config", now=0)
    db.enqueue([Ref(file=NAME)], source="event", now=0)
    claimed = _claim_all(db)
    assert set(claimed) == {"id:7", f"file:{NAME}"}          # names unknown yet: both claimed
    assert db.bind_name(f"file:{NAME}", NAME) == ("proceed", None)
    outcome, twin = db.bind_name("id:7", NAME)
    assert outcome == "wait" and twin is not None and twin.key == f"file:{NAME}"
    db.release("id:7", now=2.0)
    assert _claim_all(db) == []                                # its twin is in transfer: not claimable
    assert db.complete(f"file:{NAME}", final_path=f"d/{NAME}", size=10, sha256="ab", now=3.0, file=NAME) == 7
    rows = db.rows()
    assert [(r.key, r.state, r.final_path, r.sha256) for r in rows] == [("id:7", "done", f"d/{NAME}", "ab")]
    db.close()


def test_binds_that_share_a_transaction_answer_as_one_call_after_another_would(tmp_path: Path) -> None:
    """Group commit of binds: ids that learn their names in one batch get one write, and a pair of twins
    in the same batch still ends in one transfer (the second sees what the first wrote)."""
    db = _db(tmp_path)
    other = "20220112173700-1641980200.15-5566-5556-Internal.wav"
    db.enqueue_many([Ref(rec_id=7), Ref(rec_id=8)], source="config", now=0)
    db.enqueue([Ref(file=NAME)], source="event", now=0)
    assert set(_claim_all(db)) == {"id:7", "id:8", f"file:{NAME}"}
    changes = db.conn.total_changes
    outcomes = db.bind_names([(f"file:{NAME}", NAME), ("id:7", NAME), ("id:8", other)])
    assert [o for o, _ in outcomes] == ["proceed", "wait", "proceed"]
    assert outcomes[1][1] is not None and outcomes[1][1].key == f"file:{NAME}"
    assert db.conn.total_changes > changes
    assert db.get("id:8").file == other  # type: ignore[union-attr]
    # All known and without twins: answered by reads, no transaction at all.
    changes = db.conn.total_changes
    assert db.bind_names([("id:8", other)]) == [("proceed", None)] and db.conn.total_changes == changes
    db.close()


def test_a_twin_already_done_settles_the_other_without_a_transfer(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.enqueue([Ref(file=NAME)], source="event", now=0)
    _claim_all(db)
    db.complete(f"file:{NAME}", final_path=f"d/{NAME}", size=10, sha256="ab", now=3.0, file=NAME)
    db.enqueue_many([Ref(rec_id=7)], source="config", now=4.0)
    assert _claim_all(db) == ["id:7"]
    outcome, row = db.bind_name("id:7", NAME)
    assert outcome == "done" and row is not None and row.key == "id:7" and row.final_path == f"d/{NAME}"
    assert [(r.key, r.state, r.sha256) for r in db.rows()] == [("id:7", "done", "ab")]
    db.close()


@pytest.mark.parametrize("state", ["pending", "failed", "missing", "done", "in_progress"])
def test_an_id_with_metadata_takes_over_a_name_row_in_every_state(tmp_path: Path, state: str) -> None:
    """Discovery's id ref replaces a waiting, failed or missing name row, takes over a done one, and
    waits for one in transfer (whose completion then settles it): one recording, one row."""
    db = _db(tmp_path)
    key = f"file:{NAME}"
    db.enqueue([Ref(file=NAME)], source="event", now=0)
    if state != "pending":
        _claim_all(db)
    if state in ("missing", "failed"):
        db.finish(key, state=state, error="x", now=1.0)
    elif state == "done":
        db.complete(key, final_path=f"d/{NAME}", size=5, sha256="cd", now=2.0, file=NAME)
    db.enqueue([Ref(rec_id=101, file=NAME, meta=(("size", 5),))], source="discover", now=3.0)
    rows = {r.key: r for r in db.rows()}
    if state == "in_progress":
        assert {k: r.state for k, r in rows.items()} == {key: "in_progress", "id:101": "pending"}
        assert _claim_all(db) == []   # it waits for its twin
        db.complete(key, final_path=f"d/{NAME}", size=5, sha256="cd", now=4.0, file=NAME)
        rows = {r.key: r for r in db.rows()}
        assert {k: r.state for k, r in rows.items()} == {"id:101": "done"}
    elif state == "done":
        assert {k: r.state for k, r in rows.items()} == {"id:101": "done"}
        assert rows["id:101"].sha256 == "cd" and rows["id:101"].meta["size"] == 5
    else:
        assert {k: r.state for k, r in rows.items()} == {"id:101": "pending"}
    db.close()


def test_a_vanished_file_keeps_its_evidence(tmp_path: Path) -> None:
    """Row 29: re-queueing a done row whose file vanished keeps its path, size and sha256."""
    db = _db(tmp_path)
    db.enqueue_many([Ref(rec_id=7)], source="config", now=0)
    _claim_all(db)
    db.complete("id:7", final_path="d/x.wav", size=10, sha256="ab", now=1.0, file="x.wav")
    db.requeue("id:7", reason="vanished", now=2.0)
    row = db.get("id:7")
    assert row is not None and row.state == "pending"
    assert (row.final_path, row.bytes, row.sha256) == ("d/x.wav", 10, "ab")
    db.close()


def test_the_ledger_is_private_and_never_creates_its_folders_parents(tmp_path: Path) -> None:
    """Low: callers' names and numbers: ledger 0600, its folder 0700; a missing parent is an error, not mkdir -p."""
    db = _db(tmp_path)
    db.enqueue_many([Ref(rec_id=1)], source="config", now=0)
    db.close()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        p = tmp_path / "state" / name
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, name
    with pytest.raises(FileNotFoundError):
        LedgerDb(tmp_path / "unmounted" / ".yeastar-archiver" / "ledger.db")
    assert not (tmp_path / "unmounted").exists()


def test_an_older_world_readable_ledger_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    LedgerDb(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_locked_ledger_is_a_ledger_error_not_a_crash(tmp_path: Path) -> None:
    """Row 27: "database is locked" after the busy timeout comes back as LedgerError (a pause), with the path."""
    path = tmp_path / "ledger.db"
    async with Ledger(path) as ledger:
        await ledger.call(lambda db: db.conn.execute("PRAGMA busy_timeout = 100"))
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(LedgerError, match="locked"):
                await ledger.call(lambda db: db.enqueue_many([Ref(rec_id=1)], source="t", now=0))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await ledger.call(lambda db: db.enqueue_many([Ref(rec_id=1)], source="t", now=0)) == 1


async def test_the_queue_keeps_what_a_locked_ledger_could_not_take(tmp_path: Path) -> None:
    """Row 27: lines read while the ledger is locked are offered again once it is free; none is lost."""
    from daemon.clock import SystemClock
    from daemon.sources import QueueTail, follow_queue
    from daemon.supervise import Loops
    path = tmp_path / "ledger.db"
    queue = tmp_path / "queue.txt"
    queue.write_text("1\n2\n3\n")
    loops = Loops(SystemClock())
    stop = asyncio.Event()
    async with Ledger(path) as ledger:
        await ledger.call(lambda db: db.conn.execute("PRAGMA busy_timeout = 50"))
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        released = threading.Event()

        def release_later() -> None:
            time.sleep(1.0)
            holder.execute("ROLLBACK")
            released.set()
        threading.Thread(target=release_later, daemon=True).start()

        async def enqueue(refs: list[Ref]) -> int:
            return await ledger.call(lambda db: db.enqueue_many(refs, source="queue", now=0))
        task = asyncio.create_task(follow_queue(QueueTail(queue), enqueue, SystemClock(), 0.05, stop, loops=loops))
        while loops.states.get("queue") is None or loops.states["queue"].ok:
            await asyncio.sleep(0.01)
        assert "locked" in (loops.states["queue"].error or "")
        while not released.is_set() or not loops.states["queue"].ok:
            await asyncio.sleep(0.05)
        stop.set()
        await task
        holder.close()
        counts = await ledger.call(lambda db: db.counts())
    assert counts["pending"] == 3


def test_the_rebuild_mark_is_kept_in_the_ledger(tmp_path: Path) -> None:
    db = _db(tmp_path)
    assert db.kv_get(KV_REBUILT) is None
    db.close()


class _LongWayBinds(LedgerDb):
    """The ledger with the one-statement bind turned off: the oracle the short way must agree with."""

    @staticmethod
    def _bind_new_name(c: sqlite3.Connection, key: str, served: str) -> None:
        return None


_NAMES = ("a.wav", "a.mp3", "a", "b.wav")
_STATES = ("pending", "in_progress", "in_progress", "in_progress", "done", "copying", "failed", "missing",
           "forgotten")
_row_st = st.tuples(st.sampled_from(["id:1", "id:2", "id:3", "file:a.wav", "file:a.mp3", "file:b.wav"]),
                    st.one_of(st.none(), st.sampled_from(_NAMES)), st.sampled_from(_STATES))


def _fill(db: LedgerDb, rows: list[tuple[str, str | None, str]], forgotten: list[tuple[str, str]]) -> None:
    with db.write() as c:
        for key, file, state in rows:
            rec_id = int(key[3:]) if key.startswith("id:") else None
            file = file if rec_id is not None else key[5:]   # a name row goes by its name
            c.execute("INSERT OR IGNORE INTO recordings (key, rec_id, file, state, final_path, sha256, done_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)", (key, rec_id, file, state,
                                                       f"d/{file}" if state in ("done", "copying") else None,
                                                       "ab" if state in ("done", "copying") else None, 1.0))
        for key, name in forgotten:
            c.execute("INSERT OR IGNORE INTO forgotten (key, name_hash, forgotten_at, forgotten_by) "
                      "VALUES (?, ?, 1.0, 'test')", (key, name_hash(name)))


def _dump(db: LedgerDb) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    return ([tuple(r) for r in db.conn.execute("SELECT * FROM recordings ORDER BY key")],
            [tuple(r) for r in db.conn.execute("SELECT * FROM forgotten ORDER BY key")])


def test_the_one_statement_bind_answers_and_writes_exactly_as_the_long_way(tmp_path: Path) -> None:
    """The common bind (an id row learns a name nothing else goes by) is one guarded UPDATE, for the
    ledger thread's sake; over random ledgers of ids, names, variants, states and forgotten names,
    every batch of binds must answer and leave the ledger exactly as the long way does."""
    short_way = [0]
    dirs = iter(range(10**6))

    class Counted(LedgerDb):
        @staticmethod
        def _bind_new_name(c: sqlite3.Connection, key: str, served: str) -> tuple[str, Row | None] | None:
            out = LedgerDb._bind_new_name(c, key, served)
            short_way[0] += out is not None
            return out

    @settings(max_examples=300, deadline=None)
    @example(rows=[("id:1", None, "in_progress")], forgotten=[], binds=[("id:1", "a.wav")])
    @example(rows=[("id:1", None, "in_progress"), ("id:2", None, "in_progress"), ("file:a.mp3", None, "pending")],
             forgotten=[], binds=[("id:2", "b.wav"), ("id:1", "a.wav")])
    @example(rows=[("id:1", None, "in_progress"), ("id:2", None, "in_progress")], forgotten=[],
             binds=[("id:1", "a.wav"), ("id:2", "a.mp3")])
    @example(rows=[("id:1", None, "in_progress")], forgotten=[("file:x", "a.mp3")], binds=[("id:1", "a.wav")])
    @given(rows=st.lists(_row_st, max_size=6),
           forgotten=st.lists(st.tuples(st.sampled_from(["id:3", "file:x"]), st.sampled_from(_NAMES)), max_size=2),
           binds=st.lists(st.tuples(st.sampled_from(["id:1", "id:2", "id:3", "file:a.wav", "id:9"]),
                                    st.sampled_from(_NAMES)), min_size=1, max_size=3))
    def check(rows: list[tuple[str, str | None, str]], forgotten: list[tuple[str, str]],
              binds: list[tuple[str, str]]) -> None:
        n = next(dirs)
        fast, slow = Counted(tmp_path / f"f{n}" / "l.db"), _LongWayBinds(tmp_path / f"s{n}" / "l.db")
        try:
            for db in (fast, slow):
                _fill(db, rows, forgotten)
            got = fast.bind_names(binds)
            want = slow.bind_names(binds)
            assert [(o, r.key if r else None) for o, r in got] == [(o, r.key if r else None) for o, r in want]
            assert [r for _, r in got] == [r for _, r in want]
            assert _dump(fast) == _dump(slow)
        finally:
            fast.close()
            slow.close()

    check()
    assert short_way[0] > 0   # the short way was taken, not only the long one
