"""Logging: secrets never reach a rendered line; exceptions are bounded and carry no locals; every line
is one JSON object, stdlib records (aiohttp's) included; under journald each line carries its priority."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import structlog

from daemon.logs import REDACTED, configure_logging, journal_priority, redact_text, remember_secret, under_journald
from tests.conftest import REPO, cli_env, simulator_subprocess, write_config


@pytest.mark.parametrize(("text", "expected"), [
    ("GET https://pbx:8088/api/download/x.wav?access_token=AbC123xyz",
     f"GET https://pbx:8088/api/download/x.wav?access_token={REDACTED}"),
    ("https://pbx/openapi/v1.0/recording/list?page=1&access_token=tok-9&page_size=5",
     f"https://pbx/openapi/v1.0/recording/list?page=1&access_token={REDACTED}&page_size=5"),
    ("url=...%3Faccess_token%3Dsecret-x", f"url=...%3Faccess_token%3D{REDACTED}"),
    ('{"refresh_token": "r-123", "errcode": 0}', f'{{"refresh_token": "{REDACTED}", "errcode": 0}}'),
    ("{'password': 'hunter2'}", f"{{'password': \"{REDACTED}\"}}"),
    ("nothing secret here", "nothing secret here"),
])
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def _render(fmt: str) -> tuple[io.StringIO, structlog.typing.FilteringBoundLogger]:
    out = io.StringIO()
    configure_logging(fmt, "debug", stream=out)
    return out, structlog.get_logger("test")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_an_event_carrying_a_tokenised_url_or_a_secret_renders_without_it(fmt: str) -> None:
    out, log = _render(fmt)
    log.info("download.started", url="https://pbx/api/download/a.wav?access_token=TOKEN-AAA-111",
             access_token="TOKEN-BBB-222", nested={"client_secret": "SECRET-CCC", "ok": 1},
             items=["https://x?refresh_token=TOKEN-DDD"])
    text = out.getvalue()
    for secret in ("TOKEN-AAA-111", "TOKEN-BBB-222", "SECRET-CCC", "TOKEN-DDD"):
        assert secret not in text
    assert "download.started" in text


def test_known_secret_values_are_scrubbed_wherever_they_appear() -> None:
    remember_secret("Zq8-very-unusual-token-value")
    out, log = _render("json")
    log.info("pbx.answer", body="the server echoed Zq8-very-unusual-token-value back")
    assert "Zq8-very-unusual-token-value" not in out.getvalue()


def test_exception_text_is_redacted_truncated_and_has_no_locals() -> None:
    out, log = _render("json")
    local_secret = "LOCAL-VARIABLE-SECRET"  # noqa: F841 - must not appear: tracebacks carry no locals
    try:
        raise RuntimeError("failed GET /x?access_token=EXC-TOKEN-1 body=" + "B" * 5000)
    except RuntimeError:
        log.exception("download.failed")
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert "EXC-TOKEN-1" not in line["exception"]
    assert "LOCAL-VARIABLE-SECRET" not in line["exception"]
    assert "B" * 500 not in line["exception"]
    assert "RuntimeError" in line["exception"]


def test_json_format_is_one_object_per_line_with_level_and_time() -> None:
    out, log = _render("json")
    log.warning("config.warning", message="hello")
    event = json.loads(out.getvalue())
    assert event["event"] == "config.warning"
    assert event["level"] == "warning"
    assert "timestamp" in event
    assert event["logger"] == "test"


def test_stdlib_records_become_json_lines_with_logger_and_redaction() -> None:
    out, _ = _render("json")
    try:
        raise ValueError("bad request line with access_token=STDLIB-TOKEN")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1")
    logging.getLogger("asyncio").warning("plain %s", "warning")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["logger"], e["level"]) for e in events] == [("aiohttp.server", "error"), ("asyncio", "warning")]
    assert events[0]["event"] == "Error handling request from 127.0.0.1"
    assert "ValueError" in events[0]["exception"] and "STDLIB-TOKEN" not in out.getvalue()
    assert "timestamp" in events[1]


@pytest.mark.parametrize(("level", "priority"), [
    ("critical", 2), ("error", 3), ("exception", 3), ("warning", 4), ("info", 6), ("debug", 7), ("odd", 5)])
def test_levels_map_to_syslog_priorities(level: str, priority: int) -> None:
    assert journal_priority(level) == priority


def test_journal_stream_counts_only_for_the_stream_it_names(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(a, env) and not under_journald(b, env)
        assert not under_journald(a, {}) and not under_journald(a, {"JOURNAL_STREAM": "junk"})
        assert not under_journald(io.StringIO(), env)


_EMIT = """
import logging, structlog
from daemon.logs import configure_logging
configure_logging("auto", "info")
structlog.get_logger("daemon.test").info("archive.ok")
structlog.get_logger("daemon.test").error("archive.broken")
logging.getLogger("aiohttp.server").warning("from the stdlib")
"""


def test_under_journald_every_line_starts_with_its_priority(tmp_path: Path) -> None:
    """What `journalctl -p err` relies on: journald reads "<3>" as the priority of that line."""
    path = tmp_path / "journal"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        env = cli_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        subprocess.run([sys.executable, "-c", _EMIT], stderr=stream, env=env, cwd=REPO, check=True, timeout=30)
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<3>", "<4>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["archive.ok", "archive.broken", "from the stdlib"]
    # Elsewhere (a pipe, a file of one's own): plain JSON lines.
    done = subprocess.run([sys.executable, "-c", _EMIT], capture_output=True, text=True, cwd=REPO, check=True,
                          timeout=30, env=cli_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    assert [json.loads(line)["level"] for line in done.stderr.splitlines()] == ["info", "error", "warning"]


def test_a_bad_request_to_the_health_port_logs_json_not_a_traceback(tmp_path: Path) -> None:
    """aiohttp logs "Error handling request" with a traceback through the stdlib: one JSON line."""
    with simulator_subprocess("--count", "1") as base_url:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = write_config(tmp_path, base_url, extra={"service": {"listen": f"127.0.0.1:{port}"}})
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "-c", str(cfg)], cwd=REPO, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=2):
                        break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET /\x00bad HTTP/1.1\r\nHost: x\r\n\r\n")
                assert conn.recv(100).startswith(b"HTTP/1.0 400")
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines()]   # every line, or this raises
    bad = [e for e in events if e.get("logger") == "aiohttp.server"]
    assert bad and bad[0]["level"] == "error" and "Error handling request" in bad[0]["event"]
    assert "InvalidURLError" in bad[0]["exception"]
    assert {e["logger"] for e in events} >= {"daemon.runner", "daemon.service", "aiohttp.server"}
