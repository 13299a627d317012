"""Image urls and downloads: where a generated image is kept, and how ``/stream`` serves it.

Without ``--image-store``, an image stays on the node that made it: the answer's urls are signed ids
that name the node, and ``/stream`` relays the node's file. With an image store, the gateway moves each
image from the node into the store before it answers (streamed, bounded in size, checked to be an image
of the format and size asked for), and the ids name the stored object: any gateway with the same store
and stream secret serves it, streamed with ``ETag`` and ranges, or as a redirect to a presigned URL
(``--stream-redirect``). When the store fails or is slow, the request is answered with node-held urls,
as without a store, and counted (``t2i_gateway_store_fallbacks_total``): nothing is lost, and the
request waits no longer than ``--store-timeout`` for the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from t2i_common import FORMAT_PATTERN, IMAGE_FORMATS
from t2i_common.errors import APIError, BadGateway, NotFound, ServiceUnavailable

from .image_store import InvalidRange, S3ImageStore, StoreError
from .state import CONFIG, METRICS, POOL, SESSION, SIGNER, STORE
from .stream_tokens import StreamTarget
from .upstream import Expected

logger = logging.getLogger(__name__)

STREAM_CHUNK = 64 * 1024
COPY_SLOTS = 16  # images moved into the store at once: the gateway holds at most this many parts
HEAD_BYTES = 64 * 1024  # where an image's header must say its format and size
STREAM_SLOTS = web.AppKey("stream_slots", asyncio.Semaphore)  # --max-streams
NODE_KEYS = web.AppKey("node_keys", dict[str, str])  # StreamSigner.node_key -> url, of nodes known now
COPIES = web.AppKey("copies", asyncio.Semaphore)
_RANGE = re.compile(r"bytes=([0-9]{1,15}-[0-9]{0,15}|-[0-9]{1,15})")  # one range: what a download resumes with


class BadImage(Exception):
    """A node's image is not what its answer promised (missing, too large, another format or size)."""


class RangeNotSatisfiable(APIError):
    status = 416


def setup(app: web.Application) -> None:
    """``/stream`` and, with ``--image-store``, the store (checked at start, swept while running)."""
    config = app[CONFIG]
    app[STREAM_SLOTS] = asyncio.Semaphore(config.max_streams)
    app[NODE_KEYS] = {}
    app[COPIES] = asyncio.Semaphore(COPY_SLOTS)
    if config.image_store is not None:
        app.cleanup_ctx.append(_image_store)
    app.router.add_get(f"/stream/{{token}}/{{name}}.{{format:{FORMAT_PATTERN}}}", stream_image)


async def _image_store(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    assert config.image_store is not None
    store = S3ImageStore(config.image_store, endpoint=config.s3_endpoint, ttl_s=config.image_ttl_s, timeout_s=config.store_timeout_s)
    await store.start()
    try:
        await store.check()  # a ConfigError stops the gateway at start, saying what to fix
        app[STORE] = store
        sweeper = asyncio.create_task(_sweep(store, app))
        yield
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
    finally:
        await store.close()


async def _sweep(store: S3ImageStore, app: web.Application) -> None:
    """Remove stored images older than the TTL, a few times per TTL (each gateway does; deletes are idempotent)."""
    interval_s = min(300.0, max(1.0, store.ttl_s / 4))
    while True:
        try:
            removed = await store.sweep()
            if removed:
                logger.info("image store: %d expired images removed", removed)
        except StoreError as exc:
            app[METRICS].store_errors.labels("sweep").inc()
            logger.warning("image store: sweep failed: %s", exc)
        await asyncio.sleep(interval_s)


# -- answering with image urls -------------------------------------------------------------------


async def publish(request: web.Request, node_url: str, body: dict[str, Any], expected: Expected) -> dict[str, Any]:
    """A node's good answer with each image url pointing at this gateway: at the image moved into the
    store, or (no store, or the store failing) at the node. BadImage if the node cannot hand an image over."""
    app = request.app
    signer = app[SIGNER]
    paths = [urlsplit(image["url"]).path for image in body["images"]]  # of the node's image form: upstream checked
    targets: list[StreamTarget] | None = None
    if STORE in app:
        targets = await _move_to_store(app, app[STORE], node_url, paths, expected)
    if targets is None:
        targets = [signer.target(path, node_url) for path in paths]
    base = app[CONFIG].public_url or f"{request.scheme}://{request.host}"
    return {
        "images": [
            {"url": f"{base}/stream/{signer.sign(target)}/{target.name}.{target.format}", "seed": image["seed"], "nsfw": image["nsfw"]}
            for target, image in zip(targets, body["images"])
        ]
    }


async def _move_to_store(
    app: web.Application, store: S3ImageStore, node_url: str, paths: list[str], expected: Expected
) -> list[StreamTarget] | None:
    """Each image moved into the store, or None when the store failed (the images stay on the node)."""
    started = time.monotonic()
    results = await asyncio.gather(*(_move(app, store, node_url, path, expected) for path in paths), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, StoreError):
            raise result  # BadImage: the node's fault; anything else is ours
    failures = [result for result in results if isinstance(result, StoreError)]
    metrics_ = app[METRICS]
    if failures:
        metrics_.store_errors.labels("put").inc(len(failures))
        metrics_.store_fallbacks.inc()
        logger.warning("image store: %s; answering with the node's image urls", failures[0])
        return None
    metrics_.store_seconds.observe(time.monotonic() - started)
    metrics_.stored_images.inc(len(paths))
    return [result for result in results if isinstance(result, StreamTarget)]


async def _move(app: web.Application, store: S3ImageStore, node_url: str, path: str, expected: Expected) -> StreamTarget:
    # A name of this gateway's choosing: a node never picks (or overwrites) a stored object.
    target = app[SIGNER].target(f"/stream/{secrets.token_hex(16)}/{secrets.token_hex(8)}.{expected.format}")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=app[CONFIG].connect_timeout_s, sock_read=30)
    async with app[COPIES]:
        try:
            async with app[SESSION].get(f"{node_url}{path}", headers=app[POOL].auth_headers(node_url), timeout=timeout) as upstream:
                if upstream.status != 200:
                    raise BadImage(f"its image answered {upstream.status}")
                await store.put(store.key(target.path), _checked(upstream, expected), IMAGE_FORMATS[expected.format])
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BadImage(f"its image could not be read: {type(exc).__name__}") from exc
    return target


