"""Batching on the node: compatible waiting requests share one engine call; each keeps its own everything."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable
from typing import Any

import aiohttp

from t2i_common.errors import InternalError
from t2i_common.sse import read_events
from t2i_orchestrator.app import DEVICE
from t2i_orchestrator.device import BatchPolicy

from .fakes import FakeEngine
from .helpers import MakeClient, wait_until

SSE = {"Accept": "text/event-stream"}


class FakeAlwaysBatch:
    """A batch policy, named as a fake, that always allows ``limit`` images per call."""

    def __init__(self, limit: int) -> None:
        self.limit_images = limit

    def limit(self, shape: Hashable) -> int:
        return self.limit_images

    def record(self, shape: Hashable, images: int, seconds: float) -> None:
        pass


async def busy_node(make_client: MakeClient, engine: FakeEngine, limit: int = 8) -> Any:
    """A node whose device is held by a first request, so that the next ones wait together."""
    engine.batching = True
    client = await make_client(max_queue=8)
    client.app[DEVICE].policy = FakeAlwaysBatch(limit)
    engine.batches.clear()
    engine.started.clear()
    engine.gate.clear()
    blocker = asyncio.create_task(client.post("/text-to-image", json={"prompt": "first", "width": 64, "height": 64, "seed": 1}))
    await asyncio.to_thread(engine.started.wait, 5)
    return client, blocker


def body(seed: int, **fields: Any) -> dict[str, Any]:
    return {"prompt": f"request {seed}", "width": 64, "height": 64, "seed": seed, **fields}


async def test_compatible_waiting_requests_share_one_call_and_others_do_not(make_client: MakeClient, engine: FakeEngine) -> None:
    client, blocker = await busy_node(make_client, engine)
    waiting = [asyncio.create_task(client.post("/text-to-image", json=body(seed))) for seed in (10, 20, 30)]
    odd_size = asyncio.create_task(client.post("/text-to-image", json=body(40, width=128)))
    await wait_until(lambda: client.app[DEVICE].waiting == 4)
    engine.gate.set()
    responses = await asyncio.gather(blocker, *waiting, odd_size)
    assert [r.status for r in responses] == [200] * 5
    assert engine.batches == [[1], [10, 20, 30], [40]]
    seeds = [(await r.json())["images"][0]["seed"] for r in responses]
    assert seeds == [1, 10, 20, 30, 40]  # each its own images
    assert client.app[DEVICE]._metrics.registry.get_sample_value("t2i_orchestrator_batch_size_images_count") == 4  # noqa: SLF001


async def test_a_batch_never_holds_more_images_than_the_limit(make_client: MakeClient, engine: FakeEngine) -> None:
    client, blocker = await busy_node(make_client, engine, limit=4)
    waiting = [asyncio.create_task(client.post("/text-to-image", json=body(seed, num_images_per_prompt=2))) for seed in (10, 20, 30)]
    await wait_until(lambda: client.app[DEVICE].waiting == 3)
    engine.gate.set()
    assert [r.status for r in await asyncio.gather(blocker, *waiting)] == [200] * 4
    assert engine.batches == [[1], [10, 20], [30]]


async def test_each_request_in_a_batch_gets_its_own_events(make_client: MakeClient, engine: FakeEngine) -> None:
    client, blocker = await busy_node(make_client, engine)

    async def stream(seed: int) -> list[tuple[str, Any]]:
        response = await client.post("/text-to-image", json=body(seed, num_inference_steps=2), headers=SSE)
        return [event async for event in read_events(response.content)]

    streams = [asyncio.create_task(stream(seed)) for seed in (10, 20)]
    await wait_until(lambda: client.app[DEVICE].waiting == 2)
    engine.gate.set()
    await blocker
    for seed, events in zip((10, 20), await asyncio.gather(*streams)):
        names = [name for name, _ in events]
        assert names[0] == "queued" and "started" in names and names[-1] == "result"
        assert [data for name, data in events if name == "progress"][-1] == {"step": 2, "steps": 2}
        assert events[-1][1]["images"][0]["seed"] == seed
    assert engine.batches[-1] == [10, 20]


async def test_a_client_that_leaves_a_batch_does_not_fail_the_others(make_client: MakeClient, engine: FakeEngine) -> None:
    client, blocker = await busy_node(make_client, engine)
    session = aiohttp.ClientSession()
    try:
        leaving = asyncio.create_task(session.post(client.make_url("/text-to-image"), json=body(10)))
        staying = asyncio.create_task(client.post("/text-to-image", json=body(20)))
        await wait_until(lambda: client.app[DEVICE].waiting == 2)
        held = engine.gates[10] = threading.Event()  # the batch of 10 and 20 will wait on the device
        engine.started.clear()
        engine.gate.set()
        await blocker
        await asyncio.to_thread(engine.started.wait, 5)  # the batch of 10 and 20 is on the device
        leaving.cancel()
        await session.close()  # the connection closes: the server cancels that handler
        await wait_until(lambda: client.app[DEVICE].left == 1)  # noticed while its batch runs
        held.set()
        response = await staying
        assert response.status == 200 and (await response.json())["images"][0]["seed"] == 20
        assert engine.batches[-1] == [10, 20] and not engine.stopped.is_set()  # the call went on for the one left
    finally:
        await session.close()


async def test_when_a_batch_fails_each_request_is_tried_alone_for_its_own_outcome(make_client: MakeClient, engine: FakeEngine) -> None:
    client, blocker = await busy_node(make_client, engine)
    real = engine.generate_batch

    def fails_together(generations: Any, *args: Any) -> Any:
        if len(generations) > 1 or generations[0].seed == 20:
            engine.batches.append([g.seed for g in generations])
            raise InternalError("the device caught fire")
        return real(generations, *args)

    setattr(engine, "generate_batch", fails_together)  # noqa: B010 - a fake's method swapped for this test
    waiting = [asyncio.create_task(client.post("/text-to-image", json=body(seed))) for seed in (10, 20, 30)]
    await wait_until(lambda: client.app[DEVICE].waiting == 3)
    engine.gate.set()
    responses = await asyncio.gather(blocker, *waiting)
    assert [r.status for r in responses] == [200, 200, 500, 200]
    assert engine.batches[-4:] == [[10, 20, 30], [10], [20], [30]]


async def test_a_full_queue_is_still_a_503_with_batching(make_client: MakeClient, engine: FakeEngine) -> None:
    engine.batching = True
    client = await make_client(max_queue=1)
    engine.started.clear()
    engine.gate.clear()
    first = asyncio.create_task(client.post("/text-to-image", json=body(1)))
    await asyncio.to_thread(engine.started.wait, 5)
    second = asyncio.create_task(client.post("/text-to-image", json=body(2)))
    await wait_until(lambda: client.app[DEVICE].waiting == 1)
    refused = await client.post("/text-to-image", json=body(3))
    assert refused.status == 503 and refused.headers["Retry-After"]
    engine.gate.set()
    assert [r.status for r in await asyncio.gather(first, second)] == [200, 200]


def test_the_policy_learns_whether_batching_pays() -> None:
    policy = BatchPolicy(max_batch=8)
    shape = ("m", 64, 64, 2)
    assert policy.limit(shape) == 1  # nothing known: one alone first
    policy.record(shape, 1, 1.0)
    assert policy.limit(shape) == 2  # then try two
    policy.record(shape, 2, 1.2)  # 0.6 s per image: pays
    assert policy.limit(shape) == 4
    policy.record(shape, 4, 2.0)  # 0.5 s per image: pays
    assert policy.limit(shape) == 8
    policy.record(shape, 8, 6.0)  # 0.75 s per image: does not
    assert policy.limit(shape) == 4
    large = ("m", 512, 512, 2)
    policy.record(large, 1, 1.0)
    policy.record(large, 2, 2.4)  # slower per image: batching does not pay at this size
    assert [policy.limit(large) for _ in range(BatchPolicy.RETRY_EVERY)] == [1] * (BatchPolicy.RETRY_EVERY - 1) + [2]  # then once more
    assert BatchPolicy(max_batch=1).limit(shape) == 1


def test_the_batch_policy_remembers_a_bounded_number_of_shapes() -> None:
    policy = BatchPolicy(max_batch=8)
    kept = ("m", 64, 64, 1)
    policy.record(kept, 1, 1.0)
    for width in range(BatchPolicy.MAX_SHAPES + 100):  # sizes a client chose, one request each
        policy.record(("m", 64 + 8 * width, 64, 1), 1, 1.0)
        policy.limit(kept)  # in use all along: never the least recently used
    assert len(policy._per_image) == BatchPolicy.MAX_SHAPES and len(policy._decisions) <= BatchPolicy.MAX_SHAPES  # noqa: SLF001
    assert kept in policy._per_image  # noqa: SLF001
