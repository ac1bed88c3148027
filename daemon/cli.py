"""The command line: parses arguments, configures logging, owns signals, maps errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

from daemon.config import Config, config_path, load_config
from daemon.errors import (
    EXIT_AUTH,
    EXIT_BROKEN_PIPE,
    EXIT_CONFIG,
    EXIT_FAILED_ITEMS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    ArchiverError,
    ConfigError,
    FatalAuthError,
    PbxConfigError,
    StorageError,
    TlsError,
    WrongArchiveError,
)
from daemon.eventloop import EventLoopChoice
from daemon.simoptions import SimOptions

# Every command pays for what this module imports, and a container HEALTHCHECK runs `health` every
# 30 s: asyncio, structlog, aiohttp, the ledger, the runner and the simulator are imported inside
# the commands that use them (bench/startup.py measures it).
if TYPE_CHECKING:
    import asyncio

    from structlog.typing import FilteringBoundLogger

    from daemon.ledger import LedgerDb, Ref
    from daemon.live import Pipeline
    from daemon.runner import ProgressHook, RunResult


def _err(*text: object) -> None:
    """A line for the operator on stderr; dropped, never an error, once nobody reads stderr (a closed
    pipe): the command's work and its exit code stand."""
    try:
        print(*text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        from daemon.logs import drop_output  # only then: `health` must not pay for structlog
        drop_output(sys.stderr)


def _log() -> FilteringBoundLogger:
    import structlog
    logger: FilteringBoundLogger = structlog.get_logger("daemon.cli")
    return logger


class _VersionAction(argparse.Action):
    """``--version``, reading the distribution's metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from daemon import __version__
        print(f"{parser.prog} {__version__}")
        parser.exit()


HEALTH_TIMEOUT_S = 5.0


def _add_config_arg(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before or after the subcommand; the subcommand's copy must not erase the top one.
    parser.add_argument("-c", "--config", metavar="FILE", default=None if top else argparse.SUPPRESS,
                        help="config file (else $YEASTAR_ARCHIVER_CONFIG, else /etc/yeastar-archiver/config.yaml)")


def _add_verbosity_args(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Counted separately before and after the subcommand (argparse would let the second erase the first).
    prefix = "" if top else "sub_"
    parser.add_argument("-v", "--verbose", dest=prefix + "verbose", action="count", default=0,
                        help="more log detail than logging.level says (repeatable: -vv)")
    parser.add_argument("-q", "--quiet", dest=prefix + "quiet", action="count", default=0,
                        help="less log detail than logging.level says (repeatable: -qq)")


class _DefaultsAndRawEpilog(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, and the epilog's lines as written."""


# Commands that read no config: a -c given to them would be ignored, so it is refused instead.
NO_CONFIG = ("simulate", "demo")

# Each subcommand's help epilog: its exit codes and an example, as `COMMAND --help` shows them.
EPILOGS = {
    "run": "exit codes: 0 stopped by SIGTERM/SIGINT, 1 another run/once holds the ledger or it is unusable,\n"
           "  2 invalid config (also another PBX's serial without --new-pbx),\n"
           "  6 archive.dir is not the ledger's archive (a PBX or S3 outage, refused credentials or an\n"
           "  untrusted certificate never end it: it stays up, not ready)\n"
           "example: yeastar-archiver run -c /etc/yeastar-archiver/config.yaml",
    "once": "exit codes: 0 every queued recording ended done or missing (missing ones are named), 1 any ended failed,\n"
            "  2 invalid config or no source, 3 the PBX (or S3) refused the credentials or the IP, 4 an untrusted\n"
            "  certificate or an S3 endpoint that stayed unreachable, 5 stopped before the queue was drained (a\n"
            "  signal, a PBX outage longer than downloads.once_give_up_s, discovery incomplete: run it again),\n"
            "  6 wrong archive folder\n"
            "example: yeastar-archiver once -c config.yaml",
    "status": "exit codes: 0 shown, 2 invalid config or a ledger this user may not read\n"
              "example: yeastar-archiver status --json -c config.yaml",
    "enqueue": "exit codes: 0 added (or already known), 1 the ledger is unusable, 2 a bad REF or config\n"
               "example: yeastar-archiver enqueue 1727 20240301093000-1709285400.0-2001-2002-Inbound.wav",
    "retry": "exit codes: 0 done, 1 a REF it could not act on (each named, with why) or the ledger is unusable,\n"
             "  2 a bad REF or config\n"
             "example: yeastar-archiver retry --missing 1727",
    "check": "exit codes: 0 all OK, 2 invalid config or a local check failed, 3 the PBX (or S3) refused the\n"
             "  credentials or the IP, 4 the PBX (or S3) unreachable or its certificate not trusted\n"
             "example: yeastar-archiver check -c /etc/yeastar-archiver/config.yaml",
    "verify": "exit codes: 0 every copy whole, 1 a problem found (mended where it could be), 2 invalid config,\n"
              "  6 archive.dir is not the ledger's archive\n"
              "example: yeastar-archiver verify --read-data 1727",
    "health": "exit codes: 0 the running `run` is alive, 1 it is not (or does not answer)\n"
              "example: yeastar-archiver health --url http://127.0.0.1:9464/livez",
    "simulate": "exit codes: 0 stopped by SIGTERM/SIGINT, 2 a bad option\n"
                "example: yeastar-archiver simulate --port 8088 --count 50 --http500-rate 0.05",
    "demo": "exit codes: 0 every recording archived, 1 any failed, 2 --dir exists and was not made by the demo\n"
            "example: yeastar-archiver demo --dir /tmp/yeastar-archiver-demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yeastar-archiver",
                                     description="Archive call recordings from a Yeastar P-Series PBX.")
    parser.add_argument("--version", action=_VersionAction)
    _add_config_arg(parser, top=True)
    _add_verbosity_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".",
                           epilog=EPILOGS.get(name), formatter_class=_DefaultsAndRawEpilog if name == "simulate"
                           else argparse.RawDescriptionHelpFormatter)
        if name not in NO_CONFIG:
            _add_config_arg(p, top=False)
        _add_verbosity_args(p, top=False)
        p.set_defaults(func=func)
        return p

    new_pbx = "record this PBX's serial as the ledger's (the PBX was replaced); without it a different serial is exit 2"
    command("run", cmd_run, "the daemon: archive everything queued and keep watching, until SIGTERM").add_argument(
        "--new-pbx", action="store_true", help=new_pbx)
    command("once", cmd_once, "archive everything queued now, then exit (1 if any recording failed)").add_argument(
        "--new-pbx", action="store_true", help=new_pbx)
    command("status", cmd_status, "counts and recent failures from the ledger (works while run runs)").add_argument(
        "--json", action="store_true", help="one JSON object")
    command("enqueue", cmd_enqueue, "add recordings by id or file name (idempotent)").add_argument(
        "refs", nargs="+", metavar="REF", help="a numeric id, or a file name ending .wav/.mp3")
    retry = command("retry", cmd_retry, "put failed recordings (all, or those named) back to pending")
    retry.add_argument("refs", nargs="*", metavar="REF", help="only these (ids or file names); each one it cannot "
                       "act on is named with why (unknown, already archived, missing, ...)")
    retry.add_argument("--missing", action="store_true",
                       help="missing recordings too (the PBX did not have them; they may have appeared since)")
    command("check", cmd_check, "validate the config, log in to the PBX, call one endpoint, log out").add_argument(
        "--force-login", action="store_true",
        help="log in even after 3 failed logins in a row (the PBX blocks the IP after 5 in a row)")
    verify = command("verify", cmd_verify, "re-read every archived copy (local and S3), report and mend damage")
    verify.add_argument("--json", action="store_true", help="one JSON object")
    verify.add_argument("--read-data", action="store_true", help="read S3 objects back in full (not only HEAD)")
    verify.add_argument("refs", nargs="*", metavar="REF", help="only these recordings (ids or file names)")
    find = command("find", cmd_find, "search the ledger's metadata: one line per recording")
    add_find_filters(find)
    find.add_argument("--json", action="store_true",
                      help="JSON Lines: one JSON object per line, per recording (not one list)")
    export = command("export", cmd_export, "copy matching archived recordings and their sidecars into a folder")
    export.add_argument("--to", required=True, metavar="DIR",
                        help="where to copy them (under their archive path); nothing there is overwritten")
    add_find_filters(export)
    forget = command("forget", cmd_forget, "never fetch these recordings again (--erase: and delete them)")
    forget.add_argument("refs", nargs="+", metavar="REF", help="a numeric id, or a file name ending .wav/.mp3")
    forget.add_argument("--erase", action="store_true",
                        help="also delete the archived copies and sidecars (local and S3) and the call metadata")
    forget.add_argument("--reason", metavar="TEXT", help="why, recorded in the ledger (e.g. a request's reference)")
    for p, epilog in (   # these set their own epilogs here, beside their options
        (find, "exit codes: 0 (also when nothing matches), 2 bad filter or config\n"
               "example: yeastar-archiver find --caller +4930 --since 2024-03-01 --until 2024-03-31 --json"),
        (export, "exit codes: 0 all exported, 1 any could not be (each named), 2 bad filter or config\n"
                 "example: yeastar-archiver export --to /mnt/request-17 --caller +4930 --since 2024-03-01"),
        (forget, "exit codes: 0 done, 1 a deletion failed or a run holds the ledger (run it again), 2 bad REF or "
                 "config\nexample: yeastar-archiver forget 1727 --erase --reason 'erasure request 17'"),
    ):
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = epilog
    init = command("init", cmd_init, "write a commented starting config and create the archive folder")
    init.add_argument("--dir", default=".", help="where to write config.yaml [.]")
    init.add_argument("--archive-dir", metavar="DIR",
                      help="the archive folder to create and write into the config [<--dir>/archive]")
    init.formatter_class = argparse.RawDescriptionHelpFormatter
    init.epilog = ("exit codes: 0 written, 2 the config exists already (never overwritten) or cannot be written\n"
                   "example: yeastar-archiver init --dir /etc/yeastar-archiver --archive-dir /srv/recordings")
    command("health", cmd_health, "ask a running `run` whether it is alive (exit 0) or not (exit 1)").add_argument(
        "--url", help="the /livez URL (default: from service.listen in the config)")
    add_simulator_args(command("simulate", cmd_simulate, "serve the bundled Yeastar P-Series simulator"))
    command("demo", cmd_demo, "zero-setup tour against the bundled simulator").add_argument(
        "--dir", default="yeastar-archiver-demo", help="where to write the demo config and archive")
    return parser


