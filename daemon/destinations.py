"""Off-box destinations: an S3-compatible bucket that holds a verified copy of every recording.

The only module that sees aiobotocore and botocore; their exceptions are translated in exactly one
place (``translate_s3_errors``) into the tree of ``errors.py``.

"The server said OK" is a claim to confirm, not a proof: S3-compatible servers differ. Some accept
``If-None-Match: *`` and overwrite anyway, some store any ``x-amz-checksum-sha256`` they are given and
echo it back, some drop user metadata, some do not check ``Content-MD5``. So every object is HEADed
before it is written (an object with other bytes at the key is never overwritten: the recording goes
to the alternate name, as on disk), sent with ``Content-MD5`` on every part and ``If-None-Match: *``,
and HEADed again after: its size and its ETag — the MD5 of a single part, or the MD5 of the parts'
MD5s for a multipart upload, computed here from the local bytes — must be what was sent. No
sub-resource call (``?retention``, ``?tagging``) is ever made on a recording's key: retention comes
from the bucket's default, and one known server answers such calls by replacing the object's bytes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from daemon.archive import alternate_name
from daemon.config import S3Config
from daemon.errors import (
    ArchiverError,
    DestinationConfigError,
    DestinationFullError,
    DestinationRefusedError,
    DestinationUnavailableError,
    PermanentError,
    RetryableError,
)
from daemon.ledger import Ledger, LedgerDb
from daemon.logs import redact_text, remember_secret

log = structlog.get_logger("daemon.destinations")

READ_BYTES = 1024 * 1024
KV_UPLOAD_PREFIX = "s3.upload:"   # + upload id (or creating:<key>) -> the object key; see the journal
MAX_ERROR_TEXT = 300

_CONFIG_CODES = frozenset({"NoSuchBucket", "InvalidBucketName", "PermanentRedirect", "AuthorizationHeaderMalformed",
                           "IllegalLocationConstraintException"})
_REFUSED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                            "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
                            "InvalidSecurity", "NotSignedUp", "Forbidden", "403"})
_FULL_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "StorageFull",
                         "XMinioAdminBucketQuotaExceeded", "TooManyBuckets"})
_BUSY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                         "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "OperationAborted",
                         "500", "502", "503", "504", "429"})


def s3_error_for(code: str, status: int, message: str, *, what: str, retry_after_s: float | None = None,
                 recording: str | None = None) -> ArchiverError:
    """The archiver's error for an S3 error answer, carrying the decision. Pure; tested as a table."""
    text = f"S3 {what}: {code or status}{': ' + message if message else ''}"
    if code in _CONFIG_CODES or (what == "head bucket" and status == 404):
        return DestinationConfigError(f"{text}: check archive.s3.bucket, region and endpoint_url")
    # A quota answers 403 on some servers (Ceph's QuotaExceeded): its code decides before the status does.
    if code in _FULL_CODES or status == 507:
        return DestinationFullError(f"{text}: the bucket is full (quota)", retry_after_s=retry_after_s)
    if code == "RequestTimeTooSkewed":
        return DestinationRefusedError(f"{text}: this host's clock is more than 15 minutes off the endpoint's "
                                       "(check NTP)")
    if code in _REFUSED_CODES or status == 403:
        return DestinationRefusedError(f"{text}: check archive.s3.access_key_id and its secret, and the "
                                       "bucket policy")
    if code in _BUSY_CODES or status >= 500 or status == 429:
        return DestinationUnavailableError(text, retry_after_s=retry_after_s)
    if code in ("EntityTooLarge", "InvalidArgument", "KeyTooLongError", "InvalidObjectName"):
        return PermanentError(text, recording=recording)
    # BadDigest, IncompleteBody and the rest: this request went wrong; try this object again later.
    return RetryableError(text, retry_after_s=retry_after_s, recording=recording)


def _short(text: str) -> str:
    text = redact_text(text)
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


