"""A recording name the environment cannot carry kills a hook worker for good."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.config import HooksConfig
from daemon.hooks import HookJob, HookRunner


@pytest.mark.parametrize("name", ["a\x00b.wav", "caller-\ud800.wav"])
def test_v4_one_bad_name_stops_every_later_hook(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    outcomes: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        r = HookRunner(HooksConfig(on_archived=("/bin/sh", "-c", f"echo x >> {marker}"), max_concurrent=1,
                                   timeout_s=5.0), outcomes.append, grace_s=1.0, stop=stop)
        r.start()
        # a name from a 30012 event (discovery.on_event enqueues it without sources.ref_problem)
        r.submit(HookJob(recording=name, path=tmp_path / "x.wav", sha256="0" * 64, sidecar=b"{}"))
        for i in range(3):
            r.submit(HookJob(recording=f"{i}", path=tmp_path / "y.wav", sha256="0" * 64, sidecar=b"{}"))
        await asyncio.sleep(2.0)
        stop.set()
        await r.close(drain=False)

    asyncio.run(main())
    ran = marker.read_text().count("x") if marker.exists() else 0
    assert ran == 3, f"after one unencodable name, {ran} of the 3 later hooks ran; outcomes counted: {outcomes}"
