"""The orchestrator's HTTP API, with a fake engine (no torch): contract, validation, queueing, auth."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from metrics import OrchestratorMetrics
from t2i_orchestrator.app import STORE, create_app
from t2i_orchestrator.config import OrchestratorConfig
from t2i_orchestrator.models import ModelSpec

from .fakes import FakeEngine
from .helpers import MakeClient, wait_ready, wait_until


async def test_generates_images_with_consecutive_seeds_and_serves_them(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post(
        "/text-to-image", json={"prompt": "a cat", "width": 64, "height": 128, "seed": 7, "num_images_per_prompt": 2}
    )
    assert response.status == 200, await response.text()
    images = (await response.json())["images"]
    assert [image["seed"] for image in images] == [7, 8]
    assert [image["nsfw"] for image in images] == [False, False]
    assert images[0]["url"] != images[1]["url"]
    for image in images:
        assert image["url"].startswith(str(client.make_url("/stream/")))
        download = await client.session.get(image["url"])
        assert download.status == 200
        assert download.headers["Content-Type"] == "image/png"
        assert (await download.read()).startswith(b"\x89PNG")


@pytest.mark.parametrize(("fmt", "quality", "magic"), [("jpeg", 40, b"\xff\xd8"), ("webp", 90, b"RIFF")])
async def test_each_format_is_written_served_and_refused_where_pillow_lacks_it(
    make_client: MakeClient, fmt: str, quality: int, magic: bytes
) -> None:
    client = await make_client()
    body = {"prompt": "a cat", "width": 64, "height": 64, "output_format": fmt, "output_compression": quality}
    response = await client.post("/text-to-image", json=body)
    [image] = (await response.json())["images"]
    assert image["url"].endswith(f".{fmt}")
    download = await client.session.get(image["url"])
    assert download.headers["Content-Type"] == f"image/{fmt}" and (await download.read()).startswith(magic)
    wrong = await client.session.get(image["url"].rsplit(".", 1)[0] + ".png")  # the same image under another format
    assert wrong.status == 404
    client.app[STORE].formats = frozenset({"png"})  # type: ignore[index]  # as on a Pillow built without it
    refused = await client.post("/text-to-image", json=body)
    assert refused.status == 400 and f"cannot write {fmt} images" in (await refused.json())["detail"]["msg"]


async def test_without_seed_a_random_one_is_drawn(make_client: MakeClient) -> None:
    client = await make_client()
    seeds = set()
    for _ in range(3):
        response = await client.post("/text-to-image", json={"prompt": "a cat", "width": 64, "height": 64})
        seeds.add((await response.json())["images"][0]["seed"])
    assert len(seeds) == 3 and all(0 <= seed < 2**32 for seed in seeds)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "width": 100}, "width"),
        ({"prompt": "a", "width": 4096}, "width"),
        ({"prompt": "a", "height": 32}, "height"),
        ({"prompt": "a", "height": 512.5}, "height"),
        ({"prompt": "a", "width": "512"}, "width"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a", "num_inference_steps": 101}, "num_inference_steps"),
        ({"prompt": "a", "num_images_per_prompt": 9}, "num_images_per_prompt"),
        ({"prompt": "a", "width": 2048, "height": 2048, "num_images_per_prompt": 2}, "num_images_per_prompt"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "guidance_scale": 31}, "guidance_scale"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "seed": 2**32}, "seed"),
        ({"prompt": "a", "seed": 10**40}, "seed"),
        ({"prompt": "a", "safety_check": "maybe"}, "safety_check"),
        ({"prompt": "a", "loras": "not json"}, "loras"),
        ({"prompt": "a", "loras": '["a"]'}, "loras"),
        ({"prompt": "a", "loras": '{"a/b": "strong"}'}, "loras"),
        ({"prompt": "a", "loras": '{"a/b": -1}'}, "loras"),
        ({"prompt": "a", "loras": json.dumps({f"a/{i}": 1 for i in range(5)})}, "loras"),
        ({"prompt": "a", "steps": 4}, "steps"),
    ],
)
async def test_each_invalid_field_is_a_422_naming_it(make_client: MakeClient, body: dict[str, Any], field: str) -> None:
    client = await make_client()
    response = await client.post("/text-to-image", json=body)
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert {"loc": ["body", field]}.items() <= detail[0].items()
    assert detail[0]["msg"] and detail[0]["type"]


async def test_nan_is_rejected_not_crashed_on(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post(
        "/text-to-image", data='{"prompt": "a", "guidance_scale": NaN}', headers={"Content-Type": "application/json"}
    )
    assert response.status == 422
    assert (await response.json())["detail"][0]["loc"] == ["body", "guidance_scale"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"prompt"', "\udcff".encode("utf-8", "surrogatepass")])
async def test_malformed_body_is_a_400(make_client: MakeClient, body: bytes) -> None:
    client = await make_client()
    response = await client.post("/text-to-image", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["detail"]["msg"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
async def test_a_body_not_declared_as_json_is_a_415(make_client: MakeClient, content_type: str) -> None:
    client = await make_client()
    response = await client.post("/text-to-image", data=b'{"prompt": "a"}', headers={"Content-Type": content_type})
    assert response.status == 415
    assert "application/json" in (await response.json())["detail"]["msg"]


async def test_json_with_a_charset_or_without_a_content_type_is_accepted(make_client: MakeClient) -> None:
    client = await make_client()
    body = b'{"prompt": "a", "width": 64, "height": 64}'
    for headers in ({"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": ""}):
        assert (await client.post("/text-to-image", data=body, headers=headers)).status == 200


async def test_unknown_model_is_a_400_listing_the_offer(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/text-to-image", json={"prompt": "a", "model_id": "other/model"})
    assert response.status == 400
    message = (await response.json())["detail"]["msg"]
    assert "other/model" in message and "warm/model" in message and "cold/model" in message


async def test_empty_model_id_means_the_first_warm_model(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    assert (await client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64})).status == 200
    assert engine.loads == ["warm/model"]
    assert (await client.post("/text-to-image", json={"prompt": "a", "model_id": "cold/model", "width": 64, "height": 64})).status == 200
    assert engine.loads == ["warm/model", "cold/model"]


async def test_full_queue_answers_503_with_retry_after(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client(max_queue=1)
    engine.gate.clear()
    body = {"prompt": "a", "width": 64, "height": 64}
    running = asyncio.create_task(client.post("/text-to-image", json=body))
    await asyncio.to_thread(engine.started.wait, 5)
    waiting = asyncio.create_task(client.post("/text-to-image", json=body))
    for _ in range(100):
        capabilities = await (await client.get("/capabilities")).json()
        if capabilities["queued"] == 1:
            break
        await asyncio.sleep(0.01)
    assert capabilities["in_flight"] == 1 and capabilities["queued"] == 1 and capabilities["capacity"] == 2
    refused = await client.post("/text-to-image", json=body)  # at once: the queue is full
    assert refused.status == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "busy" in (await refused.json())["detail"]["msg"]
    engine.gate.set()
    assert (await running).status == 200
    assert (await waiting).status == 200


async def test_client_going_away_stops_the_generation(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    engine.gate.clear()
    request = asyncio.create_task(client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64}))
    await asyncio.to_thread(engine.started.wait, 5)
    request.cancel()
    await client.close()  # drops the connection, as a client that goes away does
    assert await asyncio.to_thread(engine.stopped.wait, 5)


async def test_capabilities_list_models_and_load_state(make_client: MakeClient) -> None:
    client = await make_client()
    body = await (await client.get("/capabilities")).json()
    assert body["device"] == "fake" and body["version"] and body["node_id"]
    shown = [
        {key: model[key] for key in ("model_id", "pipeline", "warm", "loaded", "capacity", "default_steps")} for model in body["models"]
    ]
    assert shown == [
        {"model_id": "warm/model", "pipeline": "text-to-image", "warm": True, "loaded": True, "capacity": 1, "default_steps": 25},
        {"model_id": "cold/model", "pipeline": "text-to-image", "warm": False, "loaded": False, "capacity": 1, "default_steps": 25},
    ]
    warm, cold = body["models"]
    assert warm["load_s"] >= 0 and cold["load_s"] is None  # the warm one was loaded at start
    assert warm["s_per_mpx_step"] is None and body["held_s"] == 0  # the warm-up call is no measure of speed


async def test_capabilities_report_the_speed_measured_and_the_work_held(make_client: MakeClient, engine: FakeEngine) -> None:
    client = await make_client()
    small = {"prompt": "a", "width": 64, "height": 64, "num_inference_steps": 2}
    assert (await client.post("/text-to-image", json=small)).status == 200
    speed = (await (await client.get("/capabilities")).json())["models"][0]["s_per_mpx_step"]
    assert speed > 0
    engine.gate.clear()  # one request held on the device, one waiting behind it
    held = [asyncio.create_task(client.post("/text-to-image", json={**small, "seed": seed})) for seed in (1, 2)]
    await wait_until(lambda: engine.started.is_set())
    body: dict[str, Any] = {}
    while body.get("queued") != 1:
        body = await (await client.get("/capabilities")).json()
    # The waiting request's expected seconds at least: its work at the measured speed.
    assert body["held_s"] >= 64 * 64 / 1e6 * 2 * speed
    engine.gate.set()
    assert [(await request).status for request in held] == [200, 200]
    assert (await (await client.get("/capabilities")).json())["held_s"] == 0


async def test_health_is_503_until_the_warm_models_are_loaded(aiohttp_client: Any, tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.gate.clear()  # the warm-up generation waits
    config = OrchestratorConfig(models=(ModelSpec("warm/model", warm=True),), storage_dir=tmp_path)
    client = await aiohttp_client(create_app(config, engine=engine, metrics_=OrchestratorMetrics(CollectorRegistry())))
    response = await client.get("/health")
    assert response.status == 503 and (await response.json())["status"] == "loading"
    engine.gate.set()
    await wait_ready(client)


async def test_a_warm_model_that_cannot_load_stops_the_node(aiohttp_client: Any, tmp_path: Path) -> None:
    from t2i_common.server import STOP
    from t2i_orchestrator.engine import ModelUnavailable

    engine = FakeEngine()
    engine.load_errors["warm/model"] = ModelUnavailable("Model warm/model could not be loaded. Get it with: hf download warm/model.")
    config = OrchestratorConfig(models=(ModelSpec("warm/model", warm=True),), storage_dir=tmp_path)
    app = create_app(config, engine=engine, metrics_=OrchestratorMetrics(CollectorRegistry()))
    client = await aiohttp_client(app)
    await asyncio.wait_for(app[STOP].requested.wait(), 5)
    assert app[STOP].failure == "Model warm/model could not be loaded. Get it with: hf download warm/model."
    response = await client.get("/health")
    assert response.status == 503 and (await response.json())["detail"]["msg"] == app[STOP].failure


async def test_a_safety_checker_that_cannot_load_stops_the_node_before_any_model(aiohttp_client: Any, tmp_path: Path) -> None:
    from t2i_common.server import STOP
    from t2i_orchestrator.engine import ModelUnavailable

    engine = FakeEngine()
    engine.start_error = ModelUnavailable("The safety checker could not be loaded.")
    config = OrchestratorConfig(models=(ModelSpec("warm/model", warm=True),), storage_dir=tmp_path)
    app = create_app(config, engine=engine, metrics_=OrchestratorMetrics(CollectorRegistry()))
    await aiohttp_client(app)
    await asyncio.wait_for(app[STOP].requested.wait(), 5)
    assert app[STOP].failure == "The safety checker could not be loaded." and engine.loads == []


async def test_what_a_model_cannot_do_is_refused_before_queueing_or_loading(make_client: MakeClient, engine: FakeEngine) -> None:
    engine.refuse["cold/model"] = "cold/model is distilled for exactly 4 steps."
    client = await make_client()
    engine.started.clear()
    engine.gate.clear()  # the device is busy: a refusal must not wait for it
    busy = asyncio.create_task(client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64}))
    await asyncio.to_thread(engine.started.wait, 5)
    response = await client.post("/text-to-image", json={"prompt": "a", "model_id": "cold/model", "num_inference_steps": 8})
    assert response.status == 400 and (await response.json())["detail"]["msg"] == "cold/model is distilled for exactly 4 steps."
    assert "cold/model" not in engine.loads
    engine.gate.set()
    assert (await busy).status == 200


async def test_loras_reach_the_engine_as_local_folders(make_client: MakeClient, engine: FakeEngine, tmp_path: Path) -> None:
    (tmp_path / "loras" / "style").mkdir(parents=True)
    seen: list[Any] = []
    real_generate = engine.generate

    def recording(request: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(request.loras)
        return real_generate(request, *args, **kwargs)

    engine.generate = recording  # type: ignore[method-assign]
    client = await make_client(lora_dir=tmp_path / "loras")
    body = {"prompt": "a", "width": 64, "height": 64, "loras": json.dumps({"style": 0.5})}
    assert (await client.post("/text-to-image", json=body)).status == 200
    assert seen[-1] == ((str((tmp_path / "loras" / "style").resolve()), 0.5),)
    response = await client.post("/text-to-image", json={**body, "loras": json.dumps({"../loras": 1})})
    assert response.status == 400 and "'../loras' could not be loaded" in (await response.json())["detail"]["msg"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"prompt": "a lone surrogate \ud800"}, 200),  # generated, and logged as a hash: never a 500 after the work
        ({"prompt": "a", "loras": json.dumps({"a\x00b": 1})}, 422),  # a NUL byte: a client error, not a crash
        ({"prompt": "a", "loras": json.dumps({"a--b/c": 1})}, 400),  # no repo id the hub would accept
    ],
)
async def test_requests_built_to_fail_are_answered_as_the_clients_fault(
    make_client: MakeClient, tmp_path: Path, body: dict[str, Any], status: int
) -> None:
    (tmp_path / "loras").mkdir()
    client = await make_client(lora_dir=tmp_path / "loras", lora_hub="on")
    response = await client.post("/text-to-image", json={"width": 64, "height": 64, **body})
    assert response.status == status, await response.text()


async def test_secret_is_required_except_on_health_and_metrics(make_client: MakeClient) -> None:
    client = await make_client(secret="s3cret")
    body = {"prompt": "a", "width": 64, "height": 64}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Bearer s3cret\u00e9"}):
        response = await client.post("/text-to-image", json=body, headers=headers)
        assert response.status == 401, headers
        assert "Authorization" in (await response.json())["detail"]["msg"]
    assert (await client.get("/capabilities")).status == 401
    ok = await client.post("/text-to-image", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 200
    url = (await ok.json())["images"][0]["url"]
    assert (await client.session.get(url)).status == 401
    assert (await client.session.get(url, headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_unknown_and_tampered_stream_ids_are_404(make_client: MakeClient) -> None:
    client = await make_client()
    url = (await (await client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64})).json())["images"][0]["url"]
    path = url.removeprefix(str(client.make_url("")).rstrip("/"))
    tampered = path[:-5] + ("0" if path[-5] != "0" else "1") + ".png"
    for candidate in (tampered, "/stream/../../etc/passwd", "/stream/%2e%2e/%2e%2e/etc/passwd.png", "/stream/" + "a" * 400 + "/x.png"):
        response = await client.get(candidate)
        assert response.status == 404, candidate
        assert "detail" in await response.json()


async def test_images_expire_after_the_ttl(make_client: MakeClient, tmp_path: Path) -> None:
    client = await make_client(image_ttl_s=60)
    url = (await (await client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64})).json())["images"][0]["url"]
    assert (await client.session.get(url)).status == 200
    for png in (tmp_path / "images").rglob("*.png"):
        os.utime(png, (time.time() - 61, time.time() - 61))
    assert (await client.session.get(url)).status == 404


async def test_advertise_url_is_the_base_of_image_urls(make_client: MakeClient) -> None:
    client = await make_client(advertise_url="https://node.example:9000")
    body = await (await client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64})).json()
    assert body["images"][0]["url"].startswith("https://node.example:9000/stream/")


async def test_wrong_method_and_unknown_route_use_the_error_shape(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/text-to-image")
    assert response.status == 405 and "POST" in response.headers["Allow"]
    assert (await response.json())["detail"]["msg"]
    response = await client.get("/nowhere")
    assert response.status == 404 and (await response.json())["detail"]["msg"]


async def test_body_over_the_limit_is_a_413(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/text-to-image", data=b"x" * (2 * 1024**2), headers={"Content-Type": "application/json"})
    assert response.status == 413
    assert (await response.json())["detail"]["msg"]


async def test_metrics_count_requests_and_images(make_client: MakeClient) -> None:
    client = await make_client()
    await client.post("/text-to-image", json={"prompt": "a", "width": 64, "height": 64, "num_images_per_prompt": 3})
    await client.post("/text-to-image", json={"prompt": ""})
    text = await (await client.get("/metrics")).text()
    assert 't2i_orchestrator_requests_total{status="200"} 1.0' in text
    assert 't2i_orchestrator_requests_total{status="422"} 1.0' in text
    assert 't2i_orchestrator_images_generated_total{model="warm/model"} 3.0' in text
    assert 't2i_orchestrator_model_load_seconds_count{model="warm/model"} 1.0' in text
    assert 't2i_orchestrator_inference_seconds_count{model="warm/model"} 2.0' in text  # warm-up + request
    assert "t2i_orchestrator_queue_depth 0.0" in text and "t2i_orchestrator_loaded_models 1.0" in text


async def test_node_registers_heartbeats_and_deregisters(aiohttp_client: Any, tmp_path: Path) -> None:
    from discovery import RegistrySettings
    from discovery.registry import read_registry

    registry = tmp_path / "registry.json"
    config = OrchestratorConfig(
        storage_dir=tmp_path / "images",
        register=RegistrySettings(str(registry)),
        advertise_url="http://10.1.2.3:8936",
        heartbeat_interval_s=0.05,
    )
    client = await aiohttp_client(create_app(config, engine=FakeEngine(), metrics_=OrchestratorMetrics(CollectorRegistry())))
    [entry] = await asyncio.to_thread(read_registry, registry)
    assert entry.url == "http://10.1.2.3:8936" and entry.heartbeat is not None
    for _ in range(500):  # the next heartbeats, however slow this machine is today
        [later] = await asyncio.to_thread(read_registry, registry)
        if later.heartbeat > entry.heartbeat:  # type: ignore[operator]
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("no heartbeat after the first")
    await client.close()
    assert await asyncio.to_thread(read_registry, registry) == []


@pytest.mark.parametrize("prompt", ["\x00\x01\x1b[31m", "😀 un chat sur la plage \u202e", "\ud7ff" * 500, "a\nb\tc"])
async def test_any_unicode_prompt_is_accepted(make_client: MakeClient, prompt: str) -> None:
    client = await make_client()
    response = await client.post("/text-to-image", json={"prompt": prompt, "width": 64, "height": 64})
    assert response.status == 200


@pytest.mark.parametrize("raw", ['"width": Infinity', '"width": 1e400', '"seed": -Infinity', '"guidance_scale": 1e400', '"width": 5.12e2'])
async def test_non_finite_and_float_numbers_are_422(make_client: MakeClient, raw: str) -> None:
    client = await make_client()
    body = '{"prompt": "a", ' + raw + "}"
    response = await client.post("/text-to-image", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 422
    assert (await response.json())["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_prompts_are_logged_only_when_asked(make_client: MakeClient, caplog: pytest.LogCaptureFixture, log_prompts: bool) -> None:
    client = await make_client(log_prompts=log_prompts)
    with caplog.at_level("INFO", logger="t2i_orchestrator.app"):
        await client.post("/text-to-image", json={"prompt": "my secret idea", "width": 64, "height": 64}, headers={"X-Request-ID": "r-1"})
    line = next(record.getMessage() for record in caplog.records if "r-1" in record.getMessage())
    assert ("my secret idea" in line) is log_prompts
    assert "sha256:" in line or log_prompts


def test_the_offer_announced_to_gateways_moves_with_a_speed_change_not_with_each_request() -> None:
    from t2i_orchestrator.app import _offer

    def report(speed: float | None, held_s: float, queued: int) -> dict[str, Any]:
        model = {"model_id": "m", "warm": True, "loaded": True, "s_per_mpx_step": speed, "default_steps": 2, "load_s": 3.0}
        return {"status": "ready", "capacity": 9, "in_flight": 1, "queued": queued, "held_s": held_s, "models": [model]}

    assert _offer(report(0.100, 0.5, 3)) == _offer(report(0.103, 2.5, 7))  # load, and a speed within a few %
    assert _offer(report(0.100, 0.5, 3)) != _offer(report(0.125, 0.5, 3))  # a quarter slower: announced
    assert _offer(report(None, 0.0, 0)) != _offer(report(0.1, 0.0, 0))  # measured for the first time: announced
