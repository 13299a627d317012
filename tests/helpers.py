"""Helpers shared by the tests (the shared fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from metrics import GatewayMetrics

BODY = {"prompt": "a cool cat on the beach", "width": 64, "height": 64}
ON_DEMAND = [{"model_id": "m/warm", "pipeline": "text-to-image", "warm": False, "loaded": False}]


@dataclass
class Gateway:
    client: TestClient
    servers: list[TestServer]
    metrics: GatewayMetrics

    def url_of(self, index: int) -> str:
        return str(self.servers[index].make_url("")).rstrip("/")

    async def post(self, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return await self.client.post("/text-to-image", json=BODY if body is None else body, **kwargs)


MakeGateway = Callable[..., Awaitable[Gateway]]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


MakeClient = Callable[..., Awaitable[TestClient]]


async def wait_ready(client: TestClient) -> None:
    for _ in range(200):
        response = await client.get("/health")
        if response.status == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the node never became ready")


def tool(name: str) -> str:
    """The path of a checking tool; CI installs them, elsewhere a missing one skips the test."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run must install it")
        pytest.skip(f"{name} is not installed here (CI installs it)")
    return path
