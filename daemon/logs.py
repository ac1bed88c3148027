"""Structured logging, configured once by the CLI, with secrets redacted from every event."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"

# Keys whose values are secrets wherever they appear in an event (nested dicts included).
SECRET_KEYS = frozenset({
    "access_token", "refresh_token", "client_secret", "password", "secret", "token", "authorization",
})

# `access_token=...` in a URL or message, and `"refresh_token": "..."` in pasted JSON.
_QUERY_SECRET = re.compile(
    r"(?P<key>access_token|refresh_token|client_secret|password)(?P<sep>=|%3D)(?P<val>[^&\s'\"<>]+)",
    re.IGNORECASE,
)
_JSON_SECRET = re.compile(
    r"(?P<key>[\"'](?:access_token|refresh_token|client_secret|password)[\"']\s*:\s*)[\"'][^\"']*[\"']",
    re.IGNORECASE,
)

MAX_EXCEPTION_CHARS = 4000
MAX_LINE_CHARS = 400


class _KnownSecrets:
    """Values known to be secret at run time (the client secret, issued tokens), scrubbed verbatim."""

    def __init__(self, keep: int = 64) -> None:
        self._keep = keep
        self._values: list[str] = []

    def add(self, value: str) -> None:
        # Short strings would match ordinary text; real secrets and tokens are long.
        if len(value) >= 6 and value not in self._values:
            self._values.append(value)
            del self._values[: -self._keep]

    def scrub(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


KNOWN_SECRETS = _KnownSecrets()


def remember_secret(value: str) -> None:
    """Register a secret value so that it is redacted wherever it later shows up in a log."""
    KNOWN_SECRETS.add(value)


def redact_text(text: str) -> str:
    """``text`` with every token, secret and password replaced by ``[REDACTED]``."""
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}{m['sep']}{REDACTED}", text)
    text = _JSON_SECRET.sub(lambda m: f'{m["key"]}"{REDACTED}"', text)
    return KNOWN_SECRETS.scrub(text)


def _redact_value(key: str | None, value: Any) -> Any:
    if key is not None and key.lower() in SECRET_KEYS and value is not None:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(None, v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    # Objects (exceptions, URLs, paths) are rendered now so that their text can be scrubbed.
    return redact_text(str(value))


def redact_processor(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact secrets in every key and value of the event."""
    for key in list(event.keys()):
        event[key] = _redact_value(key, event[key])
    return event


def truncate_exception(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Bound the rendered traceback: aiohttp pastes whole response bodies into exception messages."""
    exc = event.get("exception")
    if isinstance(exc, str):
        lines = [ln if len(ln) <= MAX_LINE_CHARS else ln[:MAX_LINE_CHARS] + "…" for ln in exc.splitlines()]
        text = "\n".join(lines)
        if len(text) > MAX_EXCEPTION_CHARS:
            text = "…" + text[-MAX_EXCEPTION_CHARS:]
        event["exception"] = text
    return event


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Plain traceback text: no local variables, which could hold secrets.
        structlog.processors.format_exc_info,
        truncate_exception,
        redact_processor,
    ]


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once, at the edge. ``fmt``: auto | json | console."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback,
        )
    structlog.configure(
        processors=[*_shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )



def set_level(level: str) -> None:
    """Change the level of later log events (SIGHUP), keeping everything else as configured."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())))
