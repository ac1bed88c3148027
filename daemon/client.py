"""The Yeastar P-Series API client: the only module that touches aiohttp's client or its exceptions.

One ``aiohttp.ClientSession`` per client, a ``User-Agent`` on every request, TLS verified unless the
operator says otherwise, API calls paced, every errcode mapped to an exception of ``errors.py``, and
one token manager that refreshes ahead of expiry, single-flight, and revokes its token on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import json
import math
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from daemon.clock import Clock, SystemClock
from daemon.config import PbxConfig
from daemon.errors import (
    ArchiverError,
    FatalAuthError,
    PauseError,
    PbxBusyError,
    PbxConfigError,
    PbxServerError,
    PbxUnavailableError,
    PermanentError,
    RecordingMissingError,
    RequestRejectedError,
    RetryableError,
    TlsError,
    TokenExpiredError,
    TokenLimitError,
    TransferError,
    UrlExpiredError,
)
from daemon.logins import LoginMemory
from daemon.logs import debug_enabled, redact_text, remember_secret

log = structlog.get_logger("daemon.client")

RETRY_AFTER_CAP_S = 3600.0
ENVELOPE_PEEK_BYTES = 64 * 1024
MAX_ERROR_TEXT = 300
MAX_API_BODY = 8 * 1024 * 1024   # a recording page of 1000 items is ~0.5 MB; anything near this is not an answer
API_READ_BYTES = 256 * 1024
POOL_SPARE = 8                   # connections beyond one per worker: API calls, discovery, the probe
REDIRECTS = frozenset({301, 302, 303, 307, 308})

# The PBX refuses us (exit 3): only its administrator can change that, and retrying bad
# credentials gets the IP blocked.
_FATAL_ERRCODES = {
    70004: "the PBX has BLOCKED this client IP after failed logins: an administrator must unblock it",
    70087: "this client IP is not on the PBX API allow-list (IP FORBIDDEN): add it in the PBX portal",
}
# The PBX says the request itself does not fit it (exit 2): a configuration change fixes it.
_CONFIG_ERRCODES = {
    10001: "the PBX does not know this API endpoint (INTERFACE NOT EXISTED): check pbx.base_url and "
           "pbx.api_path, or the firmware is too old",
    10002: "the PBX no longer maintains this API version (API VERSION OUT OF MAINTENANCE): set pbx.api_path "
           "to a version it serves",
    10003: "the PBX does not support this API version (API VERSION UNSUPPORTED): set pbx.api_path to a version "
           "it serves",
    10005: "the API application lacks a permission (ACCESS DENIED): grant it recording access in the PBX portal",
    70084: "the API application may not do this (ACTION FORBIDDEN): check its permissions in the PBX portal",
    70123: "the Open API is disabled on the PBX (API UNAVAILABLE): enable it in the PBX portal",
}
BLOCK_WAIT_CAP_S = 86400.0


BLOCK_LIFT_MARGIN_S = 2.0   # the next login this long after a PBX said its IP block lifts (clocks differ)


def block_wait_s(block_expire_time: Any, now_wall: float) -> float | None:
    """Seconds until an IP block lifts, from 70004's ``block_expire_time`` (a Unix time, or seconds
    to go; the guide does not say which): None when absent or unusable, capped at a day. Pure."""
    if isinstance(block_expire_time, bool) or not isinstance(block_expire_time, int | float | str):
        return None
    try:
        value = float(block_expire_time)
    except ValueError:
        return None
    if value <= 0:
        return None
    left = value - now_wall if value > 1e9 else value
    return min(max(0.0, left), BLOCK_WAIT_CAP_S)


def error_for_errcode(errcode: int, errmsg: str, *, login: bool = False, recording: str | None = None,
                      token_limit_backoff_s: float = 600.0, block_wait: float | None = None) -> ArchiverError:
    """The exception that carries the right decision for a non-zero errcode. Pure; tested as a table."""
    msg = f"PBX answered {errmsg or 'an error'}"
    if errcode == -1 and login:
        return FatalAuthError("the PBX rejected the client id or secret (pbx.client_id / pbx.client_secret); "
                              "not retrying: 5 failed logins block this IP", errcode=errcode)
    if errcode in _CONFIG_ERRCODES:
        return PbxConfigError(_CONFIG_ERRCODES[errcode], errcode=errcode)
    if errcode in _FATAL_ERRCODES:
        text = _FATAL_ERRCODES[errcode]
        if errcode == 70004 and block_wait is not None:
            text += f" (the PBX lifts the block in {block_wait:.0f} s)"
        return FatalAuthError(text, errcode=errcode, retry_after_s=block_wait if errcode == 70004 else None)
    if errcode == 10004:
        return TokenExpiredError(msg, errcode=errcode, recording=recording)
    if errcode in (40001, 40002, 40003, 40004):
        return RequestRejectedError(msg, errcode=errcode, recording=recording)
    if errcode == 60001:
        return RecordingMissingError("the PBX no longer has this recording", errcode=errcode, recording=recording)
    if errcode == 60002 and login:
        return TokenLimitError("the PBX's limit of 8 access tokens for this application is reached",
                               errcode=errcode, retry_after_s=token_limit_backoff_s)
    # -1 outside login, -2, 2 PROCESSING, 60002 outside login (a general quantity limit), 70082
    # OVERLOAD and any errcode not documented: retry later.
    return PbxBusyError(msg, errcode=errcode, recording=recording)


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), capped; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now_wall), RETRY_AFTER_CAP_S)


def token_renewal_due(now: float, expires_at: float, lifetime_s: float, margin_s: float) -> bool:
    """True when a token must be renewed: within ``margin_s`` of expiry (at most half its lifetime)."""
    return now >= expires_at - min(margin_s, lifetime_s / 2)


def file_url(base_url: str, resource: str) -> str:
    """The absolute URL of a ``download_resource_url``; refuses one that points at another host.

    The access token is appended to this URL, so it must never leave the PBX's origin.
    """
    parts = urlsplit(resource)
    if parts.scheme or parts.netloc:
        base = urlsplit(base_url)
        if (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
            raise TransferError(f"download URL points at another host ({parts.netloc!r}); refused")
        return resource
    if not resource.startswith("/"):
        resource = "/" + resource
    return base_url.rstrip("/") + resource


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/total`` -> (a, b, total); ``bytes */total`` -> (None, None, total); unknown parts None."""
    if not value:
        return None, None, None
    unit, _, rest = value.strip().partition(" ")
    if unit != "bytes":
        return None, None, None
    span, _, total_s = rest.partition("/")
    total = int(total_s) if total_s.isdigit() else None
    if span == "*":
        return None, None, total
    first, _, last = span.partition("-")
    if first.isdigit() and last.isdigit():
        return int(first), int(last), total
    return None, None, total


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, never its path or query (which may carry a token)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "") if parts.scheme else "?"


