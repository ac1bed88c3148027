"""Structured logging, configured once by the CLI, with secrets redacted from every event."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, MutableMapping
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


def stringify_ids(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: ``recording`` and every ``*_id`` field is a string (or null) in every event,
    so that a JSON consumer sees one type per field name (a recording is named by id or by file name)."""
    for key, value in event.items():
        if isinstance(value, int) and not isinstance(value, bool) and (key == "recording" or key.endswith("_id")):
            event[key] = str(value)
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


def add_logger_name(logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the ``logger`` field, for our events and stdlib records (aiohttp's) alike."""
    record = event.get("_record")
    name = record.name if isinstance(record, logging.LogRecord) else getattr(logger, "name", None)
    if name:
        event.setdefault("logger", name)
    return event


# syslog priorities by level, for journald's stream parser (sd-daemon(3): a line starting "<N>").
JOURNAL_PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}


def journal_priority(level: str) -> int:
    """The syslog priority of a log level; unknown levels are notices (5). Pure."""
    return JOURNAL_PRIORITIES.get(level.lower(), 5)


def under_journald(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal's own stream: systemd sets ``JOURNAL_STREAM`` to its
    ``device:inode``, and a stream redirected elsewhere (a child's, a pipe) must not be prefixed."""
    dev, _, ino = (os.environ if env is None else env).get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class _JournalPrefix:
    """Wraps the final renderer: ``<3>{...}`` so that ``journalctl -p err`` finds errors."""

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = str(event.get("level", method))
        return f"<{journal_priority(level)}>{self.renderer(logger, method, event)}"


def drop_output(stream: TextIO) -> None:
    """Point ``stream``'s file descriptor at /dev/null: once its reader has gone (a closed pipe), what
    is written later, and what its buffer still holds, goes nowhere instead of raising BrokenPipeError."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def no_color(env: Mapping[str, str] | None = None) -> bool:
    """True when ``NO_COLOR`` is set and not empty (no-color.org): then no ANSI escape at all. Pure."""
    return bool((os.environ if env is None else env).get("NO_COLOR"))


def clear_line(columns: int, *, plain: bool) -> str:
    """What erases the terminal's current line and returns to its start: ``\r`` + erase-line, or,
    with ``plain`` (NO_COLOR), blanks over the whole width. Pure."""
    return "\r" + " " * max(columns - 1, 0) + "\r" if plain else "\r\x1b[K"


def fit_line(text: str, columns: int) -> str:
    """``text`` cut to ``columns - 1`` characters: a line as wide as the terminal would wrap (and a
    ``\r`` then returns to the second row, leaving the first behind). Pure."""
    room = max(columns - 1, 1)
    return text if len(text) <= room else text[: room - 1] + "…"


class StatusLine:
    """The one live line of a terminal (the progress of ``once``). A log line written to the same stream
    clears it first, so that a log line never runs into it; the next progress tick draws it again."""

    def __init__(self) -> None:
        self._stream: TextIO | None = None
        self._clear = ""

    def show(self, stream: TextIO, text: str) -> None:
        """Draw ``text`` as the live line of ``stream``, fitted to the terminal's width now."""
        columns = shutil.get_terminal_size().columns
        self._clear = clear_line(columns, plain=no_color())
        stream.write(self._clear + fit_line(text, columns))
        stream.flush()
        self._stream = stream

    def end(self, stream: TextIO) -> None:
        """Keep the live line as the last word (a newline after it): nothing clears it any more."""
        if self._stream is stream:
            stream.write("\n")
            stream.flush()
        self._stream = None

    def clear_for(self, stream: Any) -> None:
        """Before a log line goes to ``stream``: erase the live line if it is on that stream."""
        if self._stream is not None and self._stream is stream:
            self._stream = None
            with contextlib.suppress(OSError, ValueError):
                stream.write(self._clear)


STATUS_LINE = StatusLine()


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's fast writer, carrying the name given to ``get_logger`` for the ``logger`` field.

    A log nobody reads any more (``once 2>&1 | head -1``) is dropped, never an error: a log line
    must not stop the archiving."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name

    def msg(self, message: str) -> None:
        try:
            STATUS_LINE.clear_for(self._file)
            super().msg(message)
        except BrokenPipeError:
            drop_output(self._file)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _PipeSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's records (aiohttp's, asyncio's), dropped like ours once nobody reads them."""

    def emit(self, record: logging.LogRecord) -> None:
        STATUS_LINE.clear_for(self.stream)
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            drop_output(self.stream)
            return
        super().handleError(record)


class _NamedWriteLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "daemon")


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Plain traceback text: no local variables, which could hold secrets.
        structlog.processors.format_exc_info,
        truncate_exception,
        stringify_ids,
        redact_processor,
    ]


_handler: logging.Handler | None = None  # ours on the root logger, replaced by each configure_logging
_debug = False  # logging.level is debug: set where the level is set, read on hot paths


def debug_enabled() -> bool:
    """True when debug events are written. Hot paths test this before building a debug event's fields,
    so that debug costs one call when it is off (structlog would drop the event, after its arguments
    were built)."""
    return _debug


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure logging once, at the edge. ``fmt``: auto | json | console.

    structlog's events and the standard library's records (aiohttp's, asyncio's) go through the same
    processors (redaction included) and renderer: with JSON, every line is one JSON object. Under
    journald each line starts with its syslog priority."""
    global _handler, _debug
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty() and not no_color(), exception_formatter=structlog.dev.plain_traceback,
        )
    if under_journald(stream):
        renderer = _JournalPrefix(renderer)
    numeric = logging.getLevelName(shifted_level(level, _level_shift).upper())
    _debug = numeric <= logging.DEBUG
    structlog.configure(
        processors=[*_shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_NamedWriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = _PipeSafeHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(numeric)
    _quiet_libraries()
    _handler = handler


# Libraries whose debug output is wire-level (botocore logs request headers, signatures and bodies):
# never below warning, whatever logging.level says. Our own debug events say what matters, redacted.
QUIET_LOGGERS = ("botocore", "aiobotocore", "urllib3", "s3transfer", "asyncio")


def _quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def reset_logging() -> None:
    """Undo ``configure_logging`` (tests configure it many times in one process)."""
    global _handler, _level_shift, _debug
    _debug = False
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    _level_shift = 0
    structlog.reset_defaults()


LEVELS = ("debug", "info", "warning", "error", "critical")
_level_shift = 0   # the command line's -v/-q, kept across a SIGHUP that re-reads logging.level


def shifted_level(level: str, shift: int) -> str:
    """``level`` made ``shift`` steps more verbose (-v: +1) or quieter (-q: -1), within LEVELS. Pure."""
    index = LEVELS.index(level.lower()) - shift
    return LEVELS[max(0, min(len(LEVELS) - 1, index))]


def set_level_shift(shift: int) -> None:
    """The command line's -v/-q count, applied to every level configured from now on."""
    global _level_shift
    _level_shift = shift


def set_level(level: str) -> None:
    """Change the level of later log events (SIGHUP), keeping everything else as configured."""
    global _debug
    numeric = logging.getLevelName(shifted_level(level, _level_shift).upper())
    _debug = numeric <= logging.DEBUG
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(numeric))
    logging.getLogger().setLevel(numeric)
    _quiet_libraries()
