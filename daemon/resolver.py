"""The resolver: a recording's 30-minute download URL, fetched right before the transfer and renewed
when it has expired — without ever burning an attempt for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import structlog

from daemon.client import DownloadUrl, PbxClient
from daemon.clock import Clock

log = structlog.get_logger("daemon.resolver")


def url_needs_refresh(now: float, url: DownloadUrl | None, margin_s: float) -> bool:
    """True when ``url`` is absent or within ``margin_s`` of its expiry (at most half its lifetime). Pure."""
    if url is None:
        return True
    lifetime = url.expires_at - url.issued_at
    return now >= url.expires_at - min(margin_s, lifetime / 2)


class RequestGate:
    """At most ONE PBX request of either kind (``recording/download`` or a file transfer) in flight
    while the recording format is mp3 — or, with ``auto``, until the first resolution shows it is not."""

    def __init__(self, configured: str) -> None:
        self.configured = configured
        self.format: str | None = None if configured == "auto" else configured
        self._lock = asyncio.Lock()

    @property
    def exclusive(self) -> bool:
        return self.format != "wav"

    def learn(self, file_name: str) -> None:
        """Record the format a resolution revealed (``auto`` only; mp3, once seen, stays)."""
        if self.configured != "auto" or self.format == "mp3":
            return
        lower = file_name.lower()
        seen = "mp3" if lower.endswith(".mp3") else "wav" if lower.endswith(".wav") else None
        if seen is not None and seen != self.format:
            self.format = seen
            log.info("pbx.format_detected", format=seen, one_request_at_a_time=seen == "mp3")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.exclusive:
            async with self._lock:
                yield
        else:
            yield


class Resolver:
    """Keeps each in-flight recording's download URL and renews it when it expires."""

    def __init__(self, client: PbxClient, clock: Clock, gate: RequestGate, margin_s: float,
                 on_resolve: Callable[[float], None] | None = None) -> None:
        self._client = client
        self._on_resolve = on_resolve
        self._clock = clock
        self._gate = gate
        self._margin_s = margin_s
        self._urls: dict[str, DownloadUrl] = {}

    async def url_for(self, key: str, *, rec_id: int | None, file: str | None) -> DownloadUrl:
        """A URL valid for at least the margin; resolves (through the gate) when needed."""
        url = self._urls.get(key)
        if url_needs_refresh(self._clock.monotonic(), url, self._margin_s):
            if url is not None:
                log.info("url.expired", recording=file or rec_id)
            async with self._gate.slot():
                started = self._clock.monotonic()
                url = await self._client.resolve_download(rec_id=rec_id, file=None if rec_id is not None else file)
                if self._on_resolve is not None:
                    self._on_resolve(self._clock.monotonic() - started)
            self._gate.learn(url.file)
            self._urls[key] = url
        assert url is not None
        return url

    def forget(self, key: str) -> None:
        """Drop a URL the PBX no longer honours (or that is no longer needed)."""
        self._urls.pop(key, None)
