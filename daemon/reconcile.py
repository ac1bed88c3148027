"""Start-up reconciliation: make the ledger agree with the disk before any download starts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from daemon.archive import ArchiveDir, is_part_name, looks_like_audio, sidecar_data
from daemon.errors import WrongArchiveError
from daemon.ledger import ARCHIVED, FORGOTTEN, KV_ARCHIVE_ID, KV_PBX_SN, KV_REBUILT, META_FIELDS, LedgerDb, Ref

log = structlog.get_logger("daemon.reconcile")

IDENTITY_SAMPLE = 20   # done rows looked at to tell "this archive" from "an empty folder"
MAX_ERROR_PATHS = 20


@dataclass
class ReconcileReport:
    leases_reset: int = 0
    rebuilt: int = 0
    vanished: list[str] = field(default_factory=list)
    restored: int = 0          # of the vanished, restored from a verified off-box copy (the runner's)
    parts_removed: int = 0
    parts_kept: int = 0
    untracked: int = 0
    sidecars_written: int = 0
    errors: int = 0
    error_paths: list[str] = field(default_factory=list)
    rebuild_complete: bool = True

    def error(self, path: str, exc: BaseException, what: str) -> None:
        """One file that could not be checked or mended: counted and reported, the rest goes on."""
        self.errors += 1
        if len(self.error_paths) < MAX_ERROR_PATHS:
            self.error_paths.append(path)
        log.warning("reconcile.file_error", path=path, action=what, error=str(exc))


def identity_decision(recorded: str | None, on_disk: str | None, *, has_done: bool, done_present: int
                      ) -> tuple[str, str]:
    """Is ``archive.dir`` the archive this ledger describes? Pure; tested as a table.

    ``recorded``: the archive id the ledger knows; ``on_disk``: the marker found; ``done_present``: how
    many of a sample of done recordings are on disk. Returns (action, why) with action one of
    ``ok``, ``record`` (keep the marker on disk, record it), ``create`` (write a marker, record it)
    or ``refuse`` (exit 6: download nothing into it)."""
    if on_disk is not None and recorded is not None:
        if on_disk == recorded:
            return "ok", "the archive's marker is the ledger's"
        return "refuse", (f"archive.dir holds another archive (marker {on_disk}, the ledger's is {recorded}): "
                          "check archive.dir and state.path")
    if recorded is not None:
        return "refuse", (f"archive.dir has no archive marker, but the ledger describes archive {recorded}: "
                          "is the archive disk mounted? (an emptied or replaced folder must not be filled "
                          "again unnoticed)")
    if not has_done or done_present > 0:
        return ("record", "adopting the archive's marker") if on_disk is not None else \
            ("create", "a new archive" if not has_done else "marking an archive made before markers existed")
    return "refuse", ("the ledger holds archived recordings, but none of those looked at is in archive.dir: "
                      "is the archive disk mounted?")


def check_identity(db: LedgerDb, archive: ArchiveDir) -> str:
    """Apply ``identity_decision``; returns the archive id. Raises WrongArchiveError (exit 6)."""
    recorded = db.kv_get(KV_ARCHIVE_ID)
    on_disk = archive.read_marker()
    # Only recordings kept on the local disk are evidence (with archive.keep_local: false the bucket is
    # the archive, and the local folder a staging area).
    has_done = db.conn.execute("SELECT 1 FROM recordings WHERE state IN ('done', 'copying') AND local_kept = 1 "
                               "LIMIT 1").fetchone() is not None
    present = 0
    if recorded is None and has_done:
        sample = db.conn.execute("SELECT final_path FROM recordings WHERE state IN ('done', 'copying') AND "
                                 "local_kept = 1 AND final_path IS NOT NULL ORDER BY done_at DESC LIMIT ?",
                                 (IDENTITY_SAMPLE,)).fetchall()
        present = sum(1 for r in sample if archive.exists(PurePosixPath(r[0])))
    action, why = identity_decision(recorded, on_disk, has_done=has_done, done_present=present)
    if action == "refuse":
        raise WrongArchiveError(f"archive.dir {str(archive.root)!r}: {why}")
    if action == "create":
        on_disk = archive.write_marker()
    assert on_disk is not None
    if action != "ok":
        db.kv_set(KV_ARCHIVE_ID, on_disk)
        log.info("archive.marked", archive_id=on_disk, reason=why)
    return on_disk


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    raw = ArchiveDir.read_regular(path)
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def reconcile(db: LedgerDb, archive: ArchiveDir, *, now: float, skip: Path | None = None,
              sidecars: bool = True) -> ReconcileReport:
    """Blocking; run on the ledger thread while holding the run lock (no other runner is alive).

    1. rows left in progress by a dead process go back to pending;
    2. until a rebuild has run to its end once, the ledger is rebuilt from the sidecars of verified
       files on disk (a new or deleted ledger, one made by ``enqueue`` first, one cut short);
    3. a done row whose file vanished is re-queued and reported (its sha256 kept);
    4. temp files are kept only where the ledger holds a resume checkpoint for them;
    5. a done row whose sidecar is missing (a write that failed, say on a full disk) gets it back.
    A file that cannot be read or mended is counted and reported; it never stops the rest.
    """
    report = ReconcileReport(leases_reset=db.reset_in_progress(now=now))
    keep_parts = {r.part_path for r in db.rows("pending") if r.part_path and r.part_synced > 0}
    archived = [r for state in ARCHIVED for r in db.rows(state)]
    # A forgotten recording's file, kept (``forget`` without --erase), is known too, not "untracked".
    known_paths = {r.final_path for r in [*archived, *db.rows(FORGOTTEN)] if r.final_path}
    kept_paths = {r.final_path for r in archived if r.final_path and r.local_kept}
    rebuild = db.kv_get(KV_REBUILT) != "1"
    pbx_sn = db.kv_get(KV_PBX_SN)
    rebuild_errors = 0
    skip_rel = None
    if skip is not None:
        try:
            skip_rel = PurePosixPath(skip.resolve().relative_to(archive.root.resolve()).as_posix())
        except ValueError:
            skip_rel = None

    def walk_error(exc: OSError) -> None:
        nonlocal rebuild_errors
        rebuild_errors += 1
        report.error(str(exc.filename or "?"), exc, "folder not listed")

    for folder, files in archive.walk(onerror=walk_error):
        if skip_rel is not None and (folder == skip_rel or skip_rel in folder.parents):
            continue
        names = set(files)
        for name in files:
            rel = folder / name
            if is_part_name(name):
                if str(rel) in keep_parts:
                    report.parts_kept += 1
                    continue
                try:
                    os.unlink(archive.root / rel)
                    report.parts_removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    report.error(str(rel), exc, "stray temp file left")
                continue
            if not name.lower().endswith((".wav", ".mp3")) or str(rel) in known_paths:
                continue
            if rebuild and f"{name}.json" in names:
                try:
                    adopted = _adopt_from_sidecar(db, archive, rel, now)
                except OSError as exc:
                    rebuild_errors += 1
                    report.error(str(rel), exc, "not adopted")
                    adopted = False
                if adopted:
                    report.rebuilt += 1
                    known_paths.add(str(rel))
                    continue
            report.untracked += 1
    if rebuild:
        # Done once, to the end; a rebuild cut short (a crash) or hindered (a read error) runs again.
        report.rebuild_complete = rebuild_errors == 0
        if report.rebuild_complete:
            db.kv_set(KV_REBUILT, "1")

    for row in archived:
        if not row.final_path:
            continue
        rel = PurePosixPath(row.final_path)
        if not row.local_kept:
            # archive.keep_local: false — the verified off-box copy is the archive; finish a removal a
            # crash cut short. Only of this recording's own bytes: once its file went, its path was
            # free, and another recording of the same name may be archived there now (its only copy).
            if row.final_path in kept_paths:
                continue
            with contextlib.suppress(OSError):
                present = archive.exists(rel)
                if present and row.sha256 and _holds(archive, rel, row.sha256):
                    os.unlink(archive.root / rel)
                    present = False
                if present is False:
                    # Its sidecar too, also when the file went first (a crash between the two removals).
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(archive.root / f"{rel}.json")
            continue
        try:
            present = archive.exists(rel)
        except OSError as exc:
            report.error(row.final_path, exc, "not checked")
            continue
        if present is None:
            # A symlink stands in the path: what is behind it is not inside the archive. Nothing is
            # written through it, and the row keeps its evidence.
            report.error(row.final_path, OSError(errno.ELOOP, "a symlink or non-directory is in the path"),
                         "left as archived")
            continue
        if not present:
            db.requeue(row.key, reason=f"archived file {row.final_path!r} vanished", now=now)
            report.vanished.append(row.final_path)
            log.warning("reconcile.file_vanished", recording=row.ref, path=row.final_path, sha256=row.sha256,
                        action="re-queued")
        elif sidecars and row.sha256 and row.bytes is not None \
                and archive.exists(PurePosixPath(f"{row.final_path}.json")) is False:
            data = sidecar_data(rec_id=row.rec_id, file=row.file, size=row.bytes, sha256=row.sha256,
                                archived_at=row.done_at or now, meta=row.meta, pbx_sn=pbx_sn)
            try:
                dir_fd = archive.open_dir(rel.parent, create=False)
                try:
                    ArchiveDir.write_sidecar(dir_fd, rel.name, data)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                report.error(f"{row.final_path}.json", exc, "sidecar not written")
                continue
            report.sidecars_written += 1
    log.info("reconcile.done", leases_reset=report.leases_reset, rebuilt=report.rebuilt,
             vanished=len(report.vanished), parts_removed=report.parts_removed, parts_kept=report.parts_kept,
             untracked=report.untracked, sidecars_written=report.sidecars_written, error_count=report.errors,
             rebuild_complete=report.rebuild_complete)
    return report


def _holds(archive: ArchiveDir, rel: PurePosixPath, sha256: str) -> bool:
    """The file at ``rel`` holds exactly the bytes of this sha256."""
    dir_fd = archive.open_dir(rel.parent, create=False)
    try:
        return ArchiveDir.hash_file(dir_fd, rel.name)[1] == sha256
    finally:
        os.close(dir_fd)


def _adopt_from_sidecar(db: LedgerDb, archive: ArchiveDir, rel: PurePosixPath, now: float) -> bool:
    """Adopt one archived file described by its sidecar, after checking size and hash against it."""
    side = _read_sidecar(archive.root / f"{rel}.json")
    if side is None:
        return False
    rec_id = side.get("id") if isinstance(side.get("id"), int) else None
    file = side.get("file") if isinstance(side.get("file"), str) else None
    if rec_id is None and file is None:
        return False
    dir_fd = archive.open_dir(rel.parent, create=False)
    try:
        size, sha, head = ArchiveDir.hash_file(dir_fd, rel.name)
    finally:
        os.close(dir_fd)
    if size != side.get("size") or sha != side.get("sha256") or not looks_like_audio(head):
        log.warning("reconcile.sidecar_mismatch", path=str(rel))
        return False
    meta = tuple((k, side[k]) for k in META_FIELDS if side.get(k) is not None)
    db.adopt(Ref(rec_id=rec_id, file=file, meta=meta), final_path=str(rel), size=size, sha256=sha, now=now)
    return True
