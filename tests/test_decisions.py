"""The pipeline's pure decisions, as tables: names, layout, audio, back-off, pauses, URL expiry, refs."""

from __future__ import annotations

import datetime as dt
from pathlib import PurePosixPath

import pytest

from daemon.archive import Naming, alternate_name, final_relpath, is_safe_name, looks_like_audio
from daemon.client import DownloadUrl, redirect_refused
from daemon.downloader import gate_hint, too_slow, unproven_end, verification_problem
from daemon.ledger import Ref
from daemon.reconcile import identity_decision
from daemon.resolver import RequestGate, url_needs_refresh
from daemon.scheduler import backoff_delay, claim_ahead_count, pause_delay
from daemon.simulator import HOSTILE_NAMES
from daemon.sources import parse_lines, parse_ref, ref_problem, strip_comment
from daemon.supervise import restart_delay

NOW = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC)
GOOD = "20220412173331-1649756009.12-2002-2005-Internal.wav"


@pytest.mark.parametrize(("name", "safe"), [
    (GOOD, True),
    ("20220412173331-1649756009.12-+4930123-2005-Inbound.mp3", True),
    ("a@b_c.wav", True),
    ("x.WAV", False),                 # one extension, .wav or .mp3, as the PBX writes it
    ("x.wav.mp3", False),
    ("x.ogg", False),
    (".wav", False),
    ("../../x.wav", False),
    ("a/b.wav", False),
    ("/etc/passwd.wav", False),
    ("x" * 197 + ".wav", False),      # 201 characters
    ("x" * 196 + ".wav", True),       # 200 characters
    (".", False),
    ("-rf.wav", False),
    ("nul\x00byte.wav", False),
    ("sp ace.wav", False),
    ("", False),
])
def test_is_safe_name(name: str, safe: bool) -> None:
    assert is_safe_name(name) is safe


@pytest.mark.parametrize(("layout", "naming", "expected"), [
    ("{year}/{month}/{day}/{file}", Naming(614, GOOD, "Internal"), f"2022/04/12/{GOOD}"),
    ("{call_type}/{stem}.{ext}", Naming(614, GOOD, "Internal"), f"Internal/{GOOD[:-4]}.wav"),
    ("{call_type}/{id}.{ext}", Naming(614, GOOD, "Sneaky/../x"), "unknown/614.wav"),
    ("{year}/{month}/{day}/{file}", Naming(7, "../../x.wav"), "2026/03/04/7.wav"),
    ("{year}/{month}/{day}/{file}", Naming(7, "a/b.mp3"), "2026/03/04/7.mp3"),
    ("{year}/{month}/{day}/{file}", Naming(7, "x" * 296 + ".wav"), "2026/03/04/7.wav"),
    ("{year}/{month}/{day}/{file}", Naming(7, "20221399999999-1.2-3-Inbound.wav"),   # month 13: not a date
     "2026/03/04/20221399999999-1.2-3-Inbound.wav"),
    ("{file}", Naming(None, "../evil.wav"), "file-"),
])
def test_final_relpath_never_leaves_the_archive(layout: str, naming: Naming, expected: str) -> None:
    rel = final_relpath(layout, naming, NOW)
    assert not rel.is_absolute() and ".." not in rel.parts
    assert str(rel).startswith(expected)


@pytest.mark.parametrize("hostile", HOSTILE_NAMES)
def test_every_hostile_simulator_name_gets_an_id_name(hostile: str) -> None:
    rel = final_relpath("{year}/{month}/{day}/{file}", Naming(42, hostile), NOW)
    assert rel.name in ("42.wav", "42.mp3")
    assert len(rel.parts) == 4


def test_alternate_name_keeps_the_extension() -> None:
    assert alternate_name("a.b.wav", "614") == "a.b~614.wav"


