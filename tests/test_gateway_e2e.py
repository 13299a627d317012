"""End to end with real processes: three ``t2i-orchestrator``s with the demo model and a ``t2i-gateway``.

The tests share one set of processes, and each leaves it as it found it (a hung node resumed and
readmitted, a killed one started again on its port), so that each passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from t2i_common.sse import read_events

from .helpers import tool
from .processes import Daemon, start, wait_healthy

pytestmark = pytest.mark.slow

SECRET = "e2e-node-secret-0123456789abcdef0123"
BODY = {"prompt": "a cool cat on the beach", "width": 128, "height": 128, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("logs")
    on_demand = logs / "on-demand.json"
    on_demand.write_text(json.dumps([{"pipeline": "text-to-image", "model_id": "t2i/tiny-sd", "warm": False}]))
    common = ["--cache-dir", str(model_cache), "--threads", "1"]
    env = {"T2I_ORCHESTRATOR_SECRET": SECRET}
    nodes = [
        start("t2i_orchestrator", [*common, "--storage-dir", str(logs / f"images-{name}"), *extra], logs, env)
        for name, extra in (("a", []), ("b", []), ("c", ["--models", str(on_demand)]))
    ]
    gateway_args = [arg for node in nodes for arg in ("--orchestrator", node.url)]
    gateway = start(
        "t2i_gateway",
        [*gateway_args, "--probe-interval", "1", "--probe-timeout", "2", "--request-timeout", "60", "--max-attempts", "3"],
        logs,
        {"T2I_GATEWAY_ORCHESTRATOR_SECRET": SECRET},
    )
    try:
        for daemon in [*nodes, gateway]:
            wait_healthy(daemon)
        asyncio.run(wait_all_healthy(gateway))
        yield {"nodes": nodes, "gateway": gateway, "restart": lambda node: restart(node, common, logs, env)}
    finally:
        for daemon in [gateway, *nodes]:
            daemon.stop()


def restart(killed: Daemon, common: list[str], logs: Path, env: dict[str, str]) -> Daemon:
    """Node ``a`` again, on the port it had (the gateway's static list names it), after it was killed."""
    port = int(killed.url.rsplit(":", 1)[1])
    node = start("t2i_orchestrator", [*common, "--storage-dir", str(logs / "images-a")], logs, env, port=port)
    wait_healthy(node)
    return node


async def wait_all_healthy(gateway: Daemon) -> None:
    """Until the gateway has seen every node ready."""
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"{gateway.url}/orchestrators") as response:
                if all(node["healthy"] for node in (await response.json())["orchestrators"]):
                    return
            await asyncio.sleep(0.2)
    raise AssertionError("the gateway never saw every node healthy")


async def generate(session: aiohttp.ClientSession, gateway: Daemon, count: int, concurrency: int) -> list[int]:
    """Send ``count`` requests, ``concurrency`` at a time; returns the statuses."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with semaphore, session.post(f"{gateway.url}/text-to-image", json=BODY) as response:
            await response.read()
            return response.status

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def served_by(session: aiohttp.ClientSession, gateway: Daemon) -> dict[str, float]:
    """Successful attempts per orchestrator, from the gateway's own metrics."""
    async with session.get(f"{gateway.url}/metrics") as response:
        text = await response.text()
    pattern = r't2i_gateway_attempts_total\{orchestrator="([^"]+)",outcome="ok"\} (\S+)'
    return {url: float(value) for url, value in re.findall(pattern, text)}


async def test_requests_spread_over_warm_nodes_and_images_come_through(network: dict[str, Any]) -> None:
    a, b, c = network["nodes"]
    gateway = network["gateway"]
    async with aiohttp.ClientSession() as session:
        for _ in range(16):  # one at a time: every warm node is equally free, ties go at random
            async with session.post(f"{gateway.url}/text-to-image", json=BODY) as response:
                assert response.status == 200
                [image] = (await response.json())["images"]
        counts = await served_by(session, gateway)
        assert counts.get(a.url, 0) >= 1 and counts.get(b.url, 0) >= 1
        assert counts.get(c.url, 0) == 0  # on-demand only: never chosen while warm nodes are free

        # The image through the gateway is byte for byte the node's.
        assert image["url"].startswith(f"{gateway.url}/stream/")
        async with session.get(image["url"]) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/png"
            through_gateway = await response.read()
        token = image["url"].split("/")[-2]
        _, image_id, name, fmt, _ = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))  # no node address in it
        from_nodes = []
        for node in (a, b):
            async with session.get(f"{node.url}/stream/{image_id}/{name}.{fmt}", headers={"Authorization": f"Bearer {SECRET}"}) as response:
                from_nodes += [await response.read()] if response.status == 200 else []
        assert from_nodes == [through_gateway]  # on exactly one node, byte for byte


