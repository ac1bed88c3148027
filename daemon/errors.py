"""The exception tree: each class carries the decision its caller has to make.

    ArchiverError
    ├── ConfigError              fix the configuration; exit 2
    ├── WrongArchiveError        archive.dir is not the archive the ledger describes; start nothing; exit 6
    ├── FatalAuthError           the PBX refuses us (credentials, IP, permission); stop calling it; exit 3
    │   └── PbxConfigError       the PBX says our configuration is wrong (API path/version, a redirect); exit 2
    ├── PauseError               pause the whole pipeline, burn no item's attempt; ``retry_after_s``
    │   ├── PbxUnavailableError  cannot reach the PBX (refused, DNS, timeout); exit 4 for ``check``
    │   │   └── TlsError         certificate rejected: never a fallback, never a retry loop in ``once``; exit 4
    │   ├── TokenLimitError      errcode 60002, the 8-token limit: back off minutes
    │   ├── DestinationUnavailableError  the S3 endpoint is down, busy (SlowDown, 5xx) or untrusted; exit 4
    │   ├── DestinationFullError the bucket's quota is reached
    │   └── StorageError         disk full, read-only archive, fsync failure
    │       └── LedgerError      SQLite failed (disk full, "database is locked"): the loop backs off and retries
    ├── DestinationConfigError   the off-box copy's bucket or endpoint does not exist as configured; exit 2
    ├── DestinationRefusedError  the off-box copy's endpoint refuses the credentials; exit 3
    ├── DeferredError            the same recording is being transferred under another name: later, burn nothing
    ├── RetryableError           this request failed; try the item again after a back-off
    │   ├── PbxBusyError         HTTP 503 / 429, errcode -2, 2, 70082 and unknown errcodes
    │   │   └── PbxServerError   HTTP 500-599 but 503: the PBX failed on our request; retried like busy
    │   ├── TransferError        body cut, stalled, wrong length, not audio
    │   ├── TokenExpiredError    errcode 10004 (the client refreshes once before this escapes)
    │   └── UrlExpiredError      the 30-minute download URL lapsed: re-resolve, burn no attempt
    └── PermanentError           this item will never succeed as asked
        ├── RecordingMissingError  errcode 60001: gone from the PBX -> state ``missing``
        └── RequestRejectedError   errcode 40001/40002 -> state ``failed``

Messages never contain a secret: callers pass URLs through ``logs.redact_text`` first.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_ITEMS = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 5
EXIT_WRONG_ARCHIVE = 6
# The reader of stdout went away (`status | head -2`): what a shell reports for a tool SIGPIPE ended.
EXIT_BROKEN_PIPE = 128 + 13


class ArchiverError(Exception):
    """Base of every error the archiver raises on purpose."""

    exit_code = EXIT_FAILED_ITEMS

    def __init__(self, message: str, *, errcode: int | None = None, recording: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errcode = errcode
        self.recording = recording

    def __str__(self) -> str:
        parts = [self.message]
        if self.errcode is not None:
            parts.append(f"(errcode {self.errcode})")
        if self.recording is not None:
            parts.append(f"[recording {self.recording}]")
        return " ".join(parts)


class ConfigError(ArchiverError):
    """The configuration is invalid; ``problems`` holds one line per problem, each naming its key."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems) if problems else "invalid configuration")
        self.problems = problems


class FatalAuthError(ArchiverError):
    """The PBX refused the credentials, the client IP or the application; only an operator can fix it.

    Never retried in a loop: five failed logins block the client IP on the PBX. ``retry_after_s`` is
    when the PBX said it lifts an IP block, if it said.
    """

    exit_code = EXIT_AUTH

    def __init__(self, message: str, *, errcode: int | None = None, recording: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, errcode=errcode, recording=recording)
        self.retry_after_s = retry_after_s


class PbxConfigError(FatalAuthError):
    """The PBX answered that the request itself is wrong for it: an API path or version it does not
    serve, an action the application may not take, or a redirect we will not follow. Only a
    configuration change fixes it, so it is never retried in a loop."""

    exit_code = EXIT_CONFIG


