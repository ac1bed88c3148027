"""Configuration: YAML to frozen, typed dataclasses, validated in full before any other I/O."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shlex
import stat
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from daemon.archive import MARKER_DIR
from daemon.errors import ConfigError
from daemon.eventloop import EVENT_LOOPS, EventLoopChoice
from daemon.overrides import Verbatim, apply_overrides, name_variables, parse_overrides

DEFAULT_CONFIG_PATH = Path("/etc/yeastar-archiver/config.yaml")
CONFIG_ENV = "YEASTAR_ARCHIVER_CONFIG"
DEFAULT_LAYOUT = "{year}/{month}/{day}/{file}"
LAYOUT_FIELDS = frozenset({"file", "stem", "ext", "id", "year", "month", "day", "call_type", "pbx_sn"})
MAX_WORKERS = 64
MAX_PREFETCH_URLS = 64
# Keys whose values are never echoed in a problem: they are credentials. URLs are echoed only when
# they carry no user:password@ and no query (webhook URLs of chat services are credentials too).
SECRET_KEYS = frozenset({"client_secret", "secret_access_key", "access_key_id", "password", "token", "url"})
URL_KEYS = frozenset({"base_url", "endpoint_url"})

RecordingFormat = Literal["auto", "wav", "mp3"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


class Secret:
    """A secret string that never shows itself in a repr, a log or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TlsConfig:
    verify: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True)
class PbxConfig:
    base_url: str
    client_id: str
    client_secret: Secret
    api_path: str = "openapi/v1.0"
    client_secret_file: Path | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    recording_format: RecordingFormat = "auto"
    requests_per_second: float = 5.0
    timeout_s: float = 30.0
    user_agent: str = "OpenAPI"
    token_refresh_margin_s: float = 120.0
    token_limit_backoff_s: float = 600.0
    auth_retry_interval_s: float = 900.0

    @property
    def api_base(self) -> str:
        """``{base_url}/{api_path}`` with exactly one slash between them."""
        return f"{self.base_url}/{self.api_path}" if self.api_path else self.base_url


@dataclass(frozen=True)
class DiscoverConfig:
    enabled: bool = False
    interval_s: float = 300.0
    page_size: int = 100
    since_id: int | None = None
    since_date: str | None = None          # YYYY-MM-DD, compared with the file name's date prefix
    overlap_ids: int = 100
    sweep_interval_s: float = 86400.0
    events: bool = False
    heartbeat_s: float = 30.0
    call_types: tuple[str, ...] = ()
    min_duration_s: int = 0


@dataclass(frozen=True)
class SourcesConfig:
    ids: tuple[int, ...] = ()
    queue_file: Path | None = None
    queue_poll_interval_s: float = 1.0
    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    missing_grace_s: float = 600.0


@dataclass(frozen=True)
class S3Config:
    """An off-box copy in an S3-compatible bucket (``archive.s3``)."""

    bucket: str
    access_key_id: str
    secret_access_key: Secret
    endpoint_url: str | None = None
    region: str = "us-east-1"
    prefix: str = ""
    secret_access_key_file: Path | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    tls: TlsConfig = field(default_factory=TlsConfig)
    part_size_bytes: int = 16 * 1024 * 1024
    workers: int = 4
    timeout_s: float = 60.0


@dataclass(frozen=True)
class ArchiveConfig:
    dir: Path
    layout: str = DEFAULT_LAYOUT
    sidecar: bool = True
    min_free_bytes: int = 256 * 1024 * 1024
    keep_local: bool = True
    s3: S3Config | None = None


@dataclass(frozen=True)
class VerifyConfig:
    """``run``'s slow background walk over the archive (``verify``)."""

    interval_s: float = 0.0             # 0: never in the background; `verify` on demand only
    max_bytes_per_second: int = 20 * 1024 * 1024


@dataclass(frozen=True)
class StateConfig:
    path: Path


@dataclass(frozen=True)
class DownloadsConfig:
    workers: int = 4
    max_attempts: int = 8
    read_timeout_s: float = 60.0
    min_bytes_per_second: int = 1024
    throughput_window_s: float = 30.0
    checkpoint_bytes: int = 8 * 1024 * 1024
    url_refresh_margin_s: float = 120.0
    url_lifetime_s: float = 1800.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 600.0
    pause_max_s: float = 300.0
    once_give_up_s: float = 900.0
    prefetch_urls: int = 32


