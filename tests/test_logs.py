"""Logging: secrets never reach a rendered line; exceptions are bounded and carry no locals."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from daemon.logs import REDACTED, configure_logging, redact_text, remember_secret


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