def redirect_refused(what: str, status: int, location: str | None, pbx: str) -> str:
    """The message for a redirect that is never followed. Pure."""
    target = origin_of(location) if location and "//" in location else "a path on the same host"
    return (f"{what}: the PBX at {origin_of(pbx)} answered HTTP {status}, a redirect to {target}; "
            "redirects are never followed (they would carry the client secret or the token): "
            "set pbx.base_url to the address the PBX really serves")


class _RedirectGuard:
    """A session-wide trace hook: if any request (the WebSocket upgrade included, which cannot be told
    not to follow) is about to follow a redirect, stop it before a byte goes to the new address."""

    def __init__(self, pbx: str) -> None:
        self.pbx = pbx

    def config(self) -> aiohttp.TraceConfig:
        trace = aiohttp.TraceConfig()
        trace.on_request_redirect.append(self._refuse)
        return trace

    async def _refuse(self, _session: aiohttp.ClientSession, _ctx: Any,
                      params: aiohttp.TraceRequestRedirectParams) -> None:
        resp = params.response
        raise PbxConfigError(redirect_refused(str(params.url.path).rsplit("/", 1)[-1] or "request", resp.status,
                                              resp.headers.get("Location"), self.pbx))


def _short(text: str) -> str:
    text = redact_text(text)
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


# errno -> what happened, in the operator's words ("{where}" is host:port).
_CONNECT_ERRNO = {
    errno.ECONNREFUSED: "connection refused by {where}",
    errno.ETIMEDOUT: "connecting to {where} timed out",
    errno.EHOSTUNREACH: "no route to {where}",
    errno.ENETUNREACH: "no route to {where} (network unreachable)",
    errno.ECONNRESET: "connection reset by {where}",
    errno.ECONNABORTED: "connection aborted by {where}",
    errno.EPIPE: "connection closed by {where}",
}


def describe_os_error(err: BaseException | None, where: str) -> str:
    """A socket error in plain words naming ``where`` (``host:port``), never an exception repr. Pure."""
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name of {where}"
    number = getattr(err, "errno", None)
    if number in _CONNECT_ERRNO:
        return _CONNECT_ERRNO[number].format(where=where)
    strerror = getattr(err, "strerror", None)
    return f"connection to {where} failed ({strerror.lower()})" if strerror else f"connection to {where} failed"


def describe_client_error(exc: BaseException, where: str) -> str:
    """What an aiohttp (or socket) failure means, for ledger reasons and logs: aiohttp's reprs
    (``<ContentLengthError: 400, message=...>``) say nothing to an operator. Pure; tested as a table."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return describe_os_error(exc.os_error, f"{exc.host}:{exc.port}")
    if isinstance(exc, aiohttp.ClientPayloadError):
        if "length" in str(exc).lower():
            return "the body ended before its announced length"
        return "the body arrived malformed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{where} closed the connection without an answer"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{where} sent an answer that is not valid HTTP"
    if isinstance(exc, OSError):        # aiohttp.ClientOSError and the built-in ConnectionErrors
        return describe_os_error(exc, where)
    return f"the request to {where} failed"


@contextlib.contextmanager
def translate_errors(what: str, *, in_body: bool = False, recording: str | None = None,
                     where: str = "the PBX") -> Iterator[None]:
    """Map aiohttp's and the socket's exceptions to the archiver's tree. The one place that does this.
    Messages are plain sentences (``connection refused by 127.0.0.1:8080``, ``timed out reading the
    body``); the original exception stays chained for a traceback."""
    try:
        yield
    except ArchiverError:
        raise
    except aiohttp.ClientConnectorCertificateError as exc:
        raise TlsError(
            f"{what}: the PBX's TLS certificate was rejected ({_short(str(exc.certificate_error))}); "
            "set pbx.tls.ca_file to the CA bundle that signed it", recording=recording) from exc
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        raise TlsError(f"{what}: TLS handshake with the PBX failed ({_short(str(exc))}); "
                       "check pbx.base_url and pbx.tls", recording=recording) from exc
    except aiohttp.ClientConnectorError as exc:
        raise PbxUnavailableError(f"{what}: cannot connect to {where}: {describe_client_error(exc, where)}",
                                  recording=recording) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        if in_body:
            raise TransferError(f"{what}: the transfer stalled: timed out reading the body (no data within "
                                "the read timeout)", recording=recording) from exc
        raise PbxUnavailableError(f"{what}: {where} did not answer in time", recording=recording) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
            aiohttp.ClientResponseError, ConnectionError) as exc:
        if in_body:
            raise TransferError(f"{what}: the transfer broke: {describe_client_error(exc, where)}",
                                recording=recording) from exc
        raise PbxUnavailableError(f"{what}: the connection to {where} failed: {describe_client_error(exc, where)}",
                                  recording=recording) from exc
    except aiohttp.ClientError as exc:
        raise PbxUnavailableError(f"{what}: {describe_client_error(exc, where)}", recording=recording) from exc


def stale_connection(exc: BaseException) -> bool:
    """True when ``exc`` (from ``translate_errors``) is a connection that was dropped before any answer
    came — what a pooled keep-alive socket the PBX already closed gives — not a refused connect."""
    cause = exc.__cause__
    return isinstance(cause, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError) and \
        not isinstance(cause, aiohttp.ClientConnectorError)


class Pacer:
    """Spaces API calls at most ``rate`` per second on the injected clock."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._next = -math.inf
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        """Change the pace live (SIGHUP)."""
        self._interval = 1.0 / rate

    async def wait(self) -> None:
        async with self._lock:
            now = self._clock.monotonic()
            if self._next > now:
                await self._clock.sleep(self._next - now)
                now = self._next
            self._next = now + self._interval


