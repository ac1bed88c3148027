"""The simulator keeps every rule of the P-Series API it claims to; each rule has its own test.

These tests speak raw HTTP with aiohttp, not through the archiver's client, so that a client bug
cannot hide a simulator bug.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from daemon.clock import ManualClock
from daemon.simulator import HOSTILE_NAMES, SimOptions, Simulator, make_recordings, recording_bytes
from tests.conftest import SimFactory

UA = {"User-Agent": "OpenAPI"}
API = "/openapi/v1.0"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=UA) as session:
        yield session


async def _login(http: aiohttp.ClientSession, sim: Simulator, secret: str | None = None) -> dict[str, Any]:
    body = {"username": sim.opts.client_id, "password": secret or sim.opts.client_secret}
    async with http.post(f"{sim.base_url}{API}/get_token", json=body) as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def _get(http: aiohttp.ClientSession, sim: Simulator, path: str, **params: Any) -> dict[str, Any]:
    async with http.get(f"{sim.base_url}{API}/{path}", params={k: str(v) for k, v in params.items()}) as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def test_requests_without_user_agent_get_40002(start_sim: SimFactory) -> None:
    sim = await start_sim()
    async with (aiohttp.ClientSession() as bare,
                bare.post(f"{sim.base_url}{API}/get_token", json={}, skip_auto_headers=["User-Agent"]) as r):
        assert r.status == 200
        assert await r.json() == {"errcode": 40002, "errmsg": "PARAMETER ERROR"}
    assert sim.counters.bad_user_agent == 1


async def test_get_token_answers_the_documented_shape(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    data = await _login(http, sim)
    assert data["errcode"] == 0 and data["errmsg"] == "SUCCESS"
    assert data["access_token_expire_time"] == 1800 and data["refresh_token_expire_time"] == 86400
    assert data["access_token"] and data["refresh_token"]


async def test_bad_credentials_answer_errcode_minus_1_in_http_200(start_sim: SimFactory,
                                                                   http: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    data = await _login(http, sim, secret="nope")
    assert data["errcode"] == -1 and data["errmsg"] == "FAILURE"
    assert data["invalid_param_list"] == [{"field": "username or password", "value": "error"}]


async def test_five_failed_logins_block_the_ip(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    for _ in range(4):
        assert (await _login(http, sim, secret="nope"))["errcode"] == -1
    assert (await _login(http, sim))["errcode"] == 0  # a success resets the count
    for _ in range(5):
        assert (await _login(http, sim, secret="nope"))["errcode"] == -1
    blocked = await _login(http, sim)
    assert blocked["errcode"] == 70004 and "block_expire_time" in blocked
    sim.control(unblock=True)
    assert (await _login(http, sim))["errcode"] == 0


async def test_at_most_8_live_tokens(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim()
    tokens = [await _login(http, sim) for _ in range(8)]
    assert all(t["errcode"] == 0 for t in tokens)
    assert (await _login(http, sim))["errcode"] == 60002
    await _get(http, sim, "del_token", access_token=tokens[0]["access_token"])
    assert (await _login(http, sim))["errcode"] == 0
    assert sim.snapshot()["tokens_live"] == 8 and sim.counters.revocations == 1


async def test_tokens_expire_after_their_lifetime(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    sim = await start_sim(clock=clock, token_lifetime_s=30)
    token = (await _login(http, sim))["access_token"]
    assert (await _get(http, sim, "recording/list", access_token=token))["errcode"] == 0
    clock.advance(31)
    assert (await _get(http, sim, "recording/list", access_token=token))["errcode"] == 10004


async def test_refresh_gives_a_new_pair_and_retires_the_old(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    sim = await start_sim(clock=clock, refresh_lifetime_s=100)
    first = await _login(http, sim)
    async with http.post(f"{sim.base_url}{API}/refresh_token", json={"refresh_token": first["refresh_token"]}) as r:
        second = await r.json()
    assert second["errcode"] == 0 and second["access_token"] != first["access_token"]
    assert (await _get(http, sim, "recording/list", access_token=first["access_token"]))["errcode"] == 10004
    assert (await _get(http, sim, "recording/list", access_token=second["access_token"]))["errcode"] == 0
    clock.advance(101)
    async with http.post(f"{sim.base_url}{API}/refresh_token", json={"refresh_token": second["refresh_token"]}) as r:
        assert (await r.json())["errcode"] == 10004
    assert sim.counters.refreshes == 1


async def test_list_pages_and_sorts(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=12)
    token = (await _login(http, sim))["access_token"]
    page2 = await _get(http, sim, "recording/list", access_token=token, page=2, page_size=5)
    assert page2["total_number"] == 12
    assert [d["id"] for d in page2["data"]] == [1006, 1005, 1004, 1003, 1002]
    asc = await _get(http, sim, "recording/list", access_token=token, page=3, page_size=5, order_by="asc")
    assert [d["id"] for d in asc["data"]] == [1010, 1011]
    bad = await _get(http, sim, "recording/list", access_token=token, page=0)
    assert bad["errcode"] == 40002


async def test_search_filters_by_ids_caller_and_callee(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=20)
    token = (await _login(http, sim))["access_token"]
    rec = sim.recordings[3]
    number = rec.call_from.split("<")[1].rstrip(">")
    by_ids = await _get(http, sim, "recording/search", access_token=token, ids="1001,1003")
    assert sorted(d["id"] for d in by_ids["data"]) == [1001, 1003]
    by_caller = await _get(http, sim, "recording/search", access_token=token, caller=number, page_size=100)
    assert rec.id in [d["id"] for d in by_caller["data"]]
    assert all(number in d["call_from"] for d in by_caller["data"])


async def test_download_url_works_until_it_expires(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    clock = ManualClock()
    sim = await start_sim(clock=clock, count=2, url_lifetime_s=60, token_lifetime_s=3600)
    token = (await _login(http, sim))["access_token"]
    resolved = await _get(http, sim, "recording/download", access_token=token, id=1001)
    assert resolved["file"] == sim.recordings[1].file
    assert resolved["download_resource_url"].startswith("/api/download/Recording-")
    url = f"{sim.base_url}{resolved['download_resource_url']}"
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 200 and await r.read() == sim.content(sim.recordings[1])
    clock.advance(61)
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 404


async def test_with_a_web_server_in_front_a_valid_file_request_is_an_internal_redirect(
        start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    """``accel_redirect`` (the bench's nginx mode): the token and the URL's life are still checked here;
    only the bytes come from the web server, named by X-Accel-Redirect."""
    from urllib.parse import quote
    clock = ManualClock()
    sim = await start_sim(clock=clock, count=30, url_lifetime_s=60, token_lifetime_s=3600, accel_redirect="/_files/")
    rec = next(r for r in sim.recordings if "+" in r.file)
    token = (await _login(http, sim))["access_token"]
    resolved = await _get(http, sim, "recording/download", access_token=token, file=rec.file)
    url = f"{sim.base_url}{resolved['download_resource_url']}"
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 200 and await r.read() == b""
        assert r.headers["X-Accel-Redirect"] == "/_files/" + quote(rec.file)
    async with http.get(url, params={"access_token": "bad"}) as r:
        assert "X-Accel-Redirect" not in r.headers and (await r.json())["errcode"] == 10004
    clock.advance(61)
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 404 and "X-Accel-Redirect" not in r.headers


async def test_file_url_needs_a_valid_token(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1)
    token = (await _login(http, sim))["access_token"]
    resolved = await _get(http, sim, "recording/download", access_token=token, id=1000)
    async with http.get(f"{sim.base_url}{resolved['download_resource_url']}", params={"access_token": "bad"}) as r:
        assert r.status == 200 and (await r.json())["errcode"] == 10004


async def test_download_by_file_name_with_plus_and_unknown_ids(start_sim: SimFactory,
                                                              http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=30)
    token = (await _login(http, sim))["access_token"]
    rec = next(r for r in sim.recordings if "+" in r.file)
    by_file = await _get(http, sim, "recording/download", access_token=token, file=rec.file)
    assert by_file["file"] == rec.file
    assert (await _get(http, sim, "recording/download", access_token=token, id=5))["errcode"] == 60001
    assert (await _get(http, sim, "recording/download", access_token=token))["errcode"] == 40002


@pytest.mark.parametrize("range_support", [True, False])
async def test_range_requests(start_sim: SimFactory, http: aiohttp.ClientSession, range_support: bool) -> None:
    sim = await start_sim(count=1, size_min=150_000, size_max=150_000, range_support=range_support)
    token = (await _login(http, sim))["access_token"]
    url = sim.base_url + (await _get(http, sim, "recording/download", access_token=token, id=1000))[
        "download_resource_url"]
    content = sim.content(sim.recordings[0])
    async with http.get(url, params={"access_token": token}, headers={"Range": "bytes=70000-"}) as r:
        body = await r.read()
        if range_support:
            assert r.status == 206 and r.headers["Content-Range"] == "bytes 70000-149999/150000"
            assert body == content[70000:]
        else:
            assert r.status == 200 and body == content
    async with http.get(url, params={"access_token": token}, headers={"Range": "bytes=150000-"}) as r:
        assert r.status == (416 if range_support else 200)


async def test_mp3_mode_allows_one_request_at_a_time(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=2, format="mp3", stall_rate=1.0, stall_s=5)
    token = (await _login(http, sim))["access_token"]
    url = sim.base_url + (await _get(http, sim, "recording/download", access_token=token, id=1000))[
        "download_resource_url"]
    async with http.get(url, params={"access_token": token}) as stalled:
        assert stalled.status == 200  # headers sent, body stalled: the transfer is in flight
        second = await _get(http, sim, "recording/download", access_token=token, id=1001)
        assert second["errcode"] == 70082
    assert sim.counters.mp3_violations == 1
    assert sim.counters.max_concurrency == 2


async def test_wav_mode_allows_concurrency(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=2, stall_rate=1.0, stall_s=5)
    token = (await _login(http, sim))["access_token"]
    url = sim.base_url + (await _get(http, sim, "recording/download", access_token=token, id=1000))[
        "download_resource_url"]
    async with http.get(url, params={"access_token": token}) as stalled:
        assert stalled.status == 200
        assert (await _get(http, sim, "recording/download", access_token=token, id=1001))["errcode"] == 0
    assert sim.counters.mp3_violations == 0


def test_contents_are_deterministic_and_look_like_audio() -> None:
    opts = SimOptions(count=3, size_min=100_000, size_max=200_000, seed=7)
    a, b = make_recordings(opts), make_recordings(opts)
    assert a == b
    wav = recording_bytes(7, "wav", a[0])
    assert wav == recording_bytes(7, "wav", b[0]) and len(wav) == a[0].size
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE" and wav[12:16] == b"fmt "
    assert struct.unpack("<I", wav[4:8])[0] == a[0].size - 8
    assert recording_bytes(8, "wav", a[0]) != wav
    assert recording_bytes(7, "wav", a[0], 1000, 5000) == wav[1000:5000]
    mp3 = recording_bytes(7, "mp3", a[0])
    assert mp3[:3] == b"ID3" and mp3[10:12] == b"\xff\xfb"
    assert a[0].file.endswith(".wav") and make_recordings(SimOptions(format="mp3"))[0].file.endswith(".mp3")


def test_file_names_follow_the_pbx_pattern_and_hostile_names_can_be_asked_for() -> None:
    recs = make_recordings(SimOptions(count=12))
    import re
    pattern = re.compile(r"^\d{14}-\d+\.\d+-\+?\d+-\+?\d+-(Internal|Inbound|Outbound)\.wav$")
    assert all(pattern.match(r.file) for r in recs)
    hostile = make_recordings(SimOptions(count=12, hostile_names=True))
    assert [r.file for r in hostile[: len(HOSTILE_NAMES)]] == list(HOSTILE_NAMES)
    assert any(len(r.file) > 255 for r in hostile)


@pytest.mark.parametrize(("option", "check"), [
    ("http500_rate", "http500"), ("errcode_rate", "errcode-2"), ("busy_rate", "errcode70082"),
])
async def test_api_fault_injection(start_sim: SimFactory, http: aiohttp.ClientSession, option: str,
                                   check: str) -> None:
    sim = await start_sim(count=1, **{option: 1.0})
    token = (await _login(http, sim))["access_token"]
    async with http.get(f"{sim.base_url}{API}/recording/download", params={"access_token": token, "id": "1000"}) as r:
        if check == "http500":
            assert r.status == 500
        else:
            assert (await r.json())["errcode"] == {"errcode-2": -2, "errcode70082": 70082}[check]
    assert sim.counters.faults[check] == 1


async def _file_url(http: aiohttp.ClientSession, sim: Simulator) -> tuple[str, str]:
    token = (await _login(http, sim))["access_token"]
    saved = sim.opts
    sim.opts = SimOptions(**{**saved.__dict__, "http500_rate": 0.0})
    url = sim.base_url + (await _get(http, sim, "recording/download", access_token=token, id=1000))[
        "download_resource_url"]
    sim.opts = saved
    return url, token


async def test_body_cut_midway_closes_the_connection(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1, size_min=300_000, size_max=300_000, cut_rate=1.0)
    url, token = await _file_url(http, sim)
    async with http.get(url, params={"access_token": token}) as r:
        assert r.content_length == 300_000
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert sim.counters.faults["cut"] == 1 and not sim.counters.transfers_completed


async def test_stall_sends_headers_then_nothing(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1, stall_rate=1.0, stall_s=30)
    url, token = await _file_url(http, sim)
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r.content.read(1), timeout=0.3)


async def test_json_envelope_in_place_of_audio(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1, json_body_rate=1.0)
    url, token = await _file_url(http, sim)
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 200
        assert (await r.read()).startswith(b'{"errcode": -2')


async def test_http500_on_file_urls(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1, http500_rate=1.0)
    url, token = await _file_url(http, sim)
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 500


async def test_counters_endpoint_reports_everything(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1)
    url, token = await _file_url(http, sim)
    async with http.get(url, params={"access_token": token}) as r:
        await r.read()
    async with http.get(f"{sim.base_url}/_sim/counters") as r:
        counters = await r.json()
    assert counters["requests"] == {"get_token": 1, "recording/download": 1, "file": 1}
    assert counters["tokens_issued"] == 1 and counters["tokens_live"] == 1
    assert counters["transfers_completed"] == {"1000": 1}
    assert counters["bytes_served"] == sim.recordings[0].size
    for key in ("refreshes", "revocations", "failed_logins", "max_concurrency", "mp3_violations", "faults"):
        assert key in counters
    async with http.post(f"{sim.base_url}/_sim/control", json={"expire_tokens": True}) as r:
        assert (await r.json()) == {"ok": True}
    assert (await _get(http, sim, "recording/list", access_token=token))["errcode"] == 10004


async def test_url_expired_fault_answers_404_once_resolved(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1, url_expired_rate=1.0)
    url, token = await _file_url(http, sim)
    async with http.get(url, params={"access_token": token}) as r:
        assert r.status == 404
    assert sim.counters.faults["url_expired"] == 1


async def test_bytes_per_second_paces_each_transfer(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1, size_min=300_000, size_max=300_000, bytes_per_second=1_000_000)
    url, token = await _file_url(http, sim)
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with http.get(url, params={"access_token": token}) as r:
        assert await r.read() == sim.content(sim.recordings[0])
    # A lower bound only: a slow machine makes this longer, never shorter.
    assert loop.time() - began >= 0.2


async def test_websocket_sends_30012_events_and_answers_heartbeats(start_sim: SimFactory,
                                                                  http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1)
    token = (await _login(http, sim))["access_token"]
    async with http.get(f"{sim.base_url}{API}/subscribe", params={"access_token": "bad"}) as r:
        assert (await r.json())["errcode"] == 10004
    async with http.ws_connect(f"{sim.base_url}{API}/subscribe", params={"access_token": token}) as ws:
        await ws.send_str('{"topic_list":[30012]}')
        assert json.loads((await ws.receive(timeout=5)).data) == {"errcode": 0, "errmsg": "SUCCESS"}
        await ws.send_str("heartbeat")
        assert (await ws.receive(timeout=5)).data == "heartbeat response"
        rec = await sim.add_recording()
        event = json.loads((await ws.receive(timeout=5)).data)
        assert event["type"] == 30012
        assert json.loads(event["msg"])["recording"] == rec.file
    assert sim.counters.ws_connections == 1 and sim.counters.events_sent == 1
    assert rec.id == 1001 and sim.by_file[rec.file] is rec


async def test_new_recordings_appear_over_time(start_sim: SimFactory) -> None:
    sim = await start_sim(count=1, new_every_s=0.02)
    while len(sim.recordings) < 4:
        await asyncio.sleep(0.02)
    assert [r.id for r in sim.recordings][:4] == [1000, 1001, 1002, 1003]


async def test_listing_items_carry_archive_status(start_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await start_sim(count=1)
    token = (await _login(http, sim))["access_token"]
    item = (await _get(http, sim, "recording/list", access_token=token))["data"][0]
    assert "archive_status" in item
