"""Every model family through a real ``t2i-orchestrator`` process, offline, as operators store models.

The models are tiny random-weight builds of the real architectures (``t2i_orchestrator.tiny_models``)
placed in a Hugging Face cache under the real repository ids, so the node's unchanged loading code
finds them exactly as it would find real weights: by ``--model <repo id>``, through a models file,
from local folders with an empty hub cache, and from a cache holding only the fp16 files.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from t2i_common.sse import read_events

from .processes import Daemon, start, wait_healthy

pytestmark = pytest.mark.slow

SD_TURBO = "stabilityai/sd-turbo"
SDXL_TURBO = "stabilityai/sdxl-turbo"
LIGHTNING_4 = "ByteDance/SDXL-Lightning-4step"
LIGHTNING_2 = "ByteDance/SDXL-Lightning-2step"
LIGHTNING_8 = "ByteDance/SDXL-Lightning"
REALVIS = "SG161222/RealVisXL_V4.0_Lightning"  # a full-pipeline Lightning fine-tune
SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"
LORA_REPO = "t2i-test/tiny-sdxl-lora"


@pytest.fixture(scope="module")
def hub(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models under their real ids, plus a Lightning fine-tune and an SDXL LoRA."""
    from t2i_orchestrator import tiny_models

    hub = tiny_models.ensure_hub_cache(model_cache)
    tiny_models.place_in_hub_cache(hub, REALVIS, tiny_models.snapshot_dir(hub, SDXL_TURBO))
    tiny_models.place_in_hub_cache(
        hub, LORA_REPO, _build_sdxl_lora(tiny_models.snapshot_dir(hub, SDXL_TURBO), tmp_path_factory.mktemp("lora"))
    )
    return hub


def _build_sdxl_lora(sdxl: Path, out: Path) -> Path:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:  # peft starts these at zero, which would change nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return out


def _models_file(folder: Path, entries: list[dict[str, Any]]) -> str:
    folder.mkdir()
    path = folder / "models.json"
    path.write_text(json.dumps([{"pipeline": "text-to-image", **entry} for entry in entries]))
    return str(path)


