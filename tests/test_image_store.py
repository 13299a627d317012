"""The S3 image store (--image-store), against a real S3 service: SeaweedFS on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import get_session
from PIL import Image
from prometheus_client import CollectorRegistry

from bench.common import S3Server
from discovery import StaticDiscovery
from metrics import GatewayMetrics
from t2i_common.config import ConfigError
from t2i_gateway.app import POOL, create_app
from t2i_gateway.config import GatewayConfig, load_config
from t2i_gateway.image_store import PART_BYTES, S3ImageStore, StoreLocation
from t2i_gateway.images import image_size
from t2i_gateway.state import STORE

from .fakes import FakeOrchestrator, solid_png
from .helpers import MakeGateway
from .processes import start, wait_healthy

BUCKET = "t2i-images"  # one for all tests (each bucket takes volumes of SeaweedFS's own), a prefix per test


def new_prefix(s3: S3Server) -> str:
    s3.make_bucket(BUCKET)  # once made, making it again changes nothing
    return f"test-{secrets.token_hex(6)}"


def store_options(s3: S3Server, prefix: str, **more: Any) -> dict[str, Any]:
    return {"image_store": StoreLocation.parse(f"s3://{BUCKET}/{prefix}"), "s3_endpoint": s3.url, **more}


async def stored_keys(s3: S3Server, prefix: str) -> list[str]:
    async with get_session().create_client("s3", endpoint_url=s3.url) as client:
        listed = await client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
        return [item["Key"].removeprefix(f"{prefix}/") for item in listed.get("Contents", [])]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_images_are_moved_into_the_store_and_outlive_their_node(make_gateway: MakeGateway, s3: S3Server) -> None:
    prefix = new_prefix(s3)
    fake = FakeOrchestrator()
    gateway = await make_gateway(fake, **store_options(s3, prefix))
    body = await (await gateway.post({"prompt": "a cat", "width": 64, "height": 128, "num_images_per_prompt": 2})).json()
    keys = await stored_keys(s3, prefix)
    assert len(keys) == 2 and all(key.endswith(".png") for key in keys)
    assert len(fake.downloads) == 2  # each image read from the node once, to store it
    await gateway.servers[0].close()  # the node is gone
    expected = solid_png(64, 128, 1)
    for image in body["images"]:
        path = "/" + image["url"].split("/", 3)[3]
        response = await gateway.client.get(path)
        data = await response.read()
        assert response.status == 200 and data == expected
        assert response.headers["Content-Type"] == "image/png" and int(response.headers["Content-Length"]) == len(expected)
        etag = response.headers["ETag"]
        assert etag.strip('"') == hashlib.md5(expected).hexdigest()  # S3's ETag of a single-part object
        ranged = await gateway.client.get(path, headers={"Range": "bytes=8-23"})
        assert ranged.status == 206 and await ranged.read() == expected[8:24]
        assert ranged.headers["Content-Range"] == f"bytes 8-23/{len(expected)}"
        assert (await gateway.client.get(path, headers={"If-None-Match": etag})).status == 304
        outside = await gateway.client.get(path, headers={"Range": f"bytes={len(expected) + 10}-"})
        assert outside.status == 416
    assert len(fake.downloads) == 2  # downloads never went to the node
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_stored_images_total") == 2


async def test_an_image_over_one_part_goes_up_in_parts_and_comes_back_whole(make_gateway: MakeGateway, s3: S3Server) -> None:
    import numpy

    noise = numpy.random.default_rng(7).integers(0, 256, (2048, 1024, 3), dtype=numpy.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
    fake = FakeOrchestrator()
    fake.image = buffer.getvalue()
    assert len(fake.image) > PART_BYTES
    prefix = new_prefix(s3)
    gateway = await make_gateway(fake, **store_options(s3, prefix))
    body = await (await gateway.post({"prompt": "noise", "width": 1024, "height": 2048})).json()
    await gateway.servers[0].close()
    response = await gateway.client.get("/" + body["images"][0]["url"].split("/", 3)[3])
    assert response.status == 200 and await response.read() == fake.image
    assert response.headers["ETag"].strip('"').endswith("-2")  # S3's ETag of a two-part upload


async def test_any_gateway_with_the_secret_and_the_store_serves_stored_images(
    make_gateway: MakeGateway, s3: S3Server, aiohttp_client: Any
) -> None:
    prefix = new_prefix(s3)
    gateway = await make_gateway(FakeOrchestrator(), **store_options(s3, prefix))
    url = (await (await gateway.post()).json())["images"][0]["url"]
    path = "/" + url.split("/", 3)[3]
    for options, status in ((store_options(s3, prefix), 200), ({}, 404)):  # the same store, or none
        config = GatewayConfig(orchestrators=("http://127.0.0.1:9",), **options)
        metrics = GatewayMetrics(CollectorRegistry())
        other = await aiohttp_client(create_app(config, discovery=StaticDiscovery([]), stream_secret=b"test-secret", metrics_=metrics))
        response = await other.get(path)
        assert response.status == status
        if status == 404:
            assert "--image-store" in (await response.json())["detail"]["msg"]


async def test_stream_redirect_sends_clients_to_a_presigned_url(
    make_gateway: MakeGateway, s3: S3Server, session: aiohttp.ClientSession
) -> None:
    prefix = new_prefix(s3)
    gateway = await make_gateway(FakeOrchestrator(), **store_options(s3, prefix, stream_redirect=True))
    body = await (await gateway.post({"prompt": "a cat", "width": 64, "height": 64, "output_format": "webp"})).json()
    path = "/" + body["images"][0]["url"].split("/", 3)[3]
    assert path.endswith(".webp")
    redirect = await gateway.client.get(path, allow_redirects=False)
    location = redirect.headers["Location"]
    assert redirect.status == 302 and location.startswith(s3.url) and "Signature=" in location
    async with session.get(str(gateway.client.make_url(path))) as followed:  # a plain client follows it
        assert followed.status == 200 and followed.url.host == "127.0.0.1" and str(followed.url).startswith(s3.url)
        assert Image.open(io.BytesIO(await followed.read())).size == (64, 64)
    async with session.get(location.split("?")[0]) as unsigned:
        assert unsigned.status == 403 or unsigned.status == 401  # the bucket is private


async def test_a_node_image_that_is_not_what_was_asked_for_is_the_nodes_fault(make_gateway: MakeGateway, s3: S3Server) -> None:
    prefix = new_prefix(s3)
    liar = FakeOrchestrator()
    gateway = await make_gateway(liar, **store_options(s3, prefix))
    for image, words in (
        (solid_png(32, 32, 1), "not a 64x64 png image"),
        (b"x" * 100, "not a png image"),
        (bytes(64 * 64 * 4 + 2**20 + 1), "over the"),
    ):
        liar.image = image
        response = await gateway.post()
        assert response.status == 503 and words in (await response.json())["detail"]["msg"], await response.text()
    assert await stored_keys(s3, prefix) == []
    failed = {"orchestrator": gateway.url_of(0), "outcome": "failed"}
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_attempts_total", failed) == 3
    # Whichever node a request tries first, its answer comes from the honest one, checked and stored.
    honest = FakeOrchestrator()
    gateway = await make_gateway(liar, honest, **store_options(s3, prefix))
    for _ in range(3):
        body = await (await gateway.post()).json()
        download = await gateway.client.get("/" + body["images"][0]["url"].split("/", 3)[3])
        assert await download.read() == solid_png(64, 64, 1)
    assert len(honest.requests) == 3 and len(await stored_keys(s3, prefix)) == 3


@pytest.mark.parametrize("fault", ["down", "hung"])
async def test_a_store_that_fails_leaves_the_images_on_the_node(
    make_gateway: MakeGateway, s3: S3Server, tmp_path: Path, fault: str
) -> None:
    own = S3Server(tmp_path)  # a store of this test's own, stopped or paused after the gateway has started
    own.start()
    try:
        prefix = new_prefix(own)
        gateway = await make_gateway(FakeOrchestrator(), **store_options(own, prefix, store_timeout_s=1.0))
        assert own.process is not None
        if fault == "down":
            own.stop()
        else:  # it keeps its connections open and answers nothing: --store-timeout ends the wait
            own.process.send_signal(signal.SIGSTOP)
        response = await gateway.post()
    finally:
        own.stop()
    assert response.status == 200
    path = "/" + (await response.json())["images"][0]["url"].split("/", 3)[3]
    download = await gateway.client.get(path)
    assert download.status == 200 and await download.read() == solid_png(64, 64, 1)  # from the node
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_store_fallbacks_total") == 1
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_store_errors_total", {"operation": "put"}) == 1
    assert len(gateway.client.app[POOL].healthy()) == 1  # type: ignore[index]  # the store's fault is no node's


async def test_stored_images_expire(make_gateway: MakeGateway, s3: S3Server) -> None:
    prefix = new_prefix(s3)
    gateway = await make_gateway(FakeOrchestrator(), **store_options(s3, prefix))
    assert (await gateway.post()).status == 200
    [stored] = await stored_keys(s3, prefix)
    async with get_session().create_client("s3", endpoint_url=s3.url) as client:
        await client.put_object(Bucket=BUCKET, Key=f"{prefix}/notes.txt", Body=b"not ours")  # never the sweep's to delete
    store = gateway.client.app[STORE]  # type: ignore[index]  # what the gateway's sweeper calls, a few times per TTL
    assert await store.sweep() == 0 and sorted(await stored_keys(s3, prefix)) == sorted([stored, "notes.txt"])  # young
    later = time.time() + store.ttl_s + 5  # when the image is older than the TTL
    assert await store.sweep(now=later) == 1 and await stored_keys(s3, prefix) == ["notes.txt"]
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_store_errors_total", {"operation": "sweep"}) is None


async def test_a_store_that_cannot_be_used_stops_the_gateway_at_start(s3: S3Server, tmp_path: Path) -> None:
    missing = f"t2i-missing-{secrets.token_hex(4)}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "t2i_gateway",
        "--orchestrator",
        "http://127.0.0.1:9",
        "--port",
        "0",
        "--image-store",
        f"s3://{missing}/images",
        "--s3-endpoint",
        s3.url,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    _, err = await process.communicate()
    assert process.returncode != 0
    assert f"the bucket {missing!r} does not exist" in err.decode(), err.decode()[-2000:]


async def test_a_bucket_that_cannot_be_written_is_found_at_start(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = new_prefix(s3)
    for name, value in S3Server.READ_ONLY.items():
        monkeypatch.setenv(name, value)
    store = S3ImageStore(StoreLocation(BUCKET, f"{prefix}/"), endpoint=s3.url, ttl_s=60, timeout_s=5)
    await store.start()
    try:
        with pytest.raises(ConfigError, match="the bucket cannot be written"):
            await store.check()
    finally:
        await store.close()


def test_store_options_are_checked() -> None:
    for argv, words in (
        (["--image-store", "http://bucket/x"], "s3://BUCKET/PREFIX"),
        (["--image-store", "s3://A_B/x"], "is not a bucket name"),
        (["--s3-endpoint", "http://127.0.0.1:1"], "--s3-endpoint needs --image-store"),
        (["--image-store", "s3://bucket", "--s3-endpoint", "ftp://x"], "http:// or https://"),
        (["--stream-redirect"], "--stream-redirect needs --image-store"),
    ):
        with pytest.raises(ConfigError, match=words.replace("+", r"\+")):
            load_config(["--orchestrator", "http://127.0.0.1:9", *argv])
    config = load_config(["--orchestrator", "http://127.0.0.1:9", "--image-store", "s3://bucket/a/b/"])
    assert config.image_store == StoreLocation("bucket", "a/b/") and config.s3_endpoint is None


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_image_sizes_are_read_from_the_header(fmt: str) -> None:
    for width, height in ((64, 128), (1024, 512)):
        buffer = io.BytesIO()
        options = {"lossless": True} if fmt == "webp" and width == 64 else {}  # VP8L as well as VP8
        Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format=fmt.upper(), **options)
        data = buffer.getvalue()
        assert image_size(data, fmt) == (width, height)
        assert image_size(data[:10], fmt) is None
    assert image_size(b"GIF89a" + bytes(100), "png") is None


@pytest.mark.slow
def test_images_of_a_killed_node_are_served_by_every_gateway_of_the_store(
    s3: S3Server, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Real processes: a node with the demo model, gateways sharing the store and the stream secret."""
    import urllib.request

    folder = tmp_path_factory.mktemp("store-e2e")
    prefix = new_prefix(s3)
    secret_env = {**S3Server.CREDENTIALS, "T2I_GATEWAY_STREAM_SECRET": "a-stream-secret-shared-by-the-gateways-0123"}
    node = start("t2i_orchestrator", ["--cache-dir", str(model_cache), "--storage-dir", str(folder / "images"), "--threads", "1"], folder)
    store = ["--orchestrator", node.url, "--image-store", f"s3://{BUCKET}/{prefix}", "--s3-endpoint", s3.url]
    first, second = (start("t2i_gateway", store, folder, env=secret_env) for _ in range(2))
    redirecting = start("t2i_gateway", [*store, "--stream-redirect"], folder, env=secret_env)
    try:
        for daemon in (node, first, second, redirecting):
            wait_healthy(daemon)
        urls: list[str] = []
        for fmt in ("png", "jpeg"):
            body = json.dumps({"prompt": "a lighthouse", "width": 64, "height": 64, "num_images_per_prompt": 2, "output_format": fmt})
            request = urllib.request.Request(f"{first.url}/text-to-image", body.encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                urls += [image["url"] for image in json.load(response)["images"]]
        node.process.kill()  # the node and its disk are gone
        node.process.wait()
        for url in urls:
            path = "/" + url.split("/", 3)[3]
            served = []
            for gateway in (first, second, redirecting):  # urllib follows the redirect to the store
                with urllib.request.urlopen(f"{gateway.url}{path}", timeout=30) as response:
                    served.append((response.headers["Content-Type"], response.read()))
            assert served[0] == served[1] == served[2]
            picture = Image.open(io.BytesIO(served[0][1]))
            assert picture.size == (64, 64) and served[0][0] == f"image/{picture.format.lower()}"  # type: ignore[union-attr]
            assert path.endswith(f".{picture.format.lower()}")  # type: ignore[union-attr]
    finally:
        for daemon in (first, second, redirecting, node):
            daemon.stop()
