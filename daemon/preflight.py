"""What ``run`` needs from this machine — a source, its folders, the queue file, free space — checked as
the user that runs the command, for ``check`` (and, for the sources, ``once``)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config, SourcesConfig
from daemon.eventloop import pick_loop, uvloop_version
from daemon.ledger import state_access_problem

NO_SOURCE = ("sources: no source is configured, so nothing would be archived: set sources.ids, "
             "sources.queue_file or sources.discover.enabled (or queue recordings with `enqueue`)")


@dataclass(frozen=True)
class Finding:
    """One line of ``check``: what was checked (its key path first) and whether it holds."""

    ok: bool
    text: str
    note: bool = False   # not a check: something to know about the others


def configured_sources(sources: SourcesConfig) -> list[str]:
    """The sources a config names, as ``check`` lists them; empty when it names none. Pure."""
    found = []
    if sources.ids:
        found.append(f"{len(sources.ids)} id(s) in sources.ids")
    if sources.queue_file is not None:
        found.append("sources.queue_file")
    if sources.discover.enabled:
        found.append("discovery" + (" with events" if sources.discover.events else ""))
    return found


def free_space_problem(free_bytes: int, min_free_bytes: int) -> str | None:
    """Why ``free_bytes`` on the archive's file system would pause downloads at once; None if it would not. Pure."""
    if free_bytes >= min_free_bytes:
        return None
    return (f"only {_size(free_bytes)} free, below archive.min_free_bytes ({_size(min_free_bytes)}): downloads "
            "would pause at once; free some space, or lower archive.min_free_bytes")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _can(path: Path, mode: int) -> bool:
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)   # pragma: no cover - Linux supports effective ids


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def preflight(cfg: Config) -> list[Finding]:
    """Everything ``run`` needs locally, one Finding per item, in the order ``check`` prints them.

    Access is judged for this process's user (``access(2)`` with the effective ids): as root every
    folder is writable, so the lines say when they were checked as root."""
    uid = os.geteuid()
    me = f"uid {uid}"
    out = []
    sources = configured_sources(cfg.sources)
    out.append(Finding(True, "sources: " + ", ".join(sources)) if sources else Finding(False, NO_SOURCE))

    archive = cfg.archive.dir
    where = f"archive.dir {str(archive)!r}"
    if not archive.is_dir():
        out.append(Finding(False, f"{where} does not exist (run and once never create it: an unmounted disk "
                                  "must not become a new archive); create it for the service user, or mount it"))
    elif _read_only_fs(archive):
        out.append(Finding(False, f"{where} is on a read-only file system"))
    elif not _can(archive, os.W_OK | os.X_OK):
        st = archive.stat()
        out.append(Finding(False, f"{where} is not writable by this user (uid {uid}; the folder: owner uid "
                                  f"{st.st_uid}, mode {st.st_mode & 0o7777:04o}); make the service user its owner"))
    else:
        out.append(Finding(True, f"{where} exists and is writable ({me})"))
        free = shutil.disk_usage(archive).free
        problem = free_space_problem(free, cfg.archive.min_free_bytes)
        floor = _size(cfg.archive.min_free_bytes)
        out.append(Finding(False, f"{where}: {problem}") if problem else
                   Finding(True, f"{where}: {_size(free)} free (archive.min_free_bytes {floor})"))

    state = cfg.state.path
    where = f"state.path {str(state)!r}"
    folder = state.parent if state.parent.exists() else state.parent.parent
    problem = state_access_problem(state, write=True)
    if problem is not None:
        out.append(Finding(False, problem))
    elif not folder.is_dir():
        out.append(Finding(False, f"{where}: the folder {str(folder)!r} does not exist (run creates only the "
                                  "ledger's own folder, never its parents)"))
    elif _read_only_fs(folder):
        out.append(Finding(False, f"{where} is on a read-only file system"))
    else:
        out.append(Finding(True, f"{where}: its folder is writable ({me})"))

    queue = cfg.sources.queue_file
    if queue is not None:
        where = f"sources.queue_file {str(queue)!r}"
        if not queue.exists():
            out.append(Finding(False, f"{where} does not exist (run waits for it to appear; create it, even "
                                      "empty, or fix the path)"))
        elif not queue.is_file() or not _can(queue, os.R_OK):
            out.append(Finding(False, f"{where} is not a file this user (uid {uid}) can read"))
        else:
            out.append(Finding(True, f"{where} is readable ({me})"))
    # The loop is picked as run and once pick it: a config they refuse (exit 2) must not pass here.
    pick = pick_loop(cfg.service.event_loop, uvloop_version() if cfg.service.event_loop != "asyncio" else None)
    out.append(Finding(pick.error is None, pick.error or f"service.event_loop: run and once use {pick.name}: "
                                                         f"{pick.reason}"))
    if uid == 0:
        out.append(Finding(True, "checked as root, who may write anywhere: run check as the service user to "
                                 "check its access", note=True))
    return out