@pytest.mark.parametrize(("head", "audio"), [
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", True),
    (b"ID3\x04\x00", True),
    (b"\xff\xfb\x90\x64", True),
    (b"\xff\xf3", True),
    (b'{"errcode":-2}', False),
    (b"<html>", False),
    (b"RIFF\x00\x00\x00\x00AVI ", False),
    (b"", False),
])
def test_looks_like_audio(head: bytes, audio: bool) -> None:
    assert looks_like_audio(head) is audio


@pytest.mark.parametrize(("size", "head", "listing", "problem"), [
    (1000, b"RIFF1234WAVE", None, None),
    (1000, b"RIFF1234WAVE", 1000, None),
    (999, b"RIFF1234WAVE", 1000, "lists 1000"),
    (0, b"", None, "empty"),
    (50, b"<html>", None, "not audio"),
])
def test_verification_problem(size: int, head: bytes, listing: int | None, problem: str | None) -> None:
    result = verification_problem(size, head, listing)
    assert (result is None) if problem is None else (problem in (result or ""))


@pytest.mark.parametrize(("window_bytes", "window_s", "floor", "slow"), [
    (30 * 1024, 30, 1024, False),
    (30 * 1024 - 1, 30, 1024, True),
    (0, 29.9, 1024, False),        # the window is not over yet
    (0, 60, 0, False),             # floor disabled
])
def test_too_slow(window_bytes: int, window_s: float, floor: int, slow: bool) -> None:
    assert too_slow(window_bytes, window_s, floor) is slow


@pytest.mark.parametrize(("attempt", "rand", "expected"), [
    (1, 0.5, 1.0), (2, 0.5, 2.0), (3, 0.999, 8 * 0.999), (10, 1.0, 60.0), (1, 0.0, 0.0),
])
def test_backoff_is_exponential_with_full_jitter_and_a_cap(attempt: int, rand: float, expected: float) -> None:
    assert backoff_delay(attempt, base_s=2.0, cap_s=60.0, rand=rand) == pytest.approx(expected)


@pytest.mark.parametrize(("streak", "retry_after", "rand", "expected"), [
    (1, None, 0.0, 0.5), (1, None, 1.0, 1.0), (4, None, 1.0, 8.0), (20, None, 1.0, 300.0),
    (1, 600.0, 0.0, 600.0), (20, None, 0.0, 150.0),
])
def test_pause_grows_and_honours_retry_after(streak: int, retry_after: float | None, rand: float,
                                             expected: float) -> None:
    assert pause_delay(streak, retry_after, cap_s=300.0, rand=rand) == pytest.approx(expected)


def _url(issued: float, expires: float) -> DownloadUrl:
    return DownloadUrl(file="a.wav", url="http://x/api/download/a", issued_at=issued, expires_at=expires)


@pytest.mark.parametrize(("now", "url", "margin", "refresh"), [
    (0.0, None, 120, True),
    (100.0, _url(0, 1800), 120, False),
    (1679.9, _url(0, 1800), 120, False),
    (1680.0, _url(0, 1800), 120, True),
    (2000.0, _url(0, 1800), 120, True),
    (0.9, _url(0, 2), 120, False),     # tiny lifetimes: margin is at most half
    (1.0, _url(0, 2), 120, True),
])
def test_url_needs_refresh(now: float, url: DownloadUrl | None, margin: float, refresh: bool) -> None:
    assert url_needs_refresh(now, url, margin) is refresh


@pytest.mark.parametrize(("configured", "seen", "exclusive_before", "exclusive_after"), [
    ("auto", "wav", True, False),
    ("auto", "mp3", True, True),
    ("auto", None, True, True),          # unknown: one at a time
    ("wav", "mp3", False, True),         # mp3 served, whatever the config says: one at a time
    ("mp3", "wav", True, True),          # configured mp3 stays exclusive
])
def test_request_gate(configured: str, seen: str | None, exclusive_before: bool, exclusive_after: bool) -> None:
    gate = RequestGate(configured)
    assert gate.exclusive is exclusive_before
    gate.learn(seen)
    assert gate.exclusive is exclusive_after