@contextlib.contextmanager
def translate_s3_errors(what: str, *, recording: str | None = None) -> Iterator[None]:
    """Map botocore's and the socket's exceptions to the archiver's tree. The one place that does this."""
    import botocore.exceptions as bce
    try:
        yield
    except ArchiverError:
        raise
    except bce.ClientError as exc:
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode") or 0)
        headers = meta.get("HTTPHeaders") or {}
        retry = headers.get("retry-after")
        retry_after = min(float(retry), 3600.0) if isinstance(retry, str) and retry.isdigit() else None
        raise s3_error_for(str(error.get("Code", "")), status, _short(str(error.get("Message", ""))), what=what,
                           retry_after_s=retry_after, recording=recording) from exc
    except bce.SSLError as exc:
        raise DestinationUnavailableError(f"S3 {what}: the endpoint's TLS certificate was rejected "
                                          f"({_short(str(exc))}); set archive.s3.tls.ca_file") from exc
    except (bce.NoCredentialsError, bce.PartialCredentialsError) as exc:
        raise DestinationRefusedError(f"S3 {what}: no usable credentials ({_short(str(exc))})") from exc
    except (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ReadTimeoutError, bce.ConnectionClosedError,
            bce.HTTPClientError, bce.ResponseStreamingError, bce.IncompleteReadError, ConnectionError,
            TimeoutError) as exc:
        raise DestinationUnavailableError(f"S3 {what}: cannot reach the endpoint ({type(exc).__name__}: "
                                          f"{_short(str(exc))})") from exc
    except bce.BotoCoreError as exc:
        raise RetryableError(f"S3 {what}: {type(exc).__name__}: {_short(str(exc))}", recording=recording) from exc


def object_key(prefix: str, rel: PurePosixPath | str) -> str:
    """The object key of an archived recording: ``archive.s3.prefix`` + its archive path. Pure."""
    return f"{prefix}{rel}"


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload: the MD5 of the parts' MD5s, a dash, their count. Pure."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"  # noqa: S324 - S3's own ETag


def expected_etag(part_md5s: list[bytes]) -> str:
    """The ETag an object made of these parts must have (one part: its MD5). Pure."""
    return part_md5s[0].hex() if len(part_md5s) == 1 else multipart_etag(part_md5s)


@dataclass(frozen=True)
class UploadHashes:
    """What a local file's copy is checked by: its sha256, its MD5 whole and part by part."""

    sha256: str
    md5: str
    part_md5s: list[bytes]

    def etags(self) -> frozenset[str]:
        """The ETags that prove an object holds these bytes: S3's (a single part's MD5, or the MD5 of the
        parts' MD5s), or the whole file's MD5 (what some S3-compatible servers give multipart objects)."""
        return frozenset({expected_etag(self.part_md5s), self.md5})


def upload_hashes(path: Path, part_size: int) -> UploadHashes:
    """sha256, MD5 and the MD5 of each ``part_size`` part of a local file, in one read (blocking)."""
    sha = hashlib.sha256()
    whole = hashlib.md5()  # noqa: S324 - Content-MD5 and S3's ETag, not security
    parts: list[bytes] = []
    with path.open("rb") as f:
        while True:
            part = hashlib.md5()  # noqa: S324
            got = 0
            while got < part_size and (chunk := f.read(min(READ_BYTES, part_size - got))):
                part.update(chunk)
                whole.update(chunk)
                sha.update(chunk)
                got += len(chunk)
            if got == 0 and parts:
                break
            parts.append(part.digest())
            if got < part_size:
                break
    return UploadHashes(sha256=sha.hexdigest(), md5=whole.hexdigest(), part_md5s=parts)


def part_md5s(path: Path, part_size: int) -> list[bytes]:
    """The MD5 of each ``part_size`` piece of a local file (blocking: run in a thread)."""
    return upload_hashes(path, part_size).part_md5s


