"""The image store: generated images kept in an S3 bucket, so that their urls outlive the node that made them.

Any S3-compatible service works (AWS S3, Cloudflare R2, GCS's S3 API, MinIO, SeaweedFS, Ceph), through
aiobotocore: credentials and region come from the standard AWS chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, instance roles), the endpoint from
``--s3-endpoint`` for anything that is not AWS. Objects are written under ``PREFIX/<id>/<name>.<format>``
with ids this gateway chose (never a node's), private: only gateways and presigned URLs read them.

Every call is bounded by ``timeout_s``; every failure of the store is a ``StoreError``, which the caller
treats as the store's fault, never the request's or a node's. Objects older than the image TTL are
removed by ``sweep`` (run by each gateway): a bucket lifecycle rule counts whole days, and the TTL is
usually an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import AioSession, get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from t2i_common import IMAGE_PATH
from t2i_common.config import ConfigError

logger = logging.getLogger(__name__)

PART_BYTES = 5 * 1024 * 1024  # S3's smallest multipart part: images up to this size go in one PUT
PRESIGN_S = 300  # how long a --stream-redirect URL stays valid: long enough to start the download
WRITE_CHECK = ".t2i-write-check"  # the object that start-up writes and deletes under the prefix
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StoreError(Exception):
    """The store failed or took too long: its fault, never the request's or a node's."""


@dataclass(frozen=True, slots=True)
class StoreLocation:
    bucket: str
    prefix: str  # "" or ending with "/"

    @classmethod
    def parse(cls, url: str) -> StoreLocation:
        """``s3://BUCKET/PREFIX`` (the prefix optional); ValueError says what is wrong."""
        if not url.startswith("s3://"):
            raise ValueError(f"{url!r} is not an s3://BUCKET/PREFIX URL")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{bucket!r} is not a bucket name (3 to 63 lower-case letters, digits, dots and hyphens)")
        prefix = prefix.strip("/")
        if len(prefix) > 512 or not prefix.isprintable():
            raise ValueError("the prefix must be printable and at most 512 characters")
        return cls(bucket, f"{prefix}/" if prefix else "")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object as the store answered for it: status 200, 206 (a range) or 304 (not modified)."""

    status: int
    headers: dict[str, str]
    length: int
    chunks: AsyncIterator[bytes]


class S3ImageStore:
    """A bucket and prefix on an S3 service; ``start()`` before use, ``close()`` after."""

    def __init__(self, location: StoreLocation, *, endpoint: str | None, ttl_s: float, timeout_s: float) -> None:
        self.location = location
        self.endpoint = endpoint
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def key(self, image_path: str) -> str:
        """The object key of ``/stream/<id>/<name>.<format>``."""
        return self.location.prefix + image_path.removeprefix("/stream/")

    async def start(self) -> None:
        session = get_session()
        # botocore reads its service model and the AWS config files from disk: in a thread, so that the
        # client below finds them cached and creating it does not block the event loop.
        await asyncio.to_thread(_load, session)
        config = Config(
            connect_timeout=self.timeout_s,
            read_timeout=self.timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"} if self.endpoint else {},
        )
        self._client = await self._stack.enter_async_context(session.create_client("s3", endpoint_url=self.endpoint, config=config))

    async def close(self) -> None:
        await self._stack.aclose()

    async def check(self) -> None:
        """The bucket exists and this gateway can write to it; else a ConfigError that says what to fix."""
        where = f"--image-store s3://{self.location.bucket}/{self.location.prefix}"
        bucket = self.location.bucket
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                try:
                    await self._client.head_bucket(Bucket=bucket)
                except ClientError as exc:
                    code = _code(exc)
                    if code in ("404", "NoSuchBucket"):
                        raise ConfigError(f"{where}: the bucket {bucket!r} does not exist; create it, or name another") from None
                    if code in ("403", "AccessDenied"):
                        raise ConfigError(f"{where}: access to the bucket {bucket!r} is denied; check the AWS credentials") from None
                    raise
                key = self.location.prefix + WRITE_CHECK
                try:
                    await self._client.put_object(Bucket=bucket, Key=key, Body=b"")
                    await self._client.delete_object(Bucket=bucket, Key=key)
                except ClientError as exc:
                    raise ConfigError(f"{where}: the bucket cannot be written ({_code(exc)}); check the credentials' permissions") from None
        except TimeoutError:
            raise ConfigError(f"{where}: the store did not answer within {self.timeout_s * 3:g} s; check --s3-endpoint") from None
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(f"{where}: the store cannot be used: {exc}; check --s3-endpoint and the credentials") from None

    async def put(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> None:
        """Write an object from ``chunks``, holding at most one part (``PART_BYTES``) at a time.

        An error of ``chunks`` (the source) is raised as it is; the store's own, as StoreError."""
        part = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        bucket = self.location.bucket
        try:
            async for chunk in chunks:
                part += chunk
                if len(part) >= PART_BYTES:
                    if upload_id is None:
                        created = await self._call(self._client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type))
                        upload_id = created["UploadId"]
                    number = len(parts) + 1
                    sent = await self._call(
                        self._client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(part))
                    )
                    parts.append({"PartNumber": number, "ETag": sent["ETag"]})
                    part.clear()
            if upload_id is None:
                await self._call(self._client.put_object(Bucket=bucket, Key=key, Body=bytes(part), ContentType=content_type))
                return
            if part:
                number = len(parts) + 1
                sent = await self._call(
                    self._client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(part))
                )
                parts.append({"PartNumber": number, "ETag": sent["ETag"]})
            await self._call(
                self._client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
            )
            upload_id = None
        finally:
            if upload_id is not None:  # cut short: the parts sent so far are dropped, not billed for
                with contextlib.suppress(StoreError):
                    await self._call(self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))

    @contextlib.asynccontextmanager
    async def open(
        self, key: str, *, byte_range: str | None = None, if_none_match: str | None = None
    ) -> AsyncIterator[StoredObject | None]:
        """The object (None if it is not there), its body streamed in chunks until the block ends."""
        options: dict[str, str] = {}
        if byte_range:
            options["Range"] = byte_range
        if if_none_match:
            options["IfNoneMatch"] = if_none_match
        try:
            answer = await self._call(self._client.get_object(Bucket=self.location.bucket, Key=key, **options))
        except StoreError as exc:
            cause = exc.__cause__
            code = _code(cause) if isinstance(cause, ClientError) else ""
            if code in ("NoSuchKey", "404"):
                yield None
                return
            if code == "304":
                yield StoredObject(304, {"ETag": if_none_match or ""}, 0, _nothing())
                return
            if code == "InvalidRange":
                raise InvalidRange from None
            raise
        body = answer["Body"]
        try:
            headers = {"ETag": answer["ETag"]}
            if answer.get("ContentRange"):
                headers["Content-Range"] = answer["ContentRange"]
            yield StoredObject(
                206 if byte_range and "Content-Range" in headers else 200, headers, answer["ContentLength"], self._chunks(body)
            )
        finally:
            body.close()

    async def _chunks(self, body: Any) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    chunk = await body.read(64 * 1024)
            except (TimeoutError, OSError, BotoCoreError) as exc:
                raise StoreError(f"reading from the store broke off: {type(exc).__name__}") from exc
            if not chunk:
                return
            yield chunk

    async def read(self, key: str, max_bytes: int) -> bytes | None:
        """A whole object of at most ``max_bytes`` (None if it is not there)."""
        async with self.open(key) as stored:
            if stored is None:
                return None
            if stored.length > max_bytes:
                raise StoreError(f"the stored object is {stored.length} bytes, over {max_bytes}")
            return b"".join([chunk async for chunk in stored.chunks])

    async def presign(self, key: str) -> str:
        """A URL that reads the object for ``PRESIGN_S`` seconds, without credentials."""
        url: str = await self._call(
            self._client.generate_presigned_url("get_object", Params={"Bucket": self.location.bucket, "Key": key}, ExpiresIn=PRESIGN_S)
        )
        return url

    async def sweep(self, now: float | None = None) -> int:
        """Delete this store's images older than the TTL at ``now`` (epoch seconds; default: now); how many.
        Only keys of the image form go."""
        deadline = (time.time() if now is None else now) - self.ttl_s
        removed = 0
        paginator = self._client.get_paginator("list_objects_v2")
        prefix = self.location.prefix
        try:
            async with asyncio.timeout(self.timeout_s * 10):
                async for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                    old = [
                        {"Key": item["Key"]}
                        for item in page.get("Contents", [])
                        if item["LastModified"].timestamp() < deadline
                        and IMAGE_PATH.fullmatch("/stream/" + item["Key"].removeprefix(prefix))
                    ]
                    if old:  # a page holds at most 1000 keys, as many as one DeleteObjects takes
                        await self._client.delete_objects(Bucket=self.location.bucket, Delete={"Objects": old, "Quiet": True})
                        removed += len(old)
        except (TimeoutError, ClientError, BotoCoreError) as exc:
            raise StoreError(f"the sweep failed: {type(exc).__name__}: {exc}") from exc
        return removed

    async def _call(self, call: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s * 2):  # botocore's own timeouts are per socket operation
                return await call
        except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc


class InvalidRange(Exception):
    """A Range header the object does not hold."""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


def _load(session: AioSession) -> None:
    """What creating an S3 client reads from disk, read now (botocore caches it in the session)."""
    loader = session.get_component("data_loader")
    for name in ("sdk-default-configuration", "endpoints", "partitions", "_retry"):
        loader.load_data(name)
    for kind in ("service-2", "endpoint-rule-set-1", "paginators-1"):
        loader.load_service_model("s3", kind, api_version=None)  # as botocore asks: its cache keys on the arguments
    session.get_scoped_config()