@dataclass(frozen=True)
class DownloadUrl:
    """A resolved download URL: absolute, WITHOUT the token (added per request, so a token renewal
    does not cost a new URL); ``issued_at`` and ``expires_at`` are on the client's monotonic clock."""

    file: str
    url: str
    issued_at: float
    expires_at: float

    @property
    def format_hint(self) -> str | None:
        """``wav``/``mp3`` from the download URL's own extension (the PBX names it after what it serves)."""
        path = urlsplit(self.url).path.lower()
        return "mp3" if path.endswith(".mp3") else "wav" if path.endswith(".wav") else None


@dataclass
class PbxHealth:
    """How the last exchange with the PBX went, for readiness."""

    ok_at: float = 0.0
    error_at: float = 0.0
    error: str | None = None
    answered_at: float = 0.0      # the last answer of any kind, an error envelope or a 5xx included
    unreachable_at: float = 0.0   # the last time the PBX could not be reached (or trusted) at all
    connection_errors: int = 0

    @property
    def up(self) -> bool | None:
        """The PBX answered since it was last unreachable; None before any exchange."""
        if self.last_at == 0.0:
            return None
        return max(self.ok_at, self.answered_at) > self.unreachable_at

    @property
    def ok(self) -> bool:
        """True when the most recent exchange succeeded (or none failed yet)."""
        return self.ok_at >= self.error_at

    @property
    def last_at(self) -> float:
        return max(self.ok_at, self.error_at)


@dataclass(frozen=True)
class RecordingPage:
    total: int
    items: list[dict[str, Any]]