class WrongArchiveError(ArchiverError):
    """``archive.dir`` is missing, or is not the archive the ledger describes (an unmounted disk, an
    emptied folder, another archive's marker): downloading into it would hide the loss."""

    exit_code = EXIT_WRONG_ARCHIVE


class PauseError(ArchiverError):
    """Something outside any one recording is wrong: pause everything, burn no attempt."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, message: str, *, retry_after_s: float | None = None, errcode: int | None = None,
                 recording: str | None = None) -> None:
        super().__init__(message, errcode=errcode, recording=recording)
        self.retry_after_s = retry_after_s


class PbxUnavailableError(PauseError):
    """The PBX cannot be reached or does not answer in time."""


class TlsError(PbxUnavailableError):
    """The PBX's TLS certificate was rejected; the message says how to trust it."""


class TokenLimitError(PauseError):
    """errcode 60002: the application already holds its maximum of access tokens."""


class StorageError(PauseError):
    """The archive cannot be written (disk full, read-only, fsync failed)."""

    exit_code = EXIT_FAILED_ITEMS


class DestinationUnavailableError(PauseError):
    """The off-box copy's endpoint cannot be reached, is busy, or its certificate is not trusted:
    copies wait (no recording is marked failed for it)."""


class DestinationFullError(PauseError):
    """The bucket's quota is reached: copies wait until there is room."""


class DestinationConfigError(ArchiverError):
    """The bucket (or its region, or the endpoint) is not what the configuration says."""

    exit_code = EXIT_CONFIG


class DestinationRefusedError(ArchiverError):
    """The S3 endpoint refuses the credentials or the bucket policy forbids us."""

    exit_code = EXIT_AUTH


class LedgerError(StorageError):
    """The ledger (SQLite) could not be read or written: disk full, a lock held past the busy timeout,
    an I/O error. Nothing is lost by waiting: the caller backs off and tries again."""


class DeferredError(ArchiverError):
    """This recording is being transferred right now under another ledger row (named by id and by file
    name): try again after ``retry_after_s`` without burning an attempt, so that one recording never
    has two transfers at once."""

    def __init__(self, message: str, *, retry_after_s: float = 5.0, recording: str | None = None) -> None:
        super().__init__(message, recording=recording)
        self.retry_after_s = retry_after_s


class RetryableError(ArchiverError):
    """This attempt failed for a reason that may pass; ``retry_after_s`` is the server's hint, if any."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, errcode: int | None = None,
                 recording: str | None = None) -> None:
        super().__init__(message, errcode=errcode, recording=recording)
        self.retry_after_s = retry_after_s


class PbxBusyError(RetryableError):
    """The PBX answered but could not serve the request now (503, 429, -2, 2, 70082, unknown errcode)."""


class PbxServerError(PbxBusyError):
    """The PBX answered a server error (HTTP 5xx other than 503). Its own name, so that reasons and
    logs say "server error" rather than "busy"; retried like busy (it may pass), so a subclass."""


class TransferError(RetryableError):
    """A file transfer broke or delivered something that is not the recording."""


class TokenExpiredError(RetryableError):
    """errcode 10004 after the one refresh the client allows itself."""


class UrlExpiredError(RetryableError):
    """The download URL is no longer valid; get a new one without burning an attempt."""


class PermanentError(ArchiverError):
    """Retrying this item as asked cannot succeed; ``state`` is the ledger state it ends in."""

    state = "failed"


class RecordingMissingError(PermanentError):
    """errcode 60001: the PBX no longer has the recording (deleted or auto-cleaned)."""

    state = "missing"


class RequestRejectedError(PermanentError):
    """errcode 40001/40002: the PBX rejects the request's parameters for this item."""


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for an error that ends a command."""
    if isinstance(exc, ArchiverError):
        return exc.exit_code
    return EXIT_FAILED_ITEMS
