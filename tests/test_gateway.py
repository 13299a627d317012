"""The gateway against fake orchestrators (real HTTP on loopback): selection, retries, errors, /stream."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from discovery import Endpoint, StaticDiscovery
from metrics import GatewayMetrics
from t2i_common.server import DRAIN
from t2i_common.sse import read_events
from t2i_gateway.app import POOL, create_app
from t2i_gateway.config import GatewayConfig
from t2i_gateway.nodes import FAILURES_TO_SUSPEND
from t2i_gateway.stream_tokens import StreamSigner

from .fakes import FakeOrchestrator
from .helpers import BODY, ON_DEMAND, MakeGateway, wait_until


async def test_requests_spread_across_equal_nodes(make_gateway: MakeGateway) -> None:
    fakes = [FakeOrchestrator(), FakeOrchestrator(), FakeOrchestrator()]
    gateway = await make_gateway(*fakes)
    # One at a time, every node is equally free: ties are broken at random, no node always first.
    for _ in range(30):
        assert (await gateway.post()).status == 200
    counts = [len(fake.requests) for fake in fakes]
    assert sum(counts) == 30 and min(counts) >= 2, counts  # a node left out by chance: p < 0.0003


async def test_concurrent_requests_fill_nodes_by_free_capacity(make_gateway: MakeGateway) -> None:
    fakes = [FakeOrchestrator(capacity=4) for _ in range(3)]
    for fake in fakes:
        fake.mode = "hang"
    gateway = await make_gateway(*fakes, wait_ready=False, max_queued=0)  # no waiting: a full fleet refuses at once
    for fake in fakes:
        fake.mode = "ok"
    pool = gateway.client.app[POOL]  # type: ignore[index]
    await wait_until(lambda: len(pool.healthy()) == 3)
    for fake in fakes:
        fake.mode = "hang"
    pool._probe_interval_s = 60  # keep probes (which would hang too) out of the way  # noqa: SLF001
    tasks = [asyncio.create_task(gateway.post()) for _ in range(12)]
    await wait_until(lambda: sum(len(fake.requests) for fake in fakes) == 12)
    assert [len(fake.requests) for fake in fakes] == [4, 4, 4]
    refused = await gateway.post()  # every slot is taken now
    assert refused.status == 503 and "Retry-After" in refused.headers
    for fake in fakes:
        fake.release.set()
    assert [response.status for response in await asyncio.gather(*tasks)] == [200] * 12


async def test_warm_nodes_are_preferred_over_on_demand_ones(make_gateway: MakeGateway) -> None:
    cold, warm = FakeOrchestrator(ON_DEMAND), FakeOrchestrator()
    gateway = await make_gateway(cold, warm)
    for _ in range(5):
        assert (await gateway.post()).status == 200
    assert (len(cold.requests), len(warm.requests)) == (0, 5)
    warm.mode = "fail"  # when the warm node fails, the on-demand one serves
    assert (await gateway.post()).status == 200
    assert len(cold.requests) == 1


async def test_never_a_node_that_does_not_offer_the_model(make_gateway: MakeGateway) -> None:
    other = FakeOrchestrator([{"model_id": "m/other", "pipeline": "text-to-image", "warm": True, "loaded": True}])
    fake = FakeOrchestrator()
    gateway = await make_gateway(other, fake)
    for _ in range(6):
        assert (await gateway.post({**BODY, "model_id": "m/warm"})).status == 200
    assert (len(other.requests), len(fake.requests)) == (0, 6)


async def test_the_default_model_is_filled_in_for_the_node(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator()
    gateway = await make_gateway(fake)
    assert (await gateway.post()).status == 200
    assert fake.requests[0]["model_id"] == "m/warm" and fake.requests[0]["prompt"] == BODY["prompt"]


async def test_unknown_model_is_a_400_listing_the_offer(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator())
    response = await gateway.post({**BODY, "model_id": "m/missing"})
    assert response.status == 400
    message = (await response.json())["detail"]["msg"]
    assert "m/missing" in message and "m/warm" in message


async def test_requests_go_where_they_finish_first_and_orchestrators_shows_the_speeds(make_gateway: MakeGateway) -> None:
    def offer(speed: float) -> list[dict[str, object]]:
        return [
            {"model_id": "m/warm", "pipeline": "text-to-image", "warm": True, "loaded": True, "s_per_mpx_step": speed, "default_steps": 2}
        ]

    slow, fast = FakeOrchestrator(offer(0.4), capacity=8), FakeOrchestrator(offer(0.1), capacity=2)  # slot counting: the slow one
    gateway = await make_gateway(slow, fast)
    large = {"prompt": "a cat", "width": 1024, "height": 1024, "num_inference_steps": 4}
    for _ in range(5):
        assert (await gateway.post(large)).status == 200
    assert len(fast.requests) == 5 and slow.requests == []  # one at a time: each done before the next is sent
    view = {n["url"]: n for n in (await (await gateway.client.get("/orchestrators")).json())["orchestrators"]}
    assert view[gateway.url_of(0)]["s_per_mpx_step"] == {"m/warm": 0.4} and view[gateway.url_of(1)]["held_s"] == 0


async def test_failure_is_retried_elsewhere_and_the_node_suspended(make_gateway: MakeGateway) -> None:
    bad, good = FakeOrchestrator(capacity=8), FakeOrchestrator(capacity=4)  # the bad node, with more room, is tried first
    bad.mode = "fail"  # its requests fail while its probes pass
    gateway = await make_gateway(bad, good)
    for _ in range(FAILURES_TO_SUSPEND):
        response = await gateway.post()
        assert response.status == 200
    assert len(bad.requests) == FAILURES_TO_SUSPEND  # tried each time until then: one failure never suspends
    node = gateway.client.app[POOL].nodes[gateway.url_of(0)]
    assert node.suspensions == 1 and not node.ready  # suspended by the last of them
    view = {n["url"]: n for n in (await (await gateway.client.get("/orchestrators")).json())["orchestrators"]}
    assert view[gateway.url_of(0)]["healthy"] is False
    assert view[gateway.url_of(1)]["healthy"] is True
    registry = gateway.metrics.registry
    assert registry.get_sample_value("t2i_gateway_retries_total") == FAILURES_TO_SUSPEND
    failed = registry.get_sample_value("t2i_gateway_attempts_total", {"orchestrator": gateway.url_of(0), "outcome": "failed"})
    assert failed == FAILURES_TO_SUSPEND
    gauge = {state: registry.get_sample_value("t2i_gateway_orchestrators", {"state": state}) for state in ("known", "healthy", "suspended")}
    assert gauge == {"known": 2, "healthy": 1, "suspended": 1}


async def test_failing_requests_never_suspend_more_than_the_share_of_a_models_nodes(make_gateway: MakeGateway) -> None:
    fakes = [FakeOrchestrator() for _ in range(2)]
    for fake in fakes:
        fake.mode = "fail"  # as a request built to fail would make them; their probes pass
    gateway = await make_gateway(*fakes, max_attempts=2)
    for _ in range(3 * FAILURES_TO_SUSPEND):
        assert (await gateway.post()).status == 503
    pool = gateway.client.app[POOL]
    # 0.5 of 2: one was suspended (perhaps again, once its suspension ended), never both at once.
    assert sum(node.suspensions for node in pool.nodes.values()) >= 1
    assert [node.suspended(time.monotonic()) for node in pool.nodes.values()].count(True) <= 1
    for fake in fakes:
        fake.mode = "ok"
    assert (await gateway.post()).status == 200  # the node that stayed serves at once


async def test_a_node_that_cannot_be_connected_to_is_suspended_at_once(make_gateway: MakeGateway) -> None:
    gone, good = FakeOrchestrator(capacity=8), FakeOrchestrator()
    gateway = await make_gateway(gone, good)
    url = gateway.url_of(0)
    await gateway.servers[0].close()  # nothing listens there any more
    assert (await gateway.post()).status == 200
    assert (await gateway.post()).status == 200
    assert len(good.requests) == 2  # the second request did not try the closed node again
    gone = gateway.client.app[POOL].nodes[url]
    assert gone.suspensions >= 1 and not gone.ready  # out of rotation until a probe reaches it


async def test_out_of_memory_is_tried_elsewhere_without_blame_and_too_large_for_all_is_a_400(make_gateway: MakeGateway) -> None:
    small, large = FakeOrchestrator(capacity=8), FakeOrchestrator()  # the small one looks freer: tried first
    small.mode = "oom"
    gateway = await make_gateway(small, large)
    assert (await gateway.post()).status == 200 and (len(small.requests), len(large.requests)) == (1, 1)
    assert gateway.client.app[POOL].nodes[gateway.url_of(0)].failures == 0  # the request's size, not the node
    large.mode = "oom"
    response = await gateway.post()
    assert response.status == 400
    assert "No orchestrator tried (2) has the device memory for this request" in (await response.json())["detail"]["msg"]


async def test_a_prompt_with_a_lone_surrogate_is_served_and_logged(make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    gateway = await make_gateway(FakeOrchestrator())
    caplog.set_level("INFO", logger="t2i_gateway.app")
    assert (await gateway.post({**BODY, "prompt": "a cat \ud800"})).status == 200
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_requests_total", {"status": "200", "model": "m/warm"}) == 1
    assert any("status 200" in record.getMessage() and "len:7" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("mode", ["garbage", "wrong_types", "fail"])
async def test_garbage_answers_are_retried(make_gateway: MakeGateway, mode: str) -> None:
    bad, good = FakeOrchestrator(), FakeOrchestrator()
    bad.mode = mode
    good.busy_report = 2  # the bad node looks freer, so it is tried first
    gateway = await make_gateway(bad, good)
    response = await gateway.post()
    assert response.status == 200
    assert len(bad.requests) == 1 and len(good.requests) == 1


async def test_suspended_node_is_readmitted_after_a_good_probe(make_gateway: MakeGateway) -> None:
    flaky = FakeOrchestrator()
    flaky.mode = "fail"
    gateway = await make_gateway(flaky, probe_interval_s=0.1)
    assert (await gateway.post()).status == 503
    flaky.mode = "ok"
    pool = gateway.client.app[POOL]  # type: ignore[index]
    await wait_until(lambda: len(pool.healthy()) == 1, timeout=4)
    assert (await gateway.post()).status == 200


async def test_client_errors_pass_through_without_retry_or_blame(make_gateway: MakeGateway) -> None:
    refusing, other = FakeOrchestrator(), FakeOrchestrator()
    refusing.mode = "refuse"
    other.busy_report = 3  # so the refusing node is chosen
    gateway = await make_gateway(refusing, other)
    response = await gateway.post()
    assert response.status == 422
    assert (await response.json())["detail"][0]["msg"] == "fake refusal"
    assert (len(refusing.requests), len(other.requests)) == (1, 0)
    assert len(gateway.client.app[POOL].healthy()) == 2  # type: ignore[index]


async def test_busy_everywhere_is_a_503_with_retry_after(make_gateway: MakeGateway) -> None:
    a, b = FakeOrchestrator(), FakeOrchestrator()
    a.mode = b.mode = "busy"
    gateway = await make_gateway(a, b, max_queued=0)  # no waiting at the gateway: today's 503
    response = await gateway.post()
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["detail"]["msg"]
    assert len(gateway.client.app[POOL].healthy()) == 2  # busy is not a fault  # type: ignore[index]
    # Until the next probe both count as full: the next request is refused without trying them.
    response = await gateway.post()
    assert response.status == 503 and (len(a.requests), len(b.requests)) == (1, 1)


async def test_full_capacity_is_a_503_without_any_attempt(make_gateway: MakeGateway) -> None:
    full = FakeOrchestrator(capacity=2)
    full.busy_report = 2
    gateway = await make_gateway(full, max_queued=0)
    response = await gateway.post()
    assert response.status == 503 and "Retry-After" in response.headers
    assert full.requests == []


async def test_attempts_are_bounded_by_max_attempts(make_gateway: MakeGateway) -> None:
    fakes = [FakeOrchestrator() for _ in range(4)]
    for fake in fakes:
        fake.mode = "fail"
    gateway = await make_gateway(*fakes, max_attempts=2)
    response = await gateway.post()
    assert response.status == 503
    assert sum(len(fake.requests) for fake in fakes) == 2
    assert "2 tried" in (await response.json())["detail"]["msg"]


async def test_a_hanging_node_is_abandoned_when_its_probe_fails(make_gateway: MakeGateway) -> None:
    hanging, good = FakeOrchestrator(), FakeOrchestrator()
    hanging.mode = "hang"
    good.busy_report = 1
    gateway = await make_gateway(hanging, good, probe_timeout_s=0.3, wait_ready=False)
    pool = gateway.client.app[POOL]  # type: ignore[index]
    hanging.mode = "ok"
    await wait_until(lambda: len(pool.healthy()) == 2)
    hanging.mode = "hang"
    response = await gateway.post()  # answered elsewhere once the hanging node's probe times out
    hanging.release.set()
    assert response.status == 200
    assert (len(hanging.requests), len(good.requests)) == (1, 1)


async def test_validation_happens_at_the_gateway(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator()
    gateway = await make_gateway(fake)
    response = await gateway.post({"prompt": "a", "width": 100})
    assert response.status == 422 and (await response.json())["detail"][0]["loc"] == ["body", "width"]
    response = await gateway.client.post("/text-to-image", data=b"{", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert fake.requests == []


async def test_api_keys_are_enforced(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator(), api_keys=("key-1", "key-2"))
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-1"}, {"Authorization": "Basic key-1"}):
        response = await gateway.post(headers=headers)
        assert response.status == 401
        assert "API key" in (await response.json())["detail"]["msg"]
    assert (await gateway.post(headers={"Authorization": "Bearer key-2"})).status == 200
    for path in ("/orchestrators", "/models", "/v1/models"):  # nodes' addresses and errors: for key holders only
        assert (await gateway.client.get(path)).status == 401, path
        assert (await gateway.client.get(path, headers={"Authorization": "Bearer key-1"})).status == 200, path
    for path in ("/health", "/metrics", "/openapi.json", "/"):
        assert (await gateway.client.get(path)).status == 200, path


async def test_slow_bodies_without_a_key_take_no_slot_and_a_slow_body_gets_408(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator(), api_keys=("k",), max_in_flight=2, body_timeout_s=0.5)
    host, port = gateway.client.host, gateway.client.port
    # Headers that declare a large body, then one byte of it, and nothing more.
    head = "POST /text-to-image HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n{}\r\n{{"
    connections = [await asyncio.open_connection(host, port) for _ in range(16)]
    for _, writer in connections:
        writer.write(head.format("").encode())
    for reader, _ in connections:  # each refused from its headers alone, its body never awaited
        assert (await reader.readline()).startswith(b"HTTP/1.1 401 ")
    assert gateway.client.app[DRAIN].in_flight == 0
    assert (await gateway.post(headers={"Authorization": "Bearer k"})).status == 200  # the slots are all free
    # A key holder's body that never finishes: 408 after --body-timeout, and the connection is not kept.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head.format("Authorization: Bearer k\r\n").encode())
    answer = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
    assert answer.startswith("http/1.1 408 ") and "connection: close" in answer
    length = int(answer.split("content-length: ")[1].split("\r\n")[0])
    assert b"did not arrive within 0.5 s" in await reader.readexactly(length)
    assert gateway.client.app[DRAIN].in_flight == 0
    writer.close()
    for _, anonymous in connections:
        anonymous.close()
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_requests_total", {"status": "401", "model": "other"}) == 16


async def test_the_orchestrator_secret_and_request_id_are_sent(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator(secret="node-secret")
    gateway = await make_gateway(fake, orchestrator_secret="node-secret")
    response = await gateway.post(headers={"X-Request-ID": "req-123"})
    assert response.status == 200 and response.headers["X-Request-ID"] == "req-123"
    assert fake.headers[0]["X-Request-ID"] == "req-123"


async def test_a_wrong_orchestrator_secret_never_makes_the_node_usable(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator(secret="node-secret")
    gateway = await make_gateway(fake, orchestrator_secret="wrong", wait_ready=False)
    nodes = gateway.client.app[POOL].nodes  # type: ignore[index]
    await wait_until(lambda: any(node.last_error for node in nodes.values()))  # a probe ran, and was refused
    assert "401" in next(iter(nodes.values())).last_error
    response = await gateway.post()
    assert response.status == 503 and fake.requests == []
    assert (await gateway.client.get("/health")).status == 503


async def test_stream_returns_the_orchestrators_bytes(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator(secret="s")
    fake.image = bytes(range(256)) * 40_000  # 10 MB: streamed through in chunks
    gateway = await make_gateway(fake, orchestrator_secret="s", public_url="https://gw.example")
    images = (await (await gateway.post({**BODY, "num_images_per_prompt": 2})).json())["images"]
    assert [image["seed"] for image in images] == [0, 1]
    for image in images:
        assert image["url"].startswith("https://gw.example/stream/")
        response = await gateway.client.get(image["url"].removeprefix("https://gw.example"))
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        assert int(response.headers["Content-Length"]) == len(fake.image)
        assert "max-age" in response.headers["Cache-Control"]
        assert await response.read() == fake.image
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_stream_bytes_total") == 2 * len(fake.image)


async def test_downloads_are_bounded_and_a_client_that_never_reads_is_cut_off(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator()
    fake.image = bytes(16 * 2**20)  # far more than the socket buffers of a client that reads nothing hold
    gateway = await make_gateway(fake, max_streams=1, stream_write_timeout_s=0.5)
    path = urlsplit((await (await gateway.post()).json())["images"][0]["url"]).path
    streams = partial(gateway.metrics.registry.get_sample_value, "t2i_gateway_streams")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    await asyncio.get_running_loop().sock_connect(stalled, (gateway.client.host, gateway.client.port))
    _, writer = await asyncio.open_connection(sock=stalled)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())  # and never reads a byte
    await wait_until(lambda: streams() == 1)
    refused = await gateway.client.get(path)  # the one download slot is taken
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    await wait_until(lambda: streams() == 0)  # cut off once a write waited --stream-write-timeout
    download = await gateway.client.get(path)
    assert download.status == 200 and len(await download.read()) == len(fake.image)
    writer.close()


async def test_tampered_and_forged_stream_ids_are_404(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator())
    url = (await (await gateway.post()).json())["images"][0]["url"]
    path = "/" + url.split("/", 3)[3]
    _, _, token, name = path.split("/")
    payload, mac = token.split(".")
    forged_payload = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    for candidate in (
        f"/stream/{forged_payload}.{mac}/{name}",
        f"/stream/{payload}.{mac[:-1]}A/{name}",
        f"/stream/{token}/1111111111111111.png",
        f"/stream/{'x' * 2000}/{name}",
        "/stream/..%2F..%2Fetc/passwd.png",
    ):
        response = await gateway.client.get(candidate)
        assert response.status == 404, candidate
        assert (await response.json())["detail"]["msg"]
    assert (await gateway.client.get(path)).status == 200


async def test_stream_ids_name_no_address_and_fetch_only_from_the_fleet(make_gateway: MakeGateway, aiohttp_server: Any) -> None:
    member, outsider = FakeOrchestrator(secret="fleet-secret"), FakeOrchestrator()
    gateway = await make_gateway(member, orchestrator_secret="fleet-secret")
    outside = str((await aiohttp_server(outsider.app())).make_url("")).rstrip("/")
    token = (await (await gateway.post()).json())["images"][0]["url"].split("/stream/")[1].split("/")[0]
    payload = base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()
    assert urlsplit(gateway.url_of(0)).netloc not in payload and "127.0.0.1" not in payload  # no internal address
    # Whoever holds the stream secret can sign an id for any address: it is never fetched.
    signer = StreamSigner(b"test-secret", 60)
    forged = signer.sign(signer.target(f"/stream/{'ab' * 16}/{'0' * 16}.png", outside))
    response = await gateway.client.get(f"/stream/{forged}/{'0' * 16}.png")
    assert response.status == 404 and "left the fleet" in (await response.json())["detail"]["msg"]
    assert outsider.downloads == []  # not asked, and so never sent the fleet's secret
    assert gateway.client.app[POOL].auth_headers(outside) == {}


async def test_stream_ids_work_on_any_gateway_with_the_same_secret(make_gateway: MakeGateway, aiohttp_client: Any) -> None:
    gateway = await make_gateway(FakeOrchestrator())
    url = (await (await gateway.post()).json())["images"][0]["url"]
    path = "/" + url.split("/", 3)[3]
    node = gateway.url_of(0)
    for secret, status in ((b"test-secret", 200), (b"other-secret", 404)):
        config = GatewayConfig(orchestrators=(node,))
        other = await aiohttp_client(
            create_app(
                config, discovery=StaticDiscovery([Endpoint(node)]), stream_secret=secret, metrics_=GatewayMetrics(CollectorRegistry())
            )
        )
        assert (await other.get(path)).status == status


async def test_expired_stream_ids_are_404(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator())
    name = f"{'0' * 16}"
    node = gateway.url_of(0)
    for ttl_s, status in ((60, 200), (-1, 404)):  # the same id, signed to expire in a minute, or a second ago
        signer = StreamSigner(b"test-secret", ttl_s)
        token = signer.sign(signer.target(f"/stream/{'ab' * 16}/{name}.png", node))
        assert (await gateway.client.get(f"/stream/{token}/{name}.png")).status == status


async def test_health_waits_for_a_ready_orchestrator(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator()
    fake.status = "loading"
    gateway = await make_gateway(fake, wait_ready=False)
    nodes = gateway.client.app[POOL].nodes  # type: ignore[index]
    await wait_until(lambda: any(node.capabilities for node in nodes.values()))  # probed: it said "loading"
    assert (await gateway.client.get("/health")).status == 503
    assert (await gateway.post()).status == 503
    fake.status = "ready"
    await wait_until(lambda: len(gateway.client.app[POOL].healthy()) == 1, timeout=2)  # type: ignore[index]
    assert (await gateway.client.get("/health")).status == 200


async def test_openapi_document_is_valid_and_matches_validation(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator(), api_keys=("k",))
    document = await (await gateway.client.get("/openapi.json")).json()
    validate(document)
    params = document["components"]["schemas"]["TextToImageParams"]
    assert params["required"] == ["prompt"] and params["additionalProperties"] is False
    assert params["properties"]["width"]["multipleOf"] == 8
    assert set(document["paths"]["/text-to-image"]["post"]["responses"]) >= {"200", "400", "401", "422", "503"}
    # The rules that a pattern can state are stated, and agree with what the gateway accepts.
    import re

    auth = {"Authorization": "Bearer k"}
    size = re.compile(document["components"]["schemas"]["OpenAIImageGenerationParams"]["properties"]["size"]["pattern"])
    loras = re.compile(params["properties"]["loras"]["pattern"])
    for value in ("64x64", "500x500", "64x2056", "56x64", "auto", "64x64x"):
        response = await gateway.client.post("/v1/images/generations", json={"prompt": "a", "size": value}, headers=auth)
        assert bool(size.search(value)) == (response.status == 200), (value, response.status)
    for value in ("", '{"style": 0.5}', "style", "[1]"):
        assert bool(loras.search(value)) == (value in ("", '{"style": 0.5}')), value
    assert "at most 4194304" in params["properties"]["num_images_per_prompt"]["description"]  # the pixel budget, in words


async def test_metrics_and_orchestrator_view(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator(), FakeOrchestrator(ON_DEMAND))
    await gateway.post()
    text = await (await gateway.client.get("/metrics")).text()
    assert 't2i_gateway_requests_total{model="m/warm",status="200"} 1.0' in text
    assert 't2i_gateway_orchestrators{state="healthy"} 2.0' in text
    view = (await (await gateway.client.get("/orchestrators")).json())["orchestrators"]
    assert sorted(tuple(n["models_warm"]) for n in view) == [(), ("m/warm",)]
    assert all(n["capacity"] == 4 for n in view)


async def test_without_warm_models_the_default_is_an_offered_one(make_gateway: MakeGateway) -> None:
    cold = FakeOrchestrator(ON_DEMAND)
    gateway = await make_gateway(cold)
    assert (await gateway.post()).status == 200
    assert cold.requests[0]["model_id"] == "m/warm"


def test_the_gateway_never_imports_torch_or_diffusers() -> None:
    import subprocess
    import sys

    code = "import sys, t2i_gateway.__main__, discovery.registry; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


async def test_before_any_node_is_seen_a_named_model_is_a_503_not_a_400(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator()
    fake.status = "loading"
    fake.models = []
    gateway = await make_gateway(fake, wait_ready=False)
    response = await gateway.post({**BODY, "model_id": "m/any"})
    assert response.status == 503 and "Retry-After" in response.headers


@pytest.mark.parametrize("events", [False, True])
async def test_a_client_that_hangs_up_is_counted_as_499_not_as_an_error(make_gateway: MakeGateway, events: bool) -> None:
    holding = FakeOrchestrator()
    holding.mode = "hold"
    gateway = await make_gateway(holding)
    headers = {"Accept": "text/event-stream"} if events else {}
    request = asyncio.create_task(gateway.post(headers=headers))
    await wait_until(lambda: len(holding.requests) == 1)
    request.cancel()
    await gateway.client.close()  # the client hangs up while its image is being made
    registry = gateway.metrics.registry
    await wait_until(lambda: registry.get_sample_value("t2i_gateway_requests_total", {"status": "499", "model": "m/warm"}) == 1)
    assert registry.get_sample_value("t2i_gateway_requests_total", {"status": "500", "model": "m/warm"}) is None
    holding.release.set()


async def test_refusals_before_any_attempt_are_counted(make_gateway: MakeGateway) -> None:
    full = FakeOrchestrator(capacity=1)
    full.busy_report = 1
    gateway = await make_gateway(full, max_queued=0)
    assert (await gateway.post()).status == 503
    assert (await gateway.post({"prompt": ""})).status == 422
    registry = gateway.metrics.registry
    assert registry.get_sample_value("t2i_gateway_requests_total", {"status": "503", "model": "other"}) == 1
    assert registry.get_sample_value("t2i_gateway_requests_total", {"status": "422", "model": "other"}) == 1


async def test_a_burst_on_a_full_fleet_waits_for_free_slots_in_arrival_order(make_gateway: MakeGateway) -> None:
    node = FakeOrchestrator(capacity=1)
    node.mode = "hold"
    gateway = await make_gateway(node)
    first = asyncio.create_task(gateway.post({**BODY, "seed": 0}))
    await wait_until(lambda: len(node.requests) == 1)
    waiting = []
    for seed in (1, 2, 3):  # one after the other, so that their arrival order is known
        waiting.append(asyncio.create_task(gateway.post({**BODY, "seed": seed})))
        await wait_until(partial(lambda n: gateway.metrics.registry.get_sample_value("t2i_gateway_queued") == n, seed))
    node.release.set()
    assert [r.status for r in await asyncio.gather(first, *waiting)] == [200] * 4
    assert [request["seed"] for request in node.requests] == [0, 1, 2, 3]
    assert gateway.metrics.registry.get_sample_value("t2i_gateway_queued") == 0


async def test_the_wait_is_bounded_by_the_queue_and_its_timeout(make_gateway: MakeGateway) -> None:
    node = FakeOrchestrator(capacity=1)
    node.mode = "hold"
    gateway = await make_gateway(node, max_queued=1, queue_timeout_s=0.5)
    first = asyncio.create_task(gateway.post())
    await wait_until(lambda: len(node.requests) == 1)
    second = asyncio.create_task(gateway.post())
    await wait_until(lambda: gateway.metrics.registry.get_sample_value("t2i_gateway_queued") == 1)
    refused = await gateway.post()  # the queue is full: refused at once, without waiting
    assert refused.status == 503 and refused.headers["Retry-After"]
    timed_out = await second  # waited its 0.5 s, then the usual 503
    assert timed_out.status == 503 and timed_out.headers["Retry-After"]
    assert len(node.requests) == 1
    node.release.set()
    assert (await first).status == 200


async def test_a_waiting_client_hears_its_position_and_one_that_leaves_is_dropped(make_gateway: MakeGateway) -> None:
    node = FakeOrchestrator(capacity=1)
    node.mode = "hold"
    gateway = await make_gateway(node)
    queued = lambda: gateway.metrics.registry.get_sample_value("t2i_gateway_queued")  # noqa: E731
    first = asyncio.create_task(gateway.post({**BODY, "seed": 0}))
    await wait_until(lambda: len(node.requests) == 1)
    leaving = asyncio.create_task(gateway.post({**BODY, "seed": 1}))
    await wait_until(lambda: queued() == 1)
    events = await gateway.client.post("/text-to-image", json={**BODY, "seed": 2}, headers={"Accept": "text/event-stream"})
    reader = read_events(events.content)
    assert await anext(reader) == ("queued", {"position": 1})
    leaving.cancel()
    await wait_until(lambda: queued() == 1)  # the one that left is out of the queue ...
    assert await anext(reader) == ("queued", {"position": 0})  # ... and the one behind it moved up
    node.release.set()
    assert (await first).status == 200
    rest = [event async for event in reader]
    assert rest[-1][0] == "result" and [r["seed"] for r in node.requests] == [0, 2]


async def test_openai_requests_are_checked_and_answered_in_openais_shape(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator()
    gateway = await make_gateway(fake, api_keys=("k",))
    auth = {"Authorization": "Bearer k"}
    ok = await gateway.client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "n": 2}, headers=auth)
    body = await ok.json()
    assert ok.status == 200 and len(body["data"]) == 2 and body["data"][0]["url"].startswith("http") and body["created"] > 0
    assert fake.requests[-1] == {
        "prompt": "a cat",
        "model_id": "m/warm",
        "width": 64,
        "height": 64,
        "num_images_per_prompt": 2,
        "negative_prompt": "",
    }
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"size": "64x64\n"}, "size", "WIDTHxHEIGHT"),
        ({"size": "65x64"}, "size", "multiple of 8"),
        ({"style": "vivid"}, "style", "not rewritten"),
        ({"quality": "hd"}, "quality", "auto, standard"),
        ({"output_format": "gif"}, "output_format", "png, jpeg, webp"),
        ({"output_compression": 50}, "output_compression", "jpeg and webp only"),
        ({"colour": "red"}, "colour", "Unknown field"),
        ({"seed": "7"}, "seed", "integer"),
    ]
    for fields, param, words in cases:
        response = await gateway.client.post("/v1/images/generations", json={"prompt": "a cat", **fields}, headers=auth)
        error = (await response.json())["error"]
        assert response.status == 400 and error["param"] == param and words in error["message"], (fields, error)
        assert error["type"] == "invalid_request_error"
    refused = await gateway.client.post("/v1/images/generations", json={"prompt": "a cat"}, headers={"Authorization": "Bearer nope"})
    assert refused.status == 401 and (await refused.json())["error"]["code"] == "invalid_api_key"
    deep = await gateway.client.post("/v1/images/generations", data=b"[" * 100_000, headers={**auth, "Content-Type": "application/json"})
    assert deep.status == 400 and "nested too deeply" in (await deep.json())["error"]["message"]
    models = await (await gateway.client.get("/v1/models", headers=auth)).json()
    assert models == {"object": "list", "data": [{"id": "m/warm", "object": "model", "created": 0, "owned_by": "t2i"}]}
    livepeer = await gateway.client.post("/text-to-image", json={"prompt": "a", "width": 65}, headers=auth)
    assert livepeer.status == 422 and "detail" in await livepeer.json()  # the Livepeer API keeps its own shape


async def test_both_sides_of_a_wrong_size_are_named_once(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(FakeOrchestrator())
    response = await gateway.client.post("/v1/images/generations", json={"prompt": "a cat", "size": "500x500"})
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == "size"
    assert error["message"] == "size: The width must be a multiple of 8, got 500. The height must be a multiple of 8, got 500."
    response = await gateway.post({"prompt": "a", "width": 100, "height": 90})
    livepeer = await response.json()
    assert [problem["loc"] for problem in livepeer["detail"]] == [["body", "width"], ["body", "height"]]
    # The messages joined into one sentence (the OpenAI shape, the CLI), never ".;".
    from t2i_common.errors import InvalidFields

    joined = InvalidFields([(p["loc"][1], p["msg"], p["type"]) for p in livepeer["detail"]]).message
    assert joined == "width: Must be a multiple of 8, got 100; height: Must be a multiple of 8, got 90."


class ChangingDiscovery:
    """A fake discovery whose set of nodes a test changes."""

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.endpoints = endpoints

    def snapshot(self) -> tuple[Endpoint, ...]:
        return tuple(self.endpoints)

    def take_reports(self) -> dict[str, dict[str, Any]]:
        return {}

    def problem(self) -> str | None:
        return None

    async def refresh(self) -> bool:
        return False

    async def close(self) -> None:
        pass


async def test_a_node_that_leaves_discovery_finishes_what_it_has_and_takes_no_more(aiohttp_client: Any, aiohttp_server: Any) -> None:
    leaving, staying = FakeOrchestrator(capacity=8), FakeOrchestrator()  # the leaving one looks freer: used first
    leaving.mode = "hold"
    urls = [str((await aiohttp_server(fake.app())).make_url("")).rstrip("/") for fake in (leaving, staying)]
    discovery = ChangingDiscovery([Endpoint(url) for url in urls])
    metrics = GatewayMetrics(CollectorRegistry())
    app = create_app(GatewayConfig(), discovery=discovery, stream_secret=b"test-secret", metrics_=metrics)
    client = await aiohttp_client(app)
    pool = app[POOL]
    await wait_until(lambda: len(pool.healthy()) == 2)
    in_flight = asyncio.create_task(client.post("/text-to-image", json=BODY))
    await wait_until(lambda: len(leaving.requests) == 1)
    discovery.endpoints = [Endpoint(urls[1])]  # removed from the registry while it generates
    await wait_until(lambda: pool.nodes[urls[0]].leaving)
    assert (await client.post("/text-to-image", json=BODY)).status == 200 and len(staying.requests) == 1  # no new work
    leaving.release.set()
    answer = await in_flight
    assert answer.status == 200 and (len(leaving.requests), len(staying.requests)) == (1, 1)  # finished there, not run again
    assert urls[0] not in pool.nodes  # forgotten once its last request ended...
    attempts = {"orchestrator": urls[0], "outcome": "ok"}
    assert metrics.registry.get_sample_value("t2i_gateway_attempts_total", attempts) is None  # ...its series too
    image = urlsplit((await answer.json())["images"][0]["url"]).path
    assert (await client.get(image)).status == 200  # its images stay downloadable for --image-ttl


async def test_an_image_of_a_node_that_left_is_never_fetched_with_the_fleets_secret(aiohttp_client: Any, aiohttp_server: Any) -> None:
    node = FakeOrchestrator(secret="fleet-secret")
    url = str((await aiohttp_server(node.app())).make_url("")).rstrip("/")
    discovery = ChangingDiscovery([Endpoint(url)])
    app = create_app(
        GatewayConfig(orchestrator_secret="fleet-secret"), discovery=discovery, stream_secret=b"test-secret", metrics_=GatewayMetrics()
    )
    client = await aiohttp_client(app)
    await wait_until(lambda: len(app[POOL].healthy()) == 1)
    image = urlsplit((await (await client.post("/text-to-image", json=BODY)).json())["images"][0]["url"]).path
    assert (await client.get(image)).status == 200 and node.downloads[-1]["Authorization"] == "Bearer fleet-secret"
    discovery.endpoints = []  # it leaves; its address may be someone else's by now
    await wait_until(lambda: url not in app[POOL].nodes)
    response = await client.get(image)
    assert response.status == 404 and "left the fleet" in (await response.json())["detail"]["msg"]
    assert "Authorization" not in node.downloads[-1]  # asked without the secret, which it then refused