def _read_part(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    checksum_sha256: str | None = None   # base64, where the server stored one (single-part uploads)


@dataclass(frozen=True)
class StoredCopy:
    """Where a verified copy is: its key, its ETag, and whether it was there already (adopted)."""

    key: str
    etag: str
    adopted: bool


@dataclass(frozen=True)
class BucketReport:
    """What ``check`` says of the bucket."""

    versioning: str | None
    object_lock: str | None


class S3Destination:
    """An async context manager around one S3 client for ``archive.s3``."""

    name = "s3"

    def __init__(self, cfg: S3Config) -> None:
        self.cfg = cfg
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._unsure_uploads: set[str] = set()   # keys whose create-multipart-upload answer was lost
        self.ledger: Ledger | None = None         # the upload journal; set by the copier
        remember_secret(cfg.secret_access_key.reveal())
        remember_secret(cfg.access_key_id)

    def _verify(self) -> str | bool:
        if not self.cfg.tls.verify:
            return False
        return str(self.cfg.tls.ca_file) if self.cfg.tls.ca_file else True

    async def __aenter__(self) -> S3Destination:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        config = AioConfig(
            s3={"addressing_style": self.cfg.addressing_style},
            connect_timeout=self.cfg.timeout_s, read_timeout=self.cfg.timeout_s,
            # The archiver retries (and pauses) itself; checksums are the ones it chooses to send.
            # total_max_attempts, not max_attempts (which counts retries: 1 = one hidden retry, which
            # re-sent a create-multipart-upload whose answer was lost and leaked the first upload).
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=self.cfg.workers + 2,
            **checksum_options(),
        )
        with translate_s3_errors("connect"):
            self._client = await self._stack.enter_async_context(get_session().create_client(
                "s3", endpoint_url=self.cfg.endpoint_url, region_name=self.cfg.region,
                aws_access_key_id=self.cfg.access_key_id,
                aws_secret_access_key=self.cfg.secret_access_key.reveal(),
                verify=self._verify(), config=config))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._stack.aclose()
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Destination used outside 'async with'")
        return self._client

    # ------------------------------------------------------------ the bucket
    async def check(self) -> BucketReport:
        """The bucket exists and takes these credentials; its versioning and Object Lock default."""
        bucket = self.cfg.bucket
        with translate_s3_errors("head bucket"):
            await self.client.head_bucket(Bucket=bucket)
        versioning: str | None = None
        lock: str | None = None
        with contextlib.suppress(ArchiverError), translate_s3_errors("get bucket versioning"):
            versioning = (await self.client.get_bucket_versioning(Bucket=bucket)).get("Status") or "off"
        try:
            with translate_s3_errors("get object lock configuration"):
                conf = (await self.client.get_object_lock_configuration(Bucket=bucket)).get(
                    "ObjectLockConfiguration") or {}
            rule = (conf.get("Rule") or {}).get("DefaultRetention") or {}
            lock = (f"{rule.get('Mode')} {rule.get('Days') or rule.get('Years')}"
                    f"{' days' if rule.get('Days') else ' years' if rule.get('Years') else ''}") if rule else \
                ("enabled, no default retention" if conf.get("ObjectLockEnabled") == "Enabled" else "off")
        except ArchiverError as exc:
            lock = "off" if "ObjectLockConfigurationNotFound" in str(exc) else None
        return BucketReport(versioning=versioning, object_lock=lock)

    # ------------------------------------------------------------ the upload journal
    # A multipart upload holds storage until it is completed or aborted. The journal (the ledger's kv
    # table) names every upload this archiver began and has not ended, and every key whose create is
    # under way (its answer, the upload's id, may be lost), so that the next start aborts exactly
    # those: never another writer's upload in a shared bucket, whatever the prefix.
    async def _journal(self, fn: Callable[[LedgerDb], object]) -> None:
        if self.ledger is not None:
            await self.ledger.call(fn)

    async def abort_stale_uploads(self) -> int:
        """Abort the multipart uploads an earlier process of this archiver began and never ended (it
        died mid-upload). Best effort: what cannot be aborted now stays in the journal for next time."""
        if self.ledger is None:
            return 0
        entries = await self.ledger.call(lambda db: db.kv_items(KV_UPLOAD_PREFIX))
        aborted = 0
        for name, key in entries:
            what = name.removeprefix(KV_UPLOAD_PREFIX)
            try:
                if what.startswith("creating:"):
                    aborted += await self._abort_uploads_of(key)
                else:
                    with translate_s3_errors("abort multipart upload"):
                        try:
                            await self.client.abort_multipart_upload(Bucket=self.cfg.bucket, Key=key, UploadId=what)
                            aborted += 1
                        except Exception as exc:
                            if _code(exc) != "NoSuchUpload":   # completed or aborted already
                                raise
            except (RetryableError, PermanentError) as exc:
                log.info("s3.stale_upload_not_aborted", key=key, reason=str(exc))
                continue

            def forget(db: LedgerDb, entry: str = name) -> None:
                db.kv_delete(entry)
            await self._journal(forget)
        if aborted:
            log.info("s3.stale_uploads_aborted", count=aborted)
        return aborted

    async def _abort_uploads_of(self, key: str) -> int:
        """A create for ``key`` lost its answer (or the process died during it): the server may hold an
        upload whose id we never learnt. Abort every upload of exactly that key — ours: one copy of a
        recording runs at a time, so none of them is in flight. A server that cannot list uploads
        (one answers NoSuchUpload) leaves them to its lifecycle rules."""
        aborted = 0
        try:
            with translate_s3_errors("list multipart uploads"):
                listed = await self.client.list_multipart_uploads(Bucket=self.cfg.bucket, Prefix=key)
                for upload in listed.get("Uploads") or []:
                    if upload["Key"] == key:
                        await self.client.abort_multipart_upload(Bucket=self.cfg.bucket, Key=key,
                                                                 UploadId=upload["UploadId"])
                        aborted += 1
                        log.info("s3.lost_upload_aborted", key=key)
        except (RetryableError, PermanentError) as exc:
            log.info("s3.uploads_not_listed", key=key, reason=str(exc))
        return aborted

    # ------------------------------------------------------------ objects
    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag, or None when there is none at ``key``."""
        import botocore.exceptions as bce
        with translate_s3_errors("head object"):
            try:
                answer = await self.client.head_object(Bucket=self.cfg.bucket, Key=key, ChecksumMode="ENABLED")
            except bce.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404 or exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        checksum = answer.get("ChecksumSHA256")
        return ObjectInfo(size=int(answer.get("ContentLength", -1)), etag=str(answer.get("ETag", "")).strip('"'),
                          checksum_sha256=str(checksum) if checksum else None)

    async def store(self, local: Path, rel: PurePosixPath, *, size: int, recording: str, tag: str,
                    chosen_key: str | None = None, overwrite_key: str | None = None,
                    hashes: UploadHashes | None = None) -> StoredCopy:
        """Copy ``local`` (``size`` bytes) to the object for ``rel`` — or the key chosen earlier — and
        prove it is there: never over other bytes (those keep their key; the recording goes to the
        alternate name ``stem~tag.ext``), verified by size and ETag afterwards. ``overwrite_key``: an
        object of ours that ``verify`` found damaged and kept aside: it may be written over."""
        import asyncio
        if hashes is None:
            hashes = await asyncio.to_thread(upload_hashes, local, self.cfg.part_size_bytes)
        md5s = hashes.part_md5s
        proofs = hashes.etags()
        want = expected_etag(md5s)
        first = chosen_key or object_key(self.cfg.prefix, rel)
        second = object_key(self.cfg.prefix, rel.parent / alternate_name(rel.name, tag))
        for key in dict.fromkeys((first, second)):
            found = await self.head(key)
            if found is not None and key != overwrite_key:
                if found.size == size and await self._holds(key, found, proofs, hashes.sha256):
                    log.info("s3.identical_exists", recording=recording, key=key)
                    return StoredCopy(key=key, etag=found.etag, adopted=True)
                log.warning("s3.name_conflict", recording=recording, key=key,
                            action="kept the existing object; trying another name")
                continue
            await self._put(local, key, size=size, md5s=md5s, sha256=hashes.sha256, recording=recording,
                            conditional=key != overwrite_key)
            stored = await self.head(key)
            if stored is None or stored.size != size or not await self._holds(key, stored, proofs, hashes.sha256):
                raise RetryableError(
                    f"S3 said the upload of {key!r} worked, but it holds "
                    f"{'nothing' if stored is None else f'{stored.size} bytes, ETag {stored.etag}'} "
                    f"(sent {size} bytes, ETag {want} or MD5 {hashes.md5})", recording=recording)
            return StoredCopy(key=key, etag=stored.etag, adopted=False)
        raise PermanentError(f"both {first!r} and its alternate name hold other objects in the bucket",
                             recording=recording)

    async def _holds(self, key: str, found: ObjectInfo, proofs: frozenset[str], sha256: str) -> bool:
        """The object at ``key`` (of the right size) holds these bytes. Its ETag proves it where it is the
        MD5 (or the multipart ETag) of them; where the server's ETag is opaque (AWS with SSE-KMS, some
        S3-compatible stores) the object is read back and hashed: a claim is never taken as proof."""
        if found.etag in proofs:
            return True
        if found.checksum_sha256 is not None and found.checksum_sha256 == _b64_sha256(sha256):
            # Checked by the server on upload (AWS does; we sent Content-MD5 too). Servers that store
            # any checksum unchecked give MD5 ETags, which decided above.
            return True
        digest = hashlib.sha256()
        async for chunk in self.chunks(key):
            digest.update(chunk)
        same = digest.hexdigest() == sha256
        log.info("s3.read_back", key=key, etag=found.etag, same=same,
                 reason="the ETag is not an MD5 of the bytes: read back to compare")
        return same

    async def _put(self, local: Path, key: str, *, size: int, md5s: list[bytes], sha256: str, recording: str,
                   conditional: bool) -> None:
        import asyncio
        bucket = self.cfg.bucket
        cond = {"IfNoneMatch": "*"} if conditional else {}
        if len(md5s) == 1:
            body = await asyncio.to_thread(_read_part, local, 0, size)
            with translate_s3_errors("put object", recording=recording):
                try:
                    # The sha256 too: a server whose ETag is not the MD5 (AWS with SSE-KMS) checks it and
                    # gives it back on HEAD, so that the copy is proven without reading it back.
                    await self.client.put_object(Bucket=bucket, Key=key, Body=body, ContentLength=len(body),
                                                 ContentMD5=base64.b64encode(md5s[0]).decode(),
                                                 ChecksumSHA256=_b64_sha256(sha256),
                                                 ContentType=_content_type(key), **cond)
                except Exception as exc:
                    _raise_precondition(exc, key, recording)
                    raise
            return
        part_size = self.cfg.part_size_bytes
        creating = f"{KV_UPLOAD_PREFIX}creating:{key}"
        if key in self._unsure_uploads:
            await self._abort_uploads_of(key)
        self._unsure_uploads.add(key)
        await self._journal(lambda db: db.kv_set(creating, key))
        with translate_s3_errors("create multipart upload", recording=recording):
            upload = await self.client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=_content_type(key))
        self._unsure_uploads.discard(key)
        upload_id = upload["UploadId"]
        begun = f"{KV_UPLOAD_PREFIX}{upload_id}"

        def journal_begun(db: LedgerDb) -> None:
            db.kv_set(begun, key)
            db.kv_delete(creating)
        await self._journal(journal_begun)
        try:
            parts = []
            for n, md5 in enumerate(md5s, start=1):
                # One part in memory at a time, whatever the recording's size.
                body = await asyncio.to_thread(_read_part, local, (n - 1) * part_size, part_size)
                with translate_s3_errors("upload part", recording=recording):
                    answer = await self.client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n,
                                                           Body=body, ContentLength=len(body),
                                                           ContentMD5=base64.b64encode(md5).decode())
                parts.append({"PartNumber": n, "ETag": answer["ETag"]})
            with translate_s3_errors("complete multipart upload", recording=recording):
                try:
                    await self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                                MultipartUpload={"Parts": parts}, **cond)
                except Exception as exc:
                    _raise_precondition(exc, key, recording)
                    raise
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))
                await asyncio.shield(self._journal(lambda db: db.kv_delete(begun)))
            raise
        await self._journal(lambda db: db.kv_delete(begun))

    async def put_small(self, key: str, body: bytes, *, recording: str) -> bool:
        """A small object (a sidecar) where none is: False when one is there already (left as it is)."""
        if await self.head(key) is not None:
            return False
        md5 = hashlib.md5(body).digest()  # noqa: S324 - Content-MD5
        await self._put_bytes(key, body, md5, recording)
        return True

    async def _put_bytes(self, key: str, body: bytes, md5: bytes, recording: str) -> None:
        with translate_s3_errors("put object", recording=recording):
            try:
                await self.client.put_object(Bucket=self.cfg.bucket, Key=key, Body=body, ContentLength=len(body),
                                             ContentMD5=base64.b64encode(md5).decode(),
                                             ContentType=_content_type(key), IfNoneMatch="*")
            except Exception as exc:
                _raise_precondition(exc, key, recording)
                raise

    async def chunks(self, key: str) -> AsyncIterator[bytes]:
        """An object's bytes (``verify --read-data``, restoring a local copy)."""
        with translate_s3_errors("get object"):
            answer = await self.client.get_object(Bucket=self.cfg.bucket, Key=key)
        body = answer["Body"]
        # Read from the StreamingBody itself: what its ``async with`` yields differs between releases
        # (in older releases, the raw aiohttp response, whose read() takes no size).
        async with body:
            while True:
                with translate_s3_errors("get object"):
                    chunk = await body.read(READ_BYTES)
                if not chunk:
                    return
                yield chunk

    async def keep_aside(self, key: str, aside: str) -> None:
        """Copy a damaged object to ``aside`` (server side); nothing is ever deleted."""
        with translate_s3_errors("copy object"):
            await self.client.copy_object(Bucket=self.cfg.bucket, Key=aside,
                                          CopySource={"Bucket": self.cfg.bucket, "Key": key})


    async def erase(self, key: str) -> int:
        """Delete every version of the object at ``key`` (an erasure: a delete marker alone would leave
        the bytes in a versioned bucket). Returns how many versions went. Raises the archiver's errors;
        a bucket that refuses (Object Lock retention, a legal hold, a policy) is DestinationRefusedError
        or PermanentError, naming the key."""
        import botocore.exceptions as bce
        versions: list[str | None] = []
        with translate_s3_errors(f"list versions of {key!r}"):
            try:
                answer = await self.client.list_object_versions(Bucket=self.cfg.bucket, Prefix=key)
                versions = [str(v.get("VersionId")) for part in ("Versions", "DeleteMarkers")
                            for v in answer.get(part) or [] if v.get("Key") == key]
            except bce.ClientError as exc:
                # A server without versions (some S3-compatible ones) answers NotImplemented: one delete.
                if exc.response.get("Error", {}).get("Code") not in ("NotImplemented", "501"):
                    raise
                versions = [None]
        if not versions and await self.head(key) is not None:
            versions = [None]
        for version in versions:
            with translate_s3_errors(f"delete {key!r}"):
                if version is None:
                    await self.client.delete_object(Bucket=self.cfg.bucket, Key=key)
                else:
                    await self.client.delete_object(Bucket=self.cfg.bucket, Key=key, VersionId=version)
        if await self.head(key) is not None:
            raise PermanentError(f"S3 delete {key!r}: the object is still there after its delete")
        return len(versions)


