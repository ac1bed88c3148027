"""Failed logins remembered across invocations: a fourth `check` with a wrong secret never reaches the PBX."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from daemon.client import PbxClient
from daemon.clock import ManualClock
from daemon.logins import (
    SAME_CREDENTIALS_LIMIT,
    LoginMemory,
    LoginRefusedError,
    Refusal,
    login_memory_path,
    login_refusal,
    refusal_message,
)
from tests.conftest import SimFactory, pbx_config, run_cli, sim_counters, simulator_subprocess, write_config

NOW = 1_700_000_000.0
A, B, C = "digest-a", "digest-b", "digest-c"


@pytest.mark.parametrize(("failures", "who", "expected"), [
    ([], A, None),
    ([(NOW - 10, A), (NOW - 5, A)], A, None),                         # two: a third try is allowed
    ([(NOW - 30, A), (NOW - 20, A), (NOW - 10, A)], A, Refusal(3, 3, NOW - 10)),  # three: the fourth is not
    # No time window: the PBX counts failures in a row and forgets them at a success only (review V6).
    ([(NOW - 365 * 86400, A)] * 3, A, Refusal(3, 3, NOW - 365 * 86400)),
    # Fixed credentials get their try (review V7) ...
    ([(NOW - 30, A), (NOW - 20, A), (NOW - 10, A)], B, None),
    # ... while a fifth failure stays out of reach: four in a row refuse everything.
    ([(NOW - 40, A), (NOW - 30, A), (NOW - 20, A), (NOW - 10, B)], C, Refusal(4, 0, NOW - 10)),
    ([(NOW - 40, A), (NOW - 30, B), (NOW - 20, A), (NOW - 10, B)], B, Refusal(4, 2, NOW - 10)),
    # Dates play no part: a clock far ahead or behind changes nothing (review V2).
    ([(NOW + 365 * 86400, A)] * 2, A, None),
])
def test_login_refusal(failures: list[tuple[float, str]], who: str, expected: Refusal | None) -> None:
    assert login_refusal(failures, who) == expected


def test_the_refusal_says_why_and_how_to_go_on() -> None:
    text = refusal_message(Refusal(3, 3, NOW), Path("/var/lib/x/ledger.db.logins"))
    assert "these credentials failed 3 times in a row, the last at 2023-11-14T22:13:20+00:00" in text
    assert "blocks this IP after 5" in text and "new credentials get one try" in text
    assert "check --force-login" in text and "'/var/lib/x/ledger.db.logins'" in text
    last = refusal_message(Refusal(4, 1, NOW), Path("/x.logins"))
    assert "4 failed logins in a row, 1 of them with these credentials" in last
    assert "one more failure and the PBX blocks this IP" in last


def test_the_memory_counts_per_credentials_never_keeps_them_and_a_success_clears_it(tmp_path: Path) -> None:
    clock = ManualClock()
    path = login_memory_path(tmp_path / "ledger.db")
    memory = LoginMemory(path, "https://pbx", clock)
    for _ in range(SAME_CREDENTIALS_LIMIT):
        memory.before_login("id", "wrong-secret")
        memory.failed("id", "wrong-secret")
        clock.advance(86400)   # a day apart: no window makes them fade
    with pytest.raises(LoginRefusedError) as info:
        memory.before_login("id", "wrong-secret")
    assert info.value.exit_code == 3 and info.value.retry_after_s is None
    assert "wrong-secret" not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    LoginMemory(path, "https://other-pbx", clock).before_login("id", "wrong-secret")   # another PBX: its own count
    LoginMemory(path, "https://pbx", clock, force=True).before_login("id", "wrong-secret")   # --force-login
    memory.before_login("id", "fixed-secret")    # new credentials: one try ...
    memory.failed("id", "fixed-secret")
    with pytest.raises(LoginRefusedError):       # ... and with four in a row, none without --force-login
        memory.before_login("id", "third-secret")
    memory.succeeded()
    assert not path.exists()
    memory.before_login("id", "wrong-secret")
    memory.succeeded()   # nothing to clear is fine


def test_an_unreadable_memory_never_refuses(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db.logins"
    path.write_text("{not json")
    LoginMemory(path, "https://pbx", ManualClock()).before_login("id", "secret")


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
        assert "not logging in: these credentials failed 3 times" in refused.stderr
        assert "--force-login" in refused.stderr
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


async def test_a_refused_login_in_run_is_tried_again_once_the_credentials_are_fixed(start_sim: SimFactory,
                                                                                   tmp_path: Path) -> None:
    """`run` is refused without a request while the memory says so (its scheduler looks again at its auth
    pace); a config with fixed credentials (a reload) gets its try, and the success clears the memory."""
    sim = await start_sim()
    clock = ManualClock()
    path = login_memory_path(tmp_path / "ledger.db")
    memory = LoginMemory(path, sim.base_url, clock)
    cfg = pbx_config(sim.base_url)
    for _ in range(SAME_CREDENTIALS_LIMIT):
        memory.failed(cfg.client_id, cfg.client_secret.reveal())
    async with PbxClient(cfg, clock=clock, logins=memory) as client:
        with pytest.raises(LoginRefusedError) as info:
            await client.list_recordings(page_size=1)
        assert info.value.exit_code == 3 and info.value.retry_after_s is None
        assert sim.counters.requests["get_token"] == 0
    # The same three failures, but recorded for a secret since replaced: this config logs in.
    path.unlink()
    for _ in range(SAME_CREDENTIALS_LIMIT):
        memory.failed(cfg.client_id, "the-old-wrong-secret")
    async with PbxClient(cfg, clock=clock, logins=memory) as client:
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
    memory.failed("id", "secret")
    assert (state.stat().st_uid, state.stat().st_gid) == (65534, 65534)
    assert state.stat().st_mode & 0o777 == 0o700
    written = login_memory_path(state / "ledger.db").stat()
    assert (written.st_uid, written.st_gid, written.st_mode & 0o777) == (65534, 65534, 0o600)


def test_the_memory_never_creates_the_archive_folder(tmp_path: Path) -> None:
    memory = LoginMemory(login_memory_path(tmp_path / "unmounted" / ".yeastar-archiver" / "ledger.db"),
                         "https://pbx", ManualClock())
    memory.failed("id", "secret")   # logged, not raised: losing the memory is never worse than having none
    assert not (tmp_path / "unmounted").exists()
