"""R1: at start the copier aborts EVERY multipart upload under archive.s3.prefix — with the default
prefix "" that is every upload in the bucket (another application's, another archiver's), and a prefix
without a trailing slash ("pbx1", accepted by the config) also matches "pbx10/...". Those uploads are
not ours: aborting them destroys other writers' in-flight data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.runner import run_pipeline
from tests.conftest import SimFactory, write_config
from tests.s3servers import BUCKET, s3_server


@pytest.mark.parametrize(("prefix", "foreign_key"), [("", "db-backups/nightly.tar"),
                                                      ("pbx1", "pbx10/2024/01/01/other-instance.wav")])
async def test_foreign_multipart_uploads_survive_a_start(start_sim: SimFactory, tmp_path: Path, prefix: str,
                                                         foreign_key: str) -> None:
    sim = await start_sim(count=1)
    with s3_server("moto", tmp_path / "s3") as server:
        c = server.client()
        up = c.create_multipart_upload(Bucket=BUCKET, Key=foreign_key)["UploadId"]
        part = c.upload_part(Bucket=BUCKET, Key=foreign_key, UploadId=up, PartNumber=1, Body=b"x" * 1024)
        cfg = write_config(tmp_path, sim.base_url, extra={"sources": {"ids": [r.id for r in sim.recordings]},
                                                          "archive": {"s3": server.config(prefix=prefix)}})
        result = await run_pipeline(load_config(cfg), asyncio.Event(), once=True)
        assert result.counts["done"] == 1
        uploads = [u["UploadId"] for u in c.list_multipart_uploads(Bucket=BUCKET).get("Uploads") or []]
        # The other writer's upload must still be there and completable.
        assert up in uploads, "the archiver aborted a multipart upload that is not its own"
        c.complete_multipart_upload(Bucket=BUCKET, Key=foreign_key, UploadId=up,
                                    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
