"""Start-up reconciliation: make the ledger agree with the disk before any download starts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from daemon.archive import ArchiveDir, looks_like_audio, sidecar_data
from daemon.ledger import META_FIELDS, LedgerDb, Ref

log = structlog.get_logger("daemon.reconcile")


@dataclass
class ReconcileReport:
    leases_reset: int = 0
    rebuilt: int = 0
    vanished: list[str] = field(default_factory=list)
    parts_removed: int = 0
    parts_kept: int = 0
    untracked: int = 0
    sidecars_written: int = 0


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reconcile(db: LedgerDb, archive: ArchiveDir, *, now: float, skip: Path | None = None,
              sidecars: bool = True) -> ReconcileReport:
    """Blocking; run on the ledger thread while holding the run lock (no other runner is alive).

    1. rows left in progress by a dead process go back to pending;
    2. a new (or deleted) ledger is rebuilt from the sidecars of verified files on disk;
    3. a done row whose file vanished is re-queued and reported;
    4. temp files are kept only where the ledger holds a resume checkpoint for them;
    5. a done row whose sidecar is missing (a write that failed, say on a full disk) gets it back.
    """
    report = ReconcileReport(leases_reset=db.reset_in_progress(now=now))
    keep_parts = {r.part_path for r in db.rows("pending") if r.part_path and r.part_synced > 0}
    known_paths = {r.final_path for r in db.rows("done") if r.final_path}
    rebuild = not db.existed
    skip_rel = None
    if skip is not None:
        try:
            skip_rel = PurePosixPath(skip.resolve().relative_to(archive.root.resolve()).as_posix())
        except ValueError:
            skip_rel = None

    for folder, files in archive.walk():
        if skip_rel is not None and (folder == skip_rel or skip_rel in folder.parents):
            continue
        names = set(files)
        for name in files:
            rel = folder / name
            if name.startswith(".") and name.endswith(".part"):
                if str(rel) in keep_parts:
                    report.parts_kept += 1
                else:
                    os.unlink(archive.root / rel)
                    report.parts_removed += 1
                continue
            if not name.lower().endswith((".wav", ".mp3")) or str(rel) in known_paths:
                continue
            if rebuild and f"{name}.json" in names and _adopt_from_sidecar(db, archive, rel, now):
                report.rebuilt += 1
                known_paths.add(str(rel))
            else:
                report.untracked += 1

    for row in db.rows("done"):
        if not row.final_path:
            continue
        if not os.path.isfile(archive.root / row.final_path):
            db.requeue(row.key, reason=f"archived file {row.final_path!r} vanished", now=now)
            report.vanished.append(row.final_path)
            log.warning("reconcile.file_vanished", recording=row.ref, path=row.final_path, action="re-queued")
        elif sidecars and row.sha256 and row.bytes is not None \
                and not os.path.exists(archive.root / f"{row.final_path}.json"):
            rel = PurePosixPath(row.final_path)
            data = sidecar_data(rec_id=row.rec_id, file=row.file, size=row.bytes, sha256=row.sha256,
                                archived_at=row.done_at or now, meta=row.meta)
            dir_fd = archive.open_dir(rel.parent, create=False)
            try:
                ArchiveDir.write_sidecar(dir_fd, rel.name, data)
            finally:
                os.close(dir_fd)
            report.sidecars_written += 1
    log.info("reconcile.done", leases_reset=report.leases_reset, rebuilt=report.rebuilt,
             vanished=len(report.vanished), parts_removed=report.parts_removed, parts_kept=report.parts_kept,
             untracked=report.untracked, sidecars_written=report.sidecars_written)
    return report


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
