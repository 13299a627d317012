"""Many gateways over one fleet, end to end: real node and gateway processes registered through a real Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from discovery import RegistrySettings
from discovery.redis_registry import RedisRegistry
from t2i_common.sse import read_events

from .processes import Daemon, free_port, start, wait_healthy
from .services import RedisServer, make_ca

pytestmark = pytest.mark.slow

HEARTBEAT = ["--heartbeat-interval", "1", "--heartbeat-ttl", "3"]
TLS_NODE_SECRET = "node-secret-of-the-tls-node-0123456789"
REDIS_PASSWORD = "the-fleet's-redis-password"  # the fleet's Redis speaks TLS only and wants this password
BODY = {"prompt": "a cool cat on the beach", "width": 64, "height": 64}


@dataclass
class Fleet:
    redis: RedisServer
    nodes: list[Daemon]
    gateways: list[Daemon]
    folder: Path
    model_cache: Path

    def start_node(self, name: str, *extra: str) -> Daemon:
        port = free_port()
        logs = self.folder / name
        logs.mkdir()
        args = [
            "--cache-dir",
            str(self.model_cache),
            "--storage-dir",
            str(logs / "images"),
            "--threads",
            "1",
            "--register",
            self.redis.url,
            "--advertise-url",
            f"http://127.0.0.1:{port}",
            "--registry-ca",
            str(self.redis.tls.ca),
            *HEARTBEAT,
            *extra,
        ]
        return start("t2i_orchestrator", args, logs, {"T2I_ORCHESTRATOR_REGISTRY_PASSWORD": REDIS_PASSWORD}, port=port)

    def registry(self) -> RedisRegistry:
        return RedisRegistry(RegistrySettings(self.redis.url, password=REDIS_PASSWORD, ca=self.redis.tls.ca))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("fleet")
    redis = RedisServer(folder, password=REDIS_PASSWORD, tls=make_ca(folder / "tls", "redis"))
    redis.start()
    fleet = Fleet(redis, [], [], folder, model_cache)
    try:
        fleet.nodes = [fleet.start_node(f"node-{i}") for i in range(3)]
        for i in range(2):
            logs = folder / f"gateway-{i}"
            logs.mkdir()
            fleet.gateways.append(
                start(
                    "t2i_gateway",
                    [
                        "--registry",
                        redis.url,
                        "--registry-ca",
                        str(redis.tls.ca),
                        "--stream-secret",
                        "shared-stream-secret-of-the-two-gateways",
                        "--heartbeat-ttl",
                        "3",
                    ],
                    logs,
                    {"T2I_GATEWAY_REGISTRY_PASSWORD": REDIS_PASSWORD},
                )
            )
        for daemon in fleet.nodes + fleet.gateways:
            wait_healthy(daemon)
        asyncio.run(_until_gateways_see(fleet, {node.url for node in fleet.nodes}))
        yield fleet
    finally:
        for daemon in fleet.nodes + fleet.gateways:
            daemon.stop()
        redis.stop()


async def _view(session: aiohttp.ClientSession, gateway: Daemon) -> set[str]:
    async with session.get(f"{gateway.url}/orchestrators") as response:
        return {node["url"] for node in (await response.json())["orchestrators"] if node["healthy"]}


async def _until_gateways_see(fleet: Fleet, expected: set[str], timeout: float = 30) -> float:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - started < timeout:
            if all([await _view(session, gateway) == expected for gateway in fleet.gateways]):
                return time.monotonic() - started
            await asyncio.sleep(0.1)
    raise AssertionError(f"the gateways never saw exactly {sorted(expected)}")


class Load:
    """Requests kept going through both gateways, each answer's status recorded."""

    def __init__(self, gateways: list[Daemon], concurrency: int = 4) -> None:
        self.gateways = gateways
        self.concurrency = concurrency
        self.statuses: list[int] = []
        self._answer = asyncio.Condition()  # notified at each answer
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.concurrency)]
        return self

    async def _client(self, index: int) -> None:
        gateway = self.gateways[index % len(self.gateways)]
        while not self._stop.is_set():
            async with self._session.post(f"{gateway.url}/text-to-image", json=BODY) as response:
                await response.read()
                self.statuses.append(response.status)
            async with self._answer:
                self._answer.notify_all()

    async def answered(self, count: int) -> None:
        """Until ``count`` more requests have been answered."""
        target = len(self.statuses) + count
        async with self._answer:
            await self._answer.wait_for(lambda: len(self.statuses) >= target)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()