async def _checked(upstream: aiohttp.ClientResponse, expected: Expected) -> AsyncIterator[bytes]:
    """The node's image in chunks, once its header shows the format and size asked for; at most the
    bytes such an image can take."""
    limit = expected.width * expected.height * 4 + 1024 * 1024  # raw RGBA and then some: no encoder needs more
    if (upstream.content_length or 0) > limit:
        raise BadImage(f"its image is {upstream.content_length} bytes, over the {limit} such an image can take")
    head: bytearray | None = bytearray()
    total = 0
    async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
        total += len(chunk)
        if total > limit:
            raise BadImage(f"its image is over the {limit} bytes such an image can take")
        if head is not None:
            head += chunk
            size = image_size(bytes(head), expected.format)
            if size is None and len(head) < HEAD_BYTES:
                continue
            if size != (expected.width, expected.height):
                raise BadImage(f"its image is not a {expected.width}x{expected.height} {expected.format} image")
            chunk, head = bytes(head), None
        yield chunk
    if head is not None:
        raise BadImage(f"its image is not a {expected.format} image")


def image_size(head: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG or WebP file; None if they do not say (yet)."""
    if fmt == "png":
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
            return struct.unpack(">II", head[16:24])  # type: ignore[return-value]
        return None
    if fmt == "webp":
        if head[:4] != b"RIFF" or head[8:12] != b"WEBP" or len(head) < 30:
            return None
        kind = head[12:16]
        if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if kind == b"VP8L" and head[20] == 0x2F:
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        return None
    # JPEG: the segments up to the first start-of-frame, which holds the size.
    if head[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", head[at + 5 : at + 9])
            return width, height
        at += 2 + struct.unpack(">H", head[at + 2 : at + 4])[0]
    return None


# -- serving images ------------------------------------------------------------------------------


async def stream_image(request: web.Request) -> web.StreamResponse:
    """An image, streamed chunk by chunk from the store or the node that made it, never held whole."""
    app = request.app
    target = app[SIGNER].verify(request.match_info["token"])
    if target is None or (target.name, target.format) != (request.match_info["name"], request.match_info["format"]):
        raise NotFound("Image not found: the id is unknown, altered or expired.")
    if target.stored:
        store = _store_of(app)
        if app[CONFIG].stream_redirect:
            try:
                location = await store.presign(store.key(target.path))
            except StoreError as exc:  # e.g. credentials that could not be refreshed
                raise BadGateway(f"The image store cannot be used now ({exc}); retry shortly.") from exc
            return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})
        async with _stream_slot(app):
            return await _from_store(request, store, target)
    node_url = _fleet_node(app, target)
    if node_url is None:
        raise NotFound("Image not found: the orchestrator that made it has left the fleet.")
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=app[CONFIG].connect_timeout_s, sock_read=30)
    headers = app[POOL].auth_headers(node_url)
    async with _stream_slot(app):
        try:
            async with app[SESSION].get(f"{node_url}{target.path}", headers=headers, timeout=timeout) as upstream:
                if upstream.status in (401, 403) and not headers:  # a node that left, asked without its secret
                    raise NotFound("Image not found: the orchestrator that made it has left the fleet.")
                if upstream.status == 404:
                    raise NotFound("Image not found: it has expired on the orchestrator that made it.")
                if upstream.status != 200:
                    raise BadGateway(f"The orchestrator holding this image answered {upstream.status}.")
                return await _send(request, target, 200, {}, upstream.content_length, upstream.content.iter_chunked(STREAM_CHUNK))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BadGateway(f"The orchestrator holding this image cannot be reached ({type(exc).__name__}).") from exc


def _store_of(app: web.Application) -> S3ImageStore:
    if STORE not in app:
        raise NotFound(
            "Image not found: it is kept in an image store that this gateway does not use (start it with the same --image-store)."
        )
    return app[STORE]


@contextlib.asynccontextmanager
async def _stream_slot(app: web.Application) -> AsyncIterator[None]:
    config, slots = app[CONFIG], app[STREAM_SLOTS]
    if slots.locked():
        raise ServiceUnavailable(f"The gateway is serving {config.max_streams} image downloads already; retry shortly.", retry_after=1)
    async with slots:
        with app[METRICS].streams.track_inprogress():
            yield


async def _from_store(request: web.Request, store: S3ImageStore, target: StreamTarget) -> web.StreamResponse:
    requested = request.headers.get("Range", "")
    byte_range = requested if _RANGE.fullmatch(requested) else None  # anything else is ignored: the whole image
    try:
        async with store.open(store.key(target.path), byte_range=byte_range, if_none_match=request.headers.get("If-None-Match")) as stored:
            if stored is None:
                raise NotFound("Image not found: it has expired in the image store.")
            if stored.status == 304:
                return web.Response(status=304, headers=stored.headers)
            return await _send(request, target, stored.status, {**stored.headers, "Accept-Ranges": "bytes"}, stored.length, stored.chunks)
    except InvalidRange:
        raise RangeNotSatisfiable(f"The range {requested!r} is outside the image.") from None
    except StoreError as exc:
        request.app[METRICS].store_errors.labels("get").inc()
        raise BadGateway(f"The image store cannot be read now ({exc}); retry shortly.") from exc


async def _send(
    request: web.Request, target: StreamTarget, status: int, headers: dict[str, str], length: int | None, chunks: AsyncIterator[bytes]
) -> web.StreamResponse:
    config = request.app[CONFIG]
    cache = f"private, max-age={int(config.image_ttl_s)}"
    response = web.StreamResponse(status=status, headers={**headers, "Content-Type": IMAGE_FORMATS[target.format], "Cache-Control": cache})
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    write_timeout_s = config.stream_write_timeout_s
    try:
        async for chunk in chunks:
            async with asyncio.timeout(write_timeout_s):  # a client that stops reading is cut off
                await response.write(chunk)
            request.app[METRICS].stream_bytes.inc(len(chunk))
        async with asyncio.timeout(write_timeout_s):
            await response.write_eof()
    except (aiohttp.ClientError, TimeoutError, StoreError) as exc:
        # The headers are sent: all that is left is to cut the body short, which the client sees.
        logger.warning("stream of %s broke off: %s", target.path, str(exc) or type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
    return response


def _fleet_node(app: web.Application, target: StreamTarget) -> str | None:
    """The URL of the node a stream id names, if it is in the fleet now: never an address from the id."""
    keys, pool = app[NODE_KEYS], app[POOL]
    url = keys.get(target.source)
    if url is None or not pool.knows(url):  # a node that joined since the last look, or one long gone
        keys.clear()
        keys.update((app[SIGNER].node_key(known), known) for known in pool.known_urls())
        url = keys.get(target.source)
    return url


async def image_bytes(app: web.Application, url: str) -> bytes:
    """The image behind one of this gateway's image urls (signed a moment ago): from the store, or the node."""
    target = app[SIGNER].verify(url.split("/stream/", 1)[1].split("/", 1)[0])
    if target is not None and target.stored:
        store = _store_of(app)
        try:
            data = await store.read(store.key(target.path), max_bytes=64 * 1024 * 1024)
        except StoreError as exc:
            raise BadGateway(f"The image store cannot be read now ({exc}); retry shortly.") from exc
        if data is None:
            raise BadGateway("An image moved into the image store a moment ago is not there.")
        return data
    node_url = _fleet_node(app, target) if target else None
    if target is None or node_url is None:
        raise BadGateway("An image url could not be resolved: the orchestrator that made it has left.")
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=app[CONFIG].connect_timeout_s)
    try:
        async with app[SESSION].get(f"{node_url}{target.path}", headers=app[POOL].auth_headers(node_url), timeout=timeout) as upstream:
            if upstream.status != 200:
                raise BadGateway(f"The orchestrator holding the image answered {upstream.status}.")
            return await upstream.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BadGateway(f"The orchestrator holding the image cannot be reached ({type(exc).__name__}).") from exc
