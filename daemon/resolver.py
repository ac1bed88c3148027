"""The resolver: a recording's 30-minute download URL, fetched right before the transfer (or ahead of
it, while other recordings transfer) and renewed when it has expired — without ever burning an
attempt for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import structlog

from daemon.archive import audio_ext
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
    while the PBX serves mp3 — and, with ``auto``, until a transfer has shown it serves wav.

    mp3 is a download format, not how recordings are stored: a PBX can list .wav names and sizes and
    serve mp3 bytes. So what counts is what is served (the bytes first, see ``archive.served_format``);
    mp3, once seen, stays — even where the configuration says wav."""

    def __init__(self, configured: str) -> None:
        self.configured = configured
        self.format: str | None = None if configured == "auto" else configured
        self._held = False
        self._changed = asyncio.Event()   # set (and replaced) when the slot frees or the gate opens
        # A transfer's bytes showed wav: only then may requests be sent ahead (prefetch). The
        # configuration's word is not enough — a PBX configured wav may serve mp3.
        self.wav_seen = False

    @property
    def exclusive(self) -> bool:
        return self.format != "wav"

    @property
    def may_send_ahead(self) -> bool:
        """Requests for later transfers (URL prefetch) may go out: the served bytes showed wav."""
        return self.wav_seen and not self.exclusive

    def learn(self, served: str | None) -> None:
        """Record the format a transfer showed (or a resolution hinted at: only mp3 hints count)."""
        if served == "wav" and self.format != "mp3":
            self.wav_seen = True
        if served is None or self.format == "mp3" or served == self.format:
            return
        if served == "wav" and self.configured == "mp3":
            return
        if served == "mp3" and self.configured == "wav":
            log.warning("pbx.serves_mp3", configured="wav", action="one request at a time from now on")
        self.format = served
        log.info("pbx.format_detected", format=served, one_request_at_a_time=served == "mp3")
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold the one request slot while exclusive; waiters go ahead at once when the gate opens
        (a transfer showed wav), not only when the holder is done."""
        while self.exclusive:
            if not self._held:
                self._held = True
                try:
                    yield
                finally:
                    self._held = False
                    self._wake()
                return
            await self._changed.wait()
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
        self._ahead: dict[str, asyncio.Task[None]] = {}   # prefetches under way, by recording

    def prefetch(self, key: str, *, rec_id: int | None, file: str | None) -> None:
        """Start resolving ``key``'s URL now, for a transfer that comes later. Only once a transfer's
        bytes showed wav, never while the gate is exclusive (mp3: the one-request rule). A prefetch
        that fails is forgotten: the transfer's own ``url_for`` asks again and its error counts there,
        once."""
        if not self._gate.may_send_ahead or key in self._ahead or key in self._urls:
            return
        self._ahead[key] = asyncio.create_task(self._prefetch(key, rec_id, file), name=f"prefetch-{key}")

    async def _prefetch(self, key: str, rec_id: int | None, file: str | None) -> None:
        try:
            if self._gate.may_send_ahead:   # the gate may have closed while this task waited to start
                await self.url_for(key, rec_id=rec_id, file=file)
        except Exception as exc:   # the transfer's own resolve meets it again, and counts it there
            log.debug("url.prefetch_failed", recording=_ref(rec_id, file), error=str(exc))
        finally:
            if self._ahead.get(key) is asyncio.current_task():
                del self._ahead[key]

    async def close(self) -> None:
        """Cancel the prefetches under way (their recordings were released or are gone)."""
        tasks = list(self._ahead.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def url_for(self, key: str, *, rec_id: int | None, file: str | None) -> DownloadUrl:
        """A URL valid for at least the margin; resolves (through the gate) when needed. A prefetch
        under way for ``key`` is waited for, not doubled; a URL it brought that expired meanwhile is
        renewed here like any other (``url_needs_refresh``)."""
        ahead = self._ahead.get(key)
        if ahead is not None and asyncio.current_task() is not ahead:
            await asyncio.wait([ahead])   # never raises: a failed or cancelled prefetch leaves no URL
        url = self._urls.get(key)
        if url_needs_refresh(self._clock.monotonic(), url, self._margin_s):
            if url is not None:
                log.info("url.expired", recording=_ref(rec_id, file))
            async with self._gate.slot():
                started = self._clock.monotonic()
                url = await self._client.resolve_download(rec_id=rec_id, file=None if rec_id is not None else file)
                if self._on_resolve is not None:
                    self._on_resolve(self._clock.monotonic() - started)
            if "mp3" in (url.format_hint, audio_ext(url.file, default="")):
                self._gate.learn("mp3")   # a hint of mp3 is enough to hold the gate; wav needs the bytes
            self._urls[key] = url
        assert url is not None
        return url

    def forget(self, key: str) -> None:
        """Drop a URL the PBX no longer honours (or that is no longer needed)."""
        self._urls.pop(key, None)
        ahead = self._ahead.pop(key, None)
        if ahead is not None:
            ahead.cancel()


def _ref(rec_id: int | None, file: str | None) -> str:
    """The recording as logs name it everywhere (``Row.ref``): its id as a string, else its file name."""
    return str(rec_id) if rec_id is not None else str(file)
