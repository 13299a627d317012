from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub, and several torch processes share two cores.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the built demo model (built once per test session)."""
    from t2i_orchestrator.demo_model import ensure_demo_model

    cache = tmp_path_factory.mktemp("t2i-cache")
    ensure_demo_model(cache)
    return cache


@pytest.fixture(scope="session")
def demo_model_path(model_cache: Path) -> Path:
    from t2i_orchestrator.demo_model import demo_model_dir

    return demo_model_dir(model_cache)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, demo_model_path: Path) -> Path:
    """A folder of LoRAs for the demo model: ``tiny-style`` (random, strong enough to change images)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(demo_model_path, local_files_only=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # peft starts lora_B at zero, which would change nothing: fill it with noise.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(folder / "tiny-style", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder


@pytest.fixture(scope="session")
def nsfw_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with a safety checker that flags every image."""
    from t2i_orchestrator.demo_model import build_demo_model

    folder = tmp_path_factory.mktemp("tiny-nsfw")
    build_demo_model(folder, flag_everything=True)
    return folder
