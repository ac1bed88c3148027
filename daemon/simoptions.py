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
    resolve_delay_s: float = 0.0       # recording/download answers this long after it was asked (API latency)
    # A web server in front serves the bytes: a valid file request is answered with an empty body and
    # ``X-Accel-Redirect: <prefix><file name>`` (nginx's internal redirect to a static file).
    accel_redirect: str | None = None
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
    # What real PBXs may do (reference: "What a real PBX may do"); every one off by default.
    page_cap: int = 0                  # at most this many items per page, whatever page_size asked (0: no cap)
    page_cap_offsets: str = "capped"   # capped: page N starts at (N-1)*cap | asked: at (N-1)*page_size
    close_after_response: bool = False  # one answer per TCP connection; a request on a reused one is dropped
    cleanup_on_list: int = 0           # Auto Cleanup: delete this many of the oldest after each list answer
    late_count: int = 0                # the newest N recordings are not ready (absent, 60001) ...
    late_s: float = 0.0                # ... for this many seconds after start
    late_listed: bool = False          # the late ones are listed (the CDR is written at call end), still 60001
    event_early_s: float = 0.0         # a new recording's 30012 event comes this long before its file is ready
    mp3_transcode: str = ""            # "", "wav-name" or "mp3-name": stored as wav, downloaded as mp3 bytes;
                                       # recording/download's "file" is the stored .wav name or the .mp3 name
    mp3_busy_answer: str = "70082"     # a second concurrent request in mp3 mode: 70082 | 503 | -2 | wait
    expired_url_answer: str = "404"    # an expired file URL: 404 | 403 | 410 | 60001 (an errcode envelope)
    api_version_error: int = 0         # every API call answers this errcode (10002 or 10003); 0: off
    block_expire_s: float = 0.0        # 70004 carries block_expire_time this far ahead, and the block lifts then
    content_type: str = ""             # the files' Content-Type whatever they hold (a PBX that labels mp3 audio/wav)
    total_number: str = "right"        # recording/list's total_number: right | absent | plus1 (off by one) |
                                       # page (the count of this page's items, as some firmware gives)
    page_ignored: bool = False         # recording/list answers page 1 whatever page is asked (never empty)
    body_length: str = "content-length"  # how a file's end is told: content-length | chunked | close (the
                                       # connection closes after the body: a cut looks like the end)
    wav_riff_size: str = "right"       # the RIFF header's size field: right | zero (streaming writers) | more
    content_seed: int = 0              # bytes from this seed instead of `seed` (names still from `seed`): 0 = seed
    search_ignores_ids: bool = False   # recording/search ignores ids= (an older firmware): pages of everything
    truncate_at: int = 0               # every file transfer ends (connection closed) after this many bytes
    sn: str = "SIM0000000001"
    firmware: str = "37.12.0.22"

