"""R4: the sidecar is written AFTER the ledger marks the recording archived ('copying'), and the copier
uploads `key.json` only if the local sidecar happens to exist when the object's copy is made. A sidecar
write that failed (ENOSPC: "start-up reconciliation writes missing sidecars", downloader.py) — or that
simply comes after the copier read it — is never put in the bucket: with keep_local: true the later
reconciled local sidecar is never uploaded (the copy is done); with keep_local: false the metadata is
gone for good (the local files are removed, reconcile only rewrites sidecars of kept files)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from daemon.archive import ArchiveDir
from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.s3servers import s3_server


@pytest.mark.parametrize("keep_local", [True, False])
async def test_every_object_gets_its_sidecar(start_sim: SimFactory, tmp_path: Path, keep_local: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sim = await start_sim(count=2)
    real = ArchiveDir.write_sidecar
    failed: list[str] = []

    def flaky(dir_fd: int, final: str, data: object) -> None:
        if not failed:                      # one sidecar write hits a full disk
            failed.append(final)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(dir_fd, final, data)           # type: ignore[arg-type]
    monkeypatch.setattr(ArchiveDir, "write_sidecar", staticmethod(flaky))
    with s3_server("moto", tmp_path / "s3") as server:
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                          "archive": {"keep_local": keep_local,
                                                                      "s3": server.config()}})
        r1 = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        assert r1.counts["done"] == 2 and failed
        monkeypatch.setattr(ArchiveDir, "write_sidecar", staticmethod(real))
        await run_pipeline(load_config(cfg), asyncio.Event(), once=True)   # reconcile: "missing sidecars"
        objects = server.objects()
        recordings = [k for k in objects if not k.endswith(".json")]
        missing = [k for k in recordings if k + ".json" not in objects]
        assert not missing, f"objects without a sidecar in the bucket: {missing}"
