"""The durable ledger: one SQLite row per recording, owned by one thread, shared with other processes.

WAL with ``synchronous=FULL``; writes in ``BEGIN IMMEDIATE`` transactions that never span network
I/O. ``status``, ``enqueue`` and ``retry`` open the same file from another process while ``run`` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from daemon.errors import ConfigError, LedgerError, StorageError

STATES = ("pending", "in_progress", "done", "failed", "missing", "copying", "forgotten")
# "forgotten" (``forget``): never fetched again by any source; the ``forgotten`` table says who, when, why.
FORGOTTEN = "forgotten"
# Archived on the local disk: "copying" waits for its off-box copies (archive.s3) before it is "done".
ARCHIVED = ("done", "copying")
FILE_MODE = 0o600          # the ledger holds callers' names and numbers
DIR_MODE = 0o700
KV_ARCHIVE_ID = "archive.id"
KV_REBUILT = "reconcile.rebuild_complete"
KV_PBX_SN = "pbx.sn"               # the serial of the PBX this ledger was filled from (daemon.identity)
KV_PBX_FIRMWARE = "pbx.firmware"
KV_HIGH_WATER = "discover.high_water"  # discovery's newest id seen (daemon.discovery)
KV_BACKFILL = "discover.backfill"      # discovery's back-fill position
DEFER_S = 15.0             # a twin row transferring the same recording: look again this much later
META_FIELDS = ("size", "time", "uid", "call_from", "call_to", "call_type", "duration")

SCHEMA = """
CREATE TABLE IF NOT EXISTS recordings (
    key TEXT PRIMARY KEY,
    rec_id INTEGER,
    file TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    lease_until REAL,
    last_error TEXT,
    size INTEGER, time TEXT, uid TEXT, call_from TEXT, call_to TEXT, call_type TEXT, duration INTEGER,
    final_path TEXT, bytes INTEGER, sha256 TEXT,
    part_path TEXT, part_synced INTEGER NOT NULL DEFAULT 0, part_sha256 TEXT,
    source TEXT, created_at REAL, updated_at REAL, done_at REAL
);
CREATE INDEX IF NOT EXISTS recordings_due ON recordings(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS recordings_file ON recordings(file);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS copies (
    key TEXT NOT NULL,
    dest TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    object_key TEXT, size INTEGER, etag TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT, updated_at REAL, verified_at REAL,
    PRIMARY KEY (key, dest)
);
CREATE INDEX IF NOT EXISTS copies_due ON copies(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS forgotten (
    key TEXT PRIMARY KEY,
    name_hash TEXT,
    forgotten_at REAL NOT NULL,
    forgotten_by TEXT NOT NULL,
    reason TEXT,
    erased_at REAL,
    erase_error TEXT,
    erased_by TEXT
);
CREATE INDEX IF NOT EXISTS forgotten_name ON forgotten(name_hash);
CREATE INDEX IF NOT EXISTS recordings_day ON recordings(DAY_EXPR);
CREATE INDEX IF NOT EXISTS recordings_from ON recordings(call_from);
CREATE INDEX IF NOT EXISTS recordings_to ON recordings(call_to);
"""

# The recording's day, YYYY-MM-DD, for ``find``: from the PBX's ``time`` (``MM/DD/YYYY hh:mm:ss``, or ISO),
# else from the file name's YYYYMMDD prefix. The same expression backs an index (``recordings_day``): a
# query must spell it exactly so for SQLite to use that index.
DAY_EXPR = (
    "CASE WHEN time GLOB '[0-9][0-9]/[0-9][0-9]/[0-9][0-9][0-9][0-9]*' "
    "THEN substr(time, 7, 4) || '-' || substr(time, 1, 2) || '-' || substr(time, 4, 2) "
    "WHEN time GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*' THEN substr(time, 1, 10) "
    "WHEN file GLOB '[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]*' "
    "THEN substr(file, 1, 4) || '-' || substr(file, 5, 2) || '-' || substr(file, 7, 2) END")
SCHEMA = SCHEMA.replace("DAY_EXPR", DAY_EXPR)

MIGRATIONS = (("part_sha256", "TEXT"), ("local_kept", "INTEGER NOT NULL DEFAULT 1"))
FORGOTTEN_MIGRATIONS = (("erased_by", "TEXT"),)

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")


def name_variants(name: str) -> tuple[str, str, str]:
    """The names one recording can go by: a PBX that stores wav and serves mp3 lists ``x.wav`` and
    may tell ``x.mp3`` when downloading. Rows are matched on all three."""
    if name.lower().endswith((".wav", ".mp3")):
        stem = name[:-4]
        return name, f"{stem}.wav", f"{stem}.mp3"
    return name, name, name


def name_hash(name: str) -> str:
    """What the ledger keeps of an erased recording's file name: enough to refuse the name again (an
    event, the queue file), not the name (which may hold phone numbers). Every variant hashes alike."""
    import hashlib
    stem = name[:-4] if name.lower().endswith((".wav", ".mp3")) else name
    return hashlib.sha256(stem.encode("utf-8", "surrogatepass")).hexdigest()


_STEM = ("(CASE WHEN lower({c}) LIKE '%.wav' OR lower({c}) LIKE '%.mp3' THEN substr({c}, 1, length({c}) - 4) "
         "ELSE {c} END)")


def key_for(rec_id: int | None, file: str | None) -> str:
    """The ledger key: the PBX id when known, else the file name."""
    if rec_id is not None:
        return f"id:{rec_id}"
    if file:
        return f"file:{file}"
    raise ValueError("a recording needs an id or a file name")


@dataclass(frozen=True)
class Ref:
    """A recording to archive, as a source names it, with whatever PBX metadata it knows."""

    rec_id: int | None = None
    file: str | None = None
    meta: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return key_for(self.rec_id, self.file)

    def __str__(self) -> str:
        return str(self.rec_id) if self.rec_id is not None else str(self.file)


@dataclass(frozen=True)
class DueCopy:
    """A copy to make: the recording's row, the object key chosen earlier (if any), the copy's state
    (``pending``, or ``repair``: over an object of ours that ``verify`` kept aside) and its attempts."""

    row: Row
    object_key: str | None
    state: str
    attempts: int


@dataclass(frozen=True)
class Row:
    key: str
    rec_id: int | None
    file: str | None
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    meta: dict[str, Any]
    final_path: str | None
    bytes: int | None
    sha256: str | None
    part_path: str | None
    part_synced: int
    done_at: float | None = None
    created_at: float | None = None
    source: str | None = None
    part_sha256: str | None = None    # the sha256 of the checkpointed prefix: a resume checks it
    local_kept: int = 1               # 0 once the local copy was removed (archive.keep_local: false)

    @property
    def ref(self) -> str:
        return str(self.rec_id) if self.rec_id is not None else str(self.file)


_ROW_COLUMNS = ("key, rec_id, file, state, attempts, next_attempt_at, last_error, "
                + ", ".join(META_FIELDS) + ", final_path, bytes, sha256, part_path, part_synced, done_at, "
                "created_at, source, part_sha256, local_kept")


def _row(r: sqlite3.Row) -> Row:
    return Row(key=r["key"], rec_id=r["rec_id"], file=r["file"], state=r["state"], attempts=r["attempts"],
               next_attempt_at=r["next_attempt_at"], last_error=r["last_error"],
               meta={f: r[f] for f in META_FIELDS if r[f] is not None}, final_path=r["final_path"],
               bytes=r["bytes"], sha256=r["sha256"], part_path=r["part_path"], part_synced=r["part_synced"],
               done_at=r["done_at"], created_at=r["created_at"], source=r["source"], part_sha256=r["part_sha256"],
               local_kept=r["local_kept"])


def ledger_error(exc: BaseException, path: Path) -> LedgerError:
    """The archiver's error for an SQLite or file-system failure of the ledger at ``path``."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return LedgerError(f"the ledger {str(path)!r} failed: {text}")


def state_access_problem(path: Path, *, write: bool) -> str | None:
    """Why this process's user cannot use the ledger at ``path`` — read it, or (``write``) also write
    it, its lock and the files SQLite makes beside it — naming ``state.path``; None when it can, or
    when the ledger does not exist yet for a read. A read-only file system is not reported here: like
    a full disk, it is a fault the callers wait out (it is remounted), not a mistake in the set-up."""
    folder = path.parent
    me = f"this user (uid {os.geteuid()})"
    fix = "run as the service user, or give this user access"

    def can(p: Path, mode: int) -> bool:
        if os.access in os.supports_effective_ids:
            return os.access(p, mode, effective_ids=True)
        return os.access(p, mode)   # pragma: no cover - Linux supports effective ids

    def on_read_only_fs(p: Path) -> bool:
        try:
            return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def owner(p: Path) -> str:
        try:
            st = p.stat()
        except OSError:
            return ""
        return f" (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o})"
    if not folder.exists():
        parent = folder.parent
        if write and parent.is_dir() and not can(parent, os.W_OK | os.X_OK) and not on_read_only_fs(parent):
            return (f"state.path: {str(path)!r}: {me} cannot create the ledger's folder in "
                    f"{str(parent)!r}{owner(parent)}; create {str(folder)!r} for the service user, or {fix}")
        return None
    if not can(folder, os.X_OK) or (write and not can(folder, os.W_OK) and not on_read_only_fs(folder)):
        need = "write in" if write else "open"
        return f"state.path: {str(path)!r}: {me} cannot {need} its folder {str(folder)!r}{owner(folder)}; {fix}"
    files = [path, path.with_name(path.name + ".lock")] if write else [path]
    for f in files:
        if f.exists() and not can(f, (os.R_OK | os.W_OK) if write else os.R_OK) \
                and not (write and on_read_only_fs(f)):
            need = "read and write" if write else "read"
            return f"state.path: {str(path)!r}: {me} cannot {need} {str(f)!r}{owner(f)}; {fix}"
    return None


def check_state_access(path: Path, *, write: bool) -> None:
    """Raise ConfigError (exit 2) when ``state_access_problem`` finds one: a ledger this user may not
    use is a set-up mistake that waiting cannot fix."""
    problem = state_access_problem(path, write=write)
    if problem is not None:
        raise ConfigError([problem])


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that can only read, and creates no file where it can help it (``status``).

    ``mode=ro`` shares a running writer's WAL. On a folder this user cannot write, with no writer at
    work (no ``-wal`` file), SQLite cannot make the ``-shm`` file that mode needs: the ledger is then
    opened ``immutable`` — what is on disk is everything there is."""
    uri = "file:" + urllib.parse.quote(str(path))
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, timeout=10.0)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if os.access(path.parent, os.W_OK) or path.with_name(path.name + "-wal").exists():
            raise
    conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
    conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    return conn


def _private_files(path: Path) -> None:
    """Create the ledger file 0600 before SQLite does (its -wal and -shm files copy the database's
    mode), and take group/other access away from files an older version made."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            if p.stat().st_mode & 0o077:
                p.chmod(FILE_MODE)


class LedgerDb:
    """Blocking access to the ledger. Use it from one thread only (``Ledger`` arranges that).

    ``destinations``: the off-box copies every archived recording must have before it is done (the
    runner sets it; other processes — status, enqueue — need not).

    Creates the ledger's own folder (0700) when missing, never its parents: a ledger inside an
    unmounted ``archive.dir`` must not create that folder.

    ``read_only``: for ``status``; creates and changes nothing (no schema, no migration), and works
    on a state folder this user cannot write. Raises sqlite3.Error, OSError."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.destinations: tuple[str, ...] = ()
        if read_only:
            self.conn = _connect_read_only(path)
            self.conn.row_factory = sqlite3.Row
            return
        with contextlib.suppress(FileExistsError):
            path.parent.mkdir(mode=DIR_MODE)
        _private_files(path)
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self.conn.row_factory = sqlite3.Row
        # busy_timeout first: a second process (status, enqueue) may hold the lock for a moment.
        self.conn.execute("PRAGMA busy_timeout = 10000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        with self.write() as c:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            # Columns added since the first release, for ledgers made by an older version.
            have = {r["name"] for r in c.execute("PRAGMA table_info(recordings)")}
            for column, decl in MIGRATIONS:
                if column not in have:
                    c.execute(f"ALTER TABLE recordings ADD COLUMN {column} {decl}")
            have = {r["name"] for r in c.execute("PRAGMA table_info(forgotten)")}
            for column, decl in FORGOTTEN_MIGRATIONS:
                if column not in have:
                    c.execute(f"ALTER TABLE forgotten ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken with BEGIN IMMEDIATE so that it never deadlocks on upgrade."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ---------------------------------------------------------------- sources
    def enqueue(self, refs: Iterable[Ref], *, source: str, now: float) -> int:
        """Add recordings not yet known; fill in metadata of known pending ones. Returns how many were new.

        One recording, one row: a name already held by a row is not added again, and an id that brings
        the name of a row made from that name (an event, the queue file) replaces that row — or, while
        it is being transferred, waits for it and takes its result (see ``complete_many``)."""
        added = 0
        with self.write() as c:
            for ref in refs:
                if self._refused(c, ref):
                    continue
                meta = dict(ref.meta)
                if ref.rec_id is None and ref.file is not None:
                    known = c.execute("SELECT 1 FROM recordings WHERE file IN (?, ?, ?) LIMIT 1",
                                      name_variants(ref.file)).fetchone()
                    if known is not None:
                        continue
                elif ref.file is not None:
                    by_name = c.execute(f"SELECT {_ROW_COLUMNS} FROM recordings WHERE rec_id IS NULL AND "
                                        "file IN (?, ?, ?) ORDER BY rowid LIMIT 1", name_variants(ref.file)).fetchone()
                    if by_name is not None and by_name["state"] in ARCHIVED:
                        mine = c.execute("SELECT state, final_path FROM recordings WHERE key = ?",
                                         (ref.key,)).fetchone()
                        if mine is None:
                            self._insert_done_copy(c, ref, by_name, source=source, now=now)
                            self._take_over(c, by_name, ref.key, now)
                            added += 1
                        elif mine["state"] == "in_progress" or (
                                mine["state"] in ARCHIVED and mine["final_path"] != by_name["final_path"]):
                            # In progress: its worker binds the name and takes this result. Both archived
                            # at different paths: two files exist; neither row's evidence is dropped.
                            continue
                        elif mine["state"] not in ARCHIVED:
                            # The id row (waiting, failed, missing) takes what its name row archived.
                            self._take_over(c, by_name, ref.key, now)
                        else:
                            c.execute("DELETE FROM recordings WHERE key = ?", (by_name["key"],))
                        continue
                    if by_name is not None and by_name["state"] != "in_progress":
                        c.execute("DELETE FROM recordings WHERE key = ?", (by_name["key"],))
                cur = c.execute(
                    "INSERT OR IGNORE INTO recordings (key, rec_id, file, state, source, created_at, updated_at, "
                    + ", ".join(META_FIELDS) + ") VALUES (?, ?, ?, 'pending', ?, ?, ?, "
                    + ", ".join("?" * len(META_FIELDS)) + ")",
                    (ref.key, ref.rec_id, ref.file, source, now, now, *(meta.get(f) for f in META_FIELDS)),
                )
                if cur.rowcount:
                    added += 1
                elif meta or ref.file:
                    # A listing's size is the size of the file it names: it is taken only when that is
                    # the row's file (a row that learnt the served .mp3 name must not get the .wav's size).
                    c.execute(
                        "UPDATE recordings SET file = COALESCE(file, ?), "
                        + ", ".join("size = CASE WHEN COALESCE(file, ?) = ? THEN COALESCE(size, ?) ELSE size END"
                                    if f == "size" else f"{f} = COALESCE({f}, ?)" for f in META_FIELDS)
                        + " WHERE key = ? AND state NOT IN ('done', 'copying')",
                        (ref.file, *(p for f in META_FIELDS for p in ((ref.file, ref.file, meta.get(f)) if f == "size"
                                                                     else (meta.get(f),))), ref.key),
                    )
        return added

    @staticmethod
    def _refused(c: sqlite3.Connection, ref: Ref) -> bool:
        """Was this recording forgotten (``forget``), by its key or by its name? A forgotten id that now
        comes with its name (a listing) has the name remembered too, so that an event naming it is
        refused as well."""
        row = c.execute("SELECT state FROM recordings WHERE key = ?", (ref.key,)).fetchone()
        if row is not None and row["state"] == FORGOTTEN:
            if ref.file:
                c.execute("UPDATE forgotten SET name_hash = COALESCE(name_hash, ?) WHERE key = ?",
                          (name_hash(ref.file), ref.key))
            return True
        if ref.file is None:
            return False
        return c.execute("SELECT 1 FROM forgotten WHERE name_hash = ? UNION ALL SELECT 1 FROM recordings WHERE "
                         "file IN (?, ?, ?) AND state = 'forgotten' LIMIT 1",
                         (name_hash(ref.file), *name_variants(ref.file))).fetchone() is not None

    @staticmethod
    def _insert_done_copy(c: sqlite3.Connection, ref: Ref, done: sqlite3.Row, *, source: str, now: float) -> None:
        """An id row that takes over what its name row already archived (no second transfer)."""
        meta = dict(ref.meta)
        c.execute(
            "INSERT INTO recordings (key, rec_id, file, state, final_path, bytes, sha256, source, created_at, "
            "updated_at, done_at, " + ", ".join(META_FIELDS) + ") VALUES (?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?, "
            + ", ".join("?" * len(META_FIELDS)) + ")",
            (ref.key, ref.rec_id, done["file"], done["final_path"], done["bytes"], done["sha256"], source, now, now,
             done["done_at"], *(meta.get(f, done[f]) for f in META_FIELDS)))

    @staticmethod
    def _take_over(c: sqlite3.Connection, src: sqlite3.Row, dst_key: str, now: float) -> None:
        """``dst_key``'s row takes what ``src`` archived (its state, path, size, sha256 and off-box
        copies), and ``src`` goes: one recording, one row."""
        c.execute("UPDATE recordings SET state = ?, final_path = ?, bytes = ?, sha256 = ?, done_at = ?, "
                  "local_kept = ?, file = COALESCE(file, ?), last_error = NULL, attempts = 0, lease_until = NULL, "
                  "part_path = NULL, part_synced = 0, updated_at = ? WHERE key = ?",
                  (src["state"], src["final_path"], src["bytes"], src["sha256"], src["done_at"], src["local_kept"],
                   src["file"], now, dst_key))
        c.execute("DELETE FROM copies WHERE key = ?", (dst_key,))
        c.execute("UPDATE copies SET key = ? WHERE key = ?", (dst_key, src["key"]))
        c.execute("DELETE FROM recordings WHERE key = ?", (src["key"],))

    def enqueue_many(self, refs: list[Ref], *, source: str, now: float) -> int:
        """Fast path for big batches of bare ids/names (the queue file): one statement, no metadata."""
        with self.write() as c:
            before = c.total_changes
            ids = [(r.key, r.rec_id, r.file, source, now, now) for r in refs if r.rec_id is not None]
            c.executemany("INSERT OR IGNORE INTO recordings (key, rec_id, file, state, source, created_at, "
                          "updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)", ids)
            names = [(r.key, r.file, source, now, now, *name_variants(str(r.file)), name_hash(str(r.file)))
                     for r in refs if r.rec_id is None]
            c.executemany("INSERT OR IGNORE INTO recordings (key, rec_id, file, state, source, created_at, "
                          "updated_at) SELECT ?, NULL, ?, 'pending', ?, ?, ? WHERE NOT EXISTS "
                          "(SELECT 1 FROM recordings WHERE file IN (?, ?, ?)) AND NOT EXISTS "
                          "(SELECT 1 FROM forgotten WHERE name_hash = ?)", names)
            return c.total_changes - before

    # ---------------------------------------------------------------- the scheduler's moves
    def claim(self, limit: int, *, now: float, lease_s: float) -> list[Row]:
        """Take up to ``limit`` due pending rows and mark them in progress with a lease."""
        with self.write() as c:
            # A row whose twin (same file name, another key) is being transferred waits for it.
            rows = c.execute(f"SELECT {_ROW_COLUMNS} FROM recordings r WHERE state = 'pending' AND "
                             "next_attempt_at <= ? AND (file IS NULL OR NOT EXISTS (SELECT 1 FROM recordings o "
                             f"WHERE o.state = 'in_progress' AND o.key != r.key AND {_STEM.format(c='o.file')} = "
                             f"{_STEM.format(c='r.file')})) ORDER BY next_attempt_at, rowid LIMIT ?",
                             (now, limit)).fetchall()
            c.executemany("UPDATE recordings SET state = 'in_progress', lease_until = ?, updated_at = ? "
                          "WHERE key = ?", [(now + lease_s, now, r["key"]) for r in rows])
        return [_row(r) for r in rows]

    def next_due(self) -> tuple[int, float | None]:
        """(rows still to finish: pending + in progress, earliest next attempt of a pending row)."""
        active = self.conn.execute(
            "SELECT COUNT(*) FROM recordings WHERE state IN ('pending', 'in_progress')").fetchone()[0]
        nxt = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM recordings WHERE state = 'pending'").fetchone()[0]
        return int(active), nxt

    def set_part(self, key: str, part_path: str | None, synced: int, sha256: str | None = None) -> None:
        """Record (or clear) a transfer's resume point: its temp file, the bytes fsynced, their sha256."""
        with self.write() as c:
            c.execute("UPDATE recordings SET part_path = ?, part_synced = ?, part_sha256 = ? WHERE key = ?",
                      (part_path, synced, sha256, key))

    def bind_name(self, key: str, served: str) -> tuple[str, Row | None]:
        """The PBX told the file name it serves for ``key``'s recording: make sure no other row
        transfers or holds the same recording. Returns one of

        - ``("proceed", None)``: this row is the recording's only transfer (a waiting name row for
          it is dropped; a waiting id row is left to take this row's result at completion);
        - ``("wait", twin)``: ``twin`` is transferring it now: try later, burn nothing;
        - ``("done", row)``: it is archived already, under ``row`` (this row may have been merged away);
        - ``("gone", None)``: this row no longer exists (merged into its twin meanwhile).
        """
        return self.bind_names([(key, served)])[0]

    def bind_names(self, items: list[tuple[str, str]]) -> list[tuple[str, Row | None]]:
        """Several ``bind_name`` calls, in order; those that write share one transaction (one fsync)."""
        out: list[tuple[str, Row | None]] = []
        for n, (key, served) in enumerate(items):
            read = self._bind_read(key, served)
            if read is None:
                # The first that must write opens the transaction, and the rest go inside it, in
                # order: each sees what the ones before it wrote, as one call after another would.
                with self.write() as c:
                    out.extend(self._bind_new_name(c, k, s) or self._bind_in(c, k, s) for k, s in items[n:])
                break
            out.append(read)
        return out

    def _bind_read(self, key: str, served: str) -> tuple[str, Row | None] | None:
        """The common case (a known name, no twin) is answered by a read: no transaction, no fsync."""
        me = self.conn.execute("SELECT state, file FROM recordings WHERE key = ?", (key,)).fetchone()
        if me is not None and me["state"] not in ARCHIVED and me["file"] is not None and self.conn.execute(
                "SELECT 1 FROM recordings WHERE file IN (?, ?, ?) AND key != ? UNION ALL "
                "SELECT 1 FROM forgotten WHERE name_hash = ? LIMIT 1",
                (*name_variants(served), key, name_hash(served))).fetchone() is None:
            return "proceed", None
        return None

    @staticmethod
    def _bind_new_name(c: sqlite3.Connection, key: str, served: str) -> tuple[str, Row | None] | None:
        """The common write (an id row learns its name, and nothing else goes by it), as one guarded
        UPDATE; None when anything else may apply, for ``_bind_in`` to decide. Each statement costs the
        ledger thread a wait for the GIL against the busy event loop: the long way takes six."""
        changed = c.execute(
            "UPDATE recordings SET file = ? WHERE key = ? AND file IS NULL AND state = 'in_progress' "
            "AND NOT EXISTS (SELECT 1 FROM recordings WHERE (file IN (?, ?, ?) OR key = ?) AND key != ?) "
            "AND NOT EXISTS (SELECT 1 FROM forgotten WHERE name_hash = ?)",
            (served, key, *name_variants(served), key_for(None, served), key, name_hash(served))).rowcount
        return ("proceed", None) if changed == 1 else None

    def _bind_in(self, c: sqlite3.Connection, key: str, served: str) -> tuple[str, Row | None]:
        me = c.execute(f"SELECT {_ROW_COLUMNS} FROM recordings WHERE key = ?", (key,)).fetchone()
        if me is None:
            return "gone", None
        if me["state"] in ARCHIVED:
            return "done", _row(me)
        if self._refused(c, Ref(file=served)):
            # Forgotten under its name (``forget``): this row is that recording, forgotten too.
            forgotten = c.execute("SELECT f.* FROM forgotten f LEFT JOIN recordings r ON r.key = f.key WHERE "
                                  "f.name_hash = ? OR r.file IN (?, ?, ?) LIMIT 1",
                                  (name_hash(served), *name_variants(served))).fetchone()
            if forgotten is not None:
                c.execute("UPDATE recordings SET state = 'forgotten', lease_until = NULL, part_path = NULL, "
                          "part_synced = 0, updated_at = ? WHERE key = ?", (forgotten["forgotten_at"], key))
                c.execute("INSERT OR IGNORE INTO forgotten (key, name_hash, forgotten_at, forgotten_by, reason) "
                          "VALUES (?, ?, ?, ?, ?)", (key, name_hash(served), forgotten["forgotten_at"],
                                                     forgotten["forgotten_by"], forgotten["reason"]))
            return "gone", None
        if me["file"] is None:
            c.execute("UPDATE recordings SET file = ? WHERE key = ?", (served, key))
        twins = c.execute(f"SELECT {_ROW_COLUMNS} FROM recordings WHERE file IN (?, ?, ?) AND key != ? "
                          "ORDER BY rowid", (*name_variants(served), key)).fetchall()
        for twin in twins:
            if twin["rec_id"] is not None and me["rec_id"] is not None:
                continue  # two ids: two recordings that happen to share a name (alternate names)
            if twin["state"] == "in_progress":
                return "wait", _row(twin)
            if twin["state"] in ARCHIVED:
                if me["rec_id"] is not None:  # the id row takes over its name row's result
                    self._take_over(c, twin, key, twin["done_at"] or 0.0)
                    merged = c.execute(f"SELECT {_ROW_COLUMNS} FROM recordings WHERE key = ?", (key,)).fetchone()
                    return "done", _row(merged)
                c.execute("DELETE FROM recordings WHERE key = ?", (key,))
                return "done", _row(twin)
            if twin["rec_id"] is None:
                c.execute("DELETE FROM recordings WHERE key = ?", (twin["key"],))
        return "proceed", None

    def complete(self, key: str, *, final_path: str, size: int, sha256: str, now: float,
                 file: str | None = None) -> int | None:
        """Mark done, with the file name the PBX served (when it told one). Returns the recording id."""
        return self.complete_many([{"key": key, "final_path": final_path, "size": size, "sha256": sha256,
                                    "now": now, "file": file}])[0]

    def complete_many(self, items: list[dict[str, Any]]) -> list[int | None]:
        """Several ``complete`` calls in one transaction (group commit: one fsync for all of them).

        With off-box destinations (``destinations``) a recording archived locally is ``copying``, each
        destination's copy pending, until every one holds a verified copy (``copy_done``). A name row's
        result goes to the id row waiting for the same recording, and the name row goes: one recording,
        one row. Returns, per item, the id of the recording (None when unknown)."""
        out: list[int | None] = []
        state = "copying" if self.destinations else "done"
        with self.write() as c:
            c.executemany(f"UPDATE recordings SET state = '{state}', final_path = :final_path, bytes = :size, "
                          "sha256 = :sha256, file = COALESCE(:file, file), last_error = NULL, lease_until = NULL, "
                          "part_path = NULL, part_synced = 0, local_kept = 1, done_at = :now, updated_at = :now "
                          "WHERE key = :key", items)
            for item in items:
                self._copies_pending(c, item["key"], item["now"])
                row = c.execute(f"SELECT {_ROW_COLUMNS} FROM recordings WHERE key = ?", (item["key"],)).fetchone()
                if row is None or row["file"] is None:
                    out.append(None if row is None else row["rec_id"])
                    continue
                if row["rec_id"] is None:
                    # Only a waiting row: one in progress belongs to its worker, which will find this
                    # result when it binds the name (``bind_name``).
                    waiting = c.execute("SELECT key, rec_id FROM recordings WHERE file IN (?, ?, ?) AND rec_id IS "
                                        "NOT NULL AND state NOT IN ('done', 'copying', 'in_progress') ORDER BY rowid "
                                        "LIMIT 1", name_variants(row["file"])).fetchone()
                    if waiting is not None:
                        self._take_over(c, row, waiting["key"], item["now"])
                        out.append(waiting["rec_id"])
                        continue
                else:
                    for gone in c.execute("SELECT key FROM recordings WHERE rec_id IS NULL AND file IN (?, ?, ?) AND "
                                          "state NOT IN ('in_progress', 'forgotten')",
                                          name_variants(row["file"])).fetchall():
                        c.execute("DELETE FROM copies WHERE key = ?", (gone["key"],))
                        c.execute("DELETE FROM recordings WHERE key = ?", (gone["key"],))
                out.append(row["rec_id"])
        return out

    def _copies_pending(self, c: sqlite3.Connection, key: str, now: float) -> None:
        for dest in self.destinations:
            # A copy in repair stays so: the object at its key was ours, kept aside, to be written over.
            c.execute("INSERT INTO copies (key, dest, state, updated_at) VALUES (?, ?, 'pending', ?) "
                      "ON CONFLICT(key, dest) DO UPDATE SET state = CASE WHEN copies.state = 'repair' THEN 'repair' "
                      "ELSE 'pending' END, attempts = 0, next_attempt_at = 0, "
                      "last_error = NULL, updated_at = excluded.updated_at", (key, dest, now))

    # ---------------------------------------------------------------- off-box copies
    def due_copies(self, dest: str, limit: int, *, now: float, exclude: Iterable[str] = ()) -> list[DueCopy]:
        """Rows archived locally whose copy to ``dest`` is due (to make, or to repair)."""
        skip = set(exclude)
        rows = self.conn.execute(
            f"SELECT {', '.join('r.' + col.strip() for col in _ROW_COLUMNS.split(','))}, c.object_key AS ck, "
            "c.state AS cs, c.attempts AS ca FROM copies c JOIN recordings r ON r.key = c.key WHERE c.dest = ? AND "
            "c.state IN ('pending', 'repair') AND c.next_attempt_at <= ? AND r.state IN ('copying', 'done') "
            "ORDER BY c.next_attempt_at, r.rowid LIMIT ?", (dest, now, limit + len(skip))).fetchall()
        return [DueCopy(_row(r), r["ck"], r["cs"], r["ca"]) for r in rows if r["key"] not in skip][:limit]

    def next_copy_due(self, dest: str) -> tuple[int, float | None]:
        """(copies still to make, the earliest next attempt of one)."""
        n, nxt = self.conn.execute(
            "SELECT COUNT(*), MIN(c.next_attempt_at) FROM copies c JOIN recordings r ON r.key = c.key "
            "WHERE c.dest = ? AND c.state IN ('pending', 'repair') AND r.state IN ('copying', 'done')",
            (dest,)).fetchone()
        return int(n), nxt

    def copy_done(self, key: str, dest: str, *, object_key: str, size: int, etag: str, now: float,
                  local_removed: bool = False) -> tuple[str, bool]:
        """A verified copy at ``dest``; the recording is ``done`` once all its copies are. Returns its
        state, and whether it is done for the first time: none of its copies had been verified before
        (a copy made again, of an object found lost or damaged, is not a new recording)."""
        with self.write() as c:
            before = c.execute("SELECT COUNT(*) FROM copies WHERE key = ? AND verified_at IS NOT NULL",
                               (key,)).fetchone()[0]
            c.execute("UPDATE copies SET state = 'done', object_key = ?, size = ?, etag = ?, last_error = NULL, "
                      "updated_at = ?, verified_at = ? WHERE key = ? AND dest = ?",
                      (object_key, size, etag, now, now, key, dest))
            left = c.execute("SELECT COUNT(*) FROM copies WHERE key = ? AND state != 'done'", (key,)).fetchone()[0]
            became = 0
            if left == 0:
                became = c.execute("UPDATE recordings SET state = 'done', updated_at = ? WHERE key = ? "
                                   "AND state = 'copying'", (now, key)).rowcount
            if local_removed:
                c.execute("UPDATE recordings SET local_kept = 0 WHERE key = ?", (key,))
            row = c.execute("SELECT state FROM recordings WHERE key = ?", (key,)).fetchone()
        return (str(row["state"]) if row else "gone"), bool(became) and before == 0

    def copy_chosen(self, key: str, dest: str, object_key: str) -> None:
        """Remember the object key a copy goes to (an alternate name when the first was taken)."""
        with self.write() as c:
            c.execute("UPDATE copies SET object_key = ? WHERE key = ? AND dest = ?", (object_key, key, dest))

    def copy_later(self, key: str, dest: str, *, error: str, next_at: float, now: float, failed: bool = False,
                   max_attempts: int | None = None) -> str:
        """A copy that did not work this time: again at ``next_at``, or ``failed`` — one that never can
        as asked, or that spent ``max_attempts`` (an operator's turn: ``retry``). Returns its state."""
        with self.write() as c:
            row = c.execute("SELECT attempts FROM copies WHERE key = ? AND dest = ?", (key, dest)).fetchone()
            attempts = (row["attempts"] if row else 0) + 1
            state = "failed" if failed or (max_attempts is not None and attempts >= max_attempts) else "pending"
            c.execute("UPDATE copies SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
                      "updated_at = ? WHERE key = ? AND dest = ?",
                      (state, attempts, next_at, error[:1000], now, key, dest))
        return state

    def copy_again(self, key: str, dest: str, *, state: str, now: float) -> None:
        """A verified copy found lost (``pending``) or damaged and kept aside (``repair``: it may be
        written over): the recording is ``copying`` again until it is mended."""
        assert state in ("pending", "repair")
        with self.write() as c:
            c.execute("UPDATE copies SET state = ?, attempts = 0, next_attempt_at = 0, updated_at = ? "
                      "WHERE key = ? AND dest = ?", (state, now, key, dest))
            c.execute("UPDATE recordings SET state = 'copying', updated_at = ? WHERE key = ? AND state = 'done'",
                      (now, key))

    def copies_of(self, key: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM copies WHERE key = ? ORDER BY dest", (key,))]

    def copy_counts(self) -> dict[str, dict[str, int]]:
        """dest -> state -> count."""
        out: dict[str, dict[str, int]] = {}
        for r in self.conn.execute("SELECT dest, state, COUNT(*) AS n FROM copies GROUP BY dest, state"):
            out.setdefault(r["dest"], {})[r["state"]] = r["n"]
        return out

    def reschedule(self, key: str, *, error: str, next_at: float, burn: bool, max_attempts: int, now: float) -> str:
        """Back to pending after a failed attempt (or ``failed`` once the budget is spent). Returns the state."""
        with self.write() as c:
            row = c.execute("SELECT attempts FROM recordings WHERE key = ?", (key,)).fetchone()
            attempts = (row["attempts"] if row else 0) + (1 if burn else 0)
            state = "failed" if attempts >= max_attempts else "pending"
            c.execute("UPDATE recordings SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, "
                      "lease_until = NULL, updated_at = ? WHERE key = ?",
                      (state, attempts, next_at, error[:1000], now, key))
        return state

    def release(self, key: str, *, now: float) -> None:
        """Give a claimed row back untouched (shutdown, pause): no attempt is burnt."""
        with self.write() as c:
            c.execute("UPDATE recordings SET state = 'pending', lease_until = NULL, updated_at = ? "
                      "WHERE key = ? AND state = 'in_progress'", (now, key))

    def finish(self, key: str, *, state: str, error: str, now: float) -> None:
        """End a row as ``missing`` or ``failed``."""
        assert state in ("missing", "failed")
        with self.write() as c:
            c.execute("UPDATE recordings SET state = ?, last_error = ?, lease_until = NULL, part_path = NULL, "
                      "part_synced = 0, updated_at = ? WHERE key = ?", (state, error[:1000], now, key))

    # ---------------------------------------------------------------- operators
    def keys_for(self, ref: Ref) -> list[str]:
        """The ledger keys a recording named by an operator goes by (its id, or its name in any row)."""
        if ref.rec_id is not None:
            return [r["key"] for r in self.conn.execute("SELECT key FROM recordings WHERE rec_id = ?", (ref.rec_id,))]
        return [r["key"] for r in self.conn.execute("SELECT key FROM recordings WHERE file IN (?, ?, ?)",
                                                    name_variants(str(ref.file)))]

    def has_done(self) -> bool:
        return self.conn.execute("SELECT 1 FROM recordings WHERE state IN ('done', 'copying') LIMIT 1"
                                 ).fetchone() is not None

    def retry(self, keys: list[str] | None, *, now: float, missing: bool = False) -> int:
        """Failed rows and failed off-box copies (all, or those keyed) back to pending with a fresh
        attempt budget; ``missing`` rows too when asked (they may have appeared on the PBX since).
        Returns how many of either."""
        with self.write() as c:
            states = "('failed', 'missing')" if missing else "('failed')"
            sql = ("UPDATE recordings SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ? "
                   f"WHERE state IN {states}")
            copies = ("UPDATE copies SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ? "
                      "WHERE state = 'failed'")
            if keys is None:
                return c.execute(sql, (now,)).rowcount + c.execute(copies, (now,)).rowcount
            return sum(c.execute(sql + " AND key = ?", (now, k)).rowcount +
                       c.execute(copies + " AND key = ?", (now, k)).rowcount for k in keys)

    def search(self, *, since: str | None = None, until: str | None = None, caller: str | None = None,
               callee: str | None = None, call_type: str | None = None, state: str | None = None,
               states: Iterable[str] = ()) -> Iterator[Row]:
        """The rows matching every filter given (``find``, ``export``), oldest day first. ``since``/
        ``until``: YYYY-MM-DD, inclusive, on the recording's day (``DAY_EXPR``, indexed); ``caller``/
        ``callee``: a part of ``call_from``/``call_to`` (the PBX gives ``Name<number>``), as the PBX's own
        search matches; ``call_type``: exact, any case; ``state``/``states``: exact."""
        where, params = [], []
        if since is not None:
            where.append(f"({DAY_EXPR}) >= ?")
            params.append(since)
        if until is not None:
            where.append(f"({DAY_EXPR}) <= ?")
            params.append(until)
        for column, text in (("call_from", caller), ("call_to", callee)):
            if text is not None:
                where.append(f"instr({column}, ?) > 0")
                params.append(text)
        if call_type is not None:
            where.append("lower(call_type) = lower(?)")
            params.append(call_type)
        wanted = ([state] if state is not None else []) + list(states)
        if wanted:
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        sql = (f"SELECT {_ROW_COLUMNS}, ({DAY_EXPR}) AS day FROM recordings"
               + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY ({DAY_EXPR}), time, rowid")
        for r in self.conn.execute(sql, params):
            yield _row(r)

    def forget(self, keys: list[str], *, by: str, reason: str | None, now: float) -> list[str]:
        """Never fetch these recordings again: their rows (made when the ledger does not know them yet)
        become ``forgotten``, and who, when and why goes into the ``forgotten`` table. Whatever was
        archived stays where it is, and its row keeps its path, size and sha256 (``erase`` removes
        them). Returns the keys newly forgotten."""
        out = []
        with self.write() as c:
            for key in keys:
                row = c.execute("SELECT state, file, rec_id FROM recordings WHERE key = ?", (key,)).fetchone()
                if row is not None and row["state"] == FORGOTTEN:
                    continue
                if row is None and key.startswith("file:") and c.execute(
                        "SELECT 1 FROM forgotten WHERE name_hash = ?", (name_hash(key[5:]),)).fetchone():
                    continue   # erased already: its row is keyed by the name's hash now
                if row is None:
                    rec_id = int(key[3:]) if key.startswith("id:") and key[3:].isdigit() else None
                    file = key[5:] if key.startswith("file:") else None
                    c.execute("INSERT INTO recordings (key, rec_id, file, state, source, created_at, updated_at) "
                              "VALUES (?, ?, ?, 'forgotten', 'forget', ?, ?)", (key, rec_id, file, now, now))
                else:
                    file = row["file"]
                    c.execute("UPDATE recordings SET state = 'forgotten', lease_until = NULL, part_path = NULL, "
                              "part_synced = 0, updated_at = ? WHERE key = ?", (now, key))
                # The first request stays on record: who asked, when and why is what a compliance
                # audit reads, and a later request must not rewrite it.
                c.execute("INSERT INTO forgotten (key, name_hash, forgotten_at, forgotten_by, reason) VALUES "
                          "(?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                          "name_hash = COALESCE(forgotten.name_hash, excluded.name_hash), "
                          "reason = COALESCE(forgotten.reason, excluded.reason)",
                          (key, name_hash(file) if file else None, now, by, reason))
                out.append(key)
        return out

    def forgotten_record(self, key: str) -> dict[str, Any] | None:
        r = self.conn.execute("SELECT * FROM forgotten WHERE key = ?", (key,)).fetchone()
        return None if r is None else dict(r)

    def erased(self, key: str, *, by: str, reason: str | None, now: float, error: str | None,
               local_gone: bool, copies_gone: Iterable[str]) -> None:
        """After ``forget --erase`` deleted what it could: the row keeps its key and state, the
        ``forgotten`` table who, when, why — and the recording's metadata goes. ``local_gone``: the
        local file and sidecar are deleted (the path goes then, not before: a failed delete must stay
        findable); ``copies_gone``: the destinations whose objects are deleted. ``error``: what could
        not be deleted (the erasure is then incomplete, ``erased_at`` stays unset; run it again)."""
        with self.write() as c:
            c.execute("UPDATE recordings SET file = NULL, " + ", ".join(f"{f} = NULL" for f in META_FIELDS)
                      + ", last_error = NULL, updated_at = ? WHERE key = ?", (now, key))
            if local_gone:
                c.execute("UPDATE recordings SET final_path = NULL, bytes = NULL, sha256 = NULL, local_kept = 0 "
                          "WHERE key = ?", (key,))
            c.executemany("DELETE FROM copies WHERE key = ? AND dest = ?", [(key, d) for d in copies_gone])
            # Who erased goes beside who asked to forget (``forgotten_by`` stays the first request's).
            c.execute("UPDATE forgotten SET erased_by = ?, reason = COALESCE(reason, ?), erased_at = ?, "
                      "erase_error = ? WHERE key = ?", (by, reason, None if error else now, error, key))
            if key.startswith("file:") and not error:
                # A row keyed by its file name would keep the name (and the numbers in it): the key
                # becomes the name's hash, which still refuses the name (``_refused``).
                hashed = f"erased:{name_hash(key[5:])}"
                c.execute("UPDATE forgotten SET key = ?, name_hash = COALESCE(name_hash, ?) WHERE key = ?",
                          (hashed, name_hash(key[5:]), key))
                c.execute("UPDATE copies SET key = ? WHERE key = ?", (hashed, key))
                c.execute("UPDATE recordings SET key = ? WHERE key = ?", (hashed, key))

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for r in self.conn.execute("SELECT state, COUNT(*) AS n FROM recordings GROUP BY state"):
            counts[r["state"]] = r["n"]
        return counts

    def bytes_archived(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM recordings WHERE state = 'done'")
                   .fetchone()[0])

    def oldest_waiting_since(self) -> float | None:
        """When the longest-waiting recording (pending or in progress) was enqueued, Unix time; None if none."""
        value = self.conn.execute("SELECT MIN(created_at) FROM recordings WHERE state IN ('pending', 'in_progress')"
                                  ).fetchone()[0]
        return None if value is None else float(value)

    def last_done_at(self) -> float | None:
        """When the most recent recording was archived, Unix time; None if none ever was."""
        value = self.conn.execute("SELECT MAX(done_at) FROM recordings WHERE state = 'done'").fetchone()[0]
        return None if value is None else float(value)

    def done_since(self, since: float) -> int:
        """How many recordings were archived at or after ``since`` (Unix time): status's rates."""
        return int(self.conn.execute("SELECT COUNT(*) FROM recordings WHERE state = 'done' AND done_at >= ?",
                                     (since,)).fetchone()[0])

    def oldest_pending(self) -> tuple[str, float] | None:
        """The longest-waiting pending recording and when it was enqueued; None if nothing waits."""
        r = self.conn.execute("SELECT rec_id, file, created_at FROM recordings WHERE state IN ('pending', "
                              "'in_progress') AND created_at IS NOT NULL ORDER BY created_at LIMIT 1").fetchone()
        # Named as everywhere else the operator reads one: the id, else the file name (Row.ref).
        return None if r is None else (str(r["rec_id"] if r["rec_id"] is not None else r["file"]),
                                       float(r["created_at"]))

    def failures_by_reason(self, limit: int = 5) -> list[tuple[str, str, int]]:
        """(state, reason, count) of failed and missing recordings, the commonest first."""
        return [(str(r["state"]), str(r["reason"]), int(r["n"])) for r in self.conn.execute(
            "SELECT state, COALESCE(last_error, '') AS reason, COUNT(*) AS n FROM recordings "
            "WHERE state IN ('failed', 'missing') GROUP BY state, reason ORDER BY n DESC, reason LIMIT ?",
            (limit,))]

    def recent_failures(self, limit: int = 10) -> list[Row]:
        return [_row(r) for r in self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM recordings WHERE state IN ('failed', 'missing') "
            "ORDER BY updated_at DESC LIMIT ?", (limit,))]

    def get(self, key: str) -> Row | None:
        r = self.conn.execute(f"SELECT {_ROW_COLUMNS} FROM recordings WHERE key = ?", (key,)).fetchone()
        return _row(r) if r else None

    def rows(self, state: str | None = None) -> list[Row]:
        if state is None:
            return [_row(r) for r in self.conn.execute(f"SELECT {_ROW_COLUMNS} FROM recordings ORDER BY rowid")]
        return [_row(r) for r in self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM recordings WHERE state = ? ORDER BY rowid", (state,))]

    def kv_get(self, key: str) -> str | None:
        r = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if r is None else str(r["value"])

    def kv_set(self, key: str, value: str) -> None:
        with self.write() as c:
            c.execute("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, value))

    def kv_items(self, prefix: str) -> list[tuple[str, str]]:
        """Every (key, value) whose key starts with ``prefix``."""
        rows = self.conn.execute("SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? ORDER BY key",
                                 (len(prefix), prefix)).fetchall()
        return [(str(r["key"]), str(r["value"])) for r in rows]

    def kv_delete(self, *keys: str) -> None:
        with self.write() as c:
            c.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys])

    # ---------------------------------------------------------------- reconciliation
    def reset_in_progress(self, *, now: float) -> int:
        """Rows left in progress by a process that died: back to pending, no attempt burnt."""
        with self.write() as c:
            return c.execute("UPDATE recordings SET state = 'pending', lease_until = NULL, updated_at = ? "
                             "WHERE state = 'in_progress'", (now,)).rowcount

    def requeue(self, key: str, *, reason: str, now: float) -> None:
        """A done row whose file vanished: pending again, fresh budget. Its path, size and sha256 stay
        as the evidence of what was archived (and let an identical copy found later be adopted)."""
        with self.write() as c:
            c.execute("UPDATE recordings SET state = 'pending', attempts = 0, next_attempt_at = 0, last_error = ?, "
                      "updated_at = ? WHERE key = ?", (reason, now, key))

    def retire_pbx(self, old_sn: str, *, now: float, kv_reset: Iterable[str] = ()) -> int:
        """The PBX was replaced (``--new-pbx``): recording ids start again on the new one, so the old
        one's id rows must not answer for them (a new recording 1000 is not the old 1000, done years
        ago). Their keys and file names move aside (``pbx:<old sn>:id:1000``, ``pbx:<old sn>:<name>``),
        their ids go; their final paths, sizes and sha256 stay as the record of what was archived.
        What was still to fetch from the old PBX cannot be any more: missing. ``kv_reset``: discovery's
        positions, which counted old ids. Returns how many rows moved."""
        prefix = f"pbx:{old_sn}:"
        with self.write() as c:
            moved = [r["key"] for r in c.execute("SELECT key FROM recordings WHERE rec_id IS NOT NULL")]
            for key in moved:
                c.execute("UPDATE copies SET key = ? WHERE key = ?", (prefix + key, key))
                c.execute("UPDATE forgotten SET key = ? WHERE key = ?", (prefix + key, key))
                # The file name too: a new PBX's recording of the same name (a replacement restored from
                # the old one's backup numbers alike) must not be taken for this one and merged into it.
                c.execute("UPDATE recordings SET key = ?, rec_id = NULL, file = CASE WHEN file IS NULL THEN NULL "
                          "ELSE ? || file END, updated_at = ? WHERE key = ?", (prefix + key, prefix, now, key))
            c.execute("UPDATE recordings SET state = 'missing', lease_until = NULL, last_error = ?, updated_at = ? "
                      "WHERE substr(key, 1, ?) = ? AND state IN ('pending', 'in_progress', 'failed')",
                      (f"left on the replaced PBX {old_sn}", now, len(prefix), prefix))
            c.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in kv_reset])
        return len(moved)

    def restored(self, key: str, *, now: float) -> None:
        """A re-queued recording whose local copy was restored from a verified off-box copy: archived
        again (done when every copy is), nothing to download."""
        with self.write() as c:
            left = c.execute("SELECT COUNT(*) FROM copies WHERE key = ? AND state != 'done'", (key,)).fetchone()[0]
            c.execute("UPDATE recordings SET state = ?, local_kept = 1, last_error = NULL, updated_at = ? "
                      "WHERE key = ? AND state = 'pending'", ("copying" if left else "done", now, key))

    def adopt(self, ref: Ref, *, final_path: str, size: int, sha256: str, now: float) -> None:
        """Record a verified file found on disk as done (ledger rebuild)."""
        meta = dict(ref.meta)
        with self.write() as c:
            if ref.rec_id is not None and ref.file:
                c.execute("DELETE FROM recordings WHERE rec_id IS NULL AND file IN (?, ?, ?) AND "
                          "state NOT IN ('in_progress', 'forgotten')", name_variants(ref.file))
            c.execute(
                "INSERT INTO recordings (key, rec_id, file, state, final_path, bytes, sha256, source, created_at, "
                "updated_at, done_at, " + ", ".join(META_FIELDS) + ") VALUES (?, ?, ?, 'done', ?, ?, ?, 'rebuild', "
                "?, ?, ?, " + ", ".join("?" * len(META_FIELDS)) + ") ON CONFLICT(key) DO UPDATE SET state = 'done', "
                "final_path = excluded.final_path, bytes = excluded.bytes, sha256 = excluded.sha256, "
                "done_at = excluded.done_at WHERE recordings.state != 'forgotten'",
                (ref.key, ref.rec_id, ref.file, final_path, size, sha256, now, now, now,
                 *(meta.get(f) for f in META_FIELDS)))


