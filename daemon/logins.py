"""Failed PBX logins remembered across processes, so that no command repeats a wrong secret into an IP block.

The PBX blocks the client IP after 5 failed logins in a row, and only its administrator lifts that (its
count has no time window that the guide documents; a success resets it). Each process already stops at
the first refusal, but an operator running ``check`` again and again, or ``once`` on a timer, does not:
the failures in a row are kept beside the ledger (``<state.path>.logins``, a small JSON file written
atomically), each with a salted digest of the credentials tried. A login is refused without contacting
the PBX after ``SAME_CREDENTIALS_LIMIT`` failures of the same credentials, and after ``IN_A_ROW_LIMIT``
of any: new credentials (the operator fixed the secret) get a try while that leaves one spare below the
PBX's five. A successful login clears the file; ``check --force-login`` tries anyway, and deleting the
file forgets the failures.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.clock import Clock
from daemon.errors import FatalAuthError

log = structlog.get_logger("daemon.logins")

SAME_CREDENTIALS_LIMIT = 3   # failures of these credentials: a fourth try of them is refused
IN_A_ROW_LIMIT = 4           # failures in a row of any credentials: the PBX's fifth would block the IP
KEEP = 10   # failures kept in the file: bounded, and more than any limit needs


@dataclass(frozen=True)
class Refusal:
    """Why a login is not tried now: ``in_a_row`` failed logins since the last success, ``same`` of them
    with the credentials configured now, the last at ``last_at`` (Unix time)."""

    in_a_row: int
    same: int
    last_at: float


def login_refusal(failures: Sequence[tuple[float, str]], who: str, *, same_limit: int = SAME_CREDENTIALS_LIMIT,
                  in_a_row_limit: int = IN_A_ROW_LIMIT) -> Refusal | None:
    """None when a login with the credentials ``who`` (their digest) may be tried; else why not.
    ``failures``: (when, digest) of each failed login since the last success. Pure; tested as a table."""
    same = sum(1 for _, w in failures if w == who)
    if same < same_limit and len(failures) < in_a_row_limit:
        return None
    return Refusal(in_a_row=len(failures), same=same, last_at=max(t for t, _ in failures))


def refusal_message(refusal: Refusal, path: Path) -> str:
    """What the operator reads: why, and how to go on. Pure."""
    when = dt.datetime.fromtimestamp(refusal.last_at, dt.UTC).isoformat(timespec="seconds")
    why = (f"these credentials failed {refusal.same} times in a row" if refusal.same >= SAME_CREDENTIALS_LIMIT
           else f"{refusal.in_a_row} failed logins in a row, {refusal.same} of them with these credentials")
    fix = ("fix pbx.client_id / pbx.client_secret (new credentials get one try)"
           if refusal.in_a_row < IN_A_ROW_LIMIT else
           "one more failure and the PBX blocks this IP: make sure pbx.client_id / pbx.client_secret are right")
    return (f"not logging in: {why}, the last at {when} (the PBX blocks this IP after 5 in a row and only its "
            f"administrator lifts it); {fix}, then try with `check --force-login`, or delete {str(path)!r}")


def credentials_digest(salt: str, client_id: str, secret: str) -> str:
    """Which credentials a failure was of, without keeping them: salted, so equal secrets on two
    machines do not match, and cut short."""
    return hashlib.sha256(f"{salt}\0{client_id}\0{secret}".encode()).hexdigest()[:16]


class LoginRefusedError(FatalAuthError):
    """Too many failed logins in a row: no request was sent."""


class LoginMemory:
    """The failed-login file of one PBX (``pbx`` is its base URL: the PBX counts per client IP). Each
    call names the credentials of the login (a reload may change them)."""

    def __init__(self, path: Path, pbx: str, clock: Clock, *, force: bool = False) -> None:
        self.path = path
        self.pbx = pbx
        self.clock = clock
        self.force = force

    def _load(self) -> tuple[str, list[tuple[float, str]]]:
        """(salt, failures in a row); a new salt and none when absent, unreadable or of another PBX."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("pbx") != self.pbx:
                raise ValueError("another PBX (base_url changed): its failures say nothing of this one")
            return str(data["salt"]), [(float(f["at"]), str(f["who"])) for f in data["failures"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return secrets.token_hex(8), []   # nothing remembered: never a reason to refuse

    def before_login(self, client_id: str, secret: str) -> None:
        """Raises LoginRefusedError (exit 3) when a login with these credentials now would risk the IP block."""
        salt, failures = self._load()
        refusal = login_refusal(failures, credentials_digest(salt, client_id, secret)) if failures else None
        if refusal is None:
            return
        if self.force:
            log.warning("auth.login_forced", failures_in_a_row=refusal.in_a_row, path=str(self.path))
            return
        log.error("auth.login_refused", failures_in_a_row=refusal.in_a_row, with_these_credentials=refusal.same,
                  path=str(self.path))
        # No retry_after_s: `run` looks again at its usual auth pace (the operator may fix the secret,
        # reload, or delete the file meanwhile).
        raise LoginRefusedError(refusal_message(refusal, self.path), errcode=-1)

    def failed(self, client_id: str, secret: str) -> None:
        """Remember one failed login (best effort: a state folder we cannot write only loses the memory).
        Read, add and replace under an flock: two processes failing at once must both be counted."""
        try:
            with self._locked():
                salt, failures = self._load()
                failures = [*failures, (self.clock.wall(), credentials_digest(salt, client_id, secret))][-KEEP:]
                self._write({"pbx": self.pbx, "salt": salt,
                             "failures": [{"at": t, "who": w} for t, w in failures]})
        except OSError as exc:
            log.warning("auth.login_memory_failed", path=str(self.path), error=exc.strerror or str(exc))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive flock on the state folder (the file itself is replaced by each write, so a lock
        on it would not hold). Without a folder yet, no lock: ``_write`` creates the folder."""
        try:
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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