def add_find_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", metavar="DATE", help="recorded on or after DATE (YYYY-MM-DD)")
    p.add_argument("--until", metavar="DATE", help="recorded on or before DATE (YYYY-MM-DD)")
    p.add_argument("--caller", metavar="X", help="call_from contains X (a number or a name)")
    p.add_argument("--callee", metavar="X", help="call_to contains X (a number or a name)")
    p.add_argument("--call-type", metavar="T", help="Inbound, Outbound, Internal, ... (any case)")
    p.add_argument("--state", metavar="S", help="pending, done, failed, missing, copying, forgotten, ...")


def add_simulator_args(p: argparse.ArgumentParser) -> None:
    d = SimOptions()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8088, help="port; 0 picks a free one")
    p.add_argument("--count", type=int, default=d.count, help="number of recordings")
    p.add_argument("--first-id", type=int, default=d.first_id, help="id of the first recording")
    p.add_argument("--size-min", type=int, default=d.size_min, help="smallest recording, bytes")
    p.add_argument("--size-max", type=int, default=d.size_max, help="largest recording, bytes")
    p.add_argument("--format", choices=("wav", "mp3"), default=d.format, help="recording format")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the deterministic contents")
    p.add_argument("--client-id", default=d.client_id, help="the API client id it accepts")
    p.add_argument("--client-secret", default=d.client_secret, help="the API secret it accepts")
    p.add_argument("--token-lifetime", type=float, default=d.token_lifetime_s, help="access token lifetime, s")
    p.add_argument("--refresh-lifetime", type=float, default=d.refresh_lifetime_s, help="refresh token lifetime, s")
    p.add_argument("--url-lifetime", type=float, default=d.url_lifetime_s, help="download URL lifetime, s")
    p.add_argument("--resolve-delay", type=float, default=0.0, metavar="S",
                   help="answer recording/download S seconds after it was asked (API latency)")
    p.add_argument("--accel-redirect", metavar="PREFIX", default=None,
                   help="answer a valid file request with X-Accel-Redirect: PREFIX<file name> (for nginx in front)")
    p.add_argument("--no-range", action="store_true", help="ignore Range headers (always answer 200)")
    p.add_argument("--hostile-names", action="store_true", help="give the first recordings hostile file names")
    for name in ("http500", "errcode", "busy", "cut", "stall", "json-body", "url-expired"):
        p.add_argument(f"--{name}-rate", type=float, default=0.0, help=f"probability of the {name} fault")
    p.add_argument("--stall-s", type=float, default=d.stall_s, help="how long a stall lasts, s")
    p.add_argument("--bytes-per-second", type=int, default=0, help="pace each transfer, 0: unpaced")
    p.add_argument("--new-every", type=float, default=0.0, help="a new recording every S seconds, 0: never")
    p.add_argument("--fail-ids", type=lambda v: tuple(int(x) for x in v.split(",") if x), default=(),
                   metavar="ID,ID", help="recordings whose recording/download always answers HTTP 500")
    # What a real PBX may do (each off by default).
    p.add_argument("--page-cap", type=int, default=0, metavar="N", help="at most N items per page, whatever was asked")
    p.add_argument("--page-cap-offsets", choices=("capped", "asked"), default="capped",
                   help="with --page-cap: page numbers count capped pages, or the page_size asked")
    p.add_argument("--close-after-response", action="store_true",
                   help="one answer per TCP connection; a request on a reused connection is dropped")
    p.add_argument("--cleanup-on-list", type=int, default=0, metavar="K",
                   help="Auto Cleanup: delete the K oldest recordings after each recording/list answer")
    p.add_argument("--late", default="0:0", metavar="N:S",
                   help="the newest N recordings are not ready (absent, 60001) for S seconds after start")
    p.add_argument("--event-early", type=float, default=0.0, metavar="S",
                   help="a new recording's 30012 event comes S seconds before its file is ready")
    p.add_argument("--mp3-transcode", choices=("", "wav-name", "mp3-name"), default="",
                   help="recordings stored as wav, downloaded as mp3; recording/download tells the .wav or .mp3 name")
    p.add_argument("--mp3-busy-answer", choices=("70082", "503", "-2", "wait"), default="70082",
                   help="what a second concurrent request gets in mp3 mode")
    p.add_argument("--expired-url-answer", choices=("404", "403", "410", "60001"), default="404",
                   help="what an expired file URL answers")
    p.add_argument("--api-version-error", type=int, choices=(0, 10002, 10003), default=0,
                   help="every API call answers this errcode; 0: off")
    p.add_argument("--idle-drop", type=float, default=d.ws_idle_s, metavar="S",
                   help="drop a WebSocket whose client sent no heartbeat for S seconds")
    p.add_argument("--block-expire", type=float, default=0.0, metavar="S",
                   help="70004 carries block_expire_time S seconds ahead, and the IP block lifts then; 0: never")
    p.add_argument("--sn", default=d.sn, help="the PBX serial system/information tells")


