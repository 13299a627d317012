"""The real engine: the demo model built, loaded by diffusers' own loader, generating real PNGs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops
from prometheus_client import CollectorRegistry

from metrics import OrchestratorMetrics
from t2i_common.errors import BadRequest
from t2i_common.schemas import TextToImageRequest
from t2i_orchestrator import diffusers_engine
from t2i_orchestrator.app import create_app
from t2i_orchestrator.config import OrchestratorConfig
from t2i_orchestrator.demo_model import DEMO_MODEL_ID
from t2i_orchestrator.engine import GenerationCancelled
from t2i_orchestrator.models import ModelSpec

pytestmark = pytest.mark.slow


def never() -> bool:
    return False


@pytest.fixture(scope="module")
def engine(model_cache: Path, demo_model_path: Path, nsfw_model_path: Path) -> Any:
    specs = [
        ModelSpec(DEMO_MODEL_ID, warm=True),
        ModelSpec("tiny/b", path=str(demo_model_path)),
        ModelSpec("tiny/c", path=str(demo_model_path)),
        ModelSpec("tiny/nsfw", path=str(nsfw_model_path)),
    ]
    return diffusers_engine.DiffusersEngine(specs, device="cpu", cache_dir=model_cache, max_loaded_models=2)


def generate(engine: Any, seed: int = 42, model_id: str = DEMO_MODEL_ID, **fields: Any) -> list[Any]:
    request = TextToImageRequest(**{"prompt": "a cool cat on the beach", "width": 64, "height": 64, **fields})
    return engine.generate(request, model_id, seed, never)


def largest_difference(a: Image.Image, b: Image.Image) -> int:
    """The largest difference of any channel of any pixel of two pictures, 0 to 255."""
    extrema: Any = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getextrema()  # one (low, high) per channel
    return max(high for _, high in extrema)


def test_demo_model_generates_a_picture_of_the_requested_size(engine: Any) -> None:
    [image] = generate(engine, width=256, height=192)
    picture = image.picture
    assert picture.mode == "RGB" and picture.size == (256, 192)
    assert image.seed == 42 and image.nsfw is False
    assert len(picture.convert("L").getcolors(maxcolors=256) or []) > 10  # a real picture, not a blank


def test_same_seed_same_pixels_and_another_seed_another_image(engine: Any) -> None:
    assert generate(engine, seed=5)[0].picture == generate(engine, seed=5)[0].picture
    assert generate(engine, seed=5)[0].picture != generate(engine, seed=6)[0].picture


def test_two_images_per_prompt_have_seeds_s_and_s_plus_1(engine: Any) -> None:
    first, second = generate(engine, seed=9, num_images_per_prompt=2)
    assert (first.seed, second.seed) == (9, 10)
    assert first.picture != second.picture
    # Image i depends on seed + i only: the second image is the first image of a request with seed 10.
    [alone] = generate(engine, seed=10)
    assert largest_difference(second.picture, alone.picture) <= 2


def test_lora_changes_the_image_for_that_request_only(engine: Any, lora_dir: Path) -> None:
    base = generate(engine, seed=3)[0].picture
    styled = generate(engine, seed=3, loras=((str(lora_dir / "tiny-style"), 1.0),))[0].picture
    assert styled != base
    assert largest_difference(base, styled) > 10
    assert generate(engine, seed=3)[0].picture == base


def test_a_lora_that_does_not_fit_the_model_is_a_400_and_the_engine_still_works(engine: Any, tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BadRequest, match="'broken' could not be loaded"):
        generate(engine, loras=((str(tmp_path / "broken"), 1.0),))
    assert generate(engine, seed=3)[0].picture == generate(engine, seed=3)[0].picture


def test_a_batch_makes_each_request_its_own_images_nearly_as_alone(engine: Any) -> None:
    from t2i_orchestrator.engine import Generation

    generations = [
        Generation(TextToImageRequest(prompt=prompt, width=64, height=64, num_images_per_prompt=n), DEMO_MODEL_ID, seed)
        for prompt, n, seed in (("a cat", 1, 5), ("a dog", 2, 50), ("a lighthouse", 1, 7))
    ]
    batched = engine.generate_batch(generations, never)
    assert [[image.seed for image in images] for images in batched] == [[5], [50, 51], [7]]
    for generation, images in zip(generations, batched):
        alone = engine.generate_batch([generation], never)[0]
        for together, by_itself in zip(images, alone):
            # The same seed gives the same picture; batched arithmetic may differ in the last bit.
            assert largest_difference(together.picture, by_itself.picture) <= 2
    assert batched[0][0].picture != batched[2][0].picture


def test_least_recently_used_on_demand_model_is_evicted(engine: Any) -> None:
    engine.load(DEMO_MODEL_ID)
    assert engine.load("tiny/b") is True
    assert engine.load("tiny/c") is True
    loaded = engine.loaded_models()
    assert "tiny/b" not in loaded and "tiny/c" in loaded and DEMO_MODEL_ID in loaded  # warm models stay
    assert engine.load("tiny/c") is False
    assert engine.load("tiny/b") is True
    assert set(engine.loaded_models()) == {DEMO_MODEL_ID, "tiny/b"}


def test_safety_checker_flags_without_blacking_out(engine: Any) -> None:
    flagged = generate(engine, model_id="tiny/nsfw", num_images_per_prompt=2)
    assert [image.nsfw for image in flagged] == [True, True]
    assert flagged[0].picture.getbbox() is not None  # not an all-black image
    unchecked = generate(engine, model_id="tiny/nsfw", safety_check=False)
    assert unchecked[0].nsfw is False
    assert generate(engine)[0].nsfw is False


def test_generation_stops_at_the_next_step_when_asked(engine: Any) -> None:
    calls = 0

    def stop_after_first_check() -> bool:
        nonlocal calls
        calls += 1
        return calls > 1

    request = TextToImageRequest(prompt="a", width=64, height=64, num_inference_steps=20)
    with pytest.raises(GenerationCancelled):
        engine.generate(request, DEMO_MODEL_ID, 1, stop_after_first_check)
    assert calls == 2  # the check before starting, then the first step's


async def test_on_demand_model_loads_once_under_concurrent_requests(
    aiohttp_client: Any, tmp_path: Path, model_cache: Path, demo_model_path: Path
) -> None:
    specs = (ModelSpec(DEMO_MODEL_ID, warm=True), ModelSpec("tiny/on-demand", path=str(demo_model_path)))
    engine = await asyncio.to_thread(
        diffusers_engine.DiffusersEngine, specs, device="cpu", cache_dir=model_cache
    )  # reads files: off the loop
    metrics = OrchestratorMetrics(CollectorRegistry())
    config = OrchestratorConfig(models=specs, storage_dir=tmp_path)
    client = await aiohttp_client(create_app(config, engine=engine, metrics_=metrics))
    body = {"prompt": "a", "model_id": "tiny/on-demand", "width": 64, "height": 64}
    responses = await asyncio.gather(*(client.post("/text-to-image", json=body) for _ in range(4)))
    assert [response.status for response in responses] == [200] * 4
    assert metrics.registry.get_sample_value("t2i_orchestrator_model_load_seconds_count", {"model": "tiny/on-demand"}) == 1
    assert metrics.registry.get_sample_value("t2i_orchestrator_images_generated_total", {"model": "tiny/on-demand"}) == 4


def test_out_of_memory_is_a_507_and_the_engine_keeps_serving(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from t2i_orchestrator.engine import OutOfMemory

    engine.load(DEMO_MODEL_ID)
    model = engine._loaded[DEMO_MODEL_ID]  # noqa: SLF001 - swap in a pipeline that runs out of memory

    def out_of_memory(**_: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    real_pipe = model.pipe
    monkeypatch.setattr(model, "pipe", out_of_memory)
    with pytest.raises(OutOfMemory, match="Out of GPU memory") as caught:
        generate(engine)
    assert caught.value.status == 507  # the request's size: a gateway tries a larger node, blaming none
    monkeypatch.setattr(model, "pipe", real_pipe)
    assert generate(engine)[0].picture.size == (64, 64)


def test_a_vae_left_upcast_by_an_out_of_memory_decode_is_put_back(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from t2i_orchestrator.engine import OutOfMemory

    engine.load(DEMO_MODEL_ID)
    vae = engine._loaded[DEMO_MODEL_ID].pipe.vae  # noqa: SLF001 - the decode runs out of memory half way

    def upcast_then_out_of_memory(*args: Any, **kwargs: Any) -> Any:
        vae.to(dtype=torch.float64)  # as SDXL's pipeline upcasts its float16 VAE before decoding
        raise torch.cuda.OutOfMemoryError("CUDA out of memory while decoding")

    monkeypatch.setattr(vae, "decode", upcast_then_out_of_memory)
    with pytest.raises(OutOfMemory):
        generate(engine)
    monkeypatch.undo()
    assert vae.dtype == torch.float32
    assert generate(engine)[0].picture.size == (64, 64)


@pytest.mark.parametrize("prompt", ["\x00\x1b[31m\u202e", "😀 un chat sur la plage, 猫", "word " * 400])
def test_any_prompt_text_generates(engine: Any, prompt: str) -> None:
    [image] = generate(engine, prompt=prompt, negative_prompt=prompt)
    assert image.picture.size == (64, 64)


async def test_the_real_engine_batches_only_what_may_share_a_call(engine: Any, lora_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``batch_key``, through the real device queue: a LoRA request never shares a call with a
    plain one, nor do requests whose guidance, negative prompt or safety check differ."""
    import threading

    from t2i_orchestrator.device import DeviceQueue
    from t2i_orchestrator.engine import Generation

    from .helpers import wait_until
    from .test_batching import FakeAlwaysBatch

    calls: list[list[int]] = []
    real_batch = engine.generate_batch

    def recording(generations: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append([g.seed for g in generations])
        return real_batch(generations, *args, **kwargs)

    monkeypatch.setattr(engine, "generate_batch", recording)
    queue = DeviceQueue(OrchestratorMetrics(CollectorRegistry()), engine, max_queue=16, max_batch=8)
    queue.policy = FakeAlwaysBatch(8)  # type: ignore[assignment]
    hold = threading.Event()
    try:
        busy = asyncio.create_task(queue.run(lambda stop: hold.wait(30), label="hold"))  # the device is busy meanwhile
        lora = ((str(lora_dir / "tiny-style"), 1.0),)
        variants: dict[int, dict[str, Any]] = {
            1: {},
            2: {"loras": lora},
            3: {},
            4: {"guidance_scale": 9.0},
            5: {"negative_prompt": "blurry"},
            6: {"loras": lora},
            7: {"safety_check": False},
        }
        jobs = [
            asyncio.create_task(
                queue.generate(Generation(TextToImageRequest(prompt=f"p{seed}", width=64, height=64, **fields), DEMO_MODEL_ID, seed))
            )
            for seed, fields in variants.items()
        ]
        await wait_until(lambda: queue.waiting == len(jobs))
        hold.set()
        await busy
        await asyncio.gather(*jobs)
    finally:
        hold.set()
        await queue.close()
    together = {frozenset(call) for call in calls}
    assert together == {frozenset({1, 3}), frozenset({2, 6}), frozenset({4}), frozenset({5}), frozenset({7})}
