"""A Yeastar P-Series Open API simulator: the endpoints the archiver uses, their rules, and faults.

Faithful to ``reference/yeastar-p-series-api.md``: errcode envelopes in HTTP 200, the User-Agent
rule, token / refresh-token / download-URL lifetimes, the 8-token limit (60002), the IP block after
5 consecutive failed logins (70004), 10004 for expired tokens, paging and search, one request at a
time in mp3 mode. Recording bytes are deterministic from (seed, id) and look like real audio.
Test hooks live under ``/_sim/``: ``counters`` (GET) and ``control`` (POST).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import secrets
import struct
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import quote

from aiohttp import web

from daemon.clock import Clock, SystemClock
from daemon.simoptions import SimOptions

API = "/openapi/v1.0"
BLOCK = 64 * 1024
HOSTILE_NAMES = (
    "../../x.wav", "a/b.wav", "/etc/passwd.wav", "x" * 296 + ".wav", ".", "-rf.wav", "nul\x00byte.wav",
    "..\\..\\win.wav",
)


@dataclass(frozen=True)
class Recording:
    id: int
    file: str
    size: int
    time: str
    uid: str
    call_from: str
    call_to: str
    duration: int
    call_type: str

    def listing(self) -> dict[str, Any]:
        # Newer firmware adds archive fields (documented values: success, failed, retry, jump_over);
        # the archiver must tolerate keys it does not use.
        status = ("success", "failed", "retry", "jump_over")[self.id % 4]
        return {**asdict(self), "archive_status": status}


def make_recording(opts: SimOptions, n: int) -> Recording:
    """The simulated PBX's ``n``-th recording (0-based), fully determined by the options."""
    base = dt.datetime(2022, 1, 12, 9, 0, 0, tzinfo=dt.UTC)
    ext = "mp3" if opts.format == "mp3" else "wav"
    rid = opts.first_id + n
    rng = random.Random(f"{opts.seed}:meta:{rid}")
    when = base + dt.timedelta(seconds=n * 97 + rng.randint(0, 60))
    call_type = rng.choice(("Inbound", "Outbound", "Internal"))
    ext_no = str(rng.randint(2000, 2099))
    # Outside numbers carry a '+', which must survive URL encoding of file= lookups.
    far = f"+49{rng.randint(100000000, 999999999)}" if call_type != "Internal" else str(rng.randint(2000, 2099))
    src, dst = (far, ext_no) if call_type == "Inbound" else (ext_no, far)
    name = f"{when:%Y%m%d%H%M%S}-{int(when.timestamp())}.{n}-{src}-{dst}-{call_type}.{ext}"
    if opts.hostile_names and n < len(HOSTILE_NAMES):
        name = HOSTILE_NAMES[n]
    size = rng.randint(opts.size_min, max(opts.size_min, opts.size_max))
    return Recording(
        id=rid, file=name, size=size, time=f"{when:%m/%d/%Y %H:%M:%S}",
        uid=f"{when:%Y%m%d%H%M%S}{rng.randint(10000, 99999)}",
        call_from=f"Caller {src}<{src}>", call_to=f"Callee {dst}<{dst}>",
        duration=max(1, size // 16000), call_type=call_type,
    )


def make_recordings(opts: SimOptions) -> list[Recording]:
    """The recordings the simulated PBX holds when it starts."""
    return [make_recording(opts, n) for n in range(opts.count)]


def audio_header(fmt: str, size: int) -> bytes:
    """A valid RIFF/WAVE header (8 kHz mono PCM) or an ID3v2 tag followed by an MPEG frame sync."""
    if fmt == "mp3":
        return b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64"
    data_len = max(0, size - 44)
    return (b"RIFF" + struct.pack("<I", max(0, size - 8)) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000, 2, 16) + b"data" + struct.pack("<I", data_len))


