"""The API client against the simulator on loopback: tokens, errcodes, paging, resolving, streaming, TLS."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from daemon.client import (
    PbxClient,
    error_for_errcode,
    file_url,
    parse_content_range,
    parse_retry_after,
    token_renewal_due,
)
from daemon.clock import ManualClock
from daemon.config import TlsConfig
from daemon.errors import (
    FatalAuthError,
    PbxBusyError,
    PbxConfigError,
    PbxUnavailableError,
    RecordingMissingError,
    RequestRejectedError,
    TlsError,
    TokenExpiredError,
    TokenLimitError,
    TransferError,
    UrlExpiredError,
)
from tests.conftest import SimFactory, pbx_config, serve_on_loopback

# ---------------------------------------------------------------- pure decisions, as tables


@pytest.mark.parametrize(("errcode", "login", "kind", "exit_code"), [
    (-1, True, FatalAuthError, 3),
    (-1, False, PbxBusyError, 1),
    (-2, False, PbxBusyError, 1),
    (2, False, PbxBusyError, 1),
    (70082, False, PbxBusyError, 1),
    (99999, False, PbxBusyError, 1),
    (1, False, PbxBusyError, 1),                   # PARTIAL SUCCESS: call_raw takes it as success first
    (10001, False, PbxConfigError, 2),             # wrong path or firmware: a configuration error
    (10002, False, PbxConfigError, 2),             # API version out of maintenance: pbx.api_path
    (10003, True, PbxConfigError, 2),              # API version unsupported
    (10004, False, TokenExpiredError, 1),
    (10005, False, PbxConfigError, 2),             # a permission: the PBX portal
    (40001, False, RequestRejectedError, 1),
    (40002, False, RequestRejectedError, 1),
    (40003, False, RequestRejectedError, 1),
    (40004, False, RequestRejectedError, 1),
    (60001, False, RecordingMissingError, 1),
    (60002, True, TokenLimitError, 4),
    (60002, False, PbxBusyError, 1),               # outside get_token: a quantity limit, not the token limit
    (70004, True, FatalAuthError, 3),
    (70084, False, PbxConfigError, 2),             # ACTION FORBIDDEN: a permission
    (70087, False, FatalAuthError, 3),
    (70123, False, PbxConfigError, 2),
])
def test_every_errcode_maps_to_the_decision_it_needs(errcode: int, login: bool, kind: type, exit_code: int) -> None:
    exc = error_for_errcode(errcode, "X", login=login, recording="7")
    assert type(exc) is kind
    assert exc.errcode == errcode
    assert exc.exit_code == exit_code


def test_missing_recording_ends_in_state_missing_and_token_limit_waits_minutes() -> None:
    missing = error_for_errcode(60001, "DATA NOT FOUND")
    assert isinstance(missing, RecordingMissingError) and missing.state == "missing"
    limit = error_for_errcode(60002, "MAX", token_limit_backoff_s=600, login=True)
    assert isinstance(limit, TokenLimitError) and limit.retry_after_s == 600


@pytest.mark.parametrize(("value", "now", "wait"), [
    (None, 1e9, None), (0, 1e9, None), ("soon", 1e9, None), (True, 1e9, None),
    (300, 1.7e9, 300.0),                      # seconds to go
    (1_700_000_600, 1_700_000_000, 600.0),    # a Unix time
    (1_600_000_000, 1_700_000_000, 0.0),      # already past
    (10**7, 1.7e9, 86400.0),                  # capped at a day
])
def test_block_wait(value: object, now: float, wait: float | None) -> None:
    from daemon.client import block_wait_s
    assert block_wait_s(value, now) == wait


def test_70004_carries_when_the_block_lifts() -> None:
    blocked = error_for_errcode(70004, "BLOCKED", block_wait=120.0)
    assert isinstance(blocked, FatalAuthError) and blocked.retry_after_s == 120.0 and "120 s" in str(blocked)


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), ("7", 7.0), ("0", 0.0), ("99999999", 3600.0),
    ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),     # now_wall is 07:28:00
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),      # in the past
    ("Thu, 01 Jan 2099 00:00:00 GMT", 3600.0),   # absurd: capped
    ("soon", None), ("-5", None),
])
def test_retry_after_seconds_or_http_date_capped(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now_wall=1445412480.0) == expected


@pytest.mark.parametrize(("now", "expires_at", "lifetime", "margin", "due"), [
    (0, 1800, 1800, 120, False),
    (1679, 1800, 1800, 120, False),
    (1680, 1800, 1800, 120, True),
    (1900, 1800, 1800, 120, True),
    (0, 3, 3, 120, False),       # margin larger than the lifetime: renew at half-life
    (1.5, 3, 3, 120, True),
    (0, float("-inf"), 0, 120, True),
])
def test_token_renewal_due(now: float, expires_at: float, lifetime: float, margin: float, due: bool) -> None:
    assert token_renewal_due(now, expires_at, lifetime, margin) is due


@pytest.mark.parametrize(("resource", "expected"), [
    ("/api/download/a.wav", "https://pbx:8088/api/download/a.wav"),
    ("api/download/a.wav", "https://pbx:8088/api/download/a.wav"),
    ("https://pbx:8088/api/download/a.wav", "https://pbx:8088/api/download/a.wav"),
    ("https://evil.example:8088/api/download/a.wav", None),
    ("http://pbx:8088/api/download/a.wav", None),
])
def test_file_url_never_leaves_the_pbx_origin(resource: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(TransferError):
            file_url("https://pbx:8088/", resource)
    else:
        assert file_url("https://pbx:8088/", resource) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes 100-199/1000", (100, 199, 1000)),
    ("bytes */1000", (None, None, 1000)),
    ("bytes 0-9/*", (0, 9, None)),
    ("items 0-9/10", (None, None, None)),
    (None, (None, None, None)),
])
def test_parse_content_range(value: str | None, expected: tuple[Any, ...]) -> None:
    assert parse_content_range(value) == expected


# ---------------------------------------------------------------- tokens


async def test_login_once_then_proactive_refresh_before_expiry(start_sim: SimFactory) -> None:
    sim = await start_sim()
    clock = ManualClock()
    async with PbxClient(pbx_config(sim.base_url, token_refresh_margin_s=120), clock=clock) as client:
        await client.list_recordings(page_size=1)
        await client.list_recordings(page_size=1)
        assert sim.counters.logins == 1 and sim.counters.refreshes == 0
        clock.advance(1800 - 121)
        await client.list_recordings(page_size=1)
        assert sim.counters.refreshes == 0
        clock.advance(2)  # now inside the 120 s margin
        await client.list_recordings(page_size=1)
        assert sim.counters.refreshes == 1
        assert sim.snapshot()["tokens_live"] == 1
    assert sim.counters.revocations == 1
    assert sim.snapshot()["tokens_live"] == 0


async def test_10004_under_20_concurrent_callers_causes_exactly_one_refresh(start_sim: SimFactory) -> None:
    sim = await start_sim(count=30)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        await client.list_recordings(page_size=1)
        sim.control(expire_tokens=True)
        pages = await asyncio.gather(*(client.list_recordings(page=i + 1, page_size=1) for i in range(20)))
        assert [p.items[0]["id"] for p in pages] == list(range(1029, 1009, -1))
        assert sim.counters.refreshes == 1
        assert sim.counters.logins == 1
        assert sim.snapshot()["tokens_live"] == 1


async def test_expired_refresh_token_falls_back_to_a_fresh_login(start_sim: SimFactory) -> None:
    sim_clock = ManualClock()
    sim = await start_sim(clock=sim_clock, token_lifetime_s=1800, refresh_lifetime_s=3600)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        await client.list_recordings(page_size=1)
        sim_clock.advance(4000)  # both the access and the refresh token are dead on the PBX
        await client.list_recordings(page_size=1)
        assert sim.counters.requests["refresh_token"] == 1
        assert sim.counters.refreshes == 0
        assert sim.counters.logins == 2
        assert sim.snapshot()["tokens_live"] == 1


async def test_bad_credentials_make_exactly_one_login_attempt(start_sim: SimFactory) -> None:
    sim = await start_sim()
    async with PbxClient(pbx_config(sim.base_url, secret="wrong-secret")) as client:
        for _ in range(3):
            with pytest.raises(FatalAuthError) as info:
                await client.list_recordings()
            assert info.value.errcode == -1
            assert "5 failed logins" in str(info.value)
    assert sim.counters.requests["get_token"] == 1
    assert sim.counters.failed_logins == 1


async def test_clear_fatal_allows_exactly_one_more_login(start_sim: SimFactory) -> None:
    sim = await start_sim()
    async with PbxClient(pbx_config(sim.base_url, secret="wrong-secret")) as client:
        with pytest.raises(FatalAuthError):
            await client.list_recordings()
        client.tokens.clear_fatal()
        with pytest.raises(FatalAuthError):
            await client.list_recordings()
        with pytest.raises(FatalAuthError):
            await client.list_recordings()
    assert sim.counters.requests["get_token"] == 2


async def test_ip_block_is_fatal_with_an_operator_message(start_sim: SimFactory) -> None:
    sim = await start_sim()
    for _ in range(5):
        async with PbxClient(pbx_config(sim.base_url, secret="wrong")) as bad:
            with pytest.raises(FatalAuthError):
                await bad.check()
    async with PbxClient(pbx_config(sim.base_url)) as good:
        with pytest.raises(FatalAuthError) as info:
            await good.check()
    assert info.value.errcode == 70004
    assert "administrator" in str(info.value)


async def test_token_limit_backs_off_minutes_without_asking_again(start_sim: SimFactory) -> None:
    sim = await start_sim(max_tokens=1)
    clock = ManualClock()
    async with PbxClient(pbx_config(sim.base_url)) as other:
        await other.check()  # another application instance holds the only token
        async with PbxClient(pbx_config(sim.base_url, token_limit_backoff_s=600), clock=clock) as client:
            with pytest.raises(TokenLimitError) as info:
                await client.check()
            assert info.value.retry_after_s == 600
            clock.advance(300)
            with pytest.raises(TokenLimitError) as info:
                await client.check()
            assert info.value.retry_after_s == pytest.approx(300)
            assert sim.counters.token_limit_hits == 1
            await other.close()  # the other instance revokes its token
            clock.advance(301)
            await client.check()
            assert sim.counters.token_limit_hits == 1
            assert sim.snapshot()["tokens_live"] == 1


# ---------------------------------------------------------------- listing and resolving


async def test_list_and_search_paging(start_sim: SimFactory) -> None:
    sim = await start_sim(count=25)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        seen = []
        for page in (1, 2, 3):
            result = await client.list_recordings(page=page, page_size=10)
            assert result.total == 25
            seen += [item["id"] for item in result.items]
        assert seen == list(range(1024, 999, -1))
        asc = await client.list_recordings(page=1, page_size=3, order_by="asc")
        assert [i["id"] for i in asc.items] == [1000, 1001, 1002]
        found = await client.search_recordings(ids="1003,1007,9999")
        assert sorted(i["id"] for i in found.items) == [1003, 1007] and found.total == 2
        item = sim.recordings[5]
        from daemon.simulator import _epoch
        t = _epoch(item)
        window = await client.search_recordings(start_time=t, end_time=t)
        assert [i["id"] for i in window.items] == [item.id]
        assert set(asc.items[0]) >= {"id", "time", "uid", "call_from", "call_to", "duration", "size",
                                     "call_type", "file"}


async def test_resolve_by_id_and_by_file_name_containing_plus(start_sim: SimFactory) -> None:
    sim = await start_sim(count=30)
    rec = next(r for r in sim.recordings if "+" in r.file)
    async with PbxClient(pbx_config(sim.base_url), url_lifetime_s=1800) as client:
        by_id = await client.resolve_download(rec_id=rec.id)
        by_file = await client.resolve_download(file=rec.file)
        assert by_id.file == by_file.file == rec.file
        assert by_id.url.startswith(sim.base_url + "/api/download/")
        assert "access_token" not in by_id.url
        assert by_id.expires_at == by_id.issued_at + 1800
        with pytest.raises(RecordingMissingError):
            await client.resolve_download(rec_id=424242)


# ---------------------------------------------------------------- streaming


async def _fetch(client: PbxClient, url: str, offset: int = 0) -> tuple[int, int | None, bytes, int]:
    async with client.open_file(url, offset=offset) as stream:
        body = b"".join([c async for c in stream.chunks(4096)])
        return stream.start, stream.total, body, stream.status


async def test_streaming_whole_file_and_with_range(start_sim: SimFactory) -> None:
    sim = await start_sim(count=3, size_min=200_000, size_max=300_000)
    rec = sim.recordings[0]
    expected = sim.content(rec)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        url = (await client.resolve_download(rec_id=rec.id)).url
        start, total, body, status = await _fetch(client, url)
        assert (start, total, status) == (0, rec.size, 200) and body == expected
        start, total, body, status = await _fetch(client, url, offset=123_457)
        assert (start, total, status) == (123_457, rec.size, 206) and body == expected[123_457:]
        start, total, body, status = await _fetch(client, url, offset=rec.size)
        assert (status, total, body) == (416, rec.size, b"")


async def test_streaming_restarts_at_zero_when_range_is_ignored(start_sim: SimFactory) -> None:
    sim = await start_sim(count=1, range_support=False)
    rec = sim.recordings[0]
    async with PbxClient(pbx_config(sim.base_url)) as client:
        url = (await client.resolve_download(rec_id=rec.id)).url
        start, _, body, status = await _fetch(client, url, offset=1000)
        assert (start, status) == (0, 200)
        assert body == sim.content(rec)


async def test_file_url_classifies_expiry_envelopes_and_html(start_sim: SimFactory) -> None:
    sim = await start_sim(count=2)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        url = (await client.resolve_download(rec_id=1000)).url
        sim.control(expire_urls=True)
        with pytest.raises(UrlExpiredError):
            await _fetch(client, url)
        url = (await client.resolve_download(rec_id=1000)).url
        sim.control(expire_tokens=True)
        *_, body, _ = await _fetch(client, url)  # 10004 on the file URL: one refresh, then the bytes
        assert body == sim.content(sim.recordings[0]) and sim.counters.refreshes == 1
        sim.control(options={"json_body_rate": 1.0})
        with pytest.raises(PbxBusyError) as info:
            await _fetch(client, url)
        assert info.value.errcode == -2


async def test_connection_refused_is_pbx_unavailable() -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with PbxClient(pbx_config(f"http://127.0.0.1:{port}", timeout_s=2)) as client:
        with pytest.raises(PbxUnavailableError) as info:
            await client.check()
    assert "cannot connect" in str(info.value)
    # A sentence naming where, not aiohttp's repr or errno text.
    assert f"connection refused by 127.0.0.1:{port}" in str(info.value)
    assert "Errno" not in str(info.value) and "Connect call failed" not in str(info.value)


@pytest.mark.parametrize(("status", "header", "retry_after"), [(503, "7", 7.0), (429, "120", 120.0), (500, None, None)])
async def test_http_errors_are_busy_with_the_server_retry_after(status: int, header: str | None,
                                                                retry_after: float | None) -> None:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Retry-After": header} if header else {})
    runner, url = await serve_on_loopback(handler)
    try:
        async with PbxClient(pbx_config(url)) as client:
            with pytest.raises(PbxBusyError) as info:
                await client.check()
        assert info.value.retry_after_s == retry_after
    finally:
        await runner.cleanup()


async def test_every_request_carries_the_user_agent(start_sim: SimFactory) -> None:
    sim = await start_sim(count=1)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        url = (await client.resolve_download(rec_id=1000)).url
        await _fetch(client, url)
    assert sim.counters.bad_user_agent == 0
    assert sum(sim.counters.requests.values()) == 4  # get_token, download, file, del_token


# ---------------------------------------------------------------- TLS


@pytest.fixture
def tls_ca(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "pbx-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server_ctx, ca_file


async def test_tls_with_ca_file_works_and_without_it_fails_clearly(start_sim: SimFactory,
                                                                   tls_ca: tuple[ssl.SSLContext, Path]) -> None:
    server_ctx, ca_file = tls_ca
    sim = await start_sim(ssl_context=server_ctx)
    assert sim.base_url.startswith("https://")
    async with PbxClient(pbx_config(sim.base_url, tls=TlsConfig(ca_file=ca_file))) as client:
        page = await client.check()
        assert page.total == sim.opts.count
    async with PbxClient(pbx_config(sim.base_url)) as client:
        with pytest.raises(TlsError) as info:
            await client.check()
    assert "pbx.tls.ca_file" in str(info.value)
    assert sim.counters.logins == 1  # nothing was sent over the unverified connection


async def test_tls_wrong_host_name_is_rejected(start_sim: SimFactory, tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("pbx.example.test").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sim = await start_sim(ssl_context=server_ctx)
    async with PbxClient(pbx_config(sim.base_url, tls=TlsConfig(ca_file=ca_file))) as client:
        with pytest.raises(TlsError):
            await client.check()


async def test_tls_verify_false_connects_to_an_unknown_certificate(start_sim: SimFactory,
                                                                   tls_ca: tuple[ssl.SSLContext, Path]) -> None:
    sim = await start_sim(ssl_context=tls_ca[0])
    async with PbxClient(pbx_config(sim.base_url, tls=TlsConfig(verify=False))) as client:
        assert (await client.check()).total == sim.opts.count


async def test_stalled_body_raises_transfer_error(start_sim: SimFactory) -> None:
    sim = await start_sim(count=1, stall_rate=1.0, stall_s=30)
    async with PbxClient(pbx_config(sim.base_url), read_timeout_s=0.3) as client:
        url = (await client.resolve_download(rec_id=1000)).url
        with pytest.raises(TransferError) as info:
            await _fetch(client, url)
    assert "stalled" in str(info.value)


async def test_body_cut_midway_raises_transfer_error(start_sim: SimFactory) -> None:
    sim = await start_sim(count=1, size_min=300_000, size_max=300_000, cut_rate=1.0)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        url = (await client.resolve_download(rec_id=1000)).url
        with pytest.raises(TransferError):
            await _fetch(client, url)


async def test_aiohttp_default_user_agent_is_not_what_we_send(start_sim: SimFactory) -> None:
    sim = await start_sim(count=1)
    async with (aiohttp.ClientSession() as raw,
                raw.post(f"{sim.base_url}/openapi/v1.0/get_token", json={}, skip_auto_headers=["User-Agent"]) as r):
        assert (await r.json())["errcode"] == 40002


async def test_a_crashed_process_token_is_reused_not_leaked(start_sim: SimFactory, tmp_path: Path) -> None:
    """A process killed without revoking leaves its token; the next one picks it up instead of logging
    in again, so that a crash loop never runs into the PBX's 8-token limit."""
    sim = await start_sim(count=2)
    store = tmp_path / "state" / "ledger.db.token"
    crashed = PbxClient(pbx_config(sim.base_url), token_store=store)
    await crashed.__aenter__()
    await crashed.check()
    await crashed.session.close()              # dies without revoking
    await crashed.fresh_session.close()
    assert store.stat().st_mode & 0o777 == 0o600
    assert sim.counters.logins == 1
    for _ in range(3):                         # three more lives
        async with PbxClient(pbx_config(sim.base_url), token_store=store) as client:
            await client.check()
        assert not store.exists()              # revoked on a clean exit: nothing left behind
        assert sim.snapshot()["tokens_live"] == 0
        crashed = PbxClient(pbx_config(sim.base_url), token_store=store)
        await crashed.__aenter__()
        await crashed.check()
        await crashed.session.close()
        await crashed.fresh_session.close()
    assert sim.counters.logins == 4            # one per clean exit, none per crash
    assert sim.snapshot()["tokens_live"] == 1