class FileStream:
    """An open file transfer. ``start`` is the byte offset its body begins at; ``total`` the file size if known."""

    def __init__(self, response: aiohttp.ClientResponse, *, start: int, total: int | None, first: bytes,
                 recording: str | None, meter: Callable[[int], None]) -> None:
        self.status = response.status
        self.start = start
        self.total = total
        self.length = response.content_length
        # A chunked body ends with its last chunk: one that stops short of it breaks (ClientPayloadError),
        # so a body that ends well is whole, as with a Content-Length.
        self.chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
        self.content_type = response.headers.get("Content-Type")
        self._response = response
        self._first = first
        self._recording = recording
        self._meter = meter

    async def chunks(self, size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """The body, in chunks of up to ``size`` bytes. Raises ``TransferError`` if it breaks, stalls
        or falls below the caller's throughput floor (``meter``)."""
        if self._first:
            yield self._first
        while True:
            with translate_errors("file transfer", in_body=True, recording=self._recording):
                chunk = await self._response.content.read(size)
            if not chunk:
                return
            self._meter(len(chunk))
            yield chunk


class TokenManager:
    """Holds ONE access token per PBX: login, proactive refresh, single-flight renewal, revocation."""

    def __init__(self, client: PbxClient, cfg: PbxConfig, clock: Clock, store: Path | None = None) -> None:
        self._client = client
        self._cfg = cfg
        self._clock = clock
        self._store_path = store
        self._lock = asyncio.Lock()
        self._access: str | None = None
        self._access_expires_at = -math.inf
        self._lifetime_s = 0.0
        self._refresh: str | None = None
        self._refresh_expires_at = -math.inf
        self._fatal: FatalAuthError | None = None
        self._limit_until = -math.inf
        self.logins = 0
        self.refreshes = 0
        self.logins_memory: LoginMemory | None = None   # failed logins across processes (never with no state)

    @property
    def fatal(self) -> FatalAuthError | None:
        """The fatal auth error that stopped all logins, if any."""
        return self._fatal

    @property
    def authenticated(self) -> bool:
        return self._access is not None and self._clock.monotonic() < self._access_expires_at

    def _fresh(self) -> bool:
        return self._access is not None and not token_renewal_due(
            self._clock.monotonic(), self._access_expires_at, self._lifetime_s, self._cfg.token_refresh_margin_s)

    async def token(self) -> str:
        """A valid access token; renews it (once, for all concurrent callers) when due."""
        if self._fresh():
            assert self._access is not None
            return self._access
        async with self._lock:
            if not self._fresh():
                await self._renew()
            assert self._access is not None
            return self._access

    def invalidate(self, stale: str) -> None:
        """The PBX said ``stale`` is expired (10004); the next ``token()`` renews unless already done."""
        if self._access == stale:
            self._access_expires_at = -math.inf

    @property
    def expires_wall(self) -> float | None:
        """Unix time the current access token expires (None without one)."""
        if self._access is None:
            return None
        return self._clock.wall() + self._access_expires_at - self._clock.monotonic()

    def seconds_until_renewal(self) -> float:
        """How long the current token stays fresh (0 when it is due or absent)."""
        if self._access is None:
            return 0.0
        due = self._access_expires_at - min(self._cfg.token_refresh_margin_s, self._lifetime_s / 2)
        return max(0.0, due - self._clock.monotonic())

    def clear_fatal(self) -> None:
        """Allow one more login after a fatal auth error (``run`` does this on a long interval)."""
        self._fatal = None

    def _store(self, data: dict[str, Any]) -> None:
        try:
            access = str(data["access_token"])
            refresh = str(data["refresh_token"])
            lifetime = float(data.get("access_token_expire_time", 1800))
            refresh_lifetime = float(data.get("refresh_token_expire_time", 86400))
        except (KeyError, TypeError, ValueError) as exc:
            raise PbxBusyError("the PBX's token answer lacks access_token/refresh_token") from exc
        remember_secret(access)
        remember_secret(refresh)
        now = self._clock.monotonic()
        self._access, self._refresh = access, refresh
        self._lifetime_s = lifetime
        self._access_expires_at = now + lifetime
        self._refresh_expires_at = now + refresh_lifetime
        self._save()

    # A process killed without revoking leaves its token live for 30 minutes; the PBX allows 8. So
    # the pair is kept in a 0600 file beside the ledger and picked up by the next process (a crash
    # loop then never exhausts the limit), and the file goes when the token is revoked.
    def _save(self) -> None:
        if self._store_path is None or self._access is None or self._refresh is None:
            return
        wall, mono = self._clock.wall(), self._clock.monotonic()
        data = {"access_token": self._access, "refresh_token": self._refresh, "lifetime_s": self._lifetime_s,
                "access_expires_wall": wall + self._access_expires_at - mono,
                "refresh_expires_wall": wall + self._refresh_expires_at - mono,
                "pbx": self._cfg.base_url, "client_id": self._cfg.client_id}
        tmp = self._store_path.with_name(self._store_path.name + ".tmp")
        try:
            self._store_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self._store_path)
        except OSError as exc:
            log.warning("token.store_failed", error=str(exc))

    def _forget_store(self) -> None:
        if self._store_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._store_path.unlink()

    def restore(self) -> bool:
        """Pick up the token a previous process left (same PBX and client id, refresh still valid)."""
        if self._store_path is None:
            return False
        try:
            data = json.loads(self._store_path.read_text())
            access, refresh = str(data["access_token"]), str(data["refresh_token"])
            same = data.get("pbx") == self._cfg.base_url and data.get("client_id") == self._cfg.client_id
            access_left = float(data["access_expires_wall"]) - self._clock.wall()
            refresh_left = float(data["refresh_expires_wall"]) - self._clock.wall()
            lifetime = float(data["lifetime_s"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not same or refresh_left <= 0:
            self._forget_store()
            return False
        remember_secret(access)
        remember_secret(refresh)
        mono = self._clock.monotonic()
        self._access, self._refresh, self._lifetime_s = access, refresh, lifetime
        self._access_expires_at = mono + access_left
        self._refresh_expires_at = mono + refresh_left
        log.info("token.restored", expires_in_s=round(max(0.0, access_left)))
        return True

    async def _renew(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        now = self._clock.monotonic()
        if now < self._limit_until:
            raise TokenLimitError("waiting out the PBX's token limit", errcode=60002,
                                  retry_after_s=self._limit_until - now)
        if self._refresh is not None and now < self._refresh_expires_at:
            try:
                data = await self._client.call_raw("refresh_token", {"refresh_token": self._refresh})
            except (TokenExpiredError, RequestRejectedError, PbxBusyError) as exc:
                # The PBX refused the refresh token: fall back to a fresh login below.
                log.info("token.refresh_failed", reason=str(exc))
            else:
                self._store(data)
                self.refreshes += 1
                log.info("token.refreshed", expires_in_s=self._lifetime_s)
                return
        await self._revoke_quietly()
        if self.logins_memory is not None:
            try:
                self.logins_memory.before_login(self._cfg.client_id, self._cfg.client_secret.reveal())
            except FatalAuthError as exc:   # no request sent; `run` looks again at its auth pace
                self._fatal = exc
                raise
        try:
            data = await self._client.call_raw("get_token", {
                "username": self._cfg.client_id, "password": self._cfg.client_secret.reveal()}, login=True)
        except FatalAuthError as exc:
            if self.logins_memory is not None and exc.errcode == -1:
                self.logins_memory.failed(self._cfg.client_id, self._cfg.client_secret.reveal())
            self._fatal = exc
            self._access = self._refresh = None
            log.error("auth.fatal", errcode=exc.errcode, reason=exc.message)
            raise
        except TokenLimitError as exc:
            self._limit_until = self._clock.monotonic() + (exc.retry_after_s or self._cfg.token_limit_backoff_s)
            log.warning("token.limit_reached", retry_after_s=exc.retry_after_s)
            raise
        self._store(data)
        self.logins += 1
        if self.logins_memory is not None:
            self.logins_memory.succeeded()
        log.info("token.obtained", expires_in_s=self._lifetime_s)

    async def _revoke_quietly(self) -> None:
        """Revoke the current token if it may still be live, so that we never hold two."""
        if self._access is None or self._clock.monotonic() >= self._access_expires_at:
            self._access = self._refresh = None
            self._forget_store()
            return
        access, self._access, self._refresh = self._access, None, None
        try:
            await self._client.call_raw("del_token", None, params={"access_token": access}, method="GET")
        except ArchiverError as exc:
            log.warning("token.revoke_failed", reason=str(exc))
        else:
            log.info("token.revoked")
            self._forget_store()

    async def revoke(self) -> None:
        """Revoke the token on shutdown (the PBX allows only 8 per application)."""
        async with self._lock:
            await self._revoke_quietly()


class PbxClient:
    """An async context manager around one ClientSession; ``close`` revokes the token."""

    def __init__(self, cfg: PbxConfig, *, clock: Clock | None = None, read_timeout_s: float = 60.0,
                 url_lifetime_s: float = 1800.0, token_store: Path | None = None, workers: int = 4,
                 logins: LoginMemory | None = None) -> None:
        self.cfg = cfg
        # Every worker may hold a file transfer; pool waits would count against the connect timeout.
        self._pool_size = workers + POOL_SPARE
        self.close_timeout_s = cfg.timeout_s
        self.clock = clock or SystemClock()
        self.tokens = TokenManager(self, cfg, self.clock, token_store)
        self.tokens.logins_memory = logins
        self.pacer = Pacer(cfg.requests_per_second, self.clock)
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self.connection_retries = 0
        self.health = PbxHealth()
        self._events_ws: aiohttp.ClientWebSocketResponse | None = None
        self.errcodes: Counter[int] = Counter()
        self._url_lifetime_s = url_lifetime_s
        self._api_timeout = aiohttp.ClientTimeout(total=cfg.timeout_s, connect=cfg.timeout_s)
        self._file_timeout = aiohttp.ClientTimeout(total=None, connect=cfg.timeout_s, sock_read=read_timeout_s)
        remember_secret(cfg.client_secret.reveal())

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.cfg.tls.verify:
            return False
        ca = str(self.cfg.tls.ca_file) if self.cfg.tls.ca_file else None
        return ssl.create_default_context(cafile=ca)

    async def __aenter__(self) -> PbxClient:
        ssl_ctx = self._ssl()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=self._pool_size),
            headers={"User-Agent": self.cfg.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[_RedirectGuard(self.cfg.base_url).config()],
        )
        # No keep-alive: for logins and for a request that met a connection the PBX had closed.
        self._fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=self._pool_size, force_close=True),
            headers={"User-Agent": self.cfg.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[_RedirectGuard(self.cfg.base_url).config()],
        )
        self.tokens.restore()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Revoke the token (within ``close_timeout_s``: a stop must not wait on a PBX that is gone),
        then close the session."""
        if self._session is None:
            return
        try:
            try:
                async with asyncio.timeout(max(0.1, self.close_timeout_s)):
                    await self.tokens.revoke()
            except TimeoutError:
                log.warning("token.revoke_timed_out", timeout_s=self.close_timeout_s,
                            action="the token stays stored for the next start")
        finally:
            await self._session.close()
            self._session = None
            if self._fresh is not None:
                await self._fresh.close()
                self._fresh = None

    @property
    def events_connected(self) -> bool:
        """An event subscription (the PBX WebSocket) is open now."""
        return self._events_ws is not None and not self._events_ws.closed

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("PbxClient used outside 'async with'")
        return self._session

    @property
    def fresh_session(self) -> aiohttp.ClientSession:
        """A session whose every request gets a new connection."""
        if self._fresh is None:
            raise RuntimeError("PbxClient used outside 'async with'")
        return self._fresh

    # ---------------------------------------------------------------- API calls
    async def call_raw(self, endpoint: str, body: dict[str, Any] | None, *, params: dict[str, str] | None = None,
                       method: str = "POST", login: bool = False, recording: str | None = None) -> dict[str, Any]:
        """One paced API request without token handling. Returns the envelope when errcode is 0 (or 1,
        PARTIAL SUCCESS: the caller checks that what it needs is there).

        A POST (a login, a token refresh) always goes on a connection of its own: the PBX closes each
        connection after its answer, and a POST lost on a stale one must not be sent twice (a second
        login could count against the 8-token limit). A GET lost on a stale pooled connection is sent
        once more on a fresh one before it counts as trouble."""
        await self.pacer.wait()
        url = f"{self.cfg.api_base}/{endpoint}"
        fresh = method != "GET"
        while True:
            session = self.fresh_session if fresh else self.session
            sent = self.clock.monotonic()
            try:
                with translate_errors(endpoint, recording=recording):
                    async with session.request(method, url, params=params, json=body, allow_redirects=False,
                                               timeout=self._api_timeout) as resp:
                        if debug_enabled():
                            # The endpoint, never the URL: the token travels in the query.
                            log.debug("pbx.request", method=method, endpoint=endpoint, status=resp.status,
                                      elapsed_ms=round((self.clock.monotonic() - sent) * 1000, 1),
                                      recording=recording)
                        self._raise_for_http(resp, endpoint, recording)
                        raw = await _read_capped(resp, endpoint, recording)
                break
            except PbxUnavailableError as exc:
                if not fresh and stale_connection(exc):
                    self._stale_connection(endpoint)
                    fresh = True
                    continue
                self._unhealthy(exc)
                raise
            except (PauseError, PbxBusyError, PbxConfigError) as exc:
                self._unhealthy(exc)
                raise
        self.health.ok_at = self.clock.monotonic()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PbxBusyError(f"{endpoint}: the PBX answered something that is not JSON",
                               recording=recording) from exc
        if not isinstance(data, dict) or "errcode" not in data:
            raise PbxBusyError(f"{endpoint}: the PBX answered JSON without an errcode", recording=recording)
        errcode = _int_or(data.get("errcode"), -2)
        if errcode == 1:
            log.warning("pbx.partial_success", endpoint=endpoint, errmsg=str(data.get("errmsg", ""))[:200])
        elif errcode != 0:
            self.errcodes[errcode] += 1
            error = error_for_errcode(errcode, str(data.get("errmsg", "")), login=login, recording=recording,
                                      token_limit_backoff_s=self.cfg.token_limit_backoff_s,
                                      block_wait=block_wait_s(data.get("block_expire_time"), self.clock.wall()))
            if isinstance(error, PbxBusyError | FatalAuthError | TokenLimitError):
                self._unhealthy(error)
            raise error
        return data

    def _stale_connection(self, what: str) -> None:
        self.connection_retries += 1
        if self.connection_retries == 1:
            log.info("pbx.closes_connections", endpoint=what,
                     action="a request lost on a connection the PBX had closed is sent again on a fresh one")

    def _unhealthy(self, exc: Exception) -> None:
        self.health.error_at = self.clock.monotonic()
        self.health.error = str(exc)
        if isinstance(exc, PbxUnavailableError):
            self.health.unreachable_at = self.health.error_at
            self.health.connection_errors += 1
        else:
            self.health.answered_at = self.health.error_at

    def _raise_for_http(self, resp: aiohttp.ClientResponse, what: str, recording: str | None) -> None:
        if resp.status == 200:
            return
        retry_after = parse_retry_after(resp.headers.get("Retry-After"), self.clock.wall())
        if resp.status in REDIRECTS:
            raise PbxConfigError(redirect_refused(what, resp.status, resp.headers.get("Location"), self.cfg.base_url))
        if resp.status == 404:
            raise FatalAuthError(f"{what}: HTTP 404 from the PBX: check pbx.base_url and pbx.api_path")
        if resp.status in (429, 503):
            raise PbxBusyError(f"{what}: HTTP {resp.status} from the PBX", retry_after_s=retry_after,
                               recording=recording)
        if resp.status >= 500:
            raise PbxServerError(f"{what}: server error HTTP {resp.status} from the PBX", retry_after_s=retry_after,
                                 recording=recording)
        raise PbxBusyError(f"{what}: unexpected HTTP {resp.status} from the PBX", recording=recording)

    async def call(self, endpoint: str, params: dict[str, str] | None = None, *,
                   recording: str | None = None) -> dict[str, Any]:
        """A GET API call with the token in the query; on 10004, renew the token once and retry."""
        for attempt in (1, 2):
            token = await self.tokens.token()
            try:
                return await self.call_raw(endpoint, None, params={**(params or {}), "access_token": token},
                                           method="GET", recording=recording)
            except TokenExpiredError:
                if attempt == 2:
                    raise
                self.tokens.invalidate(token)
        raise AssertionError("unreachable")

    async def list_recordings(self, *, page: int = 1, page_size: int = 100, sort_by: str = "id",
                              order_by: str = "desc") -> RecordingPage:
        """One page of ``recording/list``."""
        data = await self.call("recording/list", {"page": str(page), "page_size": str(page_size),
                                                  "sort_by": sort_by, "order_by": order_by})
        return _page(data)

    async def search_recordings(self, *, page: int = 1, page_size: int = 100, **filters: str | int) -> RecordingPage:
        """One page of ``recording/search``; filters: start_time, end_time, caller, callee, ids."""
        params = {"page": str(page), "page_size": str(page_size)}
        params.update({k: str(v) for k, v in filters.items()})
        return _page(await self.call("recording/search", params))

    async def resolve_download(self, *, rec_id: int | None = None, file: str | None = None) -> DownloadUrl:
        """Ask for a recording's temporary download URL (valid 30 minutes) by id or by file name."""
        if (rec_id is None) == (file is None):
            raise ValueError("give exactly one of rec_id and file")
        ref = str(rec_id) if rec_id is not None else str(file)
        params = {"id": str(rec_id)} if rec_id is not None else {"file": str(file)}
        data = await self.call("recording/download", params, recording=ref)
        resource = data.get("download_resource_url")
        name = data.get("file")
        if not isinstance(resource, str) or not resource:
            raise PbxBusyError("recording/download answered without download_resource_url", recording=ref)
        now = self.clock.monotonic()
        return DownloadUrl(file=name if isinstance(name, str) else (file or ""),
                           url=file_url(self.cfg.base_url, resource), issued_at=now,
                           expires_at=now + self._url_lifetime_s)

    # ---------------------------------------------------------------- file transfer
    @contextlib.asynccontextmanager
    async def open_file(self, url: str, *, offset: int = 0, recording: str | None = None,
                        meter: Callable[[int], None] | None = None,
                        on_headers: Callable[[str | None], None] | None = None) -> AsyncIterator[FileStream]:
        """Open a download URL, asking for bytes from ``offset`` on when it is > 0. ``meter`` is told
        the size of every read of the body (the envelope peek included), and may raise to abort it.

        The stream's ``start`` tells where its body really begins: ``offset`` only when the server
        answered 206 with a matching Content-Range, else 0. A 416 yields a stream with no body and
        ``total`` set. Raises UrlExpiredError (404/403/410), PbxBusyError (5xx/429), the mapped
        errcode error for a JSON envelope served in place of audio (10004: renews once, retries).
        """
        token_retried = False
        use_range = offset > 0
        count = meter or _ignore
        fresh = False
        while True:
            token = await self.tokens.token()
            headers = {"Range": f"bytes={offset}-"} if use_range else {}
            sent = self.clock.monotonic()
            try:
                with translate_errors("file download", recording=recording):
                    resp = await (self.fresh_session if fresh else self.session).get(
                        url, params={"access_token": token}, headers=headers, allow_redirects=False,
                        timeout=self._file_timeout)
                if debug_enabled():
                    log.debug("pbx.request", method="GET", endpoint="file download", status=resp.status,
                              elapsed_ms=round((self.clock.monotonic() - sent) * 1000, 1), recording=recording,
                              url=redact_text(url.split("?", 1)[0]), range_from=offset if use_range else None)
            except PbxUnavailableError as exc:
                if not fresh and stale_connection(exc):
                    self._stale_connection("file download")
                    fresh = True
                    continue
                self._unhealthy(exc)
                raise
            async with resp:
                retry = await self._check_file_response(resp, recording)
                if retry == "token" and not token_retried:
                    token_retried = True
                    self.tokens.invalidate(token)
                    continue
                if retry == "token":
                    raise TokenExpiredError("the file URL refused a fresh token", errcode=10004, recording=recording)
                start, total = 0, resp.content_length
                if resp.status == 416:
                    _, _, total = parse_content_range(resp.headers.get("Content-Range"))
                    yield FileStream(resp, start=offset, total=total, first=b"", recording=recording, meter=count)
                    return
                if resp.status == 206:
                    first_byte, _, total = parse_content_range(resp.headers.get("Content-Range"))
                    if not use_range or first_byte != offset:
                        # A Range answer we did not ask for or that starts elsewhere: never splice it.
                        log.info("download.range_mismatch", recording=recording, asked=offset, got=first_byte)
                        use_range = False
                        continue
                    start = offset
                if on_headers is not None:
                    on_headers(resp.headers.get("Content-Type"))
                # A 206 body starts mid-recording, where any byte may stand: never read it as an envelope.
                first = await self._peek_envelope(resp, recording, count) if resp.status == 200 else b""
                if first is None:
                    if not token_retried:
                        token_retried = True
                        self.tokens.invalidate(token)
                        continue
                    raise TokenExpiredError("the file URL refused a fresh token", errcode=10004, recording=recording)
                self.health.ok_at = self.clock.monotonic()
                yield FileStream(resp, start=start, total=total, first=first, recording=recording, meter=count)
                return

    async def _check_file_response(self, resp: aiohttp.ClientResponse, recording: str | None) -> str | None:
        """Raise for statuses that end this request; ``"token"`` when the token must be renewed."""
        if resp.status in (200, 206, 416):
            return None
        if resp.status == 401:
            return "token"
        if resp.status in REDIRECTS:
            # Another host's bytes would be archived as the recording (and the token sent there).
            raise TransferError(redirect_refused("file download", resp.status, resp.headers.get("Location"),
                                                 self.cfg.base_url), recording=recording)
        if resp.status in (403, 404, 410):
            raise UrlExpiredError(f"the download URL answered HTTP {resp.status}", recording=recording)
        retry_after = parse_retry_after(resp.headers.get("Retry-After"), self.clock.wall())
        if resp.status in (429, 503):
            raise PbxBusyError(f"file download: HTTP {resp.status}", retry_after_s=retry_after, recording=recording)
        if resp.status >= 500:
            raise PbxServerError(f"file download: server error HTTP {resp.status}", retry_after_s=retry_after,
                                 recording=recording)
        raise TransferError(f"file download: unexpected HTTP {resp.status}", recording=recording)

    async def _peek_envelope(self, resp: aiohttp.ClientResponse, recording: str | None,
                             meter: Callable[[int], None]) -> bytes | None:
        """The first bytes of the body. A JSON errcode envelope in place of audio is raised as its error
        (None for 10004: renew the token); an HTML page is a TransferError. Every read is metered: a
        body that starts with ``{`` and trickles is cut by the same floor as any transfer."""
        with translate_errors("file transfer", in_body=True, recording=recording):
            first = await resp.content.read(ENVELOPE_PEEK_BYTES)
        meter(len(first))
        head = first.lstrip()[:1]
        if head == b"{":
            with translate_errors("file transfer", in_body=True, recording=recording):
                while len(first) < ENVELOPE_PEEK_BYTES:
                    more = await resp.content.read(ENVELOPE_PEEK_BYTES - len(first))
                    if not more:
                        break
                    meter(len(more))
                    first += more
            try:
                data = json.loads(first)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return first  # not an envelope after all; the downloader's audio check decides
            if isinstance(data, dict) and "errcode" in data:
                errcode = _int_or(data.get("errcode"), -2)
                self.errcodes[errcode] += 1
                if errcode == 10004:
                    return None
                if errcode == 60001:
                    # Said by the file URL, "not found" may be the URL rather than the recording (what an
                    # expired URL answers is not documented): a new URL is asked for, and
                    # recording/download decides whether the recording is gone.
                    raise UrlExpiredError("the download URL answered DATA NOT FOUND", errcode=errcode,
                                          recording=recording)
                raise error_for_errcode(errcode, str(data.get("errmsg", "")), recording=recording,
                                        token_limit_backoff_s=self.cfg.token_limit_backoff_s)
        if head == b"<":
            raise TransferError("the PBX sent an HTML page in place of the recording", recording=recording)
        return first

    # ---------------------------------------------------------------- events
    async def events(self, topics: list[int], *, heartbeat_s: float = 30.0, session_s: float | None = None,
                     on_subscribed: Callable[[], None] | None = None) -> AsyncIterator[dict[str, Any]]:
        """Events from the PBX WebSocket (``{api}/subscribe``), heartbeat included.

        Ends after ``session_s`` (default: until the token is due for renewal) so that the caller
        reconnects with a fresh token; raises PbxUnavailableError when the socket fails or closes.
        """
        token = await self.tokens.token()
        base = self.cfg.api_base
        url = ("wss://" + base.removeprefix("https://")) if base.startswith("https://") else \
            ("ws://" + base.removeprefix("http://"))
        lifetime = session_s if session_s is not None else self.tokens.seconds_until_renewal()
        deadline = self.clock.monotonic() + max(lifetime, heartbeat_s)
        try:
            with translate_errors("event subscription"):
                ws = await self.session.ws_connect(f"{url}/subscribe", params={"access_token": token},
                                                   timeout=aiohttp.ClientWSTimeout(ws_close=5.0), autoping=True)
        except PbxUnavailableError as exc:
            if isinstance(exc.__cause__, aiohttp.WSServerHandshakeError):
                # The PBX answered with an envelope instead of upgrading: most likely the token.
                self.tokens.invalidate(token)
                raise PbxBusyError("the PBX refused the event subscription") from exc
            raise
        self._events_ws = ws
        async with ws:
            await ws.send_str(json.dumps({"topic_list": topics}))
            log.info("events.subscribed", topics=topics)
            # The PBX drops a socket on which the client sent nothing for 60 s, however many events
            # it sends itself: the heartbeat goes on a timer, never only when idle.
            next_beat = self.clock.monotonic() + heartbeat_s
            while self.clock.monotonic() < deadline:
                with translate_errors("event subscription"):
                    try:
                        msg = await ws.receive(timeout=max(0.0, next_beat - self.clock.monotonic()))
                    except TimeoutError:
                        msg = None
                    if self.clock.monotonic() >= next_beat:
                        await ws.send_str("heartbeat")
                        next_beat = self.clock.monotonic() + heartbeat_s
                if msg is None:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    text = str(msg.data)
                    if text.strip().lower().startswith("heartbeat"):
                        continue
                    try:
                        event = json.loads(text)
                    except json.JSONDecodeError:
                        log.warning("events.unreadable", size=len(text))
                        continue
                    if isinstance(event, dict) and "errcode" in event and "type" not in event:
                        # The answer to the subscription: SUCCESS, or why not.
                        errcode = _int_or(event.get("errcode"), -2)
                        if errcode != 0:
                            if errcode == 10004:
                                self.tokens.invalidate(token)
                            raise error_for_errcode(errcode, str(event.get("errmsg", "")))
                        if on_subscribed is not None:
                            on_subscribed()
                        continue
                    if isinstance(event, dict):
                        yield event
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.ERROR):
                    raise PbxUnavailableError("the PBX closed the event subscription")

    async def system_info(self) -> dict[str, Any] | None:
        """``system/information``: the PBX's serial (``sn``), firmware and date format; None when the
        firmware does not offer the endpoint (10001)."""
        try:
            data = await self.call("system/information")
        except PbxConfigError as exc:
            if exc.errcode == 10001:
                return None
            raise
        except PermanentError as exc:
            # 40003, 60001 and the like: this firmware will not tell its serial to this application. Like
            # 10001, no serial (a ledger that recorded one refuses it); never a verdict on a recording.
            log.warning("pbx.system_information_refused", reason=str(exc), action="no serial")
            return None
        return {k: data.get(k) for k in ("sn", "firmware_version", "system_date_format", "system_time_format")
                if isinstance(data.get(k), str) and data.get(k)}

    async def check(self) -> RecordingPage:
        """Log in and list one recording: proves URL, TLS, credentials and permission."""
        return await self.list_recordings(page=1, page_size=1)