def transcoded(rec: Recording) -> Recording:
    """The recording as a PBX that stores wav and serves mp3 hands it out: an .mp3 name and about a
    tenth of the wav's size (deterministic)."""
    stem = rec.file[:-4] if rec.file.lower().endswith((".wav", ".mp3")) else rec.file
    return replace(rec, file=f"{stem}.mp3", size=max(64, rec.size // 11))


def recording_block(seed: int, fmt: str, rec: Recording, k: int) -> bytes:
    """Block ``k`` (64 KiB, shorter at the end) of a recording's bytes."""
    start = k * BLOCK
    length = min(BLOCK, rec.size - start)
    if length <= 0:
        return b""
    data = random.Random(f"{seed}:{rec.id}:{k}").randbytes(length)
    if k == 0:
        header = audio_header(fmt, rec.size)[:length]
        data = header + data[len(header):]
    return data


def recording_bytes(seed: int, fmt: str, rec: Recording, start: int = 0, end: int | None = None) -> bytes:
    """Bytes ``start``..``end`` (exclusive) of a recording; the whole file by default."""
    end = rec.size if end is None else min(end, rec.size)
    out = bytearray()
    for k in range(start // BLOCK, (end + BLOCK - 1) // BLOCK):
        block = recording_block(seed, fmt, rec, k)
        lo = max(start - k * BLOCK, 0)
        hi = min(end - k * BLOCK, len(block))
        out += block[lo:hi]
    return bytes(out)


@dataclass
class _Token:
    expires_at: float
    refresh_token: str
    revoked: bool = False


@dataclass
class _Url:
    rec: Recording
    expires_at: float


@dataclass
class _Counters:
    requests: Counter[str] = field(default_factory=Counter)
    logins: int = 0
    tokens_issued: int = 0
    refreshes: int = 0
    revocations: int = 0
    failed_logins: int = 0
    token_limit_hits: int = 0
    ip_blocks: int = 0
    bad_user_agent: int = 0
    expired_token_hits: int = 0
    in_flight: int = 0
    max_concurrency: int = 0
    mp3_violations: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    bytes_served: int = 0
    range_requests: int = 0
    ws_connections: int = 0
    ws_heartbeats: int = 0
    events_sent: int = 0
    transfers_completed: Counter[int] = field(default_factory=Counter)
    dropped_reused: int = 0
    cleaned_up: int = 0
    heartbeats_late: int = 0
    errcodes_injected: Counter[int] = field(default_factory=Counter)


def _envelope(errcode: int, errmsg: str, **extra: Any) -> web.Response:
    return web.json_response({"errcode": errcode, "errmsg": errmsg, **extra})


_ERRMSG = {
    -1: "FAILURE", -2: "INTERNAL SERVER ERROR", 1: "PARTIAL SUCCESS", 10001: "INTERFACE NOT EXISTED",
    10002: "API VERSION OUT OF MAINTENANCE", 10003: "API VERSION UNSUPPORTED", 10004: "TOKEN EXPIRED",
    10005: "ACCESS DENIED", 40002: "PARAMETER ERROR", 60001: "DATA NOT FOUND", 60002: "MAX LIMITATION EXCEEDED",
    70004: "ACCOUNT IP BLOCKED", 70082: "OVERLOAD_TASK_RUNNING", 70084: "ACTION FORBIDDEN", 70087: "IP FORBIDDEN",
}


def _error(errcode: int, **extra: Any) -> web.Response:
    return _envelope(errcode, _ERRMSG.get(errcode, "ERROR"), **extra)


class Simulator:
    """The simulated PBX: state, handlers and an optional server of its own on loopback."""

    def __init__(self, opts: SimOptions | None = None, *, clock: Clock | None = None) -> None:
        self.opts = opts or SimOptions()
        self.clock = clock or SystemClock()
        self.recordings = make_recordings(self.opts)
        self.all_recordings = list(self.recordings)      # deleted ones included (tests ask what was served)
        self.by_id = {r.id: r for r in self.recordings}
        self.by_file = {r.file: r for r in self.recordings}
        self.tokens: dict[str, _Token] = {}
        self.refresh_tokens: dict[str, tuple[float, str]] = {}
        self.urls: dict[str, _Url] = {}
        self.failed_by_ip: Counter[str] = Counter()
        self.blocked_ips: set[str] = set()
        self.counters = _Counters()
        self.rng = random.Random(self.opts.seed)
        self.websockets: set[web.WebSocketResponse] = set()
        self.list_queries: list[tuple[int, str]] = []  # (page, order) of every recording/list answered
        self.ready_at: dict[int, float] = {}            # recording id -> when its file can be served
        if self.opts.late_count:
            until = self.clock.monotonic() + self.opts.late_s
            for rec in self.recordings[-self.opts.late_count:]:
                self.ready_at[rec.id] = until
        self.inject: dict[str, list[int]] = {}          # endpoint -> errcodes to answer, one per request
        self.block_until = 0.0
        self._answered: weakref.WeakSet[Any] = weakref.WeakSet()   # transports that had their one answer
        self._mp3_lock = asyncio.Lock()
        self.app = self._make_app()
        self._runner: web.AppRunner | None = None
        self._grower: asyncio.Task[None] | None = None
        self.base_url = ""

    # ---------------------------------------------------------------- lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0, ssl_context: Any = None) -> str:
        """Serve on ``host:port`` (0 picks a free port); returns the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = self._runner.addresses[-1][1]
        scheme = "https" if ssl_context is not None else "http"
        self.base_url = f"{scheme}://{host}:{bound_port}"
        if self.opts.new_every_s > 0 and self._grower is None:
            self._grower = asyncio.create_task(self._grow())
        return self.base_url

    async def _grow(self) -> None:
        while True:
            await asyncio.sleep(self.opts.new_every_s)
            await self.add_recording()

    async def add_recording(self, *, msg_as_object: bool = False) -> Recording:
        """A call just ended: a new recording appears, and subscribers get a 30012 event (which comes
        ``event_early_s`` before the file can be served)."""
        rec = make_recording(self.opts, len(self.all_recordings))
        self.recordings.append(rec)
        self.all_recordings.append(rec)
        self.by_id[rec.id] = rec
        self.by_file[rec.file] = rec
        if self.opts.event_early_s > 0:
            self.ready_at[rec.id] = self.clock.monotonic() + self.opts.event_early_s
        # The documented 30012 fields; call_id is the call's, uid the CDR's (they differ).
        body = {"call_id": f"{rec.uid[:14]}.{rec.id}", "time_start": rec.time, "call_from": rec.call_from,
                "call_to": rec.call_to, "call_duration": rec.duration + 7, "talk_duration": rec.duration,
                "status": "ANSWERED", "type": rec.call_type, "recording": rec.file, "did_number": "",
                "uid": rec.uid}
        event = json.dumps({"type": 30012, "sn": self.opts.sn, "msg": body if msg_as_object else json.dumps(body)})
        for ws in list(self.websockets):
            if not ws.closed:
                await ws.send_str(event)
                self.counters.events_sent += 1
        return rec

    async def drop_websockets(self) -> None:
        for ws in list(self.websockets):
            await ws.close()

    async def stop(self) -> None:
        if self._grower is not None:
            self._grower.cancel()
            await asyncio.gather(self._grower, return_exceptions=True)
            self._grower = None
        await self.drop_websockets()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def content(self, rec: Recording) -> bytes:
        data = recording_bytes(self.opts.content_seed or self.opts.seed, self.opts.format, rec)
        return _riff_size(data, self.opts.wav_riff_size) if self.opts.format == "wav" else data

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON data."""
        c = self.counters
        now = self.clock.monotonic()
        return {
            "requests": dict(c.requests), "logins": c.logins, "tokens_issued": c.tokens_issued,
            "tokens_live": sum(1 for t in self.tokens.values() if not t.revoked and t.expires_at > now),
            "refreshes": c.refreshes, "revocations": c.revocations, "failed_logins": c.failed_logins,
            "token_limit_hits": c.token_limit_hits, "ip_blocks": c.ip_blocks,
            "bad_user_agent": c.bad_user_agent, "expired_token_hits": c.expired_token_hits,
            "in_flight": c.in_flight, "max_concurrency": c.max_concurrency,
            "mp3_violations": c.mp3_violations, "faults": dict(c.faults), "bytes_served": c.bytes_served,
            "range_requests": c.range_requests, "ws_connections": c.ws_connections,
            "ws_heartbeats": c.ws_heartbeats, "events_sent": c.events_sent, "recordings": len(self.recordings),
            "transfers_completed": {str(k): v for k, v in c.transfers_completed.items()},
        }

    # ---------------------------------------------------------------- app
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post(f"{API}/get_token", self.get_token)
        app.router.add_post(f"{API}/refresh_token", self.refresh_token)
        app.router.add_get(f"{API}/del_token", self.del_token)
        app.router.add_get(f"{API}/recording/list", self.recording_list)
        app.router.add_get(f"{API}/recording/search", self.recording_search)
        app.router.add_get(f"{API}/recording/download", self.recording_download)
        app.router.add_get("/api/download/{name}", self.file_download)
        app.router.add_get(f"{API}/subscribe", self.subscribe)
        app.router.add_get(f"{API}/system/information", self.system_information)
        app.router.add_get("/_sim/counters", self.sim_counters)
        app.router.add_post("/_sim/control", self.sim_control)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        name = request.path.removeprefix(API + "/")
        if request.path.startswith("/api/download/"):
            name = "file"
        if request.path.startswith("/_sim/"):
            return await handler(request)
        transport = request.transport
        if self.opts.close_after_response and transport is not None and transport in self._answered:
            # This PBX closes each connection after its answer: a request that a client sent on the
            # connection before it saw the close is lost, the connection dropped without a word.
            self.counters.dropped_reused += 1
            transport.abort()
            raise web.HTTPServiceUnavailable  # never sent: the transport is gone
        self.counters.requests[name] += 1
        if not request.headers.get("User-Agent"):
            self.counters.bad_user_agent += 1
            return _error(40002)
        if self.opts.api_version_error and name != "file":
            return _error(self.opts.api_version_error)
        queued = self.inject.get(name)
        if queued:
            errcode = queued.pop(0)
            self.counters.errcodes_injected[errcode] += 1
            return _error(errcode)
        response = await handler(request)
        if self.opts.close_after_response and transport is not None:
            # Keep-alive is advertised, the close comes a moment later: a client that reuses the
            # connection in between loses its request (the race a real PBX's close opens).
            self._answered.add(transport)
            asyncio.get_running_loop().call_later(0.5, transport.close)
        return response

    def _ip(self, request: web.Request) -> str:
        return request.remote or "?"

    def _issue(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.tokens[access] = _Token(now + self.opts.token_lifetime_s, refresh)
        self.refresh_tokens[refresh] = (now + self.opts.refresh_lifetime_s, access)
        self.counters.tokens_issued += 1
        return {
            "errcode": 0, "errmsg": "SUCCESS",
            "access_token_expire_time": _seconds(self.opts.token_lifetime_s),
            "access_token": access,
            "refresh_token_expire_time": _seconds(self.opts.refresh_lifetime_s),
            "refresh_token": refresh,
        }

    def _live_tokens(self) -> int:
        now = self.clock.monotonic()
        return sum(1 for t in self.tokens.values() if not t.revoked and t.expires_at > now)

    def _token_ok(self, request: web.Request) -> bool:
        tok = self.tokens.get(request.query.get("access_token", ""))
        ok = tok is not None and not tok.revoked and tok.expires_at > self.clock.monotonic()
        if not ok:
            self.counters.expired_token_hits += 1
        return ok

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return body if isinstance(body, dict) else {}

    # ---------------------------------------------------------------- auth
    async def get_token(self, request: web.Request) -> web.Response:
        ip = self._ip(request)
        if ip in self.blocked_ips and self.opts.block_expire_s and self.clock.wall() >= self.block_until:
            self.blocked_ips.discard(ip)
            self.failed_by_ip[ip] = 0
        if ip in self.blocked_ips:
            return _error(70004, block_expire_time=int(self.block_until) if self.opts.block_expire_s else 0)
        body = await self._json_body(request)
        if body.get("username") != self.opts.client_id or body.get("password") != self.opts.client_secret:
            self.counters.failed_logins += 1
            self.failed_by_ip[ip] += 1
            if self.failed_by_ip[ip] >= self.opts.block_after:
                self.blocked_ips.add(ip)
                self.counters.ip_blocks += 1
                self.block_until = self.clock.wall() + self.opts.block_expire_s
            return _error(-1, invalid_param_list=[{"field": "username or password", "value": "error"}])
        self.failed_by_ip[ip] = 0
        if self._live_tokens() >= self.opts.max_tokens:
            self.counters.token_limit_hits += 1
            return _error(60002)
        self.counters.logins += 1
        return web.json_response(self._issue())

    async def refresh_token(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        entry = self.refresh_tokens.pop(str(body.get("refresh_token", "")), None)
        if entry is None or entry[0] <= self.clock.monotonic():
            return _error(10004)
        old = self.tokens.get(entry[1])
        if old is not None:
            old.revoked = True  # a refresh replaces the pair
        self.counters.refreshes += 1
        return web.json_response(self._issue())

    async def del_token(self, request: web.Request) -> web.Response:
        tok = self.tokens.get(request.query.get("access_token", ""))
        if tok is None or tok.revoked:
            return _error(10004)
        tok.revoked = True
        self.refresh_tokens.pop(tok.refresh_token, None)
        self.counters.revocations += 1
        return _envelope(0, "SUCCESS")

    # ---------------------------------------------------------------- recordings
    def _api_fault(self) -> web.Response | None:
        r = self.rng.random()
        o = self.opts
        if r < o.http500_rate:
            self.counters.faults["http500"] += 1
            return web.Response(status=500, text="Internal Server Error")
        r -= o.http500_rate
        if r < o.errcode_rate:
            self.counters.faults["errcode-2"] += 1
            return _error(-2)
        r -= o.errcode_rate
        if r < o.busy_rate:
            self.counters.faults["errcode70082"] += 1
            return _error(70082)
        return None

    def _page(self, request: web.Request, recs: list[Recording]) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            size = int(request.query.get("page_size", "10"))
        except ValueError:
            return _error(40002)
        if page < 1 or not 1 <= size <= 1000:
            return _error(40002)
        if self.opts.page_ignored:
            page = 1
        key = request.query.get("sort_by", "id")
        desc = request.query.get("order_by", "desc") == "desc"
        recs = sorted(recs, key=(lambda r: r.id) if key != "time" else (lambda r: (r.time, r.id)), reverse=desc)
        cap = self.opts.page_cap
        if cap and cap < size:
            start = (page - 1) * (cap if self.opts.page_cap_offsets == "capped" else size)
            chunk = recs[start: start + cap]
        else:
            chunk = recs[(page - 1) * size: page * size]
        answer: dict[str, Any] = {"errcode": 0, "errmsg": "SUCCESS", "data": [r.listing() for r in chunk]}
        if self.opts.total_number != "absent":
            answer["total_number"] = len(chunk) if self.opts.total_number == "page" else \
                len(recs) + (1 if self.opts.total_number == "plus1" else 0)
        return web.json_response(answer)

    def _ready(self, rec: Recording) -> bool:
        return self.ready_at.get(rec.id, 0.0) <= self.clock.monotonic()

    def _listed(self) -> list[Recording]:
        if self.opts.late_listed:
            return list(self.recordings)
        return [r for r in self.recordings if self._ready(r)]

    def delete_recording(self, rec: Recording) -> None:
        """The PBX deletes a recording (Auto Cleanup, an administrator): gone from lists and downloads."""
        self.recordings.remove(rec)
        self.by_id.pop(rec.id, None)
        self.by_file.pop(rec.file, None)

    async def recording_list(self, request: web.Request) -> web.Response:
        if not self._token_ok(request):
            return _error(10004)
        answer = self._api_fault() or self._page(request, self._listed())
        page_no = request.query.get("page", "1")
        if page_no.isdigit():
            self.list_queries.append((int(page_no), request.query.get("order_by", "desc")))
        for _ in range(self.opts.grow_on_list):
            await self.add_recording()
        for rec in sorted(self.recordings, key=lambda r: r.id)[:self.opts.cleanup_on_list]:
            self.delete_recording(rec)
            self.counters.cleaned_up += 1
        return answer

    async def system_information(self, request: web.Request) -> web.Response:
        if not self._token_ok(request):
            return _error(10004)
        return web.json_response({"errcode": 0, "errmsg": "SUCCESS", "sn": self.opts.sn,
                                  "firmware_version": self.opts.firmware, "system_date_format": "mm/dd/yyyy",
                                  "system_time_format": "24h", "device_name": "Yeastar P570 (simulated)"})

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        """The event WebSocket: topic_list, then 30012 events; 'heartbeat' within ws_idle_s or closed."""
        if not self._token_ok(request):
            return _error(10004)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.counters.ws_connections += 1
        self.websockets.add(ws)
        try:
            while True:
                try:
                    # The PBX drops a socket on which the client sent nothing for ws_idle_s, however
                    # many events it sent itself.
                    msg = await ws.receive(timeout=self.opts.ws_idle_s)
                except TimeoutError:
                    self.counters.heartbeats_late += 1
                    break
                if msg.type != web.WSMsgType.TEXT:
                    break
                if msg.data == "heartbeat":
                    self.counters.ws_heartbeats += 1
                    await ws.send_str("heartbeat response")
                elif msg.data.lstrip().startswith("{"):
                    await ws.send_str(json.dumps({"errcode": 0, "errmsg": "SUCCESS"}))  # the subscription
        finally:
            self.websockets.discard(ws)
            await ws.close()
        return ws

    async def recording_search(self, request: web.Request) -> web.Response:
        if not self._token_ok(request):
            return _error(10004)
        fault = self._api_fault()
        if fault is not None:
            return fault
        q = request.query
        recs = self._listed()
        try:
            if "ids" in q and not self.opts.search_ignores_ids:
                wanted = {int(x) for x in q["ids"].split(",") if x.strip()}
                recs = [r for r in recs if r.id in wanted]
            if "start_time" in q or "end_time" in q:
                lo, hi = int(q.get("start_time", "0")), int(q.get("end_time", str(2**40)))
                recs = [r for r in recs if lo <= _epoch(r) <= hi]
        except ValueError:
            return _error(40002)
        if "caller" in q:
            recs = [r for r in recs if q["caller"] in r.call_from]
        if "callee" in q:
            recs = [r for r in recs if q["callee"] in r.call_to]
        return self._page(request, recs)

    @property
    def serves_mp3(self) -> bool:
        return self.opts.format == "mp3" or bool(self.opts.mp3_transcode)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[bool]:
        """Count a request in flight; yields False when it breaks the mp3 one-at-a-time rule (with
        ``mp3_busy_answer: wait`` a second request waits for the first instead, still counted)."""
        c = self.counters
        violation = self.serves_mp3 and c.in_flight >= 1
        if violation:
            c.mp3_violations += 1
        c.in_flight += 1
        c.max_concurrency = max(c.max_concurrency, c.in_flight)
        try:
            if self.serves_mp3 and self.opts.mp3_busy_answer == "wait":
                async with self._mp3_lock:
                    yield True
            else:
                yield not violation
        finally:
            c.in_flight -= 1

    def _mp3_busy(self) -> web.Response:
        answer = self.opts.mp3_busy_answer
        if answer == "503":
            return web.Response(status=503, text="Service Unavailable", headers={"Retry-After": "1"})
        return _error(-2 if answer == "-2" else 70082)

    async def recording_download(self, request: web.Request) -> web.Response:
        async with self._slot() as allowed:
            if self.opts.resolve_delay_s > 0:   # in flight meanwhile, as on a PBX that takes its time
                await asyncio.sleep(self.opts.resolve_delay_s)
            if not self._token_ok(request):
                return _error(10004)
            if not allowed:
                return self._mp3_busy()
            fault = self._api_fault()
            if fault is not None:
                return fault
            q = request.query
            rec = None
            if "id" in q:
                try:
                    rec = self.by_id.get(int(q["id"]))
                except ValueError:
                    return _error(40002)
            elif "file" in q:
                rec = self.by_file.get(q["file"])
                if rec is None and self.opts.mp3_transcode:
                    rec = next((r for r in self.recordings if transcoded(r).file == q["file"]), None)
            else:
                return _error(40002)
            if rec is None or not self._ready(rec):
                return _error(60001)
            if rec.id in self.opts.fail_ids:
                self.counters.faults["fail_id"] += 1
                return web.Response(status=500, text="Internal Server Error")
            ext = "mp3" if self.serves_mp3 else "wav"
            name = f"Recording-X.7.0.6-1-download-{secrets.token_urlsafe(12)}.{ext}"
            self.urls[name] = _Url(rec, self.clock.monotonic() + self.opts.url_lifetime_s)
            told = transcoded(rec).file if self.opts.mp3_transcode == "mp3-name" else rec.file
            return web.json_response({"errcode": 0, "errmsg": "SUCCESS", "file": told,
                                      "download_resource_url": f"/api/download/{name}"})

    async def file_download(self, request: web.Request) -> web.StreamResponse:
        async with self._slot() as allowed:
            if not self._token_ok(request):
                return _error(10004)
            if not allowed:
                return self._mp3_busy()
            name = request.match_info["name"]
            url = self.urls.get(name)
            if url is not None and self.rng.random() < self.opts.url_expired_rate:
                # As if the 30 minutes had just run out between resolving and fetching.
                self.counters.faults["url_expired"] += 1
                url.expires_at = self.clock.monotonic() - 1
            if url is None or url.expires_at <= self.clock.monotonic() or url.rec.id not in self.by_id:
                answer = self.opts.expired_url_answer
                if answer == "60001":
                    return _error(60001)
                return web.Response(status=int(answer) if answer in ("403", "410") else 404, text="Not Found")
            rec = transcoded(url.rec) if self.opts.mp3_transcode else url.rec
            if self.opts.accel_redirect is not None:
                return web.Response(headers={"X-Accel-Redirect": self.opts.accel_redirect + quote(rec.file)})
            return await self._serve_file(request, rec)

    def served_content(self, rec: Recording) -> bytes:
        """The bytes a download of ``rec`` gives (mp3 when the PBX transcodes)."""
        if self.opts.mp3_transcode:
            return recording_bytes(self.opts.content_seed or self.opts.seed, "mp3", transcoded(rec))
        return self.content(rec)

    def _block(self, fmt: str, rec: Recording, k: int) -> bytes:
        block = recording_block(self.opts.content_seed or self.opts.seed, fmt, rec, k)
        return _riff_size(block, self.opts.wav_riff_size) if k == 0 and fmt == "wav" else block

    async def _serve_file(self, request: web.Request, rec: Recording) -> web.StreamResponse:
        o = self.opts
        r = self.rng.random()
        if r < o.http500_rate:
            self.counters.faults["http500"] += 1
            return web.Response(status=500, text="Internal Server Error")
        r -= o.http500_rate
        if r < o.json_body_rate:
            self.counters.faults["json_body"] += 1
            return web.Response(body=json.dumps({"errcode": o.json_body_errcode,
                                                 "errmsg": _ERRMSG.get(o.json_body_errcode, "ERROR")}).encode(),
                                content_type="application/octet-stream")
        r -= o.json_body_rate
        cut = r < o.cut_rate
        r -= o.cut_rate
        stall = not cut and r < o.stall_rate

        start, end, status = 0, rec.size, 200
        rng_header = request.headers.get("Range")
        if rng_header:
            self.counters.range_requests += 1
        if rng_header and o.range_support:
            parsed = _parse_range(rng_header)
            if parsed is None:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{rec.size}"})
            start, last = parsed
            if start >= rec.size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{rec.size}"})
            end = rec.size if last is None else min(last + 1, rec.size)
            status = 206
        fmt = "mp3" if self.serves_mp3 else "wav"
        resp = web.StreamResponse(status=status)
        resp.content_type = o.content_type or ("audio/mpeg" if fmt == "mp3" else "audio/wav")
        if o.body_length == "content-length":
            resp.content_length = end - start
        elif o.body_length == "chunked":
            resp.enable_chunked_encoding()
        else:
            # HTTP/1.0 style: no length, no chunks; the body ends when the connection does.
            resp._length_check = False   # aiohttp has no public switch for it
            resp.force_close()
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{rec.size}"
        resp.headers["Accept-Ranges"] = "bytes" if o.range_support else "none"
        await resp.prepare(request)
        if stall:
            self.counters.faults["stall"] += 1
            await asyncio.sleep(o.stall_s)
        # A cut lands anywhere when nothing tells the client the length (as a real network's would).
        cut_at = None if not cut else start + (end - start) // 2 if o.body_length == "content-length" else \
            start + self.rng.randrange(1, max(2, end - start))
        if o.truncate_at and o.truncate_at < end and (cut_at is None or cut_at > o.truncate_at):
            cut_at = max(start, o.truncate_at)   # a deterministic cut: every transfer ends here
        pos = start
        began = asyncio.get_running_loop().time()
        while pos < end:
            if o.bytes_per_second > 0:
                # Pace like a small embedded PBX would: never ahead of bytes_per_second.
                ahead = (pos - start) / o.bytes_per_second - (asyncio.get_running_loop().time() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            k = pos // BLOCK
            block = self._block(fmt, rec, k)
            piece = block[pos - k * BLOCK: min(end - k * BLOCK, len(block))]
            if cut_at is not None and pos + len(piece) > cut_at:
                piece = piece[: cut_at - pos]
                await resp.write(piece)
                self.counters.bytes_served += len(piece)
                self.counters.faults["cut"] += 1
                # Drop the connection mid-body: the client sees fewer bytes than Content-Length.
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write(piece)
            self.counters.bytes_served += len(piece)
            pos += len(piece)
        await resp.write_eof()
        if start == 0 and end == rec.size:
            self.counters.transfers_completed[rec.id] += 1
        return resp

    # ---------------------------------------------------------------- test hooks
    async def sim_counters(self, _request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def sim_control(self, request: web.Request) -> web.Response:
        """Test hook: ``{"expire_tokens": true, "expire_urls": true, "unblock": true, "options": {...}}``."""
        body = await self._json_body(request)
        self.control(expire_tokens=bool(body.get("expire_tokens")), expire_urls=bool(body.get("expire_urls")),
                     unblock=bool(body.get("unblock")), options=body.get("options") or {},
                     inject=body.get("inject") or {})
        return web.json_response({"ok": True})

    def control(self, *, expire_tokens: bool = False, expire_urls: bool = False, unblock: bool = False,
                options: dict[str, Any] | None = None, inject: dict[str, list[int]] | None = None) -> None:
        """Expire every token or URL now, lift IP blocks, or change fault options while serving."""
        if expire_tokens:
            for tok in self.tokens.values():
                tok.expires_at = self.clock.monotonic() - 1
        if expire_urls:
            for url in self.urls.values():
                url.expires_at = self.clock.monotonic() - 1
        if unblock:
            self.blocked_ips.clear()
            self.failed_by_ip.clear()
        if options:
            live = ("stall_s", "range_support", "bytes_per_second", "grow_on_list", "page_cap", "page_cap_offsets",
                    "close_after_response", "cleanup_on_list", "event_early_s", "mp3_busy_answer",
                    "expired_url_answer", "api_version_error", "ws_idle_s")
            allowed = {k: v for k, v in options.items() if k.endswith("_rate") or k in live}
            self.opts = replace(self.opts, **allowed)
        for endpoint, codes in (inject or {}).items():
            self.inject.setdefault(endpoint, []).extend(int(c) for c in codes)


def _riff_size(head: bytes, how: str) -> bytes:
    """The RIFF size field as some PBXs' writers leave it: 0 (not known while recording) or more than
    the file holds (never updated after the recording was trimmed)."""
    if how == "right" or head[:4] != b"RIFF":
        return head
    size = 0 if how == "zero" else int.from_bytes(head[4:8], "little") + 4096
    return head[:4] + size.to_bytes(4, "little") + head[8:]


def _seconds(value: float) -> float | int:
    """Whole seconds as the PBX sends them; fractions only for the tiny lifetimes tests use."""
    return int(value) if float(value).is_integer() else value


def _epoch(rec: Recording) -> int:
    return int(dt.datetime.strptime(rec.time, "%m/%d/%Y %H:%M:%S").replace(tzinfo=dt.UTC).timestamp())


def _parse_range(header: str) -> tuple[int, int | None] | None:
    """``bytes=N-`` or ``bytes=N-M`` -> (N, M or None); anything else (suffix, multi-range) -> None."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    return int(first), (int(last) if last else None)

