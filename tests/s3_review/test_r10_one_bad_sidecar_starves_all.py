"""R10: an error on ONE recording's sidecar PUT (any per-object answer: InvalidArgument, BadDigest,
412, KeyTooLong...) escapes Copier._copy (put_small is outside its per-object try), so the worker treats
it as a destination-wide problem: the whole copier pauses, and because that copy's next_attempt_at never
moves it is claimed first again after every pause. One poisoned recording starves every other copy
forever (`run`), or `once` gives up with exit 4 "the off-box copy's endpoint stayed unreachable" though the
endpoint is fine (the reliability spec, fault 28: failures never pause or starve the healthy ones)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.s3front import S3Front
from tests.s3servers import s3_server


class RejectOneSidecar(S3Front):
    def __init__(self, upstream_port: int, needle: str) -> None:
        super().__init__(upstream_port)
        self.needle = needle.encode()

    async def _relay(self, head: bytes, headers: dict[str, str], body: bytes) -> bytes:
        first = head.split(b"\r\n", 1)[0]
        if first.startswith(b"PUT ") and self.needle in first and b".json" in first:
            xml = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
                   b"<Message>injected: this object is refused</Message></Error>")
            return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\nContent-Length: "
                    + str(len(xml)).encode() + b"\r\nConnection: close\r\n\r\n" + xml)
        return await super()._relay(head, headers, body)


async def test_one_bad_sidecar_does_not_stop_the_other_copies(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=4)
    poisoned = sim.recordings[0]
    with s3_server("moto", tmp_path / "s3") as server:
        front = RejectOneSidecar(server.port, poisoned.file.split("-")[0])
        await front.start()
        try:
            cfg = write_config(tmp_path, sim.base_url, extra={
                "sources": {"ids": [r.id for r in sim.recordings]},
                "downloads": {"once_give_up_s": 5, "pause_max_s": 0.5},
                "archive": {"s3": server.config(endpoint_url=front.endpoint_url, workers=1)}})
            result = await asyncio.wait_for(run_pipeline(load_config(cfg), asyncio.Event(), once=True), 60)
        finally:
            await front.stop()
        print(result.counts, result.copy_gave_up, result.copy_stats)
        assert result.counts["done"] >= 3, f"healthy recordings starved: {result.counts}"
        assert not result.copy_gave_up