def simulator_options(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        count=args.count, first_id=args.first_id, size_min=args.size_min, size_max=args.size_max,
        format=args.format, seed=args.seed, client_id=args.client_id, client_secret=args.client_secret,
        token_lifetime_s=args.token_lifetime, refresh_lifetime_s=args.refresh_lifetime,
        url_lifetime_s=args.url_lifetime, resolve_delay_s=args.resolve_delay, range_support=not args.no_range,
        accel_redirect=args.accel_redirect,
        hostile_names=args.hostile_names,
        http500_rate=args.http500_rate, errcode_rate=args.errcode_rate, busy_rate=args.busy_rate,
        cut_rate=args.cut_rate, stall_rate=args.stall_rate, json_body_rate=args.json_body_rate,
        url_expired_rate=args.url_expired_rate, bytes_per_second=args.bytes_per_second,
        new_every_s=args.new_every, fail_ids=args.fail_ids,
        stall_s=args.stall_s, page_cap=args.page_cap, page_cap_offsets=args.page_cap_offsets,
        close_after_response=args.close_after_response, cleanup_on_list=args.cleanup_on_list,
        late_count=int(args.late.partition(":")[0] or 0), late_s=float(args.late.partition(":")[2] or 0),
        event_early_s=args.event_early, mp3_transcode=args.mp3_transcode, mp3_busy_answer=args.mp3_busy_answer,
        expired_url_answer=args.expired_url_answer, api_version_error=args.api_version_error,
        ws_idle_s=args.idle_drop, block_expire_s=args.block_expire, sn=args.sn,
    )


def _load(args: argparse.Namespace) -> Config:
    """Load the config and configure logging from it. Raises ConfigError."""
    from daemon.logs import configure_logging
    cfg = load_config(config_path(args.config))
    configure_logging(cfg.logging.format, cfg.logging.level)
    for warning in cfg.warnings:
        _log().warning("config.warning", message=warning)
    from daemon.overrides import parse_overrides
    # Which keys the environment set, never their values (a secret may be among them).
    for override in parse_overrides(os.environ)[0]:
        _log().debug("config.override", key=override.key, variable=override.variable)
    return cfg


def _open_missing_stdio() -> None:
    """Put /dev/null on any of descriptors 0-2 the process was started without (`once 0<&-` from a
    script), and give Python its stream for it. Else the loop's own descriptors take those numbers:
    libuv (uvloop) aborts the process when it closes one of them (exit 134), and a log line for
    stderr could land in whatever file got descriptor 2."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)   # the lowest free number: this very fd
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:   # closed when Python started
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115 (for the process's life)


def _run_until_signal(main: Callable[[asyncio.Event, asyncio.Event], Coroutine[Any, Any, int]],
                      reload: Callable[[], asyncio.Event] | None = None, *,
                      event_loop: EventLoopChoice | None = None) -> int:
    """Run ``main(stop, hurry)`` with SIGTERM and SIGINT setting ``stop``: the only place signals are
    handled. A second SIGTERM/SIGINT sets ``hurry``: the grace wait for in-flight downloads ends at once
    (an operator pressing Ctrl-C twice).

    With ``reload`` (a factory, so that the event is made inside the running loop), SIGHUP sets it.
    ``event_loop``: ``service.event_loop`` for `run` and `once` (daemon.eventloop), whose choice is logged;
    None (the simulator, the demo): asyncio's own."""
    import asyncio

    from daemon.eventloop import loop_factory, pick_loop, uvloop_version
    pick = pick_loop(event_loop or "asyncio", uvloop_version() if event_loop not in (None, "asyncio") else None)
    if pick.error is not None:
        raise ConfigError([pick.error])

    async def runner() -> int:
        stop = asyncio.Event()
        hurry = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_stop_signal() -> None:
            if stop.is_set():
                hurry.set()
                _log().warning("shutdown.hurry", action="abandoning in-flight downloads now")
            stop.set()
        # SIGTERM: systemd / container stop. SIGINT: Ctrl-C. Both ask for the same graceful stop.
        handled = [signal.SIGTERM, signal.SIGINT]
        for sig in handled:
            loop.add_signal_handler(sig, on_stop_signal)
        if reload is not None:
            # SIGHUP: `systemctl reload` — re-read the config, keep running.
            loop.add_signal_handler(signal.SIGHUP, reload().set)
            handled.append(signal.SIGHUP)
        if event_loop is not None:
            # Named from the loop that runs, not from the pick: the log line cannot claim what is not so.
            running = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
            _log().info("service.event_loop", loop=running, reason=pick.reason)
        try:
            return await main(stop, hurry)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
    with asyncio.Runner(loop_factory=loop_factory(pick)) as runner_:
        return runner_.run(runner())


# ---------------------------------------------------------------- check
async def check_pbx(cfg: Config, *, force_login: bool = False) -> tuple[str, str | None]:
    """Log in, read which PBX it is, list one recording, revoke the token; returns a one-line report
    and the serial the PBX told (None when it tells none). Raises ArchiverError (LoginRefusedError,
    without contacting the PBX, after failed logins in a row)."""
    from daemon.client import PbxClient
    from daemon.clock import SystemClock
    from daemon.logins import LoginMemory, login_memory_path
    logins = LoginMemory(login_memory_path(cfg.state.path), cfg.pbx.base_url, SystemClock(), force=force_login)
    async with PbxClient(cfg.pbx, read_timeout_s=cfg.downloads.read_timeout_s, logins=logins) as client:
        info = await client.system_info()
        page = await client.check()
    who = (f"PBX serial {info.get('sn', '?')}, firmware {info.get('firmware_version', '?')}" if info
           else "the PBX does not tell its serial (no system/information)")
    sn = info.get("sn") if info else None
    return (f"logged in to {cfg.pbx.base_url} as {cfg.pbx.client_id!r}; {who}; "
            f"{page.total} recordings on the PBX; token revoked"), (str(sn) if sn is not None else None)


def cmd_check(args: argparse.Namespace) -> int:
    """The config, then what run needs on this machine (a source, archive.dir, state.path, the queue
    file, free space), then the PBX and the bucket; one line each, every check run. The exit code is
    the PBX's or the bucket's when they fail (3 and 4 are the answers scripts and systemd act on),
    else 2 when a local check failed, else 0."""
    from daemon.preflight import preflight
    try:
        cfg = _load(args)
    except ConfigError as exc:
        return _config_failed(exc)
    _print_effective_config(cfg)
    local = EXIT_OK
    for finding in preflight(cfg):
        if finding.note:
            print(f"check: note: {finding.text}")
        elif finding.ok:
            print(f"check: OK: {finding.text}")
        else:
            _err(f"check: FAILED: {finding.text}")
            local = EXIT_CONFIG
    remote, same_pbx = _check_pbx_line(cfg, force_login=args.force_login)
    if not same_pbx:
        local = EXIT_CONFIG
    if cfg.archive.s3 is not None and remote == EXIT_OK:
        remote = _check_s3(cfg)
    return remote or local


def _print_effective_config(cfg: Config) -> None:
    """What `run` would use: the file with the environment's overrides laid over it, secrets masked."""
    from daemon.effective import effective_lines
    from daemon.overrides import parse_overrides
    overrides, _problems = parse_overrides(os.environ)   # any problem already failed the load
    print(f"check: effective config (file {str(cfg.source_path)!r}, then the environment):")
    for line in effective_lines(cfg, {o.key: o.variable for o in overrides}):
        print(f"  {line}")


def _check_pbx_line(cfg: Config, *, force_login: bool = False) -> tuple[int, bool]:
    """The PBX's check line(s): its exit code (0 when it answered), and whether it is the ledger's PBX."""
    import asyncio

    from daemon.logins import LoginRefusedError
    try:
        report, sn = asyncio.run(check_pbx(cfg, force_login=force_login))
    except ConfigError as exc:
        return _config_failed(exc), True
    except PbxConfigError as exc:
        _err(f"check: the PBX says the configuration is wrong: {exc}")
        return exc.exit_code, True
    except LoginRefusedError as exc:
        _err(f"check: {exc}")
        return EXIT_AUTH, True
    except FatalAuthError as exc:
        _err(f"check: PBX refused us: {exc}")
        return EXIT_AUTH, True
    except TlsError as exc:
        _err(f"check: the PBX's certificate is not trusted: {exc}")
        return EXIT_UNREACHABLE, True
    except ArchiverError as exc:
        _err(f"check: PBX not usable: {exc}")
        return EXIT_UNREACHABLE, True
    print(f"check: OK: {report}")
    # once and run refuse another PBX than the one the ledger was filled from: so does check.
    problem = _serial_problem(cfg, sn)
    if problem is not None:
        _err(f"check: FAILED: {problem}")
        return EXIT_OK, False
    return EXIT_OK, True