@dataclass(frozen=True)
class ServiceConfig:
    listen: str | None = "127.0.0.1:9464"
    shutdown_grace_s: float = 20.0
    pbx_probe_interval_s: float = 30.0
    event_loop: EventLoopChoice = "auto"   # daemon.eventloop


@dataclass(frozen=True)
class NotifyConfig:
    url: str | None = None
    timeout_s: float = 10.0
    pbx_down_after_s: float = 600.0
    summary_interval_s: float = 86400.0


@dataclass(frozen=True)
class HooksConfig:
    """Commands run for events of the archive (``hooks``); empty: none."""

    on_archived: tuple[str, ...] = ()   # argv, no shell; a string in the file is split like a shell would
    max_concurrent: int = 2
    timeout_s: float = 60.0
    max_queued: int = 100               # hook runs waiting for a slot; beyond this one is dropped (logged)


@dataclass(frozen=True)
class LoggingConfig:
    format: LogFormat = "auto"
    level: LogLevel = "info"


@dataclass(frozen=True)
class Config:
    pbx: PbxConfig
    sources: SourcesConfig
    archive: ArchiveConfig
    state: StateConfig
    downloads: DownloadsConfig
    service: ServiceConfig
    logging: LoggingConfig
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    source_path: Path | None = None
    warnings: tuple[str, ...] = ()


_MISSING: Any = object()
_REPORTED: Any = object()  # a value already reported as a problem (an unset ${VAR})
T = TypeVar("T")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Reader:
    """Walks one mapping of the YAML, collecting every problem instead of stopping at the first."""

    def __init__(self, data: Any, path: str, problems: list[str], base_dir: Path) -> None:
        self.path = path
        self.problems = problems
        self.base_dir = base_dir
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem(path, data, "must be a mapping")
            data = {}
        self.data: dict[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, key: str, value: Any, why: str) -> None:
        name = key.rsplit(".", 1)[-1]
        secret = name in SECRET_KEYS or (name in URL_KEYS and any(c in str(value) for c in "@?"))
        shown = "" if value is _MISSING else " (value not shown: it may be a credential)" if secret \
            else f" (got {value!r})"
        self.problems.append(f"{key or '<top level>'}: {why}{shown}")

    def raw(self, name: str) -> Any:
        self.seen.add(name)
        value = self.data.get(name, _MISSING)
        if isinstance(value, str) and not isinstance(value, Verbatim):
            value = self._expand(name, value)
        return value

    def _expand(self, name: str, value: str) -> Any:
        unset = [var for var in _VAR.findall(value) if var not in os.environ]
        for var in unset:
            # In a secret, even the name after `$` may be a piece of the secret: not shown.
            self.problem(self.key(name), _MISSING, "names an environment variable that is not set (name not shown)"
                         if name in SECRET_KEYS else f"environment variable ${{{var}}} is not set")
        if unset:
            return _REPORTED
        return _VAR.sub(lambda m: os.environ[m.group(1)], value)

    def section(self, name: str) -> _Reader:
        value = self.raw(name)
        return _Reader(None if value is _MISSING else value, self.key(name), self.problems, self.base_dir)

    def get(self, name: str, kind: Callable[[Any], T], default: T, why: str,
            check: Callable[[T], bool] = lambda _v: True) -> T:
        """The value of ``name`` converted by ``kind``, or ``default``; ``why`` explains a bad value."""
        value = self.raw(name)
        if value is _REPORTED:
            return default
        if value is _MISSING:
            if default is _MISSING:
                self.problem(self.key(name), _MISSING, f"is required; {why}")
            return default
        try:
            converted = kind(value)
        except (TypeError, ValueError):
            self.problem(self.key(name), value, why)
            return default
        if not check(converted):
            self.problem(self.key(name), value, why)
            return default
        return converted

    def path_value(self, name: str, default: Path | None, why: str) -> Path | None:
        value = self.raw(name)
        if value is _REPORTED:
            return None if default is _MISSING else default
        if value is _MISSING or value is None:
            if default is _MISSING:
                self.problem(self.key(name), _MISSING, f"is required; {why}")
                return None
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(self.key(name), value, why)
            return default
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def finish(self) -> None:
        for name in self.data:
            if name not in self.seen:
                self.problem(self.key(str(name)), _MISSING, "unknown key (check the spelling)")


def positive(value: float) -> bool:
    return value > 0


def non_negative(value: float) -> bool:
    return value >= 0


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError
    return int(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError
        return value.lower()
    return convert


def _ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise TypeError
    out = []
    for item in value:
        if isinstance(item, bool):
            raise TypeError
        n = int(item)
        if n <= 0:
            raise ValueError
        out.append(n)
    return tuple(out)


def _base_url(value: Any) -> str:
    url = _text(value).strip().rstrip("/")
    parts = urlsplit(url)
    # user:pass@ would be sent to the PBX on every request and shown wherever the URL is.
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.username is not None or parts.password is not None:
        raise ValueError
    return url


def _webhook_url(value: Any) -> str | None:
    if value is None:
        return None
    url = _text(value).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError
    return url


def _listen(value: Any) -> str | None:
    if value is None:
        return None
    host, sep, port = _text(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError
    return f"{host}:{port}"


def _layout(value: Any) -> str:
    text = _text(value)
    names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    if "{" not in text or not names or any(n not in LAYOUT_FIELDS for n in names):
        raise ValueError
    if text.startswith("/") or ".." in text.split("/"):
        raise ValueError
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if parts and parts[0] == MARKER_DIR:
        raise ValueError   # the archiver's own folder: what is there is not kept (the hooks' names)
    return text


def _since(value: Any) -> int | str | None:
    """A recording id (int > 0), a date YYYY-MM-DD, or null for everything."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        if value <= 0:
            raise ValueError
        return value
    if isinstance(value, dt.date):
        return value.isoformat()
    text = _text(value).strip()
    dt.date.fromisoformat(text)
    return text


def _argv(value: Any) -> tuple[str, ...]:
    """A command: a list of strings, or a string split by shell rules (no shell ever runs it)."""
    if value is None:
        return ()
    if isinstance(value, str):
        argv = shlex.split(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        argv = list(value)
    else:
        raise TypeError
    if not argv or not argv[0].strip():
        raise ValueError
    return tuple(argv)


def _call_types(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError
    allowed = {"inbound": "Inbound", "outbound": "Outbound", "internal": "Internal"}
    if any(str(v).lower() not in allowed for v in value):
        raise ValueError  # reported with the key path, like every other bad value
    return tuple(allowed[str(v).lower()] for v in value)


def _discover(d: _Reader) -> DiscoverConfig:
    no_since: int | str | None = None
    since = d.get("since", _since, no_since, "a recording id such as 1700, or a date such as 2024-01-31")
    cfg = DiscoverConfig(
        enabled=d.get("enabled", _bool, False, "true or false"),
        interval_s=d.get("interval_s", _number, 300.0, "seconds >= 1", check=lambda v: v >= 1),
        page_size=d.get("page_size", _int, 100, "an integer from 1 to 1000", check=lambda v: 1 <= v <= 1000),
        since_id=since if isinstance(since, int) else None,
        since_date=since if isinstance(since, str) else None,
        overlap_ids=d.get("overlap_ids", _int, 100, "an integer >= 0", check=non_negative),
        sweep_interval_s=d.get("sweep_interval_s", _number, 86400.0, "seconds >= 60", check=lambda v: v >= 60),
        events=d.get("events", _bool, False, "true or false"),
        heartbeat_s=d.get("heartbeat_s", _number, 30.0, "seconds from 1 to 55 (the PBX wants one within 60 s)",
                          check=lambda v: 1 <= v <= 55),
        call_types=d.get("call_types", _call_types, (), "a list of Inbound, Outbound, Internal"),
        min_duration_s=d.get("min_duration_s", _int, 0, "seconds >= 0", check=non_negative),
    )
    d.finish()
    return cfg


def _s3(arc: _Reader, problems: list[str], warnings: list[str]) -> S3Config | None:
    """``archive.s3``, every problem collected."""
    d = arc.section("s3")
    bucket = d.get("bucket", _text, _MISSING, "the bucket name", check=lambda v: 3 <= len(v.strip()) <= 63)
    endpoint = d.get("endpoint_url", _endpoint_url, None, "an http:// or https:// URL without user:password@, "
                     "or null for AWS")
    region = d.get("region", _text, "us-east-1", "a region name such as us-east-1", check=lambda v: bool(v.strip()))
    prefix = d.get("prefix", _text, "", "a key prefix such as recordings/ (no leading /)",
                   check=lambda v: not v.startswith("/") and ".." not in v.split("/"))
    if prefix and not prefix.endswith("/"):
        prefix += "/"    # a folder, as an operator means it: "pbx1" must not make keys "pbx12022/..."
    key_id = d.get("access_key_id", _text, _MISSING, "the access key id", check=lambda v: bool(v.strip()))
    has_secret = d.data.get("secret_access_key") is not None
    has_file = d.data.get("secret_access_key_file") is not None
    secret, secret_file = "", None
    if has_secret == has_file:
        d.problem(d.key("secret_access_key"), _MISSING,
                  "set exactly one of secret_access_key and secret_access_key_file")
        d.raw("secret_access_key")
        d.raw("secret_access_key_file")
    elif has_secret:
        secret = d.get("secret_access_key", _text, "", "the secret access key as a string",
                       check=lambda v: bool(v.strip()))
        d.raw("secret_access_key_file")
    else:
        d.raw("secret_access_key")
        secret_file = d.path_value("secret_access_key_file", None, "a path to a file holding the secret access key")
    style = d.get("addressing_style", _choice("auto", "path", "virtual"), "auto", "one of auto, path, virtual")
    tls = d.section("tls")
    verify = tls.get("verify", _bool, True, "true or false")
    ca_file = tls.path_value("ca_file", None, "a path to a PEM bundle that signs the endpoint's certificate")
    tls.finish()
    if ca_file is not None and not ca_file.is_file():
        problems.append(f"archive.s3.tls.ca_file: no such file ({str(ca_file)!r})")
    if not verify:
        warnings.append("archive.s3.tls.verify is false: the S3 endpoint's certificate is NOT checked")
    part = d.get("part_size_bytes", _int, 16 * 1024 * 1024, "bytes from 5 MiB to 5 GiB",
                 check=lambda v: 5 * 1024 * 1024 <= v <= 5 * 1024**3)
    workers = d.get("workers", _int, 4, "an integer from 1 to 32", check=lambda v: 1 <= v <= 32)
    timeout = d.get("timeout_s", _number, 60.0, "seconds > 0", check=positive)
    d.finish()
    if secret_file is not None:
        secret = read_secret_file(secret_file, "archive.s3.secret_access_key_file", problems, warnings)
    import importlib.util
    if importlib.util.find_spec("aiobotocore") is None:
        problems.append("archive.s3: the S3 client is not installed: pip install 'yeastar-archiver[s3]'")
    if bucket is _MISSING or key_id is _MISSING:
        return None
    return S3Config(bucket=bucket.strip(), access_key_id=key_id.strip(), secret_access_key=Secret(secret.strip()),
                    endpoint_url=endpoint, region=region.strip(), prefix=prefix, secret_access_key_file=secret_file,
                    addressing_style=cast(Literal["auto", "path", "virtual"], style),
                    tls=TlsConfig(verify=verify, ca_file=ca_file), part_size_bytes=part, workers=workers,
                    timeout_s=timeout)


def _endpoint_url(value: Any) -> str | None:
    if value is None:
        return None
    return _base_url(value)


def read_secret_file(path: Path, key: str, problems: list[str], warnings: list[str]) -> str:
    """The secret in ``path``, stripped of surrounding whitespace; problems are appended, not raised."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{key}: cannot read the secret file {str(path)!r}: {exc.strerror or exc}")
        return ""
    if st.st_mode & stat.S_IRWXO:
        problems.append(f"{key}: {str(path)!r} is readable by any user (mode {stat.S_IMODE(st.st_mode):04o}); "
                        "run: chmod 600 on it (or 640, owned by the service's group)")
    elif st.st_mode & stat.S_IRWXG:
        warnings.append(
            f"{key}: {str(path)!r} is readable by its group (mode {stat.S_IMODE(st.st_mode):04o}); "
            "prefer chmod 600 on it"
        )
    if not text:
        problems.append(f"{key}: the secret file {str(path)!r} is empty")
    return text


def default_state_path(archive_dir: Path, state_directory: str | None) -> Path:
    """``state.path`` when the config leaves it out. Pure.

    Under systemd, ``$STATE_DIRECTORY`` (set from ``StateDirectory=``, colon-separated when it names
    several) is the folder the unit gave the service for it: the first one, outside the archive, so
    that an unmounted archive disk is recognised. Elsewhere, inside ``archive.dir``."""
    first = (state_directory or "").split(":", 1)[0]
    if first and Path(first).is_absolute():
        return Path(first) / "ledger.db"
    return archive_dir / ".yeastar-archiver" / "ledger.db"


def parse_config(data: Any, *, base_dir: Path, source_path: Path | None = None) -> Config:
    """Validate a parsed YAML document. Raises ``ConfigError`` listing every problem at once."""
    problems: list[str] = []
    warnings: list[str] = []
    top = _Reader(data, "", problems, base_dir)

    pbx = top.section("pbx")
    base_url = pbx.get("base_url", _base_url, _MISSING,
                       "an http:// or https:// URL such as https://192.168.5.150:8088, "
                       "without user:password@, a query or a fragment")
    api_path = pbx.get("api_path", _text, "openapi/v1.0", "a path such as openapi/v1.0").strip("/")
    client_id = pbx.get("client_id", _text, _MISSING, "the Client ID from the PBX portal (Integrations > API)",
                        check=lambda v: bool(v.strip()))
    has_secret = pbx.data.get("client_secret") is not None
    has_file = pbx.data.get("client_secret_file") is not None
    secret_value = ""
    secret_file = None
    if has_secret and has_file:
        pbx.problem(pbx.key("client_secret"), _MISSING, "set exactly one of client_secret and client_secret_file")
        pbx.raw("client_secret")
        pbx.raw("client_secret_file")
    elif not has_secret and not has_file:
        pbx.problem(pbx.key("client_secret"), _MISSING,
                    "is required: set client_secret, or client_secret_file to a file holding it")
        pbx.raw("client_secret")
        pbx.raw("client_secret_file")
    elif has_secret:
        secret_value = pbx.get("client_secret", _text, "", "the Client Secret as a string",
                               check=lambda v: bool(v.strip()))
        pbx.raw("client_secret_file")
    else:
        pbx.raw("client_secret")
        secret_file = pbx.path_value("client_secret_file", None, "a path to a file holding the Client Secret")

    tls = pbx.section("tls")
    verify = tls.get("verify", _bool, True, "true or false")
    ca_file = tls.path_value("ca_file", None, "a path to a PEM bundle that signs the PBX certificate")
    tls.finish()
    if ca_file is not None and not ca_file.is_file():
        problems.append(f"pbx.tls.ca_file: no such file ({str(ca_file)!r})")
    if not verify:
        warnings.append("pbx.tls.verify is false: the PBX certificate is NOT checked; set pbx.tls.ca_file instead")

    recording_format = cast(RecordingFormat, pbx.get("recording_format", _choice("auto", "wav", "mp3"), "auto",
                                                     "one of auto, wav, mp3"))
    requests_per_second = pbx.get("requests_per_second", _number, 5.0, "a number of requests per second > 0",
                                  check=positive)
    timeout_s = pbx.get("timeout_s", _number, 30.0, "seconds > 0", check=positive)
    user_agent = pbx.get("user_agent", _text, "OpenAPI", "a non-empty User-Agent (the PBX requires one)",
                         check=lambda v: bool(v.strip()))
    token_refresh_margin_s = pbx.get("token_refresh_margin_s", _number, 120.0, "seconds >= 0", check=non_negative)
    token_limit_backoff_s = pbx.get("token_limit_backoff_s", _number, 600.0, "seconds > 0", check=positive)
    auth_retry_interval_s = pbx.get("auth_retry_interval_s", _number, 900.0, "seconds >= 60",
                                    check=lambda v: v >= 60)
    pbx.finish()

    src = top.section("sources")
    no_ids: tuple[int, ...] = ()
    ids = src.get("ids", _ids, no_ids, "a list of positive recording ids such as [1727, 1728]")
    queue_file = src.path_value("queue_file", None, "a path to the queue file")
    queue_poll = src.get("queue_poll_interval_s", _number, 1.0, "seconds > 0", check=positive)
    missing_grace = src.get("missing_grace_s", _number, 600.0, "seconds >= 0", check=non_negative)
    discover = _discover(src.section("discover"))
    src.finish()

    arc = top.section("archive")
    archive_dir = arc.path_value("dir", _MISSING, "the folder the recordings are archived in")
    layout = arc.get("layout", _layout, DEFAULT_LAYOUT,
                     "a relative path template using only {file} {stem} {ext} {id} {year} {month} {day} {call_type} "
                     "{pbx_sn}, outside .yeastar-archiver/")
    sidecar = arc.get("sidecar", _bool, True, "true or false")
    min_free = arc.get("min_free_bytes", _int, 256 * 1024 * 1024, "bytes >= 0", check=non_negative)
    keep_local = arc.get("keep_local", _bool, True, "true or false")
    s3 = _s3(arc, problems, warnings) if arc.data.get("s3") is not None else None
    if arc.data.get("s3") is None:
        arc.raw("s3")
    if not keep_local and s3 is None:
        problems.append("archive.keep_local: false needs archive.s3 (the copy that stays)")
    arc.finish()

    st = top.section("state")
    state_path = st.path_value("path", None, "a path to the ledger database file")
    st.finish()
    if state_path is None and archive_dir is not None:
        state_path = default_state_path(archive_dir, os.environ.get("STATE_DIRECTORY"))

    dl = top.section("downloads")
    downloads = DownloadsConfig(
        workers=dl.get("workers", _int, 4, f"an integer from 1 to {MAX_WORKERS}",
                       check=lambda v: 1 <= v <= MAX_WORKERS),
        max_attempts=dl.get("max_attempts", _int, 8, "an integer >= 1", check=positive),
        read_timeout_s=dl.get("read_timeout_s", _number, 60.0, "seconds > 0", check=positive),
        min_bytes_per_second=dl.get("min_bytes_per_second", _int, 1024, "bytes per second >= 0",
                                    check=non_negative),
        throughput_window_s=dl.get("throughput_window_s", _number, 30.0, "seconds > 0", check=positive),
        checkpoint_bytes=dl.get("checkpoint_bytes", _int, 8 * 1024 * 1024, "bytes >= 65536",
                                check=lambda v: v >= 65536),
        url_refresh_margin_s=dl.get("url_refresh_margin_s", _number, 120.0, "seconds >= 0", check=non_negative),
        url_lifetime_s=dl.get("url_lifetime_s", _number, 1800.0, "seconds > 0", check=positive),
        backoff_base_s=dl.get("backoff_base_s", _number, 2.0, "seconds > 0", check=positive),
        backoff_max_s=dl.get("backoff_max_s", _number, 600.0, "seconds > 0", check=positive),
        pause_max_s=dl.get("pause_max_s", _number, 300.0, "seconds > 0", check=positive),
        once_give_up_s=dl.get("once_give_up_s", _number, 900.0, "seconds > 0", check=positive),
        prefetch_urls=dl.get("prefetch_urls", _int, 32, f"an integer from 0 to {MAX_PREFETCH_URLS}",
                              check=lambda v: 0 <= v <= MAX_PREFETCH_URLS),
    )
    dl.finish()

    sv = top.section("service")
    default_listen: str | None = "127.0.0.1:9464"
    service = ServiceConfig(
        listen=sv.get("listen", _listen, default_listen, "host:port such as 127.0.0.1:9464, or null to disable"),
        shutdown_grace_s=sv.get("shutdown_grace_s", _number, 20.0, "seconds >= 0", check=non_negative),
        pbx_probe_interval_s=sv.get("pbx_probe_interval_s", _number, 30.0, "seconds > 0", check=positive),
        event_loop=cast(EventLoopChoice, sv.get("event_loop", _choice(*EVENT_LOOPS), "auto",
                                                "one of " + ", ".join(EVENT_LOOPS))),
    )
    sv.finish()

    nt = top.section("notify")
    no_url: str | None = None
    notify = NotifyConfig(
        url=nt.get("url", _webhook_url, no_url, "an http:// or https:// URL, or null"),
        timeout_s=nt.get("timeout_s", _number, 10.0, "seconds > 0", check=positive),
        pbx_down_after_s=nt.get("pbx_down_after_s", _number, 600.0, "seconds >= 0", check=non_negative),
        summary_interval_s=nt.get("summary_interval_s", _number, 86400.0, "seconds >= 1, or 0 for none",
                                  check=lambda v: v == 0 or v >= 1),
    )
    nt.finish()

    vf = top.section("verify")
    verify_cfg = VerifyConfig(
        interval_s=vf.get("interval_s", _number, 0.0, "seconds >= 60 between background walks, or 0 for none",
                          check=lambda v: v == 0 or v >= 60),
        max_bytes_per_second=vf.get("max_bytes_per_second", _int, 20 * 1024 * 1024,
                                    "bytes per second > 0 (the background walk's read rate)", check=positive),
    )
    vf.finish()

    hk = top.section("hooks")
    no_command: tuple[str, ...] = ()
    hooks_cfg = HooksConfig(
        on_archived=hk.get("on_archived", _argv, no_command,
                           "a command as a list such as [/usr/local/bin/transcribe, --lang, de], or one string "
                           "split like a shell would (no shell runs it), or null"),
        max_concurrent=hk.get("max_concurrent", _int, 2, "an integer from 1 to 64", check=lambda v: 1 <= v <= 64),
        timeout_s=hk.get("timeout_s", _number, 60.0, "seconds > 0", check=positive),
        max_queued=hk.get("max_queued", _int, 100, "an integer from 0 to 100000",
                          check=lambda v: 0 <= v <= 100000),
    )
    hk.finish()

    lg = top.section("logging")
    logging_cfg = LoggingConfig(
        format=cast(LogFormat, lg.get("format", _choice("auto", "json", "console"), "auto",
                                      "one of auto, json, console")),
        level=cast(LogLevel, lg.get("level", _choice("debug", "info", "warning", "error"), "info",
                                    "one of debug, info, warning, error")),
    )
    lg.finish()
    top.finish()

    if secret_file is not None:
        secret_value = read_secret_file(secret_file, "pbx.client_secret_file", problems, warnings)

    if problems:
        raise ConfigError(problems)
    # Both are set whenever no problem was found.
    assert archive_dir is not None
    assert state_path is not None
    return Config(
        pbx=PbxConfig(
            base_url=base_url, api_path=api_path, client_id=client_id.strip(),
            client_secret=Secret(secret_value.strip()), client_secret_file=secret_file,
            tls=TlsConfig(verify=verify, ca_file=ca_file), recording_format=recording_format,
            requests_per_second=requests_per_second, timeout_s=timeout_s, user_agent=user_agent,
            token_refresh_margin_s=token_refresh_margin_s, token_limit_backoff_s=token_limit_backoff_s,
            auth_retry_interval_s=auth_retry_interval_s,
        ),
        sources=SourcesConfig(ids=ids, queue_file=queue_file, queue_poll_interval_s=queue_poll, discover=discover,
                              missing_grace_s=missing_grace),
        archive=ArchiveConfig(dir=archive_dir, layout=layout, sidecar=sidecar, min_free_bytes=min_free,
                              keep_local=keep_local, s3=s3),
        state=StateConfig(path=state_path),
        downloads=downloads,
        service=service,
        logging=logging_cfg,
        notify=notify,
        verify=verify_cfg,
        hooks=hooks_cfg,
        source_path=source_path,
        warnings=tuple(warnings),
    )


def config_path(cli_value: str | None) -> Path:
    """Where the config comes from: ``-c``, else ``$YEASTAR_ARCHIVER_CONFIG``, else the system path."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read the config file at ``path``, lay the environment's overrides over it (``environ``, else
    ``os.environ``; see daemon/overrides.py) and validate the result. Raises ``ConfigError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"config file {str(path)!r}: cannot read it: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"config file {str(path)!r}: not valid YAML{where}"]) from exc
    overrides, problems = parse_overrides(os.environ if environ is None else environ)
    data, placing = apply_overrides(data, overrides)
    problems += placing
    try:
        cfg = parse_config(data, base_dir=path.resolve().parent, source_path=path)
    except ConfigError as exc:
        raise ConfigError(problems + name_variables(exc.problems, overrides)) from exc
    if problems:
        raise ConfigError(problems)
    return cfg


# What SIGHUP can change in a running daemon; any other change needs a restart.
LIVE_KEYS = frozenset({"logging.level", "sources.queue_file", "sources.queue_poll_interval_s", "downloads.workers",
                       "pbx.requests_per_second"})


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted key paths whose values differ between two configs. Pure."""
    if not dataclasses.is_dataclass(old) or not dataclasses.is_dataclass(new):
        return [] if old == new else [prefix]
    out = []
    for f in dataclasses.fields(old):
        if f.name in ("source_path", "warnings"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        out += changed_keys(getattr(old, f.name), getattr(new, f.name), key)
    return out


def with_keys(old: Any, new: Any, keys: list[str]) -> Any:
    """``old`` with the values at the dotted ``keys`` taken from ``new`` (what a reload applied). Pure."""
    for key in keys:
        head, _, rest = key.partition(".")
        value = getattr(new, head) if not rest else with_keys(getattr(old, head), getattr(new, head), [rest])
        old = dataclasses.replace(old, **{head: value})
    return old