def _b64_sha256(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _content_type(key: str) -> str:
    lower = key.lower()
    return "audio/mpeg" if lower.endswith(".mp3") else "audio/wav" if lower.endswith(".wav") else \
        "application/json" if lower.endswith(".json") else "application/octet-stream"


def checksum_options() -> dict[str, str]:
    """Only the checksums the archiver chooses to send: botocore 1.36 began adding CRC32 ones to every
    upload by default (which some S3-compatible servers refuse) and the switch that stops it; older
    releases neither add them nor know the switch."""
    from botocore.config import Config
    if "request_checksum_calculation" not in Config.OPTION_DEFAULTS:
        return {}
    return {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}


def _code(exc: BaseException) -> str:
    """The S3 error code under an archiver error or a botocore ClientError, or ""."""
    import botocore.exceptions as bce
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, bce.ClientError):
            return str(cause.response.get("Error", {}).get("Code", ""))
        cause = cause.__cause__
    return ""


def _raise_precondition(exc: Exception, key: str, recording: str) -> None:
    """412 to ``If-None-Match: *``: somebody else's object appeared at the key since it was HEADed."""
    import botocore.exceptions as bce
    if isinstance(exc, bce.ClientError) and (exc.response.get("Error", {}).get("Code") in
                                             ("PreconditionFailed", "ConditionalRequestConflict") or
                                             exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
        raise RetryableError(f"S3: an object appeared at {key!r} while it was being written; trying again",
                             recording=recording) from exc
