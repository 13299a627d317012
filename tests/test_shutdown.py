"""SIGTERM: requests in flight finish, new ones get 503, the node leaves the registry; images outlive restarts."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from discovery.registry import read_registry

from .processes import Daemon, free_port, start, wait_healthy

pytestmark = pytest.mark.slow

SLOW = {"prompt": "a slow one", "width": 256, "height": 256, "num_inference_steps": 40}


def start_node(tmp_path: Path, model_cache: Path, port: int, *extra: str) -> Daemon:
    node = start(
        "t2i_orchestrator",
        ["--cache-dir", str(model_cache), "--storage-dir", str(tmp_path / "images"), "--threads", "1", *extra],
        tmp_path,
        port=port,
    )
    wait_healthy(node)
    return node


async def sigterm_during_a_request(daemon: Daemon, busy_url: str, post_url: str) -> tuple[int, int, str]:
    """Start a slow request, SIGTERM ``daemon`` while it runs, then try a new one.

    Returns the status of the request in flight, of the new one, and the new one's message."""
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(session.post(post_url, json=SLOW))
        for _ in range(200):
            async with session.get(busy_url) as response:
                if (await response.json())["in_flight"]:
                    break
            await asyncio.sleep(0.02)
        daemon.process.send_signal(signal.SIGTERM)
        for _ in range(500):  # until the daemon says it is draining (not a guess at how long a signal takes)
            async with session.get(f"{daemon.url}/health") as response:
                if (await response.json())["status"] == "draining":
                    break
            await asyncio.sleep(0.01)
        async with session.post(post_url, json=SLOW) as refused:
            refused_status, message = refused.status, (await refused.json())["detail"]["msg"]
        response = await in_flight
        await response.read()
        return response.status, refused_status, message


async def test_orchestrator_drains_deregisters_and_its_images_outlive_a_restart(tmp_path: Path, model_cache: Path) -> None:
    port = free_port()
    registry = tmp_path / "registry.json"
    advertise = f"http://127.0.0.1:{port}"
    node = start_node(tmp_path, model_cache, port, "--register", str(registry), "--advertise-url", advertise)
    assert [entry.url for entry in (await asyncio.to_thread(read_registry, registry))] == [advertise]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{node.url}/text-to-image", json={"prompt": "keep me", "width": 64, "height": 64}) as response:
            url = (await response.json())["images"][0]["url"]
        async with session.get(url) as response:
            original = await response.read()
    assert node.stop() == 0
    assert (await asyncio.to_thread(read_registry, registry)) == []

    node = start_node(tmp_path, model_cache, port, "--register", str(registry), "--advertise-url", advertise)
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200 and await response.read() == original
        finished, refused, message = await sigterm_during_a_request(node, f"{node.url}/capabilities", f"{node.url}/text-to-image")
        assert finished == 200
        assert refused == 503 and "shutting down" in message
        assert node.process.wait(timeout=30) == 0
        assert (await asyncio.to_thread(read_registry, registry)) == []
    finally:
        node.stop()


async def test_gateway_drains_on_sigterm(tmp_path: Path, model_cache: Path) -> None:
    node = start_node(tmp_path, model_cache, free_port())
    gateway = start("t2i_gateway", ["--orchestrator", node.url, "--probe-interval", "0.5"], tmp_path)
    try:
        wait_healthy(gateway)
        finished, refused, message = await sigterm_during_a_request(gateway, f"{node.url}/capabilities", f"{gateway.url}/text-to-image")
        assert finished == 200
        assert refused == 503 and "shutting down" in message
        assert gateway.process.wait(timeout=30) == 0
    finally:
        gateway.stop()
        node.stop()


async def test_the_grace_bounds_a_shutdown_and_what_runs_longer_is_cut_off(tmp_path: Path, model_cache: Path) -> None:
    node = start_node(tmp_path, model_cache, free_port(), "--shutdown-grace", "1")
    long_job = {"prompt": "a long one", "width": 256, "height": 256, "num_inference_steps": 100}
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(session.post(f"{node.url}/text-to-image", json=long_job))
        for _ in range(500):
            async with session.get(f"{node.url}/capabilities") as response:
                if (await response.json())["in_flight"]:
                    break
            await asyncio.sleep(0.02)
        node.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(node.process.wait, 60)
        with pytest.raises(aiohttp.ClientError):  # cut off: the connection closed without an answer
            response = await in_flight
            await response.read()
            raise AssertionError(f"the request answered {response.status} after the grace")
    assert code == 0
    # 1 s of grace, then the cut-off job stops at its next step: it never finishes its 100 steps.
    log = node.log.read_text()
    assert "cut off" in log and "x1 seed" not in log  # no "request ...: 256x256 x1 seed ...: 1 images in ..." line
