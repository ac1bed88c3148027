"""A raw asyncio HTTP front for the simulator that breaks file transfers at the byte level.

API requests are relayed to the in-process simulator untouched; requests for ``/api/download/...``
are answered here, from the simulator's URL table and its deterministic bytes, with the next fault
of a per-recording script: cut bodies (FIN or RST), wrong Content-Length, chunked bodies without
their last chunk, silence, a trickle, 429/503 with Retry-After, HTML, empty or JSON bodies, and
Range answers that do not match.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import struct
import time
from collections import Counter, defaultdict
from urllib.parse import parse_qs, urlsplit

from daemon.simulator import Simulator, recording_bytes

FAULTS = ("ok", "close", "rst", "cl_long", "cl_short", "chunked_no_end", "silence", "trickle",
          "503_seconds", "503_date", "429_seconds", "html", "empty", "json_10004", "json_60001",
          "range_ignored", "range_wrong", "416", "redirect_foreign", "trickle_json")


class RawPbx:
    """Serve on 127.0.0.1; ``script[rec_id]`` is consumed one fault per file request, then "ok"."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.script: dict[int, list[str]] = defaultdict(list)
        self.served: Counter[str] = Counter()
        self.file_requests: Counter[int] = Counter()
        self.request_times: dict[int, list[float]] = defaultdict(list)
        self.ranges: list[str] = []
        self.foreign_url = "http://127.0.0.2:9/elsewhere.wav"   # where "redirect_foreign" points
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.base_url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            if urlsplit(target).path.startswith("/api/download/"):
                await self._file(writer, target, headers)
            else:
                await self._relay(writer, method, target, headers, body)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _relay(self, writer: asyncio.StreamWriter, method: str, target: str, headers: dict[str, str],
                     body: bytes) -> None:
        host, port = urlsplit(self.sim.base_url).hostname, urlsplit(self.sim.base_url).port
        r, w = await asyncio.open_connection(host, port)
        fwd = {**headers, "connection": "close", "host": f"{host}:{port}"}
        w.write(f"{method} {target} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in fwd.items()).encode()
                + b"\r\n" + body)
        await w.drain()
        answer = await r.read()
        w.close()
        writer.write(answer)
        await writer.drain()

    async def _file(self, writer: asyncio.StreamWriter, target: str, headers: dict[str, str]) -> None:
        parts = urlsplit(target)
        name = parts.path.rsplit("/", 1)[1]
        token = parse_qs(parts.query).get("access_token", [""])[0]
        tok = self.sim.tokens.get(token)
        url = self.sim.urls.get(name)
        if tok is None or tok.revoked or tok.expires_at <= self.sim.clock.monotonic():
            return await self._json(writer, {"errcode": 10004, "errmsg": "TOKEN EXPIRED"})
        if url is None:
            return await self._send(writer, 404, {"Content-Type": "text/plain"}, b"Not Found")
        rec = url.rec
        self.file_requests[rec.id] += 1
        self.request_times[rec.id].append(time.monotonic())
        fault = self.script[rec.id].pop(0) if self.script[rec.id] else "ok"
        self.served[fault] += 1
        data = recording_bytes(self.sim.opts.seed, self.sim.opts.format, rec)
        rng = headers.get("range")
        if rng:
            self.ranges.append(rng)
        audio = {"Content-Type": "audio/wav"}
        half = len(data) // 2
        if fault == "ok":
            if rng and rng.startswith("bytes=") and rng[6:].rstrip("-").isdigit():
                start = int(rng[6:].rstrip("-"))
                if start >= len(data):
                    return await self._send(writer, 416, {"Content-Range": f"bytes */{len(data)}"}, b"")
                return await self._send(writer, 206, {**audio, "Content-Range": f"bytes {start}-{len(data) - 1}/"
                                                      f"{len(data)}"}, data[start:])
            return await self._send(writer, 200, audio, data)
        if fault in ("close", "rst", "cl_short"):
            await self._send(writer, 200, audio, data[:half], length=len(data), finish=False)
            if fault == "rst":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return None
        if fault == "cl_long":   # declares fewer bytes than the recording has: only the listing size tells
            return await self._send(writer, 200, audio, data[:half])
        if fault == "chunked_no_end":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(f"{half:x}\r\n".encode() + data[:half] + b"\r\n")
            await writer.drain()
            writer.close()
            return None
        if fault == "silence":
            await self._send(writer, 200, audio, b"", length=len(data), finish=False)
            await asyncio.sleep(3600)
            return None
        if fault == "redirect_foreign":   # another host's bytes would be archived as the recording
            return await self._send(writer, 302, {"Location": self.foreign_url}, b"")
        if fault == "trickle_json":       # starts like an errcode envelope, then 10 bytes/s for ever
            await self._send(writer, 200, {"Content-Type": "application/json"}, b"", length=len(data), finish=False)
            writer.write(b"{")
            for _ in range(len(data)):
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.write(b" ")
            return None
        if fault == "trickle":
            await self._send(writer, 200, audio, b"", length=len(data), finish=False)
            for i in range(len(data)):
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0.1)
            return None
        if fault in ("503_seconds", "429_seconds"):
            return await self._send(writer, int(fault[:3]), {"Retry-After": "1"}, b"busy")
        if fault == "503_date":
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            return await self._send(writer, 503, {"Retry-After": when}, b"busy")
        if fault == "html":
            return await self._send(writer, 200, {"Content-Type": "text/html"}, b"<html><body>Login</body></html>")
        if fault == "empty":
            return await self._send(writer, 200, audio, b"")
        if fault == "json_10004":
            return await self._json(writer, {"errcode": 10004, "errmsg": "TOKEN EXPIRED"})
        if fault == "json_60001":
            return await self._json(writer, {"errcode": 60001, "errmsg": "DATA NOT FOUND"})
        if fault == "range_ignored":
            return await self._send(writer, 200, audio, data)
        if fault == "range_wrong":
            return await self._send(writer, 206, {**audio, "Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"},
                                    data)
        if fault == "416":
            return await self._send(writer, 416, {"Content-Range": f"bytes */{len(data)}"}, b"")
        raise AssertionError(f"unknown fault {fault}")

    async def _json(self, writer: asyncio.StreamWriter, body: dict[str, object]) -> None:
        await self._send(writer, 200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    async def _send(self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: bytes, *,
                    length: int | None = None, finish: bool = True) -> None:
        reason = {200: "OK", 206: "Partial Content", 302: "Found", 404: "Not Found", 416: "Range Not Satisfiable",
                  429: "Too Many Requests", 503: "Service Unavailable"}[status]
        head = {**headers, "Content-Length": str(len(body) if length is None else length), "Connection": "close"}
        writer.write(f"HTTP/1.1 {status} {reason}\r\n".encode()
                     + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + body)
        await writer.drain()
        if finish:
            writer.close()