def test_request_gate_mp3_is_sticky_in_auto() -> None:
    gate = RequestGate("auto")
    gate.learn("mp3")
    gate.learn("wav")
    assert gate.exclusive


@pytest.mark.parametrize(("text", "ref"), [
    ("1727", Ref(rec_id=1727)),
    ("  1727  ", Ref(rec_id=1727)),
    ("0", None),
    ("-3", None),
    ("17x", None),
    ("١٢", None),                      # non-ASCII digits are not ids
    (GOOD, Ref(file=GOOD)),
    ("a+b.MP3", Ref(file="a+b.MP3")),
    ("notes.txt", None),
    (".wav", None),
    ("", None),
    ("../../x.wav", None),             # path-like names never reach the PBX or the archive
    ("a/b.wav", None),
    ("a\\b.wav", None),
    (".hidden.wav", None),
    ("tab\tname.wav", None),
    ("c#d.wav", Ref(file="c#d.wav")),
])
def test_parse_ref(text: str, ref: Ref | None) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize(("text", "why"), [
    ("1727", None),
    ("a..b.wav", "a path"),            # a `..` anywhere: never a PBX file name
    ("x/..wav", "a path"),
    ("a\\b.wav", "a path"),
    ("../x.wav", "a path"),
    ("nul\x00.wav", "control characters"),
    ("esc\x1b[2J.wav", "control characters"),
    ("c1\x85.wav", "control characters"),
    ("del\x7f.wav", "control characters"),
    ("Zürich-anruf.wav", None),         # non-ASCII letters are names; only controls are refused
    ("a.b.wav", None),
    ("0", "positive"),
])
def test_ref_problem_names_why_a_name_is_refused(text: str, why: str | None) -> None:
    problem = ref_problem(text)
    assert (problem is None) if why is None else (problem is not None and why in problem)


@pytest.mark.parametrize(("line", "kept"), [
    ("1007 # from the CRM", "1007"),
    ("1007\t#tab", "1007"),
    ("# whole line", ""),
    ("  # indented", ""),
    ("c#d.wav", "c#d.wav"),            # a '#' inside a name is not a comment
    ("x.wav #", "x.wav"),
    ("", ""),
])
def test_strip_comment(line: str, kept: str) -> None:
    assert strip_comment(line) == kept


@pytest.mark.parametrize(("recorded", "on_disk", "has_done", "present", "action"), [
    (None, None, False, 0, "create"),        # a new archive
    (None, None, True, 3, "create"),         # a ledger from before markers, its files here
    (None, None, True, 0, "refuse"),         # done rows, none on disk: an unmounted disk
    (None, "m1", False, 0, "record"),        # a new (or deleted) ledger beside a marked archive
    (None, "m1", True, 2, "record"),
    (None, "m1", True, 0, "refuse"),
    ("m1", "m1", True, 0, "ok"),             # emptied but marked: vanished files are re-queued
    ("m1", "m2", True, 5, "refuse"),         # another archive
    ("m1", "m2", False, 0, "refuse"),
    ("m1", None, True, 5, "refuse"),         # the marker is gone: emptied, or not mounted
    ("m1", None, False, 0, "refuse"),
])
def test_identity_decision(recorded: str | None, on_disk: str | None, has_done: bool, present: int,
                           action: str) -> None:
    got, why = identity_decision(recorded, on_disk, has_done=has_done, done_present=present)
    assert got == action and why


@pytest.mark.parametrize(("failures", "rand", "delay"), [(1, 0.0, 0.5), (1, 1.0, 1.0), (3, 1.0, 4.0),
                                                        (10, 1.0, 60.0), (10, 0.0, 30.0)])
def test_restart_delay(failures: int, rand: float, delay: float) -> None:
    assert restart_delay(failures, rand) == delay