def flock_held(proc_locks: str, dev: int, ino: int) -> bool:
    """Whether ``/proc/locks`` lists a granted flock on the file (dev, ino). Pure; tested as a table.

    Lines read ``1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF``; a waiter's line carries ``->``.
    """
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    for line in proc_locks.splitlines():
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == want:
            return True
    return False


def run_lock_held(ledger_path: Path) -> bool | None:
    """Whether a ``run``/``once`` holds this ledger's run lock, without touching the lock (taking it, even
    for a moment, could make a ``run`` starting at that instant refuse). None when it cannot be told."""
    lock = ledger_path.with_name(ledger_path.name + ".lock")
    try:
        st = lock.stat()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    if flock_held(text, st.st_dev, st.st_ino):
        return True
    # /proc/locks shows only the locks of processes in this PID namespace: a run in another container
    # on the same state volume is invisible here. The lock file names the namespace of its last run.
    try:
        owner_ns = lock.read_text(encoding="ascii").split()[1]
        return None if owner_ns != _pid_namespace() else False
    except (OSError, ValueError, IndexError):
        return False


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


class RunLock:
    """Only one ``run``/``once`` may drive a ledger at a time; ``status``/``enqueue``/``retry`` need no lock."""

    def __init__(self, ledger_path: Path) -> None:
        self.path = ledger_path.with_name(ledger_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        with contextlib.suppress(FileExistsError):
            self.path.parent.mkdir(mode=DIR_MODE)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            ledger = self.path.with_name(self.path.name.removesuffix(".lock"))
            raise StorageError(f"another run/once is already using the ledger {str(ledger)!r} (state.path): "
                               "stop it first, or give this one a state.path of its own") from exc
        # Who holds it, for `status` in another PID namespace (run_lock_held); best effort.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {_pid_namespace()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GroupCommit(Generic[A, R]):
    """Requests that arrive while the ledger thread is busy share the next transaction.

    With ``synchronous=FULL`` every commit is an fsync; four workers each claiming and completing
    one recording at a time would queue four fsyncs per file on one thread. Each caller still
    awaits the commit that holds its own change, so nothing is acknowledged before it is durable.
    """

    def __init__(self, ledger: Ledger, batch: Callable[[LedgerDb, list[A]], list[R]]) -> None:
        self._ledger = ledger
        self._batch = batch
        self._waiting: list[tuple[A, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, arg: A) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((arg, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            args = [a for a, _ in group]
            try:
                results = await self._ledger.call(functools.partial(_run_batch, self._batch, args))
            except BaseException as exc:
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("ledger closed"))
                if not isinstance(exc, Exception):
                    raise
            else:
                for (_, fut), result in zip(group, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)


def _run_batch(batch: Callable[[LedgerDb, list[A]], list[R]], args: list[A], db: LedgerDb) -> list[R]:
    return batch(db, args)


def _claim_batch(db: LedgerDb, requests: list[tuple[float, float]]) -> list[Row | None]:
    now, lease_s = requests[-1]
    rows: list[Row | None] = list(db.claim(len(requests), now=now, lease_s=lease_s))
    return rows + [None] * (len(requests) - len(rows))


def _bind_batch(db: LedgerDb, items: list[tuple[str, str]]) -> list[tuple[str, Row | None]]:
    return db.bind_names(items)


def _complete_batch(db: LedgerDb, items: list[dict[str, Any]]) -> list[int | None]:
    return db.complete_many(items)


class Ledger:
    """Async front of ``LedgerDb``: every call runs on one dedicated thread, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db: LedgerDb | None = None
        self._claims: GroupCommit[tuple[float, float], Row | None] = GroupCommit(self, _claim_batch)
        self._completions: GroupCommit[dict[str, Any], int | None] = GroupCommit(self, _complete_batch)
        self._binds: GroupCommit[tuple[str, str], tuple[str, Row | None]] = GroupCommit(self, _bind_batch)

    async def bind_name(self, key: str, served: str) -> tuple[str, Row | None]:
        """``LedgerDb.bind_name``; concurrent binds that write share a transaction."""
        return await self._binds((key, served))

    async def claim_one(self, *, now: float, lease_s: float) -> Row | None:
        """One due row for one worker; concurrent claims share a transaction."""
        return await self._claims((now, lease_s))

    async def complete(self, key: str, *, final_path: str, size: int, sha256: str, now: float,
                       file: str | None) -> int | None:
        """Mark a recording done; concurrent completions share a transaction (and its fsync).
        Returns the recording's id, when known (a name row may have merged into its id row)."""
        return await self._completions({"key": key, "final_path": final_path, "size": size, "sha256": sha256,
                                        "now": now, "file": file})

    async def __aenter__(self) -> Ledger:
        def open_db() -> LedgerDb:
            return LedgerDb(self.path)
        try:
            self._db = await asyncio.get_running_loop().run_in_executor(self._executor, open_db)
        except (sqlite3.Error, OSError) as exc:
            self._executor.shutdown(wait=True)
            raise ledger_error(exc, self.path) from exc
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def call(self, fn: Callable[[LedgerDb], T]) -> T:
        """Run ``fn(db)`` on the ledger thread. SQLite's errors come back as ``LedgerError``: a full
        disk or a lock held too long is a pause for the caller, never the end of a loop."""
        db = self._db
        if db is None:
            raise RuntimeError("ledger is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, db)
        except sqlite3.Error as exc:
            raise ledger_error(exc, self.path) from exc

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, db.close)
        self._executor.shutdown(wait=True)
