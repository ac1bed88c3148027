"""Notifications for unattended runs: a webhook told of failed recordings, pauses, recoveries, and a summary.

The notifier watches the pipeline (it never sits on its hot path), queues messages in a bounded
queue, and POSTs them with a few tries; a receiver that is down costs log lines, never downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from daemon.client import Webhook
from daemon.clock import Clock, sleep_or_stop
from daemon.config import NotifyConfig
from daemon.errors import ArchiverError
from daemon.logs import redact_text

if TYPE_CHECKING:
    from daemon.live import Pipeline
    from daemon.service import Health

log = structlog.get_logger("daemon.notify")

WATCH_INTERVAL_S = 1.0
QUEUE_SIZE = 100
TRIES = 3


def pause_kind(reason: str | None) -> str | None:
    """What a pause is about, for the operator: auth, certificate, disk or pbx (None when not paused). Pure."""
    if reason is None:
        return None
    if reason == "FatalAuthError":
        return "auth"
    if reason == "TlsError":
        return "certificate"
    if reason in ("StorageError", "LedgerError"):
        return "disk"
    return "pbx"


def copy_pause_kind(reason: str | None) -> str | None:
    """What stops the off-box copies: the destination unreachable (``unreachable``: it may come back on its
    own), or what needs a person now: refused credentials, a missing bucket, a full one, the local disk or
    ledger, an unforeseen error. Pure."""
    if reason is None:
        return None
    return {"DestinationUnavailableError": "unreachable", "DestinationFullError": "full",
            "DestinationConfigError": "config", "DestinationRefusedError": "refused",
            "StorageError": "disk", "LedgerError": "disk"}.get(reason, "error")


def should_announce_pause(kind: str, paused_for_s: float, pbx_down_after_s: float) -> bool:
    """Auth, certificate and disk trouble need a person at once; a PBX outage only once it has lasted. Pure."""
    return kind != "pbx" or paused_for_s >= pbx_down_after_s


def message(event: str, now_wall: float, **fields: Any) -> dict[str, Any]:
    """The JSON body: structured fields plus a one-line ``text`` (what chat webhooks show). No secrets."""
    texts = {
        "recording.failed": "recording {recording} failed: {reason}",
        "pipeline.paused": "archiving paused ({kind}): {reason}",
        "pipeline.recovered": "archiving resumed after {down_for_s:.0f} s ({kind})",
        "copy.paused": "off-box copies to {destination} paused ({kind}): {reason}",
        "copy.recovered": "off-box copies to {destination} resumed after {down_for_s:.0f} s ({kind})",
        "verify.problems": "verify found {problems} damaged or vanished copies of {checked} recordings",
        "summary": "{archived} archived, {failed} failed, {missing} missing; {pending} pending",
    }
    clean = {k: redact_text(v) if isinstance(v, str) else v for k, v in fields.items()}
    return {"source": "yeastar-archiver", "host": socket.gethostname(), "event": event,
            "time": dt.datetime.fromtimestamp(now_wall, dt.UTC).isoformat(timespec="seconds"),
            **clean, "text": f"yeastar-archiver: {texts[event].format(**clean)}"}


@dataclass
class _PauseState:
    kind: str
    since: float
    announced: bool = False


class Notifier:
    """Watches a pipeline and tells the webhook what an operator must know."""

    def __init__(self, cfg: NotifyConfig, health: Health, clock: Clock, user_agent: str) -> None:
        assert cfg.url is not None
        self.cfg = cfg
        self.health = health
        self.clock = clock
        self.webhook = Webhook(cfg.url, cfg.timeout_s, user_agent)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self.sent = 0
        self._pause: _PauseState | None = None
        self._copy_pause: _PauseState | None = None
        self._verify_seen: float | None = health.verify_last_run_at   # walks before this process: told already
        self._failure_seq = 0
        self._since_summary = (0, 0, 0)

    def emit(self, event: str, **fields: Any) -> None:
        body = message(event, self.clock.wall(), **fields)
        if self.queue.full():
            self.queue.get_nowait()  # the oldest goes: a flood must not grow memory
            log.warning("notify.dropped", reason="queue full")
        self.queue.put_nowait(body)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch and send until ``stop``; then send what is queued (bounded by the timeout)."""
        async with self.webhook:
            sender = asyncio.create_task(self._send_forever(), name="notify-send")
            try:
                last_summary = self.clock.monotonic()
                while not await sleep_or_stop(self.clock, WATCH_INTERVAL_S, stop):
                    self.watch()
                    if self.cfg.summary_interval_s and \
                            self.clock.monotonic() - last_summary >= self.cfg.summary_interval_s:
                        self.summary()
                        last_summary = self.clock.monotonic()
                self.watch()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.queue.join(), self.cfg.timeout_s)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)

    def watch(self) -> None:
        """Turn the pipeline's state into messages: new failures, pauses worth telling, recoveries."""
        p: Pipeline | None = self.health.pipeline
        if p is None:
            return
        for seq, recording, reason in list(p.scheduler.failures):
            if seq > self._failure_seq:
                self._failure_seq = seq
                self.emit("recording.failed", recording=recording, reason=reason)
        now = self.clock.monotonic()
        kind = pause_kind(p.scheduler.pause_reason) if p.scheduler.paused or p.scheduler.fatal else None
        if kind is not None:
            if self._pause is None or self._pause.kind != kind:
                self._pause = _PauseState(kind=kind, since=now)
            if not self._pause.announced and should_announce_pause(kind, now - self._pause.since,
                                                                   self.cfg.pbx_down_after_s):
                self._pause.announced = True
                reason = str(p.scheduler.fatal) if kind == "auth" and p.scheduler.fatal else \
                    (p.downloader.client.health.error or p.scheduler.pause_reason or kind)
                self.emit("pipeline.paused", kind=kind, reason=reason, paused_for_s=round(now - self._pause.since))
        elif self._pause is not None and p.scheduler.pause_reason is None:
            if self._pause.announced:
                self.emit("pipeline.recovered", kind=self._pause.kind, down_for_s=now - self._pause.since)
            self._pause = None

        self._watch_copies(p, now)
        self._watch_verify()

    def _watch_copies(self, p: Pipeline, now: float) -> None:
        copier = p.copier
        if copier is None:
            return
        kind = copy_pause_kind(copier.pause_reason)
        if kind is not None:
            if self._copy_pause is None or self._copy_pause.kind != kind:
                self._copy_pause = _PauseState(kind=kind, since=now)
            # An unreachable bucket is waited out like a PBX outage; anything else needs a person now.
            if not self._copy_pause.announced and should_announce_pause(
                    "pbx" if kind == "unreachable" else kind, now - self._copy_pause.since, self.cfg.pbx_down_after_s):
                self._copy_pause.announced = True
                self.emit("copy.paused", destination=copier.dest.name, kind=kind,
                          reason=copier.last_error or copier.pause_reason or kind,
                          paused_for_s=round(now - self._copy_pause.since))
        elif self._copy_pause is not None:
            if self._copy_pause.announced:
                self.emit("copy.recovered", destination=copier.dest.name, kind=self._copy_pause.kind,
                          down_for_s=now - self._copy_pause.since)
            self._copy_pause = None

    def _watch_verify(self) -> None:
        at, problems = self.health.verify_last_run_at, self.health.verify_problems
        if at is None or at == self._verify_seen:
            return
        self._verify_seen = at
        if problems:
            self.emit("verify.problems", problems=problems, checked=self.health.verify_checked or 0)

    def summary(self) -> None:
        p = self.health.pipeline
        if p is None:
            return
        s = p.scheduler.stats
        archived, failed, missing = s.archived, s.failed, s.missing
        last = self._since_summary
        self._since_summary = (archived, failed, missing)
        self.emit("summary", archived=archived - last[0], failed=failed - last[1], missing=missing - last[2],
                  pending=self.health.counts.get("pending", 0), counts=dict(self.health.counts))

    async def _send_forever(self) -> None:
        while True:
            body = await self.queue.get()
            try:
                for attempt in range(1, TRIES + 1):
                    try:
                        await self.webhook.post(body)
                        self.sent += 1
                        break
                    except ArchiverError as exc:
                        if attempt == TRIES:
                            self.health.notify_failures += 1
                            log.warning("notify.failed", notice=body["event"], error=str(exc))
                        else:
                            await self.clock.sleep(2.0 ** attempt)
            finally:
                self.queue.task_done()