class Webhook:
    """POSTs JSON to the operator's notification webhook: its own small session, errors translated."""

    def __init__(self, url: str, timeout_s: float, user_agent: str) -> None:
        self.url = url
        # Chat webhooks carry their credential in the path: it is redacted wherever it shows up.
        remember_secret(url)
        parts = urlsplit(url)
        tail = parts.path + (f"?{parts.query}" if parts.query else "")
        if len(tail) >= 16:
            remember_secret(tail)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Webhook:
        self._session = aiohttp.ClientSession(headers={"User-Agent": self._user_agent},
                                              cookie_jar=aiohttp.DummyCookieJar())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, body: dict[str, Any]) -> None:
        """Raises RetryableError when the receiver is unreachable or answers other than 2xx."""
        assert self._session is not None
        try:
            with translate_errors("webhook", where="the webhook receiver"):
                async with self._session.post(self.url, json=body, timeout=self._timeout,
                                              allow_redirects=False) as resp:
                    if resp.status in REDIRECTS:
                        raise RetryableError(f"webhook answered HTTP {resp.status}, a redirect (never followed)")
                    if not 200 <= resp.status < 300:
                        raise RetryableError(f"webhook answered HTTP {resp.status}")
        except PauseError as exc:  # translate_errors speaks of the PBX; this is the webhook receiver
            raise RetryableError(f"webhook unreachable: {exc.message}") from exc


def _ignore(_n: int) -> None:
    return None


async def _read_capped(resp: aiohttp.ClientResponse, what: str, recording: str | None) -> bytes:
    """An API answer, read up to ``MAX_API_BODY``: an endless or huge body fails cleanly, in bounded memory."""
    too_big = PbxBusyError(f"{what}: the PBX's answer is larger than {MAX_API_BODY // (1024 * 1024)} MiB; "
                           "not reading it", recording=recording)
    if resp.content_length is not None and resp.content_length > MAX_API_BODY:
        raise too_big
    body = bytearray()
    while chunk := await resp.content.read(API_READ_BYTES):
        body += chunk
        if len(body) > MAX_API_BODY:
            raise too_big
    return bytes(body)


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _page(data: dict[str, Any]) -> RecordingPage:
    items = data.get("data") or []
    if not isinstance(items, list):
        raise PbxBusyError("recording list: 'data' is not a list")
    clean = [item for item in items if isinstance(item, dict) and isinstance(item.get("id"), int)]
    # total 0: the PBX did not say (callers must not read "no more" into it).
    return RecordingPage(total=max(0, _int_or(data.get("total_number"), 0)), items=clean)

