"""R7: a server whose ETag is not the MD5 of the bytes (AWS with SSE-KMS default bucket encryption, and
other S3-compatible stores with opaque ETags). store() treats "size matches, ETag not an MD5 we know" as
"other bytes": the first upload is declared failed ("S3 said the upload worked, but it holds ..."), the
retry sees its OWN object at the key as a foreign one, uploads the recording again to the alternate name,
fails the same way, and finally gives up with PermanentError "both ... hold other objects". Result: two full
copies of the recording in the bucket (storage leak/duplicate), the copy 'failed', the recording never
done — and `once` still exits 0 (R3).

The front below relays to moto and only rewrites the ETag header of HEAD answers into an opaque, stable
value, as such a server does."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.s3front import S3Front
from tests.s3servers import s3_server


class OpaqueEtagFront(S3Front):
    async def _relay(self, head: bytes, headers: dict[str, str], body: bytes) -> bytes:
        answer = await super()._relay(head, headers, body)
        if not head.startswith(b"HEAD "):
            return answer
        top, sep, rest = answer.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        out = []
        for ln in lines:
            if ln.lower().startswith("etag:"):
                opaque = hashlib.sha256(b"kms:" + ln.split(":", 1)[1].strip().encode()).hexdigest()[:32]
                ln = f'ETag: "{opaque}"'
            out.append(ln)
        return "\r\n".join(out).encode("latin-1") + sep + rest


async def test_opaque_etags_never_duplicate_a_recording(start_sim: SimFactory, tmp_path: Path) -> None:
    sim = await start_sim(count=1)
    rec = sim.recordings[0]
    with s3_server("moto", tmp_path / "s3") as server:
        front = OpaqueEtagFront(server.port)
        await front.start()
        try:
            cfg = write_config(tmp_path, sim.base_url, extra={
                "sources": {"ids": [rec.id]}, "downloads": {"backoff_base_s": 0.05, "backoff_max_s": 0.1},
                "archive": {"s3": server.config(endpoint_url=front.endpoint_url)}})
            result = await asyncio.wait_for(run_pipeline(load_config(cfg), asyncio.Event(), once=True), 60)
        finally:
            await front.stop()
        copies = [k for k, v in server.objects().items() if v == sim.content(rec)]
        print(result.counts, result.copy_stats, copies)
        assert len(copies) <= 1, f"the recording is stored {len(copies)} times: {copies}"
        assert result.counts["done"] == 1