@pytest.mark.parametrize(("location", "shown"), [
    ("http://127.0.0.2:8080/openapi/v1.0/get_token?access_token=abc", "http://127.0.0.2:8080"),
    ("https://evil.example/x", "https://evil.example"),
    ("/elsewhere?token=abc", "a path on the same host"),
    (None, "a path on the same host"),
])
def test_a_refused_redirect_names_the_pbx_and_the_target_origin_only(location: str | None, shown: str) -> None:
    text = redirect_refused("get_token", 307, location, "https://192.168.5.150:8088")
    assert "https://192.168.5.150:8088" in text and shown in text and "abc" not in text
    assert "pbx.base_url" in text


def test_parse_lines_skips_comments_and_reports_bad_lines_by_number() -> None:
    parsed = parse_lines(["# header", "", "1727", "  bogus  ", "x.wav", "12 13"], first_lineno=1)
    assert parsed.refs == [Ref(rec_id=1727), Ref(file="x.wav")]
    assert [(n, text) for n, text, _ in parsed.bad] == [(4, "bogus"), (6, "12 13")]


def test_final_relpath_uses_the_utc_date_when_the_name_has_none() -> None:
    assert final_relpath("{year}/{month}/{day}/{file}", Naming(9, None), NOW) == PurePosixPath("2026/03/04/9.wav")


def _riff(declared_total: int) -> bytes:
    return b"RIFF" + max(0, declared_total - 8).to_bytes(4, "little") + b"WAVEfmt "


@pytest.mark.parametrize(("size", "head", "listing", "length_known", "unproven"), [
    (1000, b"\xff\xfb\x90\x64", None, True, None),            # Content-Length vouches
    (1000, b"\xff\xfb\x90\x64", 1000, False, None),           # the listing's size vouches (checked before)
    (1000, _riff(1000), None, False, None),                     # the WAV header agrees
    (500, _riff(1000), None, False, "WAV header says 1000"),    # cut, or a header never updated: look again
    (1500, _riff(1000), None, False, "WAV header says 1000"),
    (1000, b"RIFF\x00\x00\x00\x00WAVEfmt ", None, False, "nothing in it"),   # streaming writer's 0
    (1000, b"RIFF\xff\xff\xff\xffWAVEfmt ", None, False, "nothing in it"),
    (1000, b"ID3\x04\x00", None, False, "nothing in it"),      # mp3 carries no length
])
def test_unproven_end(size: int, head: bytes, listing: int | None, length_known: bool, unproven: str | None) -> None:
    result = unproven_end(size, head, listing, length_known=length_known)
    assert (result is None) if unproven is None else (unproven in (result or ""))


@pytest.mark.parametrize(("content_type", "hint", "learnt"), [
    ("audio/mpeg", None, "mp3"),
    ("audio/mpeg", "wav", "mp3"),
    ("audio/wav", None, None),         # headers never open the gate: the bytes may be mp3 all the same
    ("audio/x-wav", "wav", None),
    (None, "mp3", "mp3"),
    (None, None, None),
])
def test_gate_hint(content_type: str | None, hint: str | None, learnt: str | None) -> None:
    assert gate_hint(content_type, hint) == learnt


@pytest.mark.parametrize(("ahead", "depth", "claim"), [
    (0, 0, 0),       # prefetching off
    (0, 1, 1), (1, 1, 0),                  # a window of one: refilled as soon as its row is taken
    (2, 3, 1), (3, 3, 0),
    (0, 32, 32),     # the start: the whole window
    (31, 32, 0), (25, 32, 0),              # fewer than a quarter taken: no transaction yet
    (24, 32, 8), (10, 32, 22),             # a quarter or more: filled up again in one claim
    (7, 8, 0), (6, 8, 2), (8, 8, 0),
    (40, 32, 0),     # a smaller window after a reload
])
def test_rows_are_claimed_ahead_once_a_quarter_of_the_window_is_taken(ahead: int, depth: int, claim: int) -> None:
    assert claim_ahead_count(ahead, depth) == claim
