"""The command line: parses arguments, configures logging, owns signals, maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from daemon import __version__
from daemon.client import PbxClient
from daemon.config import Config, config_path, load_config
from daemon.errors import (
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_UNREACHABLE,
    ArchiverError,
    ConfigError,
    FatalAuthError,
)
from daemon.logs import configure_logging
from daemon.simulator import SimOptions, Simulator

log = structlog.get_logger("daemon.cli")


def _add_config_arg(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before or after the subcommand; the subcommand's copy must not erase the top one.
    parser.add_argument("-c", "--config", metavar="FILE", default=None if top else argparse.SUPPRESS,
                        help="config file (else $YEASTAR_ARCHIVER_CONFIG, else /etc/yeastar-archiver/config.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yeastar-archiver",
                                     description="Archive call recordings from a Yeastar P-Series PBX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_config_arg(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="validate the config, log in to the PBX, call one endpoint, log out")
    _add_config_arg(p, top=False)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("simulate", help="serve the bundled Yeastar P-Series simulator until interrupted")
    _add_config_arg(p, top=False)
    add_simulator_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="zero-setup tour against the bundled simulator")
    _add_config_arg(p, top=False)
    p.add_argument("--dir", default="yeastar-archiver-demo", help="where to write the demo config and archive")
    p.set_defaults(func=cmd_demo)
    return parser


def add_simulator_args(p: argparse.ArgumentParser) -> None:
    d = SimOptions()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    p.add_argument("--port", type=int, default=8088, help="port; 0 picks a free one [8088]")
    p.add_argument("--count", type=int, default=d.count, help=f"number of recordings [{d.count}]")
    p.add_argument("--first-id", type=int, default=d.first_id, help=f"id of the first recording [{d.first_id}]")
    p.add_argument("--size-min", type=int, default=d.size_min, help=f"smallest recording, bytes [{d.size_min}]")
    p.add_argument("--size-max", type=int, default=d.size_max, help=f"largest recording, bytes [{d.size_max}]")
    p.add_argument("--format", choices=("wav", "mp3"), default=d.format, help="recording format [wav]")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the deterministic contents [1]")
    p.add_argument("--client-id", default=d.client_id)
    p.add_argument("--client-secret", default=d.client_secret)
    p.add_argument("--token-lifetime", type=float, default=d.token_lifetime_s, help="access token lifetime, s")
    p.add_argument("--refresh-lifetime", type=float, default=d.refresh_lifetime_s, help="refresh token lifetime, s")
    p.add_argument("--url-lifetime", type=float, default=d.url_lifetime_s, help="download URL lifetime, s")
    p.add_argument("--no-range", action="store_true", help="ignore Range headers (always answer 200)")
    p.add_argument("--hostile-names", action="store_true", help="give the first recordings hostile file names")
    for name in ("http500", "errcode", "busy", "cut", "stall", "json-body"):
        p.add_argument(f"--{name}-rate", type=float, default=0.0, help=f"probability of the {name} fault [0]")
    p.add_argument("--stall-s", type=float, default=d.stall_s, help="how long a stall lasts, s")


def simulator_options(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        count=args.count, first_id=args.first_id, size_min=args.size_min, size_max=args.size_max,
        format=args.format, seed=args.seed, client_id=args.client_id, client_secret=args.client_secret,
        token_lifetime_s=args.token_lifetime, refresh_lifetime_s=args.refresh_lifetime,
        url_lifetime_s=args.url_lifetime, range_support=not args.no_range, hostile_names=args.hostile_names,
        http500_rate=args.http500_rate, errcode_rate=args.errcode_rate, busy_rate=args.busy_rate,
        cut_rate=args.cut_rate, stall_rate=args.stall_rate, json_body_rate=args.json_body_rate,
        stall_s=args.stall_s,
    )


def _load(args: argparse.Namespace) -> Config:
    """Load the config and configure logging from it. Raises ConfigError."""
    cfg = load_config(config_path(args.config))
    configure_logging(cfg.logging.format, cfg.logging.level)
    for warning in cfg.warnings:
        log.warning("config.warning", message=warning)
    return cfg


def _run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, int]]) -> int:
    """Run ``main(stop)`` with SIGTERM and SIGINT setting ``stop``: the only place signals are handled."""
    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGTERM: systemd / container stop. SIGINT: Ctrl-C. Both ask for the same graceful stop.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await main(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return asyncio.run(runner())


# ---------------------------------------------------------------- check
async def check_pbx(cfg: Config) -> str:
    """Log in, list one recording, revoke the token; returns a one-line report. Raises ArchiverError."""
    async with PbxClient(cfg.pbx, read_timeout_s=cfg.downloads.read_timeout_s) as client:
        page = await client.check()
    return (f"logged in to {cfg.pbx.base_url} as {cfg.pbx.client_id!r}; "
            f"{page.total} recordings on the PBX; token revoked")


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args)
        report = asyncio.run(check_pbx(cfg))
    except ConfigError as exc:
        return _config_failed(exc)
    except FatalAuthError as exc:
        print(f"check: PBX refused us: {exc}", file=sys.stderr)
        return EXIT_AUTH
    except ArchiverError as exc:
        print(f"check: PBX not usable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"check: OK: {report}")
    return EXIT_OK


def _config_failed(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(f"config error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


# ---------------------------------------------------------------- simulate
def cmd_simulate(args: argparse.Namespace) -> int:
    opts = simulator_options(args)
    configure_logging("auto", "info")

    async def main(stop: asyncio.Event) -> int:
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


# ---------------------------------------------------------------- demo
def write_demo_config(directory: Path, base_url: str, opts: SimOptions, *, ids: list[int]) -> Path:
    """A config for the demo simulator, with the secret in a 0600 file as an operator would keep it."""
    directory.mkdir(parents=True, exist_ok=True)
    secret = directory / "client_secret"
    secret.write_text(opts.client_secret + "\n", encoding="utf-8")
    secret.chmod(0o600)
    cfg = directory / "config.yaml"
    cfg.write_text(
        "# Written by `yeastar-archiver demo` for its bundled simulator.\n"
        "pbx:\n"
        f"  base_url: {base_url}\n"
        f"  client_id: {opts.client_id}\n"
        "  client_secret_file: client_secret\n"
        "  requests_per_second: 200\n"
        "sources:\n"
        f"  ids: [{', '.join(str(i) for i in ids)}]\n"
        "archive:\n"
        "  dir: archive\n"
        "service:\n"
        "  listen: null\n"
        "logging:\n"
        "  format: console\n",
        encoding="utf-8",
    )
    return cfg


def cmd_demo(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    opts = SimOptions(count=20, token_lifetime_s=30, url_lifetime_s=20)

    async def main(stop: asyncio.Event) -> int:
        async with Simulator(opts) as sim:
            cfg_path = write_demo_config(directory, sim.base_url, opts, ids=[r.id for r in sim.recordings])
            print(f"demo: simulator on {sim.base_url}; config written to {cfg_path}")
            cfg = load_config(cfg_path)
            configure_logging(cfg.logging.format, cfg.logging.level)
            report = await check_pbx(cfg)
            print(f"demo: check OK: {report}")
            counters = sim.snapshot()
            print(f"demo: simulator saw {counters['logins']} login(s), {counters['revocations']} revocation(s)")
        return EXIT_OK
    return _run_until_signal(main)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        return _config_failed(exc)
    except KeyboardInterrupt:
        return 130
    return result
