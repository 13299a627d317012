"""The real inference engine: HuggingFace diffusers pipelines on one device.

Importing this module imports torch and diffusers (seconds); the gateway never does.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Quiet the libraries' progress bars and the "no torchvision" notices before they are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import torch
import diffusers
import transformers
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from t2i_common.config import ConfigError
from t2i_common.errors import BadRequest, InternalError
from t2i_common.schemas import TextToImageRequest

from .demo_model import DEMO_MODEL_ID, ensure_demo_model
from .engine import GeneratedImage, GenerationCancelled, OutOfMemory
from .models import ModelProfile, ModelSpec, profile_for

logger = logging.getLogger(__name__)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

SAFETY_CHECKER_ID = "CompVis/stable-diffusion-safety-checker"
SAFETY_FEATURE_EXTRACTOR_ID = "openai/clip-vit-base-patch32"
SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"
_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_device(name: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``; a missing GPU is a ConfigError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible to this process")
    if match.group(1) and int(match.group(1)) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name


@dataclass
class _LoadedModel:
    pipe: DiffusionPipeline
    profile: ModelProfile
    safety: tuple[Any, Any] | None  # (checker, feature extractor) shipped with the model, if any


class DiffusersEngine:
    """Loads pipelines through diffusers' own loaders and runs them; see ``InferenceEngine``."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        *,
        device: str = "auto",
        cache_dir: Path,
        lora_dir: Path | None = None,
        max_loaded_models: int = 2,
        threads: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self._specs = {spec.model_id: spec for spec in specs}
        self._cache_dir = cache_dir
        self._lora_dir = lora_dir.resolve() if lora_dir else None
        self._max_loaded = max_loaded_models
        self._loaded: OrderedDict[str, _LoadedModel] = OrderedDict()  # least recently used first
        self._loaded_ids: tuple[str, ...] = ()
        self._shared_safety: tuple[Any, Any] | None = None
        if threads:
            torch.set_num_threads(threads)

    def loaded_models(self) -> tuple[str, ...]:
        return self._loaded_ids

    def load(self, model_id: str) -> bool:
        if model_id in self._loaded:
            self._loaded.move_to_end(model_id)
            return False
        spec = self._specs[model_id]
        profile = profile_for(model_id)
        with self._device_errors(f"loading {model_id}"):
            pipe = self._load_pipeline(spec, profile)
        # The checker only flags images here (as Livepeer's runner does): take it out of the pipeline,
        # which would otherwise black out flagged images, and run it ourselves.
        safety = None
        if getattr(pipe, "safety_checker", None) is not None:
            safety = (pipe.safety_checker, pipe.feature_extractor)
            pipe.safety_checker = None
        pipe.set_progress_bar_config(disable=True)
        self._loaded[model_id] = _LoadedModel(pipe, profile, safety)
        self._evict(keep=model_id)
        return True

    def unload_all(self) -> None:
        self._loaded.clear()
        self._loaded_ids = ()
        self._free_device_cache()

    def generate(
        self,
        request: TextToImageRequest,
        model_id: str,
        seed: int,
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[GeneratedImage]:
        if should_stop():
            raise GenerationCancelled()
        self.load(model_id)
        model = self._loaded[model_id]
        profile = model.profile
        steps = request.num_inference_steps or profile.default_steps
        if profile.fixed_steps and steps != profile.fixed_steps:
            raise BadRequest(
                f"{model_id} is distilled for exactly {profile.fixed_steps} steps, got num_inference_steps={steps}; "
                "leave it out or pick the model variant for that many steps."
            )
        guidance = profile.fixed_guidance if profile.fixed_guidance is not None else request.guidance_scale
        if guidance is None:
            guidance = profile.default_guidance
        n = request.num_images_per_prompt

        def after_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if should_stop():
                raise GenerationCancelled()
            if on_step:
                on_step(step + 1, steps)
            return tensors

        kwargs: dict[str, Any] = dict(
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            # One CPU generator per image: image i depends only on seed + i, on any device.
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
            callback_on_step_end=after_step,
        )
        if profile.negative_prompt and request.negative_prompt:
            kwargs["negative_prompt"] = request.negative_prompt
        with self._device_errors(f"generating with {model_id}"), self._loras(model.pipe, request.loras):
            images = model.pipe(**kwargs).images
            nsfw = self._safety_flags(model, images) if request.safety_check else [False] * n
        return [GeneratedImage(_encode_png(image), seed + i, flag) for i, (image, flag) in enumerate(zip(images, nsfw))]

    # -- loading -------------------------------------------------------------------------------

    def _load_pipeline(self, spec: ModelSpec, profile: ModelProfile) -> DiffusionPipeline:
        dtype = self._dtype(spec, profile)
        if profile.loader == "sdxl-lightning":
            pipe = _load_sdxl_lightning(profile.default_steps, dtype, self.device)
        else:
            source: str | Path = spec.path or spec.model_id
            if spec.model_id == DEMO_MODEL_ID and not spec.path:
                source = ensure_demo_model(self._cache_dir)
            pipe = AutoPipelineForText2Image.from_pretrained(source, dtype=dtype)
        flags = spec.optimization_flags
        if "ATTENTION_SLICING" in flags:
            pipe.enable_attention_slicing()
        if "VAE_TILING" in flags and hasattr(pipe, "vae"):
            pipe.vae.enable_tiling()
        pipe.to(self.device)
        if "TORCH_COMPILE" in flags:
            for name in ("unet", "transformer"):
                if getattr(pipe, name, None) is not None:
                    setattr(pipe, name, torch.compile(getattr(pipe, name)))
        return pipe

    def _dtype(self, spec: ModelSpec, profile: ModelProfile) -> torch.dtype:
        if self.device == "cpu":
            return torch.float32  # half precision is slow or unsupported on CPUs
        if spec.dtype:
            return getattr(torch, spec.dtype)
        if "BFLOAT16" in spec.optimization_flags or profile.dtype == "bfloat16":
            return torch.bfloat16
        return torch.float16

    def _evict(self, keep: str) -> None:
        """Drop least recently used on-demand models beyond the limit; warm models stay."""
        while len(self._loaded) > self._max_loaded:
            victim = next((m for m in self._loaded if m != keep and not self._specs[m].warm), None)
            if victim is None:
                break
            logger.info("evicting model %s (least recently used)", victim)
            del self._loaded[victim]
            self._free_device_cache()
        self._loaded_ids = tuple(self._loaded)

    # -- per request ---------------------------------------------------------------------------

    @contextmanager
    def _loras(self, pipe: DiffusionPipeline, loras: Sequence[tuple[str, float]]) -> Iterator[None]:
        """Apply the request's LoRAs for this request only; the next request gets the bare model."""
        if not loras:
            yield
            return
        if not hasattr(pipe, "load_lora_weights"):
            raise BadRequest(f"This model ({type(pipe).__name__}) does not support LoRAs.")
        names: list[str] = []
        try:
            for index, (lora_id, _) in enumerate(loras):
                source = self._lora_source(lora_id)
                try:
                    pipe.load_lora_weights(source, adapter_name=f"request_{index}", use_safetensors=True)
                except Exception as exc:  # diffusers raises many kinds here; all mean "cannot load it"
                    raise BadRequest(f"LoRA {lora_id!r} could not be loaded: {exc}") from exc
                names.append(f"request_{index}")
            pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
            yield
        finally:
            if names:
                pipe.unload_lora_weights()

    def _lora_source(self, lora_id: str) -> str:
        """A name in the node's LoRA folder, else a Hugging Face repo id (never a client-chosen path)."""
        if self._lora_dir is not None:
            candidate = (self._lora_dir / lora_id).resolve()
            if candidate.is_relative_to(self._lora_dir) and candidate.is_dir():
                return str(candidate)
        if _HUB_REPO_ID.fullmatch(lora_id) and ".." not in lora_id:
            return lora_id
        raise BadRequest(f"LoRA {lora_id!r} could not be loaded: it is not in this node's LoRA folder nor a Hugging Face repo id.")

    def _safety_flags(self, model: _LoadedModel, images: list[Any]) -> list[bool]:
        checker, extractor = model.safety or self._shared_safety_checker()
        clip_input = extractor(images, return_tensors="pt").pixel_values.to(self.device, checker.dtype)
        # The checker blacks out flagged arrays in place; it gets copies, we only keep the flags.
        _, flags = checker(clip_input=clip_input, images=[np.array(image) for image in images])
        return [bool(flag) for flag in flags]

    def _shared_safety_checker(self) -> tuple[Any, Any]:
        """CompVis's checker, for models that do not ship one; loaded on first use."""
        if self._shared_safety is None:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessor

            try:
                checker = StableDiffusionSafetyChecker.from_pretrained(SAFETY_CHECKER_ID).to(self.device)
                extractor = CLIPImageProcessor.from_pretrained(SAFETY_FEATURE_EXTRACTOR_ID)
            except OSError as exc:
                raise InternalError(
                    f"The safety checker {SAFETY_CHECKER_ID} could not be loaded on this node ({exc}); "
                    "send safety_check=false to skip it."
                ) from exc
            self._shared_safety = (checker, extractor)
        return self._shared_safety

    @contextmanager
    def _device_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except torch.cuda.OutOfMemoryError as exc:
            self._free_device_cache()
            raise OutOfMemory(
                f"Out of GPU memory while {doing}; try fewer or smaller images. The node freed its cache and keeps serving."
            ) from exc
        except OSError as exc:
            # Missing weights: a node problem (not the client's), so a 500 that the gateway retries elsewhere.
            raise InternalError(f"Model files could not be read while {doing}: {exc}") from exc

    def _free_device_cache(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_sdxl_lightning(steps: int, dtype: torch.dtype, device: str) -> DiffusionPipeline:
    """SDXL base with ByteDance's n-step Lightning UNet and a trailing Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_ID, subfolder="unet"))
    weights = hf_hub_download("ByteDance/SDXL-Lightning", f"sdxl_lightning_{steps}step_unet.safetensors")
    unet.load_state_dict(load_file(weights, device=device))
    pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_BASE_ID, unet=unet.to(dtype), dtype=dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe
