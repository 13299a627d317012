"""Live progress as Server-Sent Events, on the orchestrator (fake engine) and through the gateway (fake nodes)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from t2i_common.sse import read_events

from .fakes import FakeEngine, FakeOrchestrator
from .helpers import BODY, MakeClient, MakeGateway

SSE = {"Accept": "text/event-stream"}


async def collect(response: aiohttp.ClientResponse) -> list[tuple[str, Any]]:
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    return [event async for event in read_events(response.content)]


async def test_orchestrator_streams_queue_start_progress_and_the_result(make_client: MakeClient) -> None:
    client = await make_client(node_id="node-7")
    body = {"prompt": "a", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 5, "num_images_per_prompt": 2}
    events = await collect(await client.post("/text-to-image", json=body, headers=SSE))
    names = [name for name, _ in events]
    assert names == ["queued", "started", "progress", "progress", "progress", "result"]
    assert events[0][1] == {"position": 0} and events[1][1] == {"node": "node-7"}
    assert [data for name, data in events if name == "progress"] == [{"step": i, "steps": 3} for i in (1, 2, 3)]
    result = events[-1][1]
    assert [image["seed"] for image in result["images"]] == [5, 6]
    assert (await client.session.get(result["images"][0]["url"])).status == 200


async def test_plain_json_is_unchanged_and_refusals_stay_plain_errors(make_client: MakeClient) -> None:
    client = await make_client()
    plain = await client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64})
    assert plain.headers["Content-Type"].startswith("application/json") and "images" in await plain.json()
    invalid = await client.post("/text-to-image", json={"prompt": "a", "width": 65}, headers=SSE)
    assert invalid.status == 422 and (await invalid.json())["detail"][0]["loc"] == ["body", "width"]


async def test_a_failure_during_generation_is_an_error_event(make_client: MakeClient, engine: FakeEngine) -> None:
    from t2i_common.errors import InternalError

    client = await make_client()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise InternalError("the device caught fire")

    engine.generate = broken  # type: ignore[method-assign]
    events = await collect(await client.post("/text-to-image", json={"prompt": "a"}, headers=SSE))
    assert events[-1] == ("error", {"status": 500, "body": {"detail": {"msg": "the device caught fire"}}})
    metrics = await (await client.get("/metrics")).text()
    assert 't2i_orchestrator_requests_total{status="500"} 1.0' in metrics and 'status="200"' not in metrics


async def test_disconnecting_mid_stream_cancels_the_generation(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    engine.gate.clear()
    response = await client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64}, headers=SSE)
    first = await response.content.readline()
    assert first.startswith(b"event: queued")
    await asyncio.to_thread(engine.started.wait, 5)
    response.close()
    assert await asyncio.to_thread(engine.stopped.wait, 5)


async def test_gateway_relays_events_and_announces_retries(make_gateway: MakeGateway) -> None:
    failing, good = FakeOrchestrator(), FakeOrchestrator()
    failing.mode = "fail"
    good.busy_report = 1  # the failing node is tried first
    gateway = await make_gateway(failing, good)
    events = await collect(await gateway.post({**BODY, "num_inference_steps": 2}, headers=SSE))
    names = [name for name, _ in events]
    assert names[0] == "started" and events[0][1]["node"] == gateway.url_of(0)
    assert "retry" in names and names[-1] == "result"
    retry = dict(events)["retry"]
    assert retry["attempt"] == 2 and "500" in retry["reason"]
    assert [data["node"] for name, data in events if name == "started"] == [gateway.url_of(0), gateway.url_of(1)]
    assert [data for name, data in events if name == "progress"] == [{"step": 1, "steps": 2}, {"step": 2, "steps": 2}]
    assert events[-1][1]["images"][0]["url"].startswith(str(gateway.client.make_url("/stream/")))


async def test_gateway_errors_arrive_as_error_events(make_gateway: MakeGateway) -> None:
    refusing = FakeOrchestrator()
    refusing.mode = "refuse"
    gateway = await make_gateway(refusing)
    events = await collect(await gateway.post(headers=SSE))
    assert events[-1][0] == "error" and events[-1][1]["status"] == 422
    assert events[-1][1]["body"]["detail"][0]["msg"] == "fake refusal"


async def test_queue_positions_count_down_as_the_queue_moves(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    engine.gate.clear()
    body = {"prompt": "a", "width": 64, "height": 64}
    first = asyncio.create_task(client.post("/text-to-image", json=body))
    await asyncio.to_thread(engine.started.wait, 5)
    second = asyncio.create_task(client.post("/text-to-image", json=body))
    for _ in range(100):  # the second is queued before the third arrives
        if (await (await client.get("/capabilities")).json())["queued"] == 1:
            break
        await asyncio.sleep(0.01)
    third = await client.post("/text-to-image", json=body, headers=SSE)
    engine.gate.set()
    events = await collect(third)
    # Two ahead (one generating, one waiting), then one, then its own turn.
    assert [data["position"] for name, data in events if name == "queued"] == [2, 1]
    assert [name for name, _ in events][2:4] == ["started", "progress"] and events[-1][0] == "result"
    assert (await first).status == (await second).status == 200