def _serial_problem(cfg: Config, told: str | None) -> str | None:
    """Why once/run would refuse this PBX for this ledger (another serial), or None. Read-only."""
    from daemon.identity import identity_problem
    from daemon.ledger import KV_PBX_SN
    recorded = None
    if cfg.state.path.exists():
        try:
            with _ledger(cfg, read_only=True) as db:
                recorded = db.kv_get(KV_PBX_SN)
        except ArchiverError:
            return None   # the state folder's own check line has said what is wrong with it
    return identity_problem(recorded, told, layout_needs_sn="{pbx_sn}" in cfg.archive.layout, accept_new=False)


def _check_s3(cfg: Config) -> int:
    """The bucket exists and takes the credentials; say whether it keeps versions and locks objects."""
    import asyncio

    from daemon.destinations import S3Destination
    from daemon.errors import DestinationConfigError, DestinationRefusedError
    s3 = cfg.archive.s3
    assert s3 is not None

    async def probe() -> str:
        async with S3Destination(s3) as dest:
            report = await dest.check()
        advice = "" if report.object_lock not in (None, "off") else \
            " (for WORM retention, enable Object Lock with a default retention on the bucket)"
        return (f"bucket {s3.bucket!r} at {s3.endpoint_url or 'AWS ' + s3.region}: versioning "
                f"{report.versioning or 'unknown'}, Object Lock {report.object_lock or 'unknown'}{advice}")
    try:
        text = asyncio.run(probe())
    except DestinationConfigError as exc:
        _err(f"check: the S3 bucket is not as configured: {exc}")
        return exc.exit_code
    except DestinationRefusedError as exc:
        _err(f"check: S3 refused us: {exc}")
        return exc.exit_code
    except ArchiverError as exc:
        _err(f"check: S3 not usable: {exc}")
        return EXIT_UNREACHABLE
    print(f"check: OK: {text}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every copy is whole, 1 when any problem was found (and mended where it could be)."""
    import asyncio

    from daemon.archive import ArchiveDir
    from daemon.clock import SystemClock
    from daemon.ledger import Ledger, RunLock, check_state_access
    from daemon.verify import Verifier
    cfg = _load(args)
    refs = _parse_refs(args.refs) if args.refs else None
    check_state_access(cfg.state.path, write=True)

    async def main() -> Any:
        archive = ArchiveDir(cfg.archive.dir)
        archive.check_root()
        lock = RunLock(cfg.state.path)
        try:
            lock.acquire()
            repair = True
        except StorageError:
            repair = False   # a run is working: report, and leave the mending to it or to a later verify
        try:
            async with contextlib.AsyncExitStack() as stack:
                ledger = await stack.enter_async_context(Ledger(cfg.state.path))
                keys = None
                if refs is not None:
                    keys = await ledger.call(lambda db: [k for r in refs for k in db.keys_for(r)])
                dest = None
                if cfg.archive.s3 is not None:
                    from daemon.destinations import S3Destination
                    dest = await stack.enter_async_context(S3Destination(cfg.archive.s3))
                verifier = Verifier(ledger, archive, SystemClock(), dest=dest, repair=repair)
                return await verifier.run(keys, read_data=args.read_data)
        finally:
            lock.release()
    report = asyncio.run(main())
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        note = "" if report.repaired else " (not mended: a run holds the ledger)"
        print(f"verify: {report.checked} recording(s) checked, {report.bytes_read / 1e6:.1f} MB read, "
              f"{len(report.problems)} problem(s){note}")
        for p in report.problems:
            print(f"  {p.recording}  {p.copy}  {p.kind}  {p.where}: {p.detail}; {p.action}")
    return EXIT_FAILED_ITEMS if report.problems else EXIT_OK


def _config_failed(exc: ConfigError) -> int:
    for problem in exc.problems:
        _err(f"config error: {problem}")
    return EXIT_CONFIG


# ---------------------------------------------------------------- health
def livez_url(listen: str) -> str:
    """The /livez URL for a ``service.listen`` address; a wildcard address is asked on loopback."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "[::]", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/livez"


def http_status(url: str, timeout_s: float) -> int:
    """The HTTP status of ``GET url``. Raises OSError, ValueError."""
    return http_get(url, timeout_s, limit=0)[0]


def http_get(url: str, timeout_s: float, limit: int = 1 << 16) -> tuple[int, bytes]:
    """(status, up to ``limit`` bytes of body) of ``GET url``. Plain http (the health port) goes over a
    bare socket: urllib would import ssl and email, most of this command's start-up. Raises OSError,
    ValueError."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - the operator's own URL
                return int(resp.status), resp.read(limit) if limit else b""
        except urllib.error.HTTPError as exc:  # 503 from /readyz is an answer, not a failure to ask
            return int(exc.code), exc.read(limit) if limit else b""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout_s) as conn:
        conn.sendall(f"GET {target} HTTP/1.0\r\nHost: {parts.netloc}\r\nUser-Agent: yeastar-archiver-health\r\n"
                     "Connection: close\r\n\r\n".encode("ascii"))
        data = b""
        # The status line only; or, when a body is wanted, everything up to the limit (HTTP/1.0: until close).
        while len(data) < (limit + 16384 if limit else 256) and (limit or b"\r\n" not in data):
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    match = re.match(rb"HTTP/\d(?:\.\d)? (\d{3}) ", data)
    if match is None:
        raise ValueError(f"not an HTTP answer: {data[:40]!r}")
    _, sep, body = data.partition(b"\r\n\r\n")
    return int(match.group(1)), body[:limit] if sep and limit else b""


def cmd_health(args: argparse.Namespace) -> int:
    url = args.url
    if url is None:
        cfg = load_config(config_path(args.config))
        if cfg.service.listen is None:
            _err("health: service.listen is null: nothing to ask")
            return EXIT_FAILED_ITEMS
        url = livez_url(cfg.service.listen)
    try:
        ok = http_status(url, HEALTH_TIMEOUT_S) == 200
    except (OSError, ValueError) as exc:
        _err(f"health: {url}: {exc}")
        return EXIT_FAILED_ITEMS
    print(f"health: {url}: {'ok' if ok else 'not ok'}")
    return EXIT_OK if ok else EXIT_FAILED_ITEMS


# ---------------------------------------------------------------- simulate
def cmd_simulate(args: argparse.Namespace) -> int:
    from daemon.logs import configure_logging
    from daemon.simulator import Simulator
    opts = simulator_options(args)
    configure_logging("auto", "info")

    async def main(stop: asyncio.Event, _hurry: asyncio.Event) -> int:
        sim = Simulator(opts)
        await sim.start(args.host, args.port)
        try:
            print(f"simulator listening on {sim.base_url}", flush=True)
            print(f"  client_id:     {opts.client_id}", flush=True)
            print(f"  client_secret: {opts.client_secret}", flush=True)
            print(f"  recordings:    {opts.count} ({opts.format}), ids {opts.first_id}.."
                  f"{opts.first_id + opts.count - 1}", flush=True)
            await stop.wait()
        finally:
            await sim.stop()
        return EXIT_OK
    return _run_until_signal(main)


# ---------------------------------------------------------------- run / once
def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from daemon.runner import run_pipeline
    cfg = _load(args)
    events: list[asyncio.Event] = []

    def reload_event() -> asyncio.Event:
        events.append(asyncio.Event())
        return events[0]

    async def main(stop: asyncio.Event, hurry: asyncio.Event) -> int:
        # run ends only on SIGTERM/SIGINT: a PBX outage or a refused login leaves it up, not ready.
        await run_pipeline(cfg, stop, once=False, reload=events[0] if events else None, hurry=hurry,
                           new_pbx=args.new_pbx)
        return EXIT_OK
    return _guard_pipeline(lambda: _run_until_signal(main, reload=reload_event,
                                                     event_loop=cfg.service.event_loop))


