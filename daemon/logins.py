"""Failed PBX logins remembered across processes, so that no command repeats a wrong secret into an IP block.

The PBX blocks the client IP after 5 failed logins in a row, and only its administrator lifts that.
Each process already stops at the first refusal, but an operator running ``check`` again and again
does not: the failures are kept beside the ledger (``<state.path>.logins``, a small JSON file written
atomically) and a login after ``FAILED_LOGIN_LIMIT`` of them within ``FAILED_LOGIN_WINDOW_S`` is
refused without contacting the PBX, leaving two tries spare below the PBX's five. A successful login
clears the file; ``check --force-login`` tries anyway, and deleting the file forgets the failures.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.clock import Clock
from daemon.errors import FatalAuthError

log = structlog.get_logger("daemon.logins")

FAILED_LOGIN_LIMIT = 3
# The guide gives no window for the PBX's count (it counts failures in a row): an hour keeps a person
# who retries by hand well away from the fifth, and lets `run` (which waits between logins) go on.
FAILED_LOGIN_WINDOW_S = 3600.0
KEEP = 10   # failures kept in the file: bounded, and more than any limit needs


@dataclass(frozen=True)
class Refusal:
    """Why a login is not tried now: ``failures`` recent failed logins, the next allowed at ``resets_at``."""

    failures: int
    resets_at: float   # Unix time


def login_refusal(failures: Sequence[float], now: float, *, limit: int = FAILED_LOGIN_LIMIT,
                  window_s: float = FAILED_LOGIN_WINDOW_S) -> Refusal | None:
    """None when a login may be tried at ``now``; else when it may be tried again: once the oldest
    of the ``limit`` newest failures leaves the window. A failure dated ahead of ``now`` (the clock
    went back) counts as now. Pure."""
    recent = sorted(min(t, now) for t in failures if min(t, now) > now - window_s)
    if len(recent) < limit:
        return None
    return Refusal(failures=len(recent), resets_at=recent[-limit] + window_s)


def refusal_message(refusal: Refusal, path: Path, now: float) -> str:
    """What the operator reads: why, until when, and how to override. Pure."""
    when = dt.datetime.fromtimestamp(refusal.resets_at, dt.UTC).isoformat(timespec="seconds")
    wait = max(0, round(refusal.resets_at - now))
    return (f"not logging in: {refusal.failures} failed logins within {FAILED_LOGIN_WINDOW_S / 60:.0f} min "
            f"(the PBX blocks this IP after 5 in a row); fix pbx.client_id / pbx.client_secret first. "
            f"The next try is allowed at {when} (in {wait} s); to try now anyway: `check --force-login`, "
            f"or delete {str(path)!r}")


class LoginRefusedError(FatalAuthError):
    """Too many recent failed logins: no request was sent. ``retry_after_s``: when one may be tried."""


class LoginMemory:
    """The failed-login file of one PBX (``pbx`` is its base URL: the PBX counts per client IP)."""

    def __init__(self, path: Path, pbx: str, clock: Clock, *, force: bool = False) -> None:
        self.path = path
        self.pbx = pbx
        self.clock = clock
        self.force = force

    def _load(self) -> list[float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("pbx") != self.pbx:
                return []   # another PBX (base_url changed): its failures say nothing of this one
            return [float(t) for t in data["failures"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return []   # absent or unreadable: nothing remembered (never a reason to refuse)

    def before_login(self) -> None:
        """Raises LoginRefusedError (exit 3) when a login now would risk the IP block."""
        now = self.clock.wall()
        refusal = login_refusal(self._load(), now)
        if refusal is None:
            return
        if self.force:
            log.warning("auth.login_forced", failures=refusal.failures, path=str(self.path))
            return
        log.error("auth.login_refused", failures=refusal.failures, retry_in_s=round(refusal.resets_at - now),
                  path=str(self.path))
        raise LoginRefusedError(refusal_message(refusal, self.path, now), errcode=-1,
                                retry_after_s=max(0.0, refusal.resets_at - now))

    def failed(self) -> None:
        """Remember one failed login (best effort: a state folder we cannot write only loses the memory)."""
        failures = [*self._load(), self.clock.wall()][-KEEP:]
        try:
            self._write({"pbx": self.pbx, "failures": failures})
        except OSError as exc:
            log.warning("auth.login_memory_failed", path=str(self.path), error=exc.strerror or str(exc))

    def succeeded(self) -> None:
        """Forget the failures: the PBX's own count starts again at a successful login."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("auth.login_memory_failed", path=str(self.path), error=exc.strerror or str(exc))

    def _write(self, data: dict[str, object]) -> None:
        # Its folder is the state folder; the first `check` on a new machine may come before any run.
        # Never its parents: an unmounted archive disk must not become a folder.
        folder = self.path.parent
        try:
            folder.mkdir(mode=0o700)
            created = True
        except FileExistsError:
            created = False
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(data).encode())
            os.fsync(fd)
            if os.geteuid() == 0:
                # `check` as root (as the deploy recipe runs it): what it leaves must stay the service
                # user's, or the service could not use its own state folder afterwards.
                owner = (folder.parent if created else folder).stat()
                os.fchown(fd, owner.st_uid, owner.st_gid)
                if created:
                    os.chown(folder, owner.st_uid, owner.st_gid)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


def login_memory_path(state_path: Path) -> Path:
    """Beside the ledger, like the token store."""
    return state_path.with_name(state_path.name + ".logins")