async def test_a_stored_token_for_another_pbx_or_client_is_ignored(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    store = tmp_path / "token"
    crashed = PbxClient(pbx_config(sim.base_url), token_store=store)
    await crashed.__aenter__()
    await crashed.check()
    await crashed.session.close()
    await crashed.fresh_session.close()
    async with PbxClient(pbx_config(sim.base_url, client_id="other-app", secret=sim.opts.client_secret),
                         token_store=store) as other:
        assert not other.tokens.authenticated
    assert not store.exists()


@pytest.mark.parametrize("lead", [b"<", b"{"])
async def test_a_resumed_body_that_starts_like_markup_is_still_the_recording(start_sim: SimFactory,
                                                                            lead: bytes) -> None:
    """Found by the 200-kill soak: a resume point whose byte is '<' was taken for an HTML page, on
    every attempt, until the recording failed. A 206 body starts mid-file; any byte may stand there."""
    sim = await start_sim(count=1, size_min=300_000, size_max=300_000)
    rec = sim.recordings[0]
    content = sim.content(rec)
    offset = content.index(lead, 1000)
    async with PbxClient(pbx_config(sim.base_url)) as client:
        url = (await client.resolve_download(rec_id=rec.id)).url
        start, total, body, status = await _fetch(client, url, offset=offset)
    assert (status, start, total) == (206, offset, rec.size)
    assert body == content[offset:]