def cmd_once(args: argparse.Namespace) -> int:
    from daemon.preflight import NO_SOURCE
    from daemon.runner import run_pipeline
    cfg = _load(args)

    async def main(stop: asyncio.Event, hurry: asyncio.Event) -> int:
        result = await run_pipeline(cfg, stop, once=True, progress=progress_reporter(sys.stderr), hurry=hurry,
                                    new_pbx=args.new_pbx)
        if found_nothing_without_a_source(cfg, result):
            raise ConfigError([NO_SOURCE])
        if result.stats.missing:
            # Exit 0 stands (nothing failed), but a mistyped id must not pass unseen.
            _err(missing_line(result.stats.missing_refs, result.stats.missing))
        return once_exit_code(result)
    return _guard_pipeline(lambda: _run_until_signal(main, event_loop=cfg.service.event_loop))


def missing_line(named: list[str], count: int) -> str:
    """once's line naming the recordings that ended missing: the first few, then "+K more". Pure."""
    more = f" +{count - len(named)} more" if count > len(named) else ""
    return (f"once: {count} recording(s) ended missing (the PBX does not have them; a mistyped id?): "
            f"{', '.join(named)}{more}; retry --missing asks the PBX again")


def found_nothing_without_a_source(cfg: Config, result: RunResult) -> bool:
    """``once`` had nothing to work on, and the config names no source: "total 0" and exit 0 would
    hide a config copied with only the essentials (exit 2 instead). What `enqueue` queued still counts:
    a once that archived, failed or missed anything, or left work, found something. Pure."""
    from daemon.preflight import configured_sources
    s = result.stats
    worked = s.archived or s.failed or s.missing or result.left
    stopped = result.fatal or result.untrusted or result.interrupted or result.copy_error
    return not configured_sources(cfg.sources) and not worked and not stopped


def once_exit_code(result: RunResult) -> int:
    """3 the PBX refused us, 4 its certificate is not trusted, 1 any recording ended failed, 5 stopped with
    work left (a signal, or ``downloads.once_give_up_s`` paused), else 0. Says why on stderr."""
    if result.fatal is not None:
        what = "the PBX refused us" if result.fatal.exit_code == EXIT_AUTH else "the PBX cannot be used as configured"
        _err(f"once: {what}: {result.fatal}")
        return result.fatal.exit_code
    if result.untrusted is not None:
        _err(f"once: the PBX's certificate is not trusted: {result.untrusted}")
        return EXIT_UNREACHABLE
    if result.copy_error is not None:
        _err(f"once: the off-box copy is refused: {result.copy_error}; {result.left} recording(s) are archived "
              "locally but not copied")
        return result.copy_error.exit_code
    if result.copy_gave_up:
        _err(f"once: the off-box copy's endpoint stayed unreachable; {result.left} recording(s) are archived "
              "locally but not copied: run once again")
        return EXIT_UNREACHABLE
    if result.copies_failed:
        _err(f"once: {result.copies_failed} off-box cop{'y' if result.copies_failed == 1 else 'ies'} failed "
             "(see status); fix the cause, then run retry")
        return EXIT_FAILED_ITEMS
    if result.counts.get("failed", 0):
        if result.left:
            _err(f"once: {result.left} recording(s) left pending; run once again to continue")
        return EXIT_FAILED_ITEMS
    if result.left and (result.interrupted or result.gave_up):
        why = "stopped by a signal" if result.interrupted else "gave up after downloads.once_give_up_s paused"
        _err(f"once: {why}; {result.left} recording(s) left; nothing failed: run once again to continue")
        return EXIT_INTERRUPTED
    if result.discovery_incomplete:
        why = "stopped by a signal" if result.interrupted else "could not list every recording the PBX holds"
        _err(f"once: discovery {why}; what it found is archived; run once again to continue")
        return EXIT_INTERRUPTED
    return EXIT_OK


def _guard_pipeline(body: Callable[[], int]) -> int:
    try:
        return body()
    except WrongArchiveError as exc:
        _err(f"error: {exc}")
        return exc.exit_code
    except StorageError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILED_ITEMS


def progress_reporter(stream: TextIO, *, interval_s: float | None = None) -> ProgressHook:
    """A live progress line on a TTY (done/total, MB, rate, ETA); periodic ``progress`` events otherwise.

    MB are the archived bytes, the figure of the summary: bytes of attempts that were retried or
    fetched twice to be sure are not archived. Log lines clear the live line first (logs.STATUS_LINE)."""
    tty = stream.isatty()
    every = interval_s if interval_s is not None else (0.5 if tty else 10.0)

    async def report(pipeline: Pipeline, done: asyncio.Event) -> None:
        import asyncio

        from daemon.clock import SystemClock, sleep_or_stop
        from daemon.logs import STATUS_LINE
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            finished = await sleep_or_stop(SystemClock(), every, done)
            counts = await pipeline.ledger.call(lambda db: db.counts())
            total = sum(counts.values()) - counts.get("forgotten", 0)   # never to be fetched: not work left
            ended = counts["done"] + counts["missing"] + counts["failed"]
            megabytes = pipeline.scheduler.stats.bytes / 1e6
            elapsed = max(loop.time() - started, 1e-6)
            rate = megabytes / elapsed
            per_item = elapsed / max(pipeline.scheduler.stats.archived, 1)
            eta = (total - ended) * per_item if pipeline.scheduler.stats.archived else None
            eta_text = f"{eta:.0f} s" if eta is not None else "?"
            paused = f"  (paused: {pipeline.scheduler.pause_reason})" if pipeline.scheduler.paused else ""
            if tty:
                STATUS_LINE.show(stream, f"{ended:>7}/{total:<7} {megabytes:9.1f} MB {rate:7.1f} MB/s "
                                         f"ETA {eta_text}{paused}")
            else:
                _log().info("progress", ended=ended, total=total, megabytes=round(megabytes, 1),
                         mb_per_s=round(rate, 2), eta_s=None if eta is None else round(eta))
            if finished:
                if tty:
                    STATUS_LINE.end(stream)
                return
    return report


# ---------------------------------------------------------------- status / enqueue / retry
@contextlib.contextmanager
def _ledger(cfg: Config, *, read_only: bool = False) -> Iterator[LedgerDb]:
    """The ledger for one command. A ledger this user may not use (its folder or file not writable —
    or, ``read_only``, not readable — by this user) is a ConfigError naming ``state.path`` (exit 2);
    its SQLite and file errors (locked, a read-only file system, disk full) become a LedgerError that
    names it too (exit 1). A clear line, never a traceback."""
    import sqlite3

    from daemon.ledger import LedgerDb, check_state_access, ledger_error
    check_state_access(cfg.state.path, write=not read_only)
    try:
        db = LedgerDb(cfg.state.path, read_only=read_only)
    except (sqlite3.Error, OSError) as exc:
        raise ledger_error(exc, cfg.state.path) from exc
    try:
        yield db
    except sqlite3.Error as exc:
        raise ledger_error(exc, cfg.state.path) from exc
    finally:
        db.close()


def daemon_status(running: bool | None, listen: str | None, answer: tuple[int, bytes] | None,
                  error: str | None) -> dict[str, Any]:
    """What the daemon is doing, for status: from whether the run lock is held and, when it is, what its
    /readyz answered (or why it could not be asked). Pure; tested as a table."""
    if not running and running is not None:
        return {"state": "not running"}
    if running is None and answer is None:
        return {"state": "unknown", "why": "cannot tell whether a run holds the ledger's lock (a run in another "
                                           "container or PID namespace is invisible here)"
                + ("" if listen is None else f"; its health port does not answer ({error})")}
    if listen is None:
        return {"state": "running", "why": "service.listen is null: no readiness to ask"}
    if answer is None:
        return {"state": "running", "why": f"its health port does not answer ({error})"}
    try:
        body = json.loads(answer[1])
        ready, checks = bool(body["ready"]), dict(body["checks"])
    except (ValueError, KeyError, TypeError):
        return {"state": "running", "why": f"/readyz answered HTTP {answer[0]} without its JSON"}
    if ready:
        return {"state": "running", "ready": True}
    reasons = [f"{name}: {check.get('reason') or 'not ok'}" for name, check in checks.items()
               if isinstance(check, dict) and not check.get("ok")]
    return {"state": "running", "ready": False, "why": "; ".join(reasons) or "not ready"}


def _when(ts: float | None, now: float) -> str:
    """``2026-12-02T13:00:00+00:00 (5 min ago)``; ``never`` for None."""
    if ts is None:
        return "never"
    ago = max(0.0, now - ts)
    span = (f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else
            f"{ago / 3600:.1f} h" if ago < 172800 else f"{ago / 86400:.1f} days")
    return f"{dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec='seconds')} ({span} ago)"


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.ledger import KV_PBX_FIRMWARE, KV_PBX_SN, STATES, check_state_access, run_lock_held
    from daemon.logs import redact_text
    cfg = _load(args)
    check_state_access(cfg.state.path, write=False)
    now = time.time()
    running = run_lock_held(cfg.state.path)
    answer, error = None, None
    if running is not False and cfg.service.listen is not None:   # running, or cannot tell: ask it
        try:
            answer = http_get(livez_url(cfg.service.listen).removesuffix("/livez") + "/readyz", HEALTH_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            error = str(exc) or type(exc).__name__
    daemon = daemon_status(running, cfg.service.listen, answer, error)
    if not cfg.state.path.exists():
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        data: dict[str, Any] = {"counts": counts, "bytes_archived": 0, "recent_failures": [],
                                "ledger": str(cfg.state.path), "ledger_exists": False, "daemon": daemon}
    else:
        # Read-only: status works beside a running `run`, and on a state folder it may not write.
        with _ledger(cfg, read_only=True) as db:
            oldest = db.oldest_pending()
            data = {
                "counts": db.counts(), "bytes_archived": db.bytes_archived(), "discovery": discovery_status(db),
                "pbx": {"sn": db.kv_get(KV_PBX_SN), "firmware": db.kv_get(KV_PBX_FIRMWARE)},
                "recent_failures": [{"recording": r.ref, "state": r.state, "attempts": r.attempts,
                                     "error": redact_text(r.last_error or "")} for r in db.recent_failures()],
                "ledger": str(cfg.state.path), "ledger_exists": True,
                "copies": db.copy_counts(), "verify": verify_status(db), "daemon": daemon,
                "archived_last_hour": db.done_since(now - 3600), "archived_last_day": db.done_since(now - 86400),
                "last_success_at": db.last_done_at(),
                "oldest_pending": None if oldest is None else {"recording": oldest[0], "since": oldest[1]},
                "failures_by_reason": [{"state": st, "reason": redact_text(reason), "count": n}
                                       for st, reason, n in db.failures_by_reason()],
            }
    if args.json:
        print(json.dumps(data))
        return EXIT_OK
    c = data["counts"]
    line = f"daemon: {daemon['state']}"
    if "ready" in daemon:
        line += ", ready" if daemon["ready"] else ", NOT ready"
    print(line + (f" ({daemon['why']})" if daemon.get("why") else ""))
    print(f"ledger: {data['ledger']}")
    pbx = data.get("pbx") or {}
    if pbx.get("sn"):
        print(f"  PBX serial {pbx['sn']}, firmware {pbx.get('firmware') or '?'}")
    print("  " + "  ".join(f"{state}: {c[state]}" for state in STATES))
    print(f"  archived: {data['bytes_archived'] / 1e6:.1f} MB")
    if data["ledger_exists"]:
        print(f"  archived in the last hour: {data['archived_last_hour']}, last day: {data['archived_last_day']}; "
              f"last success: {_when(data['last_success_at'], now)}")
        oldest = data["oldest_pending"]
        print(f"  oldest pending: {'none' if oldest is None else oldest['recording'] + ', enqueued '}"
              f"{'' if oldest is None else _when(oldest['since'], now)}")
        if data["failures_by_reason"]:
            print("failures by reason:")
            for f in data["failures_by_reason"]:
                print(f"  {f['count']:>6}  {f['state']:<7}  {f['reason'] or '(no reason recorded)'}")
    disc = data.get("discovery") or {}
    if disc:
        backfill = disc.get("backfill") or {}
        print(f"discovery: newest id seen {disc.get('high_water')}, back-fill "
              f"{'done' if backfill.get('done') else 'at page ' + str(backfill.get('page'))}, "
              f"last poll {disc.get('last_poll_at') or 'never'}, last event {disc.get('last_event_at') or 'never'}, "
              f"last sweep {disc.get('last_sweep_at') or 'never'}")
    for dest, states in sorted((data.get("copies") or {}).items()):
        print(f"copies to {dest}: " + "  ".join(f"{state}: {states.get(state, 0)}"
                                                 for state in ("pending", "repair", "failed", "done")))
    last = data.get("verify") or {}
    if last:
        print(f"verify: last walk {last['at']}, {last['checked']} checked, {last['problems']} problem(s)")
    if data["recent_failures"]:
        print("recent failures:")
        for f in data["recent_failures"]:
            print(f"  {f['recording']}  {f['state']}  attempts={f['attempts']}  {f['error']}")
    return EXIT_OK


def verify_status(db: LedgerDb) -> dict[str, Any]:
    """The last verify walk (``verify`` or run's background walk), as status shows it ({} if never)."""
    from daemon.verify import KV_LAST_REPORT
    try:
        report = json.loads(db.kv_get(KV_LAST_REPORT) or "")
        at = dt.datetime.fromtimestamp(float(report["at"]), dt.UTC).isoformat(timespec="seconds")
        return {"at": at, "checked": int(report["checked"]), "problems": int(report["problems"])}
    except (ValueError, TypeError, KeyError):
        return {}


def discovery_status(db: LedgerDb) -> dict[str, Any]:
    """The discovery checkpoint and its last activity, as status shows them ({} if never run)."""
    from daemon.discovery import KV_LAST_EVENT, KV_LAST_POLL, KV_LAST_SWEEP, Backfill
    from daemon.ledger import KV_BACKFILL, KV_HIGH_WATER
    high = db.kv_get(KV_HIGH_WATER)
    if high is None:
        return {}

    def when(key: str) -> str | None:
        value = db.kv_get(key)
        return None if value is None else dt.datetime.fromtimestamp(float(value), dt.UTC).isoformat(
            timespec="seconds")
    backfill = Backfill.load(db.kv_get(KV_BACKFILL))
    return {"high_water": int(high), "backfill": None if backfill is None else vars(backfill),
            "last_poll_at": when(KV_LAST_POLL), "last_event_at": when(KV_LAST_EVENT),
            "last_sweep_at": when(KV_LAST_SWEEP)}


def _parse_refs(texts: list[str]) -> list[Ref]:
    from daemon.sources import parse_ref, ref_problem
    refs, bad = [], []
    for text in texts:
        ref = parse_ref(text)
        if ref is None:
            bad.append(f"REF {text!r}: {ref_problem(text.strip()) or 'not a recording id or .wav/.mp3 file name'}")
        else:
            refs.append(ref)
    if bad:
        raise ConfigError(bad)
    return refs


def cmd_enqueue(args: argparse.Namespace) -> int:
    cfg = _load(args)
    refs = _parse_refs(args.refs)
    with _ledger(cfg) as db:
        added = db.enqueue(refs, source="cli", now=time.time())
    print(f"enqueue: {added} added, {len(refs) - added} already known (queued, archived, missing or forgotten: "
          "see status)")
    return EXIT_OK


def retry_verdict(states: list[str], *, failed_copies: bool, missing: bool) -> str | None:
    """Why ``retry`` cannot act on a recording whose ledger rows are in ``states`` (None: it can). Pure."""
    if not states:
        return "unknown to the ledger (never queued; enqueue it first)"
    if "failed" in states or failed_copies or (missing and "missing" in states):
        return None
    if "missing" in states:
        return "missing: the PBX did not have it when asked (retry --missing asks again)"
    if "forgotten" in states:
        return "forgotten: it is never fetched again"
    if set(states) <= {"done", "copying"}:
        return "already archived"
    return "not failed: already queued (pending or in progress)"


def cmd_retry(args: argparse.Namespace) -> int:
    """Exit 0 when every REF named was put back (or none was named), 1 when any could not be (each named)."""
    cfg = _load(args)
    refs = _parse_refs(args.refs) if args.refs else None
    refused: list[tuple[str, str]] = []
    with _ledger(cfg) as db:
        keys: list[str] | None = None
        if refs is not None:
            keys = []
            for ref in refs:
                found = db.keys_for(ref)
                rows = [row for row in map(db.get, found) if row is not None]
                failed_copies = any(c["state"] == "failed" for k in found for c in db.copies_of(k))
                why = retry_verdict([r.state for r in rows], failed_copies=failed_copies, missing=args.missing)
                if why is None:
                    keys += found
                else:
                    refused.append((str(ref.rec_id) if ref.rec_id is not None else str(ref.file), why))
        n = db.retry(keys, now=time.time(), missing=args.missing) if keys != [] else 0
    for ref_text, why in refused:
        _err(f"retry: {ref_text}: {why}")
    print(f"retry: {n} recording(s) back to pending" + (f", {len(refused)} not (see above)" if refused else ""))
    return EXIT_FAILED_ITEMS if refused else EXIT_OK


# ---------------------------------------------------------------- find / export / forget
def _filters(args: argparse.Namespace) -> Any:
    from daemon.compliance import Filters, parse_day
    from daemon.ledger import STATES
    if args.state is not None and args.state not in STATES:
        raise ConfigError([f"--state: {args.state!r} is not one of {', '.join(STATES)}"])
    return Filters(since=None if args.since is None else parse_day(args.since, "--since"),
                   until=None if args.until is None else parse_day(args.until, "--until"),
                   caller=args.caller, callee=args.callee, call_type=args.call_type, state=args.state)


def cmd_find(args: argparse.Namespace) -> int:
    """Read-only, like status: works beside a running `run`. Exit 0 (also when nothing matches)."""
    from daemon.compliance import find, row_json, row_line
    cfg = _load(args)
    filters = _filters(args)
    if not cfg.state.path.exists():
        _err(f"find: no ledger at {str(cfg.state.path)!r} (state.path) yet: nothing archived")
        return EXIT_OK
    with _ledger(cfg, read_only=True) as db:
        for row in find(db, filters):
            print(json.dumps(row_json(row, cfg.archive.dir)) if args.json else row_line(row, cfg.archive.dir))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Exit 0 when every matching archived recording is in DIR, 1 when any could not be exported."""
    import asyncio

    from daemon.archive import ArchiveDir
    from daemon.compliance import export, find
    from daemon.ledger import ARCHIVED
    cfg = _load(args)
    filters = _filters(args)
    to = Path(args.to).resolve()
    root = cfg.archive.dir.resolve()
    if to == root or root in to.parents:
        raise ConfigError([f"export --to {args.to!r} is inside archive.dir {str(root)!r}: choose a folder outside it"])
    if not cfg.state.path.exists():
        _err(f"export: no ledger at {str(cfg.state.path)!r} (state.path) yet: nothing archived")
        return EXIT_OK
    archive = ArchiveDir(cfg.archive.dir)

    async def main(db: LedgerDb) -> Any:
        rows = list(find(db, filters, states=() if filters.state else ARCHIVED))
        if cfg.archive.s3 is None or all(r.local_kept for r in rows):
            return await export(db, archive, rows, to, None)
        from daemon.destinations import S3Destination
        async with S3Destination(cfg.archive.s3) as dest:
            return await export(db, archive, rows, to, dest)
    with _ledger(cfg, read_only=True) as db:
        try:
            report = asyncio.run(main(db))
        except ArchiverError as exc:
            _err(f"export: S3 not usable: {exc}")
            return EXIT_FAILED_ITEMS
    for path in report.copied:
        print(f"export: copied {path}")
    for path in report.skipped:
        print(f"export: already there (identical) {path}")
    for problem in report.problems:
        _err(f"export: FAILED: {problem}")
    print(f"export: {len(report.copied)} copied, {len(report.skipped)} already there, "
          f"{len(report.problems)} not exported, into {to}")
    return EXIT_FAILED_ITEMS if report.problems else EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    """Exit 0 when every recording is forgotten (and, --erase, erased), 1 when a deletion failed (run it
    again: what is gone stays gone), 1 too while a run/once holds the ledger (it could be fetching one)."""
    import asyncio

    from daemon.archive import ArchiveDir
    from daemon.compliance import EraseResult, erase_copies, erase_local, who
    from daemon.ledger import Ref, RunLock, check_state_access
    cfg = _load(args)
    refs = _parse_refs(args.refs)
    check_state_access(cfg.state.path, write=True)
    lock = RunLock(cfg.state.path)
    lock.acquire()   # StorageError (exit 1) while a run holds the ledger: it may be fetching one of these
    by, now = who(), time.time()
    problems = 0
    try:
        with _ledger(cfg) as db:
            keys = list(dict.fromkeys(k for ref in refs for k in (db.keys_for(ref) or [ref.key])))
            # A row for the same recording by its name (not merged into its id row yet) goes too — not
            # another recording that has the same file name under an id of its own.
            same = [k for row in map(db.get, keys) if row is not None and row.file
                    for k in db.keys_for(Ref(file=row.file))
                    if (other := db.get(k)) is not None and other.rec_id in (None, row.rec_id)]
            keys = list(dict.fromkeys(keys + same))
            fresh = db.forget(keys, by=by, reason=args.reason, now=now)
            print(f"forget: {len(fresh)} recording(s) forgotten, {len(keys) - len(fresh)} already were; "
                  f"recorded as {by}")
            if not args.erase:
                return EXIT_OK
            archive = ArchiveDir(cfg.archive.dir)

            async def erase_all() -> int:
                failed = 0
                dest = None
                async with contextlib.AsyncExitStack() as stack:
                    if cfg.archive.s3 is not None and any(db.copies_of(k) for k in keys):
                        from daemon.destinations import S3Destination
                        dest = await stack.enter_async_context(S3Destination(cfg.archive.s3))
                    for key in keys:
                        row = db.get(key)
                        if row is None:
                            continue
                        local = erase_local(archive, row) if cfg.archive.dir.is_dir() else EraseResult(
                            problems=[f"archive.dir {str(cfg.archive.dir)!r} is not there (unmounted?)"]
                            if row.final_path and row.local_kept else [])
                        remote, gone = await erase_copies(db, row, dest)
                        for path in local.deleted + remote.deleted:
                            print(f"forget: deleted {path}")
                        errors = local.problems + remote.problems
                        for problem in errors:
                            _err(f"forget: FAILED: {row.ref}: {problem}")
                        db.erased(key, by=by, reason=args.reason, now=time.time(), error="; ".join(errors) or None,
                                  local_gone=not local.problems, copies_gone=gone)
                        failed += bool(errors)
                return failed
            try:
                problems = asyncio.run(erase_all())
            except ArchiverError as exc:
                _err(f"forget: S3 not usable, nothing deleted there: {exc}; the recordings stay forgotten: "
                     "run forget --erase again")
                return EXIT_FAILED_ITEMS
            print(f"forget: {len(keys) - problems} erased, {problems} not completely (see above; run again)")
    finally:
        lock.release()
    return EXIT_FAILED_ITEMS if problems else EXIT_OK


# ---------------------------------------------------------------- init
def example_config() -> str:
    """The commented example config shipped inside the package (package data)."""
    from importlib.resources import files
    return files("daemon").joinpath("config.example.yaml").read_text(encoding="utf-8")


def init_config_text(example: str, *, archive_dir: str, schema_path: Path) -> str:
    """The example with this installation's archive folder and the installed schema's path. Pure."""
    lines = example.splitlines(keepends=True)
    written = "# Written by `yeastar-archiver init`: fill in pbx.base_url, client_id and the secret, then run check.\n"
    if lines and lines[0].startswith("# yaml-language-server:"):
        lines[0] = f"# yaml-language-server: $schema={schema_path}\n" + written
    else:
        lines.insert(0, written)
    text = "".join(lines)
    text, n = re.subn(r"^(archive:\n  dir: )\S+", lambda m: m.group(1) + json.dumps(archive_dir), text,
                      count=1, flags=re.MULTILINE)
    if n != 1:   # pragma: no cover - pinned by a test on the shipped example
        raise ValueError("the example config has no archive.dir line")
    return text


def cmd_init(args: argparse.Namespace) -> int:
    """Exit 0, or 2 when the config is there already (never overwritten) or a folder cannot be made."""
    from daemon.archive import ArchiveDir
    from daemon.schema import SCHEMA_PATH
    folder = Path(args.dir).resolve()
    cfg_path = folder / "config.yaml"
    # Relative paths in a config are relative to its folder; on the command line, to the current one.
    archive_dir = Path(args.archive_dir).resolve() if args.archive_dir else folder / "archive"
    archive_text = str(archive_dir) if args.archive_dir else "archive"
    if cfg_path.exists() or cfg_path.is_symlink():
        raise ConfigError([f"init: {str(cfg_path)!r} exists: it is never overwritten (move it aside, or choose "
                           "another --dir)"])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # O_EXCL: a config that appeared meanwhile is not overwritten either. 0600: it may hold a secret.
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(init_config_text(example_config(), archive_dir=archive_text, schema_path=SCHEMA_PATH))
        archive_dir.mkdir(parents=True, exist_ok=True)
        archive = ArchiveDir(archive_dir)
        ident = archive.read_marker() or archive.write_marker()
    except FileExistsError as exc:
        raise ConfigError([f"init: {str(cfg_path)!r} exists: it is never overwritten"]) from exc
    except OSError as exc:
        raise ConfigError([f"init: cannot write {exc.filename or folder!r}: {exc.strerror or exc}"]) from exc
    print(f"init: wrote {cfg_path} (mode 0600)")
    print(f"init: archive folder {archive_dir} (marker {ident})")
    print(f"init: next: edit the pbx section, then  yeastar-archiver check -c {cfg_path}")
    return EXIT_OK


# ---------------------------------------------------------------- demo
DEMO_OPTIONS = SimOptions(
    # Paced like a small PBX, with lifetimes short enough that token refreshes and URL renewals
    # really happen during the few seconds the tour lasts.
    count=200, size_min=60_000, size_max=1_500_000, token_lifetime_s=3, url_lifetime_s=2,
    bytes_per_second=6_000_000, cut_rate=0.02, http500_rate=0.01, errcode_rate=0.01,
)


def write_demo_config(directory: Path, base_url: str, opts: SimOptions, *, ids: list[int]) -> Path:
    """A config for the demo simulator, as an operator would write one: the secret in a 0600 file,
    the ids in a queue file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "archive").mkdir(exist_ok=True)   # run and once never create archive.dir; the demo does
    secret = directory / "client_secret"
    secret.write_text(opts.client_secret + "\n", encoding="utf-8")
    secret.chmod(0o600)
    (directory / "queue.txt").write_text("# one recording id or file name per line\n"
                                         + "".join(f"{i}\n" for i in ids), encoding="utf-8")
    cfg = directory / "config.yaml"
    cfg.write_text(
        f"{DEMO_MARKER} for its bundled simulator.\n"
        "pbx:\n"
        f"  base_url: {base_url}\n"
        f"  client_id: {opts.client_id}\n"
        "  client_secret_file: client_secret\n"
        "  requests_per_second: 200\n"
        "sources:\n"
        "  queue_file: queue.txt\n"
        "archive:\n"
        "  dir: archive\n"
        "  min_free_bytes: 0\n"
        "downloads:\n"
        "  backoff_base_s: 0.2\n"
        "  backoff_max_s: 2\n"
        "  pause_max_s: 2\n"
        f"  url_lifetime_s: {opts.url_lifetime_s:g}\n"
        "  url_refresh_margin_s: 1\n"
        "service:\n"
        "  listen: null\n"
        "logging:\n"
        "  level: warning\n",
        encoding="utf-8",
    )
    return cfg


DEMO_MARKER = "# Written by `yeastar-archiver demo`"


def prepare_demo_dir(directory: Path) -> None:
    """Start each demo afresh, but only ever delete a folder an earlier demo made."""
    if not directory.exists() or not any(directory.iterdir()):
        return
    cfg = directory / "config.yaml"
    if not cfg.is_file() or not cfg.read_text(encoding="utf-8").startswith(DEMO_MARKER):
        raise ConfigError([f"demo --dir {str(directory)!r} exists and was not made by the demo; choose another"])
    shutil.rmtree(directory / "archive", ignore_errors=True)


def own_command(executable: str | None = None) -> str:
    """How to run this very installation from a shell: the ``yeastar-archiver`` script beside the
    interpreter (a venv's bin/ is rarely on PATH), else ``python -m daemon`` with this interpreter."""
    python = Path(executable or sys.executable)
    script = python.parent / "yeastar-archiver"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(str(python))} -m daemon"


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.logs import configure_logging
    from daemon.runner import run_pipeline
    from daemon.simulator import Simulator
    directory = Path(args.dir).resolve()
    opts = DEMO_OPTIONS
    prepare_demo_dir(directory)

    async def main(stop: asyncio.Event, hurry: asyncio.Event) -> int:
        async with Simulator(opts) as sim:
            cfg_path = write_demo_config(directory, sim.base_url, opts, ids=[r.id for r in sim.recordings])
            print(f"demo: simulator (a fake Yeastar P-Series PBX) on {sim.base_url}: {opts.count} recordings, "
                  f"{sum(r.size for r in sim.recordings) / 1e6:.0f} MB, tokens live {opts.token_lifetime_s:g} s, "
                  f"download URLs {opts.url_lifetime_s:g} s, ~4% injected faults")
            print(f"demo: config {cfg_path}")
            cfg = load_config(cfg_path)
            configure_logging(cfg.logging.format, cfg.logging.level)
            result = await run_pipeline(cfg, stop, once=True, progress=progress_reporter(sys.stderr), hurry=hurry)
            counters = sim.snapshot()
        s = result.stats
        print(f"demo: archived {s.archived} recordings ({s.bytes / 1e6:.0f} MB) in {result.elapsed_s:.1f} s; "
              f"{s.retried} retries after injected faults, {counters['refreshes']} token refreshes, "
              f"{counters['logins']} login(s), {counters['revocations']} revocation(s)")
        print(f"demo: ledger {result.counts}")
        print(f"demo: the recordings are under {cfg.archive.dir}  (next to each: a .json sidecar)")
        print(f"demo: try  {own_command()} status -c {shlex.quote(str(cfg_path))}")
        return once_exit_code(result)
    return _run_until_signal(main)


def main(argv: list[str] | None = None) -> int:
    _open_missing_stdio()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in NO_CONFIG and args.config is not None:
        parser.error(f"-c/--config: {args.command} reads no config")
    shift = args.verbose + args.sub_verbose - args.quiet - args.sub_quiet
    if shift or "daemon.logs" in sys.modules:   # `health` must not pay for structlog unless asked
        from daemon.logs import set_level_shift
        set_level_shift(shift)
    try:
        result: int = args.func(args)
        sys.stdout.flush()   # here, not at exit: a reader gone (`status | head -2`) is seen and handled
    except BrokenPipeError:
        # Like a Unix tool that SIGPIPE ends: stop, quietly. (Logs and stderr lines never get here:
        # they are dropped where they are written, so that `once` and `run` keep archiving.)
        from daemon.logs import drop_output
        drop_output(sys.stdout)
        return EXIT_BROKEN_PIPE
    except ConfigError as exc:
        return _config_failed(exc)
    except (WrongArchiveError, StorageError) as exc:
        _err(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return result
