"""What the bundled simulator can be told: a plain dataclass, apart from the server, so that the CLI can
build its ``simulate`` options without importing aiohttp for every other command."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimOptions:
    """Everything the simulator can be told. Rates are probabilities per request, 0..1."""

    count: int = 50
    first_id: int = 1000
    size_min: int = 16 * 1024
    size_max: int = 256 * 1024
    format: str = "wav"
    seed: int = 1
    client_id: str = "archiver"
    client_secret: str = "sim-secret-please-change"  # noqa: S105 - the simulator's demo credential
    token_lifetime_s: float = 1800.0
    refresh_lifetime_s: float = 86400.0
    url_lifetime_s: float = 1800.0
    max_tokens: int = 8
    block_after: int = 5
    range_support: bool = True
    hostile_names: bool = False
    http500_rate: float = 0.0
    errcode_rate: float = 0.0
    busy_rate: float = 0.0
    cut_rate: float = 0.0
    stall_rate: float = 0.0
    stall_s: float = 3600.0
    json_body_rate: float = 0.0
    json_body_errcode: int = -2
    url_expired_rate: float = 0.0
    bytes_per_second: int = 0          # per transfer; 0 = as fast as loopback goes
    new_every_s: float = 0.0           # a new recording (and a 30012 event) this often; 0 = never
    grow_on_list: int = 0              # recordings added after each recording/list answer (insertions mid-paging)
    ws_idle_s: float = 60.0            # close a WebSocket that sent no heartbeat for this long
    fail_ids: tuple[int, ...] = ()     # recordings whose recording/download always answers HTTP 500