@pytest.fixture(scope="module")
def nodes(hub: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Six nodes, started together (their imports overlap), each as an operator would start it."""
    from t2i_orchestrator import tiny_models

    work = tmp_path_factory.mktemp("family-nodes")
    snapshot = lambda repo: str(tiny_models.snapshot_dir(hub, repo))  # noqa: E731
    flagging_checker = work / "flagging-checker"
    tiny_models.build_safety_checker(flagging_checker, flag_everything=True)
    empty_hub = work / "empty-hub"
    empty_hub.mkdir()
    fp16_hub = tiny_models.ensure_hub_cache(model_cache, fp16_only=True)
    lightning_models = _models_file(
        work / "lightning",
        [
            {"model_id": LIGHTNING_4, "warm": True},
            {"model_id": LIGHTNING_2},
            {"model_id": LIGHTNING_8},
            {"model_id": REALVIS},
        ],
    )
    local_models = _models_file(
        work / "local",
        [
            {"model_id": "local/sd-turbo", "path": snapshot(SD_TURBO), "family": "turbo", "warm": True},
            {"model_id": "local/sdxl-turbo", "path": snapshot(SDXL_TURBO), "family": "turbo", "warm": True},
            {
                "model_id": LIGHTNING_4,
                "path": snapshot("stabilityai/stable-diffusion-xl-base-1.0"),
                "unet_path": f"{snapshot('ByteDance/SDXL-Lightning')}/sdxl_lightning_4step_unet.safetensors",
                "warm": True,
            },
            {"model_id": "local/schnell", "path": snapshot(SCHNELL), "family": "flux-schnell", "warm": True},
            {"model_id": "local/dev", "path": snapshot(DEV), "family": "flux-dev", "default_steps": 2, "warm": True},
        ],
    )
    common = ["--cache-dir", str(model_cache), "--threads", "1"]
    plans: dict[str, tuple[list[str], Path]] = {
        "sd-turbo": (["--model", SD_TURBO], hub),
        "sdxl-turbo": (["--model", SDXL_TURBO], hub),
        "lightning": (["--models", lightning_models], hub),
        "flux": (["--model", SCHNELL, "--model", DEV, "--safety-checker", "none"], hub),
        "local": (["--models", local_models, "--safety-checker", str(flagging_checker)], empty_hub),
        "fp16": (["--model", SD_TURBO, "--model", SDXL_TURBO, "--model", LIGHTNING_4], fp16_hub),
    }
    daemons: dict[str, Daemon] = {}
    try:
        for name, (args, hub_cache) in plans.items():
            logs = work / name
            logs.mkdir(exist_ok=True)
            env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
            daemons[name] = start("t2i_orchestrator", [*common, "--storage-dir", str(logs / "images"), *args], logs, env)
        for daemon in daemons.values():
            wait_healthy(daemon, timeout=240)
        yield {name: daemon.url for name, daemon in daemons.items()}
    finally:
        for daemon in daemons.values():
            daemon.stop()


async def generate(url: str, **fields: Any) -> tuple[int, Any]:
    body = {"prompt": "a cool cat on the beach", "width": 64, "height": 64, "seed": 7, **fields}
    async with aiohttp.ClientSession() as session, session.post(f"{url}/text-to-image", json=body) as response:
        return response.status, await response.json()


async def image_bytes(url: str, **fields: Any) -> bytes:
    status, body = await generate(url, **fields)
    assert status == 200, body
    async with aiohttp.ClientSession() as session, session.get(body["images"][0]["url"]) as response:
        assert response.status == 200
        return await response.read()


async def steps_run(url: str, **fields: Any) -> int:
    """How many denoising steps the node ran, from its live progress events."""
    body = {"prompt": "a", "width": 64, "height": 64, **fields}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/text-to-image", json=body, headers={"Accept": "text/event-stream"}) as response,
    ):
        events = [event async for event in read_events(response.content)]
    assert events[-1][0] == "result", events[-1]
    return max(data["step"] for name, data in events if name == "progress")


@pytest.mark.parametrize(
    ("node", "model_id"),
    [
        ("sd-turbo", SD_TURBO),
        ("sdxl-turbo", SDXL_TURBO),
        ("lightning", LIGHTNING_4),
        ("lightning", LIGHTNING_2),  # on demand
        ("lightning", REALVIS),
        ("flux", SCHNELL),
        ("flux", DEV),
        ("local", "local/sd-turbo"),
        ("local", "local/sdxl-turbo"),
        ("local", LIGHTNING_4),
        ("local", "local/schnell"),
        ("local", "local/dev"),
        ("fp16", SD_TURBO),
        ("fp16", SDXL_TURBO),
        ("fp16", LIGHTNING_4),
    ],
)
async def test_each_family_generates_with_its_defaults(nodes: dict[str, str], node: str, model_id: str) -> None:
    png = await image_bytes(nodes[node], model_id=model_id)
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == (64, 64)
    assert len(picture.convert("L").getcolors(maxcolors=256) or []) > 10  # a real picture, not a blank


@pytest.mark.parametrize(
    ("node", "model_id", "steps"),
    [
        ("sd-turbo", SD_TURBO, 1),
        ("lightning", LIGHTNING_4, 4),
        ("lightning", REALVIS, 6),
        ("flux", SCHNELL, 4),
        ("local", "local/dev", 2),  # the models file's default_steps
    ],
)
async def test_default_steps_follow_the_family(nodes: dict[str, str], node: str, model_id: str, steps: int) -> None:
    assert await steps_run(nodes[node], model_id=model_id) == steps


async def test_lightning_takes_only_its_step_count_and_refuses_before_loading(nodes: dict[str, str]) -> None:
    url = nodes["lightning"]
    status, body = await generate(url, model_id=LIGHTNING_8, num_inference_steps=4)
    assert status == 400 and "exactly 8 steps" in body["detail"]["msg"]
    async with aiohttp.ClientSession() as session, session.get(f"{url}/capabilities") as response:
        models = {m["model_id"]: m for m in (await response.json())["models"]}
    assert models[LIGHTNING_8]["loaded"] is False  # refused before any loading
    assert await steps_run(url, model_id=LIGHTNING_4, num_inference_steps=4) == 4


@pytest.mark.parametrize(("node", "model_id"), [("sd-turbo", SD_TURBO), ("sdxl-turbo", SDXL_TURBO), ("flux", SCHNELL)])
async def test_turbo_and_schnell_ignore_guidance(nodes: dict[str, str], node: str, model_id: str) -> None:
    assert await image_bytes(nodes[node], model_id=model_id, guidance_scale=0) == await image_bytes(
        nodes[node], model_id=model_id, guidance_scale=9
    )


async def test_flux_dev_follows_guidance_and_flux_ignores_the_negative_prompt(nodes: dict[str, str]) -> None:
    url = nodes["flux"]
    assert await image_bytes(url, model_id=DEV, guidance_scale=1) != await image_bytes(url, model_id=DEV, guidance_scale=9)
    for model_id in (SCHNELL, DEV):
        plain = await image_bytes(url, model_id=model_id)
        assert await image_bytes(url, model_id=model_id, negative_prompt="blurry, low quality") == plain


async def test_a_negative_prompt_changes_an_sdxl_image(nodes: dict[str, str]) -> None:
    url = nodes["lightning"]  # RealVis keeps guidance (1.5), so a negative prompt counts
    assert await image_bytes(url, model_id=REALVIS) != await image_bytes(url, model_id=REALVIS, negative_prompt="blurry")


async def test_a_per_request_lora_on_sdxl_from_the_hub_cache(nodes: dict[str, str]) -> None:
    url = nodes["sdxl-turbo"]
    base = await image_bytes(url)
    styled = await image_bytes(url, loras=json.dumps({LORA_REPO: 1.0}))
    assert styled != base
    assert await image_bytes(url) == base  # the next request gets the bare model
    status, body = await generate(url, loras=json.dumps({"nerijs/pixel-art-xl": 1.0}))
    assert status == 400 and "not in this node's Hugging Face cache" in body["detail"]["msg"]


async def test_models_without_their_own_checker_use_the_shared_one(nodes: dict[str, str]) -> None:
    # The "local" node's shared checker flags everything: proof that it ran on turbo and FLUX images.
    url = nodes["local"]
    for model_id in ("local/sd-turbo", "local/schnell", LIGHTNING_4):
        status, body = await generate(url, model_id=model_id)
        assert status == 200 and body["images"][0]["nsfw"] is True, model_id
        status, body = await generate(url, model_id=model_id, safety_check=False)
        assert status == 200 and body["images"][0]["nsfw"] is False
    status, body = await generate(nodes["sd-turbo"])  # CompVis's checker from the hub cache
    assert status == 200 and body["images"][0]["nsfw"] is False


async def test_without_a_checker_an_explicit_safety_check_is_a_400(nodes: dict[str, str]) -> None:
    url = nodes["flux"]  # --safety-checker none
    status, body = await generate(url, model_id=SCHNELL, safety_check=True)
    assert status == 400 and "no safety checker" in body["detail"]["msg"] and "safety_check=false" in body["detail"]["msg"]
    status, body = await generate(url, model_id=SCHNELL)  # not asked for: not checked
    assert status == 200 and body["images"][0]["nsfw"] is False


def run_until_exit(args: list[str], hub_cache: Path, log_dir: Path, model_cache: Path) -> tuple[int, str]:
    daemon = start(
        "t2i_orchestrator",
        ["--cache-dir", str(model_cache), "--storage-dir", str(log_dir / "images"), *args],
        log_dir,
        {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"},
    )
    try:
        code = daemon.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        daemon.stop()
        raise AssertionError(f"the node did not stop:\n{daemon.log.read_text()[-3000:]}") from None
    return code, daemon.log.read_text()


def test_a_warm_model_that_cannot_be_found_stops_the_node_saying_how_to_get_it(tmp_path: Path, model_cache: Path) -> None:
    (tmp_path / "hub").mkdir()
    code, log = run_until_exit(["--model", SD_TURBO, "--safety-checker", "none"], tmp_path / "hub", tmp_path, model_cache)
    assert code != 0
    last = log.strip().splitlines()[-1]
    assert last.startswith("t2i-orchestrator: Model stabilityai/sd-turbo could not be loaded"), log[-2000:]
    assert str(tmp_path / "hub") in last and f"hf download {SD_TURBO}" in last


def test_a_missing_safety_checker_stops_the_node_saying_how_to_get_it(tmp_path: Path, model_cache: Path, hub: Path) -> None:
    from t2i_orchestrator import tiny_models

    only_flux = tmp_path / "hub"
    tiny_models.place_in_hub_cache(only_flux, SCHNELL, tiny_models.snapshot_dir(hub, SCHNELL))
    code, log = run_until_exit(["--model", SCHNELL], only_flux, tmp_path, model_cache)
    assert code != 0
    last = log.strip().splitlines()[-1]
    assert "safety checker CompVis/stable-diffusion-safety-checker could not be loaded" in last, log[-2000:]
    assert "hf download CompVis/stable-diffusion-safety-checker" in last and "--safety-checker none" in last
