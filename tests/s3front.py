"""A fault-injecting front for the real S3 servers of the tests: what a busy, flaky or full provider does.

It listens on 127.0.0.1, reads each request (headers and body), and either answers with a fault or
relays the request to the real server (moto's or rclone's) on a fresh connection and the answer back.
Every connection is closed after one exchange (``Connection: close``), so that a fault never leaves a
half-read pooled connection behind it. Signatures stay valid: the Host header and the body pass
unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

# kind -> (status, S3 error code)
ANSWERS = {
    "slowdown": (503, "SlowDown"),
    "internal": (500, "InternalError"),
    "quota": (403, "QuotaExceeded"),        # Ceph RGW's answer to a bucket over its quota
    "expired": (400, "ExpiredToken"),
}
FAULTS = (*ANSWERS, "cut_request", "cut_answer")


def request_kind(method: str, target: str) -> str:
    """What an S3 request does, from its method and query: put, part, create, complete, abort, head,
    get, list, copy (a put with x-amz-copy-source is told apart by the caller). Pure."""
    query = parse_qs(urlsplit(target).query, keep_blank_values=True)
    if method == "PUT":
        return "part" if "partNumber" in query else "put"
    if method == "POST":
        return "create" if "uploads" in query else "complete" if "uploadId" in query else "post"
    if method == "DELETE":
        return "abort" if "uploadId" in query else "delete"
    if method == "HEAD":
        return "head"
    if method == "GET":
        return "list" if ("uploads" in query or "list-type" in query or urlsplit(target).path.count("/") <= 1) \
            else "get"
    return method.lower()


@dataclass
class Rule:
    """Answer the next ``times`` requests of ``kind`` with ``fault``."""

    kind: str
    fault: str
    times: int = 1


class S3Front:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.rules: list[Rule] = []
        self.seen: Counter[str] = Counter()       # requests by kind
        self.faulted: Counter[str] = Counter()    # faults served, by fault
        self.retry_after_s = 1
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, kind: str, fault: str, times: int = 1) -> None:
        assert fault in FAULTS, fault
        self.rules.append(Rule(kind, fault, times))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _take(self, kind: str) -> str | None:
        for rule in self.rules:
            if rule.times > 0 and rule.kind in (kind, "any"):
                rule.times -= 1
                return rule.fault
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            assert "chunked" not in headers.get("transfer-encoding", ""), "the front relays Content-Length bodies"
            length = int(headers.get("content-length", "0"))
            kind = request_kind(method, target)
            if kind == "put" and "x-amz-copy-source" in headers:
                kind = "copy"
            self.seen[kind] += 1
            fault = self._take(kind)
            expects = headers.get("expect", "").lower() == "100-continue"
            if expects and fault not in ANSWERS:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            if fault == "cut_request":      # the upload dies half-way: the server never sees it whole
                await reader.readexactly(length // 2)
                self.faulted[fault] += 1
                writer.transport.abort()
                return
            # A final answer instead of 100 Continue: the client never sends the body (as real servers do).
            body = b"" if expects and fault in ANSWERS else await reader.readexactly(length)
            if fault in ANSWERS:
                status, code = ANSWERS[fault]
                self.faulted[fault] += 1
                xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>injected by the test front</Message></Error>").encode()
                writer.write(f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
                             f"Content-Length: {len(xml)}\r\nRetry-After: {self.retry_after_s}\r\n"
                             "Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else xml))
                await writer.drain()
                return
            answer = await self._relay(head, headers, body)
            if fault == "cut_answer":       # the server did it; the client never hears so
                self.faulted[fault] += 1
                writer.write(answer[: answer.index(b"\r\n") + 2])     # the status line, then nothing
                await writer.drain()
                writer.transport.abort()
                return
            writer.write(answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _relay(self, head: bytes, headers: dict[str, str], body: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        kept = [ln for ln in lines[1:] if ln and not ln.lower().startswith(("connection:", "expect:"))]
        request = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1") + body
        r, w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            w.write(request)
            await w.drain()
            answer = await r.read()     # to EOF: the upstream closes after one answer
        finally:
            w.close()
        top, sep, rest = answer.partition(b"\r\n\r\n")
        first, *fields = top.decode("latin-1").split("\r\n")
        fields = [f for f in fields if not f.lower().startswith("connection:")]
        return "\r\n".join([first, *fields, "Connection: close"]).encode("latin-1") + sep + rest