async def _requests_served(session: aiohttp.ClientSession, node: Daemon) -> float:
    async with session.get(f"{node.url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith('t2i_orchestrator_requests_total{status="200"}'):
                return float(line.split()[-1])
    return 0.0


async def test_both_gateways_spread_over_every_node_and_serve_each_others_images(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as session:
        for gateway in fleet.gateways:  # known from the reports the nodes' heartbeats carry, not from idle probes
            async with session.get(f"{gateway.url}/orchestrators") as response:
                assert {node["known_by"] for node in (await response.json())["orchestrators"]} == {"reports"}
        before = [await _requests_served(session, node) for node in fleet.nodes]
        async with Load(fleet.gateways, concurrency=6) as load:
            while len(load.statuses) < 30:
                await asyncio.sleep(0.05)
        assert set(load.statuses) == {200}
        after = [await _requests_served(session, node) for node in fleet.nodes]
        assert all(a > b for a, b in zip(after, before)), (before, after)  # every node got work
        first, second = fleet.gateways
        async with session.post(f"{first.url}/text-to-image", json=BODY) as response:
            [image] = (await response.json())["images"]
        url = image["url"].replace(first.url, second.url)  # signed with the shared stream secret
        async with session.get(url) as response:
            assert response.status == 200 and (await response.read()).startswith(b"\x89PNG")


async def test_a_node_removed_from_the_registry_while_generating_finishes_the_job_itself(fleet: Fleet) -> None:
    long_job = {**BODY, "width": 384, "height": 384, "num_inference_steps": 40}
    gateway = fleet.gateways[0]
    async with aiohttp.ClientSession() as session:
        served_before = {node.url: await _requests_served(session, node) for node in fleet.nodes}
        response = await session.post(f"{gateway.url}/text-to-image", json=long_job, headers={"Accept": "text/event-stream"})
        events = read_events(response.content)
        async for event, data in events:
            if event == "progress":  # generating, on the node the "started" event named
                break
            if event == "started":
                [node] = [other for other in fleet.nodes if other.url == data["node"]]
        registry = fleet.registry()
        try:
            assert await registry.leave(node.url)  # as t2i-register --remove does, while it generates
        finally:
            await registry.close()
        rest = [event async for event, _ in events]
        assert rest[-1] == "result" and "retry" not in rest
        served = {other.url: await _requests_served(session, other) - served_before[other.url] for other in fleet.nodes}
    assert served == {other.url: float(other is node) for other in fleet.nodes}  # finished there, never run again elsewhere
    await _until_gateways_see(fleet, {other.url for other in fleet.nodes})  # its next heartbeat puts it back


async def test_a_killed_node_leaves_every_gateway_within_its_ttl_and_no_request_fails(fleet: Fleet) -> None:
    doomed = fleet.start_node("doomed")
    try:
        wait_healthy(doomed)
        everyone = {node.url for node in fleet.nodes} | {doomed.url}
        await _until_gateways_see(fleet, everyone)
        async with Load(fleet.gateways) as load:
            await load.answered(8)  # under load when it dies
            doomed.signal(signal.SIGKILL)
            await _until_gateways_see(fleet, everyone - {doomed.url}, timeout=20)  # its TTL is 3 s
            await load.answered(8)  # and after
        assert set(load.statuses) == {200}
    finally:
        doomed.stop()


async def test_redis_down_for_10_s_fails_no_request_and_restarted_empty_gets_every_node_back(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as session, Load(fleet.gateways) as load:
        fleet.redis.stop()
        down_until = time.monotonic() + 10
        while time.monotonic() < down_until:
            for gateway in fleet.gateways:
                async with session.get(f"{gateway.url}/health") as response:
                    assert response.status == 200
            await asyncio.sleep(0.5)
        fleet.redis.start()  # empty: no persistence
        registry = fleet.registry()
        try:
            while len((await registry.read())[1]) < len(fleet.nodes):  # their next heartbeats put them back
                await asyncio.sleep(0.1)
        finally:
            await registry.close()
        await load.answered(8)  # served on after Redis came back
    assert set(load.statuses) == {200}
    await _until_gateways_see(fleet, {node.url for node in fleet.nodes})
    for gateway in fleet.gateways:
        async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/metrics") as response:
            text = await response.text()
        assert "t2i_gateway_registry_errors_total 1.0" in text  # one outage, counted once


async def test_a_node_serving_https_is_verified_by_the_gateway(tmp_path: Path, model_cache: Path) -> None:
    tls = make_ca(tmp_path / "tls")
    port = free_port()
    node = start(
        "t2i_orchestrator",
        [
            "--cache-dir",
            str(model_cache),
            "--storage-dir",
            str(tmp_path / "images"),
            "--threads",
            "1",
            "--tls-cert",
            str(tls.cert),
            "--tls-key",
            str(tls.key),
            "--secret",
            TLS_NODE_SECRET,
        ],
        tmp_path,
        port=port,
    )
    node_url = f"https://127.0.0.1:{port}"
    trusting = start(
        "t2i_gateway", ["--orchestrator", node_url, "--orchestrator-ca", str(tls.ca), "--orchestrator-secret", TLS_NODE_SECRET], tmp_path
    )
    doubting = start("t2i_gateway", ["--orchestrator", node_url, "--orchestrator-secret", TLS_NODE_SECRET], tmp_path)  # system CAs only
    try:
        wait_healthy(trusting)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{trusting.url}/text-to-image", json=BODY) as response:
                assert response.status == 200
                [image] = (await response.json())["images"]
            async with session.get(image["url"]) as response:
                assert response.status == 200
            for _ in range(100):  # the doubting gateway's probes fail verification: never healthy
                async with session.get(f"{doubting.url}/orchestrators") as response:
                    [view] = (await response.json())["orchestrators"]
                if view["last_error"]:
                    break
                await asyncio.sleep(0.1)
            assert "CERTIFICATE_VERIFY_FAILED" in view["last_error"] or "certificate verify failed" in view["last_error"], view
            assert view["healthy"] is False
            async with session.get(f"{doubting.url}/health") as response:
                assert response.status == 503
    finally:
        for daemon in (node, trusting, doubting):
            daemon.stop()
