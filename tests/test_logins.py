"""Failed logins remembered across invocations: a fourth `check` with a wrong secret never reaches the PBX."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.client import PbxClient
from daemon.clock import ManualClock
from daemon.logins import (
    FAILED_LOGIN_LIMIT,
    FAILED_LOGIN_WINDOW_S,
    LoginMemory,
    LoginRefusedError,
    Refusal,
    login_memory_path,
    login_refusal,
    refusal_message,
)
from tests.conftest import SimFactory, pbx_config, run_cli, sim_counters, simulator_subprocess, write_config

H = FAILED_LOGIN_WINDOW_S
NOW = 1_700_000_000.0


@pytest.mark.parametrize(("failures", "now", "expected"), [
    ([], NOW, None),
    ([NOW - 10, NOW - 5], NOW, None),                               # two: a third try is allowed
    ([NOW - 30, NOW - 20, NOW - 10], NOW, Refusal(3, NOW - 30 + H)),  # three: the fourth waits for the oldest
    ([NOW - H - 1, NOW - 20, NOW - 10], NOW, None),                 # the oldest left the window
    ([NOW - H, NOW - 20, NOW - 10], NOW, None),                     # exactly a window old: gone
    ([NOW - 50, NOW - 40, NOW - 30, NOW - 20], NOW, Refusal(4, NOW - 40 + H)),  # forced once: newest three count
    ([NOW + 500, NOW - 20, NOW - 10], NOW, Refusal(3, NOW - 20 + H)),  # the clock went back: counts as now
])
def test_login_refusal(failures: list[float], now: float, expected: Refusal | None) -> None:
    assert login_refusal(failures, now) == expected


def test_the_refusal_says_why_until_when_and_how_to_override() -> None:
    text = refusal_message(Refusal(3, NOW + 600), Path("/var/lib/x/ledger.db.logins"), NOW)
    assert "3 failed logins within 60 min" in text and "blocks this IP after 5" in text
    assert "2023-11-14T22:23:20+00:00 (in 600 s)" in text
    assert "check --force-login" in text and "'/var/lib/x/ledger.db.logins'" in text


def test_memory_refuses_after_the_limit_then_lets_one_through_when_the_oldest_ages_out(tmp_path: Path) -> None:
    clock = ManualClock()
    path = login_memory_path(tmp_path / "ledger.db")
    memory = LoginMemory(path, "https://pbx", clock)
    for _ in range(FAILED_LOGIN_LIMIT):
        memory.before_login()
        memory.failed()
        clock.advance(60)
    with pytest.raises(LoginRefusedError) as info:
        memory.before_login()
    assert info.value.retry_after_s == H - 3 * 60
    LoginMemory(path, "https://other-pbx", clock).before_login()   # another PBX: its own count
    LoginMemory(path, "https://pbx", clock, force=True).before_login()             # --force-login
    clock.advance(H - 3 * 60)
    memory.before_login()
    memory.succeeded()
    assert not path.exists()
    memory.succeeded()   # nothing to clear is fine


def test_an_unreadable_memory_never_refuses(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db.logins"
    path.write_text("{not json")
    LoginMemory(path, "https://pbx", ManualClock()).before_login()


def test_a_fourth_check_with_a_wrong_secret_is_refused_without_contacting_the_pbx(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "3") as base_url:
        cfg = write_config(tmp_path, base_url, secret="not-the-secret", extra={"sources": {"ids": [1000]}})
        for n in range(1, 4):
            result = run_cli("check", "-c", str(cfg))
            assert result.returncode == 3, result.stderr
            assert "rejected the client id or secret" in result.stderr
            assert sim_counters(base_url)["failed_logins"] == n
        memory = tmp_path / "archive" / ".yeastar-archiver" / "ledger.db.logins"
        assert len(json.loads(memory.read_text())["failures"]) == 3
        refused = run_cli("check", "-c", str(cfg))
        assert refused.returncode == 3
        assert "not logging in: 3 failed logins" in refused.stderr and "--force-login" in refused.stderr
        assert str(memory) in refused.stderr
        assert sim_counters(base_url)["failed_logins"] == 3     # the PBX heard nothing
        # --force-login tries (the fourth failure: one spare before the PBX's block).
        forced = run_cli("check", "--force-login", "-c", str(cfg))
        assert forced.returncode == 3 and "rejected the client id or secret" in forced.stderr
        assert sim_counters(base_url)["failed_logins"] == 4
        # The secret fixed: --force-login once more, the login works and the memory is cleared.
        (tmp_path / "client_secret").write_text("sim-secret-please-change\n")
        fixed = run_cli("check", "--force-login", "-c", str(cfg))
        assert fixed.returncode == 0, fixed.stderr
        assert not memory.exists()
        assert run_cli("check", "-c", str(cfg)).returncode == 0


def test_once_remembers_its_failed_login_for_check(tmp_path: Path) -> None:
    with simulator_subprocess("--count", "3") as base_url:
        cfg = write_config(tmp_path, base_url, secret="not-the-secret", extra={"sources": {"ids": [1000]}})
        for _ in range(3):
            assert run_cli("once", "-c", str(cfg)).returncode == 3
        refused = run_cli("check", "-c", str(cfg))
        assert refused.returncode == 3 and "not logging in" in refused.stderr
        assert sim_counters(base_url)["failed_logins"] == 3


async def test_a_refused_login_in_run_waits_only_until_the_next_try_is_allowed(start_sim: SimFactory,
                                                                               tmp_path: Path) -> None:
    """`run` gets the wait as retry_after_s (its scheduler pauses that long), then logs in: never refused for ever."""
    sim = await start_sim()
    clock = ManualClock()
    path = login_memory_path(tmp_path / "ledger.db")
    memory = LoginMemory(path, sim.base_url, clock)
    for _ in range(FAILED_LOGIN_LIMIT):
        memory.failed()
    async with PbxClient(pbx_config(sim.base_url), clock=clock, logins=memory) as client:
        with pytest.raises(LoginRefusedError) as info:
            await client.list_recordings(page_size=1)
        assert info.value.exit_code == 3 and info.value.retry_after_s == H
        assert sim.counters.requests["get_token"] == 0
        clock.advance(H)
        client.tokens.clear_fatal()     # what the scheduler does when its pause is over
        await client.list_recordings(page_size=1)
    assert sim.counters.logins == 1
    assert not path.exists()            # a successful login forgets the failures


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: check run as root on the service user's folders")
def test_check_as_root_leaves_the_memory_and_a_new_state_folder_to_the_folders_owner(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    os.chown(archive, 65534, 65534)
    state = archive / ".yeastar-archiver"
    memory = LoginMemory(login_memory_path(state / "ledger.db"), "https://pbx", ManualClock())
    memory.failed()
    assert (state.stat().st_uid, state.stat().st_gid) == (65534, 65534)
    assert state.stat().st_mode & 0o777 == 0o700
    written = login_memory_path(state / "ledger.db").stat()
    assert (written.st_uid, written.st_gid, written.st_mode & 0o777) == (65534, 65534, 0o600)


def test_the_memory_never_creates_the_archive_folder(tmp_path: Path) -> None:
    memory = LoginMemory(login_memory_path(tmp_path / "unmounted" / ".yeastar-archiver" / "ledger.db"),
                         "https://pbx", ManualClock())
    memory.failed()   # logged, not raised: losing the memory is never worse than having none
    assert not (tmp_path / "unmounted").exists()
