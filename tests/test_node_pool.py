"""Selection over a large fleet, with synthetic nodes (no HTTP): warm first, free capacity, spread."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from prometheus_client import CollectorRegistry

from discovery import Endpoint, StaticDiscovery
from metrics import GatewayMetrics
from t2i_gateway.nodes import Node, NodePool


def pool_of(count: int, *, warm: str = "m/warm", cold: str = "m/cold", capacity: int = 4) -> NodePool:
    pool = NodePool(StaticDiscovery(()), GatewayMetrics(CollectorRegistry()))
    for i in range(count):
        node = Node(Endpoint(f"http://10.0.{i // 250}.{i % 250}:8936"), ready=True, capacity=capacity, tiers={warm: 0, cold: 1})
        pool.nodes[node.url] = node
    return pool


def test_a_large_fleet_spreads_requests_and_prefers_free_nodes() -> None:
    pool = pool_of(1000)
    busy = list(pool.nodes.values())[:500]
    for node in busy:
        node.in_flight = 3  # one slot left
    picks = Counter(pool.select("m/warm", exclude=set()).url for _ in range(2000))  # type: ignore[union-attr]
    assert len(picks) > 400  # spread over the 500 free nodes (about 491 expected), not piled on a few
    on_busy = sum(picks[node.url] for node in busy)
    assert on_busy < 100  # only when all 8 drawn are busy: 1 in 256, so about 8 of 2000 expected


def test_the_one_node_with_room_is_found_among_a_thousand_full_ones() -> None:
    pool = pool_of(1000)
    nodes = list(pool.nodes.values())
    for node in nodes:
        node.in_flight = 4
    nodes[777].in_flight = 0
    assert pool.select("m/warm", exclude=set()) is nodes[777]
    assert pool.select("m/warm", exclude={nodes[777].url}) is None


def test_warm_nodes_come_before_on_demand_ones_whatever_their_load() -> None:
    pool = pool_of(100, warm="m/a", cold="m/b")
    extra = Node(Endpoint("http://10.9.9.9:8936"), ready=True, capacity=64, tiers={"m/b": 0})
    pool.nodes[extra.url] = extra
    pool._stale = True  # noqa: SLF001 - nodes were added behind the pool's back
    assert all(pool.select("m/b", exclude=set()) is extra for _ in range(50))
    extra.in_flight = 64
    assert pool.select("m/b", exclude=set()) in pool.nodes.values()  # then on demand
    assert pool.models_on_offer() == ["m/a", "m/b"] and pool.default_model() == "m/a"


async def test_a_light_load_keeps_to_the_nodes_that_went_idle_last() -> None:
    pool = pool_of(1000)
    used = set()
    for _ in range(100):  # four requests at a time, a hundred times over
        nodes = [await pool.acquire("m/warm", set(), timeout_s=0) for _ in range(4)]
        for node in nodes:
            assert node is not None
            used.add(node.url)
            pool.release(node)
    assert len(used) <= 8  # not about 330 (four fresh draws from 1,000 each time): connections stay open to few


async def test_a_node_that_went_idle_last_still_loses_to_a_freer_one() -> None:
    pool = pool_of(1000)
    recent = await pool.acquire("m/warm", set(), timeout_s=0)
    assert recent is not None
    pool.release(recent)
    assert pool.select("m/warm", exclude=set()) is recent
    recent.reported_busy = 1  # another gateway's request, seen by a probe: 3 free against 4 elsewhere
    assert all(pool.select("m/warm", exclude=set()) is not recent for _ in range(50))


class GatedDiscovery:
    """A fake discovery whose refresh waits until the test opens its gate."""

    def __init__(self) -> None:
        self.gate: asyncio.Future[bool] | None = None

    def snapshot(self) -> tuple[Endpoint, ...]:
        return ()

    async def refresh(self) -> bool:
        self.gate = asyncio.get_running_loop().create_future()
        return await self.gate

    async def close(self) -> None:
        pass


async def test_stopping_the_pool_as_a_refresh_ends_stops_it() -> None:
    """Python 3.11's wait_for swallows a cancellation that arrives as the awaited call ends (the task
    then ran on, and a daemon's shutdown hung); the pool's bounded waits must not."""
    discovery = GatedDiscovery()
    pool = NodePool(discovery, GatewayMetrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(pool.run(session))
        while discovery.gate is None:
            await asyncio.sleep(0.001)
        discovery.gate.set_result(False)  # the refresh ends...
        task.cancel()  # ...in the same turn of the loop as the shutdown
        done, _ = await asyncio.wait([task], timeout=2)
        assert task in done and task.cancelled()
