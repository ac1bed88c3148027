"""Review V6: the PBX counts failed logins in a row with no window; the memory must too."""
from __future__ import annotations

from pathlib import Path

from daemon.clock import SystemClock
from daemon.logins import LoginMemory, LoginRefusedError


class _Clock(SystemClock):
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def wall(self) -> float:
        return self.t


def test_v6_once_every_15_min_with_a_wrong_secret_reaches_the_fifth_failure(tmp_path: Path) -> None:
    """A systemd timer / cron running `once` every 15 minutes (README: once is for cron and timers) with a
    wrong client_secret: each `once` is one process that logs in when the memory allows (LoginMemory's
    contract, as in PbxClient's token code). The PBX blocks the IP at its 5th failure in a row."""
    clock = _Clock()
    pbx_failures_in_a_row = 0
    for _ in range(12):                      # three hours of timer ticks
        mem = LoginMemory(tmp_path / "ledger.db.logins", "https://127.0.0.1:8088", clock)
        try:
            mem.before_login("id", "wrong-secret")
        except LoginRefusedError:
            pass
        else:
            pbx_failures_in_a_row += 1       # the PBX answers errcode -1 (wrong secret)
            mem.failed("id", "wrong-secret")
        clock.t += 15 * 60
    assert pbx_failures_in_a_row < 5, f"{pbx_failures_in_a_row} failed logins in a row: the PBX has blocked the IP"
