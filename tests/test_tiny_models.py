"""The tiny stand-ins of the real architectures load through the UNCHANGED diffusers/hub loaders by repo id.

huggingface_hub reads HF_HUB_CACHE once at import, so every call here passes ``cache_dir=`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from t2i_orchestrator import tiny_models
from t2i_orchestrator.models import lightning_unet_file

pytestmark = pytest.mark.slow

PROMPT = "a photo of an astronaut riding a horse"

# repo id -> (pipeline class, scheduler class, call arguments), as the node would run each.
FAMILIES = {
    tiny_models.SD2_REPO: ("StableDiffusionPipeline", "EulerDiscreteScheduler", dict(num_inference_steps=1, guidance_scale=0.0)),
    tiny_models.SDXL_TURBO_REPO: (
        "StableDiffusionXLPipeline",
        "EulerAncestralDiscreteScheduler",
        dict(num_inference_steps=1, guidance_scale=0.0),
    ),
    tiny_models.SDXL_BASE_REPO: ("StableDiffusionXLPipeline", "EulerDiscreteScheduler", dict(num_inference_steps=2, guidance_scale=5.0)),
    tiny_models.FLUX_SCHNELL_REPO: (
        "FluxPipeline",
        "FlowMatchEulerDiscreteScheduler",
        dict(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256),
    ),
    tiny_models.FLUX_DEV_REPO: ("FluxPipeline", "FlowMatchEulerDiscreteScheduler", dict(num_inference_steps=2, guidance_scale=3.5)),
}
FP16_REPOS = [repo for repo, spec in tiny_models.REPOS.items() if spec["fp16"]]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def hub(tiny_cache: Path) -> Path:
    return tiny_models.ensure_hub_cache(tiny_cache)


@pytest.fixture(scope="module")
def hub_fp16(tiny_cache: Path) -> Path:
    return tiny_models.ensure_hub_cache(tiny_cache, fp16_only=True)


def _generate(pipe: Any, call: dict[str, Any]) -> Any:
    import torch

    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(PROMPT, height=64, width=64, generator=generator, **call).images[0]


def test_build_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        tiny_models.build_sd2(tmp_path / name, variant="fp16")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(p.name.endswith(".fp16.safetensors") for p in files_a)
    assert not any(p.suffix == ".safetensors" and not p.name.endswith(".fp16.safetensors") for p in files_a)
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_hub_cache_layout(hub: Path, tiny_cache: Path) -> None:
    assert tiny_models.ensure_hub_cache(tiny_cache) == hub  # built once, then reused
    for repo_id in tiny_models.REPOS:
        repo_dir = hub / tiny_models.repo_folder_name(repo_id)
        commit = (repo_dir / "refs" / "main").read_text()
        assert len(commit) == 40 and (repo_dir / "snapshots" / commit).is_dir()
        assert tiny_models.snapshot_dir(hub, repo_id) == repo_dir / "snapshots" / commit
        for blob in (repo_dir / "blobs").iterdir():
            assert blob.is_file() and not blob.is_symlink()
    lightning = tiny_models.snapshot_dir(hub, tiny_models.SDXL_LIGHTNING_REPO)
    assert sorted(p.name for p in lightning.iterdir()) == [lightning_unet_file(n) for n in (2, 4, 8)]


@pytest.mark.parametrize("repo_id", list(FAMILIES))
def test_family_loads_by_repo_id(hub: Path, repo_id: str) -> None:
    import torch
    from diffusers import AutoPipelineForText2Image

    pipeline_class, scheduler_class, call = FAMILIES[repo_id]
    pipe = AutoPipelineForText2Image.from_pretrained(repo_id, dtype=torch.float32, cache_dir=hub)
    assert type(pipe).__name__ == pipeline_class
    assert type(pipe.scheduler).__name__ == scheduler_class
    assert _generate(pipe, call).size == (64, 64)


def test_family_details(hub: Path) -> None:
    from diffusers import FluxPipeline, StableDiffusionPipeline

    sd2 = StableDiffusionPipeline.from_pretrained(tiny_models.SD2_REPO, cache_dir=hub)
    assert sd2.safety_checker is None and sd2.unet.config.use_linear_projection
    assert sd2.scheduler.config.timestep_spacing == "trailing"
    assert sd2.unet.config.cross_attention_dim == sd2.text_encoder.config.hidden_size == 64
    dev = FluxPipeline.from_pretrained(tiny_models.FLUX_DEV_REPO, cache_dir=hub)
    assert dev.transformer.config.guidance_embeds and dev.scheduler.config.use_dynamic_shifting
    assert dev.vae.config.shift_factor == pytest.approx(0.1159) and dev.vae_scale_factor == 8
    tokens = dev.tokenizer_2(PROMPT).input_ids
    assert dev.tokenizer_2.unk_token_id not in tokens and tokens[-1] == dev.tokenizer_2.eos_token_id


@pytest.mark.parametrize("repo_id", FP16_REPOS)
def test_fp16_only_cache_loads_variant_in_float32(hub_fp16: Path, repo_id: str) -> None:
    import torch
    from diffusers import AutoPipelineForText2Image

    snapshot = tiny_models.snapshot_dir(hub_fp16, repo_id)
    weights = [p.name for p in snapshot.rglob("*.safetensors")]
    assert weights and all(name.endswith(".fp16.safetensors") for name in weights)
    pipe = AutoPipelineForText2Image.from_pretrained(repo_id, variant="fp16", dtype=torch.float32, cache_dir=hub_fp16)
    assert pipe.unet.dtype == torch.float32
    assert _generate(pipe, FAMILIES[repo_id][2]).size == (64, 64)


def test_lightning_unet_fits_sdxl_base(hub: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    config = UNet2DConditionModel.load_config(tiny_models.SDXL_BASE_REPO, subfolder="unet", cache_dir=hub)
    unet = UNet2DConditionModel.from_config(config)
    states = []
    for steps in (2, 4, 8):
        path = hf_hub_download(tiny_models.SDXL_LIGHTNING_REPO, lightning_unet_file(steps), cache_dir=hub)
        states.append(load_file(path))
        assert all(t.dtype == torch.float16 for t in states[-1].values())
        unet.load_state_dict(states[-1], strict=True)
    name = "conv_in.weight"
    assert not torch.equal(states[0][name], states[1][name])


def test_safety_checker_loads(hub: Path, tmp_path: Path) -> None:
    import numpy as np
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from PIL import Image
    from transformers import CLIPImageProcessor

    repo = tiny_models.SAFETY_CHECKER_REPO
    checker = StableDiffusionSafetyChecker.from_pretrained(repo, cache_dir=hub)
    processor = CLIPImageProcessor.from_pretrained(repo, cache_dir=hub)
    image = Image.new("RGB", (64, 64), (200, 100, 50))
    clip_input = processor(images=[image], return_tensors="pt").pixel_values
    assert checker(images=np.ones((1, 64, 64, 3)), clip_input=clip_input)[1] == [False]

    tiny_models.build_safety_checker(tmp_path, flag_everything=True)
    flagging = StableDiffusionSafetyChecker.from_pretrained(tmp_path)
    assert flagging(images=np.ones((1, 64, 64, 3)), clip_input=clip_input)[1] == [True]
