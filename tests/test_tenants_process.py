"""Tenants against real processes: gateways sharing one limit through a real redis-server, the official
``openai`` client meeting a 429, the keys file reloaded on SIGHUP, and usage summed across gateways."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from bench.common import RedisServer
from t2i_gateway.tenants import secret_hash

from .fakes import FakeOrchestrator
from .helpers import wait_until
from .processes import Daemon, start, wait_for_line, wait_healthy

pytestmark = pytest.mark.slow

ACME, OPS = "t2i-acme-secret", "t2i-ops-secret"
BODY = {"prompt": "a cool cat on the beach", "width": 64, "height": 64}


def keys_toml(acme: str, name: str = "acme") -> str:
    return (
        f'[[keys]]\nname = "{name}"\nsha256 = "{secret_hash(ACME)}"\n{acme}\n\n'
        f'[[keys]]\nname = "ops"\nsha256 = "{secret_hash(OPS)}"\nadmin = true\n'
    )


def call(url: str, secret: str, body: dict[str, Any] | None = BODY) -> tuple[int, dict[str, str], Any]:
    """One request; its status, headers and JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    daemon = start("bench.fake_node", ["--behaviour", "ok"], tmp_path)
    yield daemon
    daemon.stop()


def gateway(tmp_path: Path, node_url: str, keys: Path, *extra: str) -> Daemon:
    daemon = start("t2i_gateway", ["--orchestrator", node_url, "--keys-file", str(keys), *extra], tmp_path)
    wait_healthy(daemon)
    return daemon


def test_two_gateways_over_one_redis_enforce_one_limit(tmp_path: Path, node: Daemon, redis_server: RedisServer) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml("requests_per_minute = 3"))  # one more every 20 s: none comes back during the test
    gateways = [gateway(tmp_path, node.url, keys, "--limits-redis", redis_server.url) for _ in range(2)]
    try:
        statuses = [call(f"{gateways[i % 2].url}/text-to-image", ACME)[0] for i in range(8)]
        assert sorted(statuses) == [200] * 3 + [429] * 5, statuses  # one limit of 3, not 3 at each gateway
        # The second gateway writes what it has not written yet to Redis as it stops; the first adds its own.
        assert gateways[1].stop() == 0
        status, _, body = call(f"{gateways[0].url}/admin/usage", OPS, None)
        assert status == 200 and body["shared"] is True
        assert body["keys"]["acme"]["requests"] == {"200": 3, "429": 5} and body["keys"]["acme"]["images"] == 3

        redis_server.stop()  # the documented choice: each gateway limits alone until Redis is back
        status, headers, _ = call(f"{gateways[0].url}/text-to-image", ACME)
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == "2"
        _, _, body = call(f"{gateways[0].url}/admin/usage", OPS, None)
        assert body["shared"] is False and body["problem"].startswith("Redis unreachable")
        log = gateways[0].log.read_text()
        assert "key acme" in log and ACME not in log  # the request log names the key, never its secret
    finally:
        for daemon in gateways:
            assert daemon.stop() == 0


def test_openai_client_meets_the_limit_and_waits_as_told(tmp_path: Path, node: Daemon) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml("requests_per_minute = 20"))  # one more every 3 s
    daemon = gateway(tmp_path, node.url, keys)
    try:
        while call(f"{daemon.url}/v1/images/generations", ACME, {"prompt": "a cat", "size": "64x64"})[0] == 200:
            pass  # its minute's worth at once
        hasty = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=ACME, max_retries=0)
        with pytest.raises(openai.RateLimitError) as refused:
            hasty.images.generate(prompt="a cat", size="256x256")
        assert refused.value.status_code == 429
        assert "Key 'acme' is over its limit of 20 requests per minute; retry in" in refused.value.message
        assert 0 < int(refused.value.response.headers["retry-after-ms"]) <= 3000
        assert refused.value.response.headers["x-ratelimit-limit-requests"] == "20"
        # With retries (the SDK's default), it waits what Retry-After says, and then gets its image.
        patient = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key=ACME, max_retries=2)
        started = time.monotonic()
        result = patient.images.with_raw_response.generate(prompt="a cat", size="256x256")
        assert result.http_response.status_code == 200 and result.retries_taken >= 1
        assert time.monotonic() - started > 0.001 * int(refused.value.response.headers["retry-after-ms"]) - 1
    finally:
        assert daemon.stop() == 0


async def test_keys_file_is_reloaded_on_sighup_without_dropping_requests(tmp_path: Path, aiohttp_server: Any) -> None:
    fake = FakeOrchestrator()  # in this process, its generations held until released: a request stays in flight
    node_url = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml("", name="acme"))
    daemon = await asyncio.to_thread(gateway, tmp_path, node_url, keys)
    try:
        fake.mode = "hold"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ACME}"}) as session:

            async def generate() -> int:
                async with session.post(f"{daemon.url}/text-to-image", json=BODY) as response:
                    await response.read()
                    return response.status

            first = asyncio.create_task(generate())
            await wait_until(lambda: len(fake.requests) == 1)  # admitted as 'acme', held on the node
            # A change the file watcher cannot see (same size, inode and times): only the signal reloads it.
            before = keys.stat()
            with keys.open("r+") as file:
                file.write(keys_toml("", name="acmf"))
            os.utime(keys, ns=(before.st_atime_ns, before.st_mtime_ns))
            daemon.signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for_line, daemon, "keys reloaded: 2 key(s) of 2 tenant(s)")
            second = asyncio.create_task(generate())
            await wait_until(lambda: len(fake.requests) == 2)
            fake.release.set()
            assert [await first, await second] == [200, 200]
        assert daemon.process.poll() is None  # SIGHUP reloads; it does not stop the gateway
    finally:
        assert daemon.stop() == 0
    log = daemon.log.read_text()
    # The request in flight across the reload kept the key it came with; the next has the new name.
    assert re.search(r"key acme model \S+ node \S+ attempts 1 status 200", log)
    assert re.search(r"key acmf model \S+ node \S+ attempts 1 status 200", log)
