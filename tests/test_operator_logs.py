"""What the operator reads: debug shows each PBX request (redacted), each state change and each scheduler
decision; JSON fields keep one type per name; reasons are plain sentences (a 5xx is a server error, not
"busy", and no aiohttp repr); the TTY progress line never mixes with log lines, fits the terminal,
honours NO_COLOR and ends on the summary's MB."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from daemon.client import PbxClient, describe_client_error, describe_os_error
from daemon.errors import PbxBusyError, PbxServerError, TransferError
from daemon.logs import clear_line, configure_logging, debug_enabled, fit_line, no_color, set_level
from daemon.scheduler import retry_decision
from daemon.simulator import SimOptions
from tests.conftest import REPO, SimFactory, cli_env, pbx_config, serve_on_loopback, write_config


async def _once(cfg: Path, *, stdout: int | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``once -c CFG`` as a real subprocess; its exit code and its stderr (unless ``stdout`` takes both)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "once", "-c", str(cfg), cwd=REPO, env=env or cli_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=stdout if stdout is not None else asyncio.subprocess.DEVNULL,
        stderr=stdout if stdout is not None else asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    return await proc.wait(), (err or b"").decode()


async def _debug_once(tmp_path: Path, start_sim: SimFactory) -> tuple[int, list[dict[str, Any]], str]:
    """A real ``once`` at debug level with JSON logs: 1000-1002 archive, 1003 always meets HTTP 500."""
    sim = await start_sim(count=4, fail_ids=(1003,))
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [1000, 1001, 1002, 1003]}, "downloads": {"max_attempts": 2},
        "logging": {"format": "json", "level": "debug"}})
    code, err = await _once(cfg)
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return code, events, err


def _json_type(value: Any) -> str:
    # A JSON reader sees numbers, not Python's int/float split; null is "absent" for any field.
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


async def test_json_fields_keep_one_type_per_name_in_a_real_once(tmp_path: Path, start_sim: SimFactory) -> None:
    """Every field name has one JSON type across all events of a real ``once`` (debug on, a retry, a
    failure): ``recording`` and every ``*_id`` are strings, never an id as a number."""
    code, events, _ = await _debug_once(tmp_path, start_sim)
    assert code == 1 and events
    types: dict[str, set[str]] = {}
    for event in events:
        for key, value in event.items():
            if value is not None:
                types.setdefault(key, set()).add(_json_type(value))
    mixed = {key: kinds for key, kinds in types.items() if len(kinds) > 1}
    assert mixed == {}
    assert types["recording"] == {"string"}
    assert all(kinds == {"string"} for key, kinds in types.items() if key.endswith("_id"))


async def test_debug_shows_requests_state_changes_and_decisions_redacted(tmp_path: Path,
                                                                         start_sim: SimFactory) -> None:
    """logging.level debug: each PBX request (method, endpoint, status, elapsed; no token, no secret),
    each ledger state change of a recording (from, to, reason) and each scheduler decision."""
    code, events, raw = await _debug_once(tmp_path, start_sim)
    assert code == 1
    requests = [e for e in events if e["event"] == "pbx.request"]
    assert {e["endpoint"] for e in requests} >= {"get_token", "recording/download", "file download"}
    assert all({"method", "status", "elapsed_ms"} <= e.keys() for e in requests)
    assert any(e["status"] == 500 and e.get("recording") == "1003" for e in requests)
    assert "access_token=" not in raw.replace("access_token=[REDACTED]", "")
    assert SimOptions.client_secret not in raw
    changes = {(e["recording"], e["from_state"], e["to_state"]) for e in events if e["event"] == "ledger.state_changed"}
    assert ("1000", "pending", "in_progress") in changes and ("1000", "in_progress", "done") in changes
    assert ("1003", "in_progress", "pending") in changes and ("1003", "in_progress", "failed") in changes
    decisions = [(e["recording"], e["decision"]) for e in events if e["event"] == "scheduler.decision"]
    assert decisions.count(("1003", "retry")) == 1 and decisions.count(("1003", "give_up")) == 1
    failed = next(e for e in events if e["event"] == "download.failed")
    assert failed["reason"].startswith("PbxServerError: ") and "server error HTTP 500" in failed["reason"]


def test_debug_is_one_flag_set_where_the_level_is_set() -> None:
    """Hot paths build debug fields only behind ``debug_enabled()``: off at info, on at debug, and it
    follows a SIGHUP level change."""
    configure_logging("json", "info", stream=io.StringIO())
    assert debug_enabled() is False
    set_level("debug")
    assert debug_enabled() is True
    set_level("warning")
    assert debug_enabled() is False


@pytest.mark.parametrize(("state", "burn", "decision"), [
    ("failed", True, "give_up"), ("pending", True, "retry"), ("pending", False, "wait"), (None, True, "retry"),
])
def test_retry_decision(state: str | None, burn: bool, decision: str) -> None:
    assert retry_decision(state, burn=burn) == decision


# ---------------------------------------------------------------- plain reasons
@pytest.mark.parametrize(("error", "text"), [
    (OSError(errno.ECONNREFUSED, "Connect call failed"), "connection refused by pbx:8088"),
    (OSError(errno.ETIMEDOUT, "timed out"), "connecting to pbx:8088 timed out"),
    (OSError(errno.EHOSTUNREACH, "No route"), "no route to pbx:8088"),
    (OSError(errno.ECONNRESET, "reset"), "connection reset by pbx:8088"),
    (socket.gaierror(-2, "Name or service not known"), "cannot resolve the host name of pbx:8088"),
    (OSError(errno.EACCES, "Permission denied"), "connection to pbx:8088 failed (permission denied)"),
    (None, "connection to pbx:8088 failed"),
])
def test_describe_os_error(error: BaseException | None, text: str) -> None:
    assert describe_os_error(error, "pbx:8088") == text


@pytest.mark.parametrize(("exc", "text"), [
    (aiohttp.ClientPayloadError("Response payload is not completed: <ContentLengthError: 400, message='Not "
                                "enough data to satisfy content length header.'>"),
     "the body ended before its announced length"),
    (aiohttp.ClientPayloadError("<TransferEncodingError: 400, message='bad chunk'>"), "the body arrived malformed"),
    (aiohttp.ServerDisconnectedError(), "the PBX closed the connection without an answer"),
    (aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), "connection reset by the PBX"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "connection reset by the PBX"),
    (aiohttp.ClientError("<something odd>"), "the request to the PBX failed"),
])
def test_describe_client_error_never_shows_a_repr(exc: BaseException, text: str) -> None:
    assert describe_client_error(exc, "the PBX") == text


async def _read_whole(client: PbxClient, url: str) -> bytes:
    async with client.open_file(url) as stream:
        return b"".join([c async for c in stream.chunks(4096)])


async def test_a_cut_body_reads_as_a_sentence(start_sim: SimFactory) -> None:
    """A transfer cut short (the PBX closes after N bytes of a longer Content-Length)."""
    sim = await start_sim(count=1, truncate_at=1000)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        url = (await client.resolve_download(rec_id=1000)).url
        with pytest.raises(TransferError) as info:
            await _read_whole(client, url)
    message = str(info.value)
    assert "the body ended before its announced length" in message
    assert "ClientPayloadError" not in message and "<" not in message


@pytest.mark.parametrize(("status", "kind"), [(500, PbxServerError), (502, PbxServerError), (503, PbxBusyError),
                                              (429, PbxBusyError)])
async def test_a_5xx_is_a_server_error_and_503_429_are_busy(status: int, kind: type[Exception]) -> None:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=status)
    runner, url = await serve_on_loopback(handler)
    try:
        async with PbxClient(pbx_config(url)) as client:
            with pytest.raises(PbxBusyError) as info:
                await client.check()
        assert type(info.value) is kind
        assert ("server error" in str(info.value)) is (kind is PbxServerError)
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- the progress line
@pytest.mark.parametrize(("columns", "plain", "expected"), [(10, False, "\r\x1b[K"), (10, True, "\r" + " " * 9 + "\r")])
def test_clear_line(columns: int, plain: bool, expected: str) -> None:
    assert clear_line(columns, plain=plain) == expected


@pytest.mark.parametrize(("text", "columns", "expected"), [
    ("abcdef", 10, "abcdef"), ("abcdefghij", 10, "abcdefgh…"), ("abcdefghi", 10, "abcdefghi"), ("abc", 1, "…"),
])
def test_fit_line(text: str, columns: int, expected: str) -> None:
    assert fit_line(text, columns) == expected


@pytest.mark.parametrize(("env", "plain"), [({}, False), ({"NO_COLOR": ""}, False), ({"NO_COLOR": "1"}, True)])
def test_no_color(env: dict[str, str], plain: bool) -> None:
    assert no_color(env) is plain


_SGR = re.compile(r"\x1b\[[0-9;]*m")
_PROGRESS = re.compile(r"^\s*\d+/\d+\s+(?P<mb>[\d.]+) MB\s+[\d.]+ MB/s ETA \S+( s)?(  \(paused: \w+\))?$")


def screen(raw: str) -> list[str]:
    """The rows a terminal shows after ``raw``: ``\\r`` returns to column 0, ESC[K erases to the end of
    the row, ``\\n`` ends it, other characters overwrite what is under the cursor."""
    rows: list[str] = []
    line: list[str] = []
    col = i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        ch = raw[i]
        if ch == "\n":
            rows.append("".join(line))
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    if line:
        rows.append("".join(line))
    return rows


def _read_pty(master: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: every writer of the slave side has closed it
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("plain", [False, True], ids=["colour", "NO_COLOR"])
async def test_progress_line_on_a_real_pty(tmp_path: Path, start_sim: SimFactory, plain: bool) -> None:
    """``once`` with stdout and stderr on a pty, COLUMNS=60: no row mixes the progress line with a log
    line, the progress line fits 60 columns, NO_COLOR means no ESC byte at all, and the last progress
    figure is the summary's archived MB — transfers are cut here and fetched again from the start (no
    Range support), and the bytes of the cut attempts are not archived."""
    sim = await start_sim(count=4, size_min=40_000, size_max=60_000, bytes_per_second=60_000,
                          range_support=False, cut_rate=0.5)
    cfg = write_config(tmp_path, sim.base_url, extra={
        "sources": {"ids": [1000, 1001, 1002, 1003]}, "downloads": {"workers": 2, "max_attempts": 20},
        "logging": {"format": "console", "level": "info"}})
    env = cli_env(COLUMNS="60", LINES="24", TERM="xterm")
    env.pop("NO_COLOR", None)
    if plain:
        env["NO_COLOR"] = "1"
    master, slave = os.openpty()
    try:
        reader = asyncio.create_task(asyncio.to_thread(_read_pty, master))
        try:
            code, _ = await _once(cfg, stdout=slave, env=env)
        finally:
            os.close(slave)
        raw = (await reader).decode()
    finally:
        os.close(master)
    assert code == 0, raw
    assert ("\x1b" in raw) is not plain
    rows = [row.rstrip() for row in screen(_SGR.sub("", raw))]   # trailing blanks are invisible
    progress = [row for row in rows if "MB/s" in row]
    assert progress, raw
    for row in progress:
        assert _PROGRESS.match(row), row          # a log line written over it would show in the row
        assert len(row) <= 59, row
    summary = next(row for row in rows if "run.summary" in row)
    archived = int(re.search(r"\bbytes=(\d+)", summary).group(1))  # type: ignore[union-attr]
    assert float(_PROGRESS.match(progress[-1]).group("mb")) == round(archived / 1e6, 1)  # type: ignore[union-attr]
    assert sim.counters.bytes_served > archived   # the extra fetches happened, and are not in the figure
    assert "pbx.request" not in raw and "ledger.state_changed" not in raw   # info level: no debug events