async def test_events_relay_progress_and_a_disconnect_stops_the_generation(network: dict[str, Any]) -> None:
    gateway = network["gateway"]
    long_job = {**BODY, "width": 512, "height": 512, "num_inference_steps": 100}  # about 30 s if left alone
    async with aiohttp.ClientSession() as session:
        left_before = await hung_up(session, network["nodes"])
        response = await session.post(f"{gateway.url}/text-to-image", json=long_job, headers={"Accept": "text/event-stream"})
        seen = []
        async for event, data in read_events(response.content):
            seen.append(event)
            if event == "progress" and data["step"] >= 2:
                break
        assert seen[:2] == ["started", "queued"] and "progress" in seen
        response.close()  # the client goes away mid-stream
        # The node counts the request as one whose client left (499), not as done (200): it stopped.
        while await hung_up(session, network["nodes"]) == left_before:
            await asyncio.sleep(0.2)


async def hung_up(session: aiohttp.ClientSession, nodes: list[Daemon]) -> float:
    """Requests the nodes counted as left by their client (the gateway, for its own)."""
    total = 0.0
    for node in nodes:
        async with session.get(f"{node.url}/metrics") as answer:
            total += sum(float(v) for v in re.findall(r't2i_orchestrator_requests_total\{status="499"\} (\S+)', await answer.text()))
    return total


async def test_a_hung_node_is_timed_out_and_requests_succeed_elsewhere(network: dict[str, Any]) -> None:
    a, b, _ = network["nodes"]
    gateway = network["gateway"]
    async with aiohttp.ClientSession() as session:
        os.kill(b.process.pid, signal.SIGSTOP)
        try:
            statuses = await generate(session, gateway, 10, 3)
            # Requests go on, and must succeed, until its probes, hung past --probe-timeout, have it found
            # down (whether or not a request of the first ten went there).
            for _ in range(100):
                async with session.get(f"{gateway.url}/orchestrators") as response:
                    view = {node["url"]: node for node in (await response.json())["orchestrators"]}
                if view[b.url]["last_error"] and not view[b.url]["healthy"]:
                    break
                statuses += await generate(session, gateway, 3, 3)
        finally:
            os.kill(b.process.pid, signal.SIGCONT)
        assert len(statuses) >= 10 and statuses == [200] * len(statuses)
        assert view[b.url]["last_error"] and not view[b.url]["healthy"]
        await wait_all_healthy(gateway)  # resumed and readmitted: the network as it was


async def test_a_node_killed_mid_run_costs_the_clients_nothing(network: dict[str, Any]) -> None:
    a, b, _ = network["nodes"]
    gateway = network["gateway"]
    async with aiohttp.ClientSession() as session:
        await wait_all_healthy(gateway)  # the resumed node is readmitted first
        before = (await served_by(session, gateway)).get(a.url, 0)
        retries_before = await metric(session, gateway, "t2i_gateway_retries_total")
        load = asyncio.create_task(generate(session, gateway, 24, 4))
        for _ in range(600):  # until a is serving this load
            if (await served_by(session, gateway)).get(a.url, 0) >= before + 2:
                break
            await asyncio.sleep(0.05)
        a.process.send_signal(signal.SIGKILL)
        statuses = await load
        assert statuses == [200] * 24
        # Requests that were on the killed node were moved to another one.
        assert await metric(session, gateway, "t2i_gateway_retries_total") > retries_before
        network["nodes"][0] = network["restart"](a)  # the network as it was
        await wait_all_healthy(gateway)


async def metric(session: aiohttp.ClientSession, daemon: Daemon, name: str) -> float:
    async with session.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_logs_hold_no_secrets_and_no_prompts(network: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{network['gateway'].url}/text-to-image", data=json.dumps(BODY).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:  # a request of its own to log
        assert response.status == 200
    for daemon in [network["gateway"], *network["nodes"]]:
        log = daemon.log.read_text()
        assert SECRET not in log
        assert BODY["prompt"] not in log
    gateway_log = network["gateway"].log.read_text()
    # One line per request: its id, the key, the model, the node, the attempts, the status, the time, a prompt hash.
    assert re.search(
        r"request \w+: key anonymous model t2i/tiny-sd node http://127\.0\.0\.1:\d+ attempts 1 status 200 in [\d.]+ s prompt sha256:",
        gateway_log,
    )


def test_live_metrics_pass_promtool(network: dict[str, Any]) -> None:
    promtool = tool("promtool")
    for daemon in (network["gateway"], network["nodes"][1]):
        with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as response:
            text = response.read()
        assert b"t2i_" in text
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
