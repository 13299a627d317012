"""The real inference engine: HuggingFace diffusers pipelines on one device.

Importing this module imports torch and diffusers (seconds); the gateway never does.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Quiet the libraries' progress bars and the "no torchvision" notices before they are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoPipelineForText2Image, DiffusionPipeline

from t2i_common.config import ConfigError
from t2i_common.errors import BadRequest, InternalError
from t2i_common.schemas import TextToImageRequest

from . import model_files
from .demo_model import DEMO_MODEL_ID, ensure_demo_model
from .engine import GeneratedImage, Generation, GenerationCancelled, ModelUnavailable, OutOfMemory
from .models import (
    SAFETY_CHECKER_ID,
    SDXL_BASE_ID,
    SDXL_LIGHTNING_REPO,
    ModelProfile,
    ModelSpec,
    dtype_for,
    lightning_unet_file,
    profile_for,
)

logger = logging.getLogger(__name__)
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()


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
        safety_checker: str | None = SAFETY_CHECKER_ID,
        max_loaded_models: int = 2,
        threads: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self._specs = {spec.model_id: spec for spec in specs}
        self._cache_dir = cache_dir
        self._max_loaded = max_loaded_models
        self._loaded: OrderedDict[str, _LoadedModel] = OrderedDict()  # least recently used first
        self._loaded_ids: tuple[str, ...] = ()
        self._shared_safety_source = safety_checker
        self._shared_safety: tuple[Any, Any] | None = None
        # Models that ship their own checker, known from their files before they are loaded.
        self._own_checker = {spec.model_id for spec in specs if self._ships_safety_checker(spec)}
        if threads:
            torch.set_num_threads(threads)

    def loaded_models(self) -> tuple[str, ...]:
        return self._loaded_ids

    def start(self) -> None:
        """Load the shared safety checker when some model lacks its own, before the node says it is ready."""
        if self._shared_safety_source is None or self._own_checker >= set(self._specs):
            return
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        source = self._shared_safety_source
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(source).to(self.device)
            extractor = CLIPImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(
                f"The safety checker {source} could not be loaded ({_first_line(exc)}). Get it with: hf download "
                f"{SAFETY_CHECKER_ID} (into {model_files.hub_cache()}), or give its folder with --safety-checker, "
                "or run without one (--safety-checker none)."
            ) from exc
        self._shared_safety = (checker, extractor)

    def check(self, request: TextToImageRequest, model_id: str) -> None:
        profile_for(self._specs[model_id]).check(request, model_id)
        if request.safety_check and not self._has_safety_checker(model_id):
            raise BadRequest(
                f"This node has no safety checker for {model_id} (it runs with --safety-checker none); "
                "send safety_check=false, or send the request to another node."
            )

    def load(self, model_id: str) -> bool:
        if model_id in self._loaded:
            self._loaded.move_to_end(model_id)
            return False
        spec = self._specs[model_id]
        profile = profile_for(spec)
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

    def batch_key(self, generation: Generation) -> Hashable | None:
        request, spec = generation.request, self._specs[generation.model_id]
        profile = profile_for(spec)
        return (
            generation.model_id,
            request.width,
            request.height,
            profile.steps_for(request),
            profile.guidance_for(request),
            request.loras,
            profile.negative_prompt and bool(request.negative_prompt),
            self._checks_safety(request, generation.model_id),
        )

    def generate(
        self,
        request: TextToImageRequest,
        model_id: str,
        seed: int,
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[GeneratedImage]:
        [images] = self.generate_batch([Generation(request, model_id, seed)], should_stop, on_step)
        return images

    def generate_batch(
        self,
        generations: Sequence[Generation],
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[list[GeneratedImage]]:
        if should_stop():
            raise GenerationCancelled()
        first = generations[0]
        for generation in generations:
            self.check(generation.request, generation.model_id)
        self.load(first.model_id)
        model = self._loaded[first.model_id]
        profile = model.profile
        steps = profile.steps_for(first.request)

        def after_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if should_stop():
                raise GenerationCancelled()
            if on_step:
                on_step(step + 1, steps)
            return tensors

        # One prompt per image, so that requests with several images and several requests share the call;
        # one CPU generator per image: image i of a request depends only on its seed + i, on any device.
        counts = [generation.request.num_images_per_prompt for generation in generations]
        kwargs: dict[str, Any] = dict(
            prompt=[g.request.prompt for g, n in zip(generations, counts) for _ in range(n)],
            width=first.request.width,
            height=first.request.height,
            num_inference_steps=steps,
            guidance_scale=profile.guidance_for(first.request),
            generator=[torch.Generator("cpu").manual_seed(g.seed + i) for g, n in zip(generations, counts) for i in range(n)],
            callback_on_step_end=after_step,
        )
        if profile.negative_prompt and first.request.negative_prompt:
            kwargs["negative_prompt"] = [g.request.negative_prompt for g, n in zip(generations, counts) for _ in range(n)]
        check_safety = self._checks_safety(first.request, first.model_id)
        with self._device_errors(f"generating with {first.model_id}"), self._loras(model.pipe, first.request.loras):
            try:
                images = model.pipe(**kwargs).images
            finally:
                _restore_vae_dtype(model.pipe)
            nsfw = self._safety_flags(model, images) if check_safety else [False] * len(images)
        results, start = [], 0
        for generation, n in zip(generations, counts):
            results.append([GeneratedImage(images[start + i], generation.seed + i, nsfw[start + i]) for i in range(n)])
            start += n
        return results

    def _checks_safety(self, request: TextToImageRequest, model_id: str) -> bool:
        return self._has_safety_checker(model_id) if request.safety_check is None else request.safety_check

    # -- loading -------------------------------------------------------------------------------

    def _load_pipeline(self, spec: ModelSpec, profile: ModelProfile) -> DiffusionPipeline:
        dtype = getattr(torch, dtype_for(spec, self.device))
        try:
            if profile.loader == "sdxl-lightning":
                pipe = self._load_sdxl_lightning(spec, profile, dtype)
            else:
                demo = spec.model_id == DEMO_MODEL_ID and not spec.path
                files = model_files.locate(spec, self.device, source=ensure_demo_model(self._cache_dir) if demo else None)
                pipe = AutoPipelineForText2Image.from_pretrained(files.source, dtype=dtype, variant=files.variant)
        except (OSError, ValueError) as exc:  # diffusers' and huggingface_hub's ways of saying "files missing"
            where = f"in {spec.path}" if spec.path else f"in the Hugging Face cache {model_files.hub_cache()}"
            raise ModelUnavailable(
                f"Model {spec.model_id} could not be loaded from its files {where}: {_first_line(exc)}. "
                f"Get it with: {model_files.how_to_get(spec, profile.fixed_steps if profile.loader == 'sdxl-lightning' else None)}."
            ) from exc
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

    def _load_sdxl_lightning(self, spec: ModelSpec, profile: ModelProfile, dtype: torch.dtype) -> DiffusionPipeline:
        """SDXL base with ByteDance's n-step Lightning UNet and a trailing Euler scheduler.

        The UNet is built on the meta device and takes the file's tensors as they are, so no
        random full-size UNet is ever made; the base's own UNet weights are never read.
        """
        from accelerate import init_empty_weights
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        base = model_files.locate(spec, self.device, source=spec.path or SDXL_BASE_ID)
        # A Lightning family's default steps are its fixed steps (the models file may not change them).
        unet_file = spec.unet_path or hf_hub_download(SDXL_LIGHTNING_REPO, lightning_unet_file(profile.default_steps))
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base.source, subfolder="unet"))
        unet.load_state_dict(load_file(unet_file), strict=True, assign=True)
        pipe = StableDiffusionXLPipeline.from_pretrained(base.source, unet=unet.to(dtype), dtype=dtype, variant=base.variant)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        return pipe

    def _ships_safety_checker(self, spec: ModelSpec) -> bool:
        if spec.model_id == DEMO_MODEL_ID and not spec.path:
            return True  # built with one
        if profile_for(spec).loader == "sdxl-lightning":
            return False
        folder = Path(spec.path) if spec.path else model_files.cached_snapshot(spec.model_id)
        return folder is not None and model_files.ships_safety_checker(folder)

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
        """Apply the request's LoRAs (local folders, found by the node beforehand) for this request only."""
        if not loras:
            yield
            return
        if not hasattr(pipe, "load_lora_weights"):
            raise BadRequest(f"This model ({type(pipe).__name__}) does not support LoRAs.")
        names: list[str] = []
        try:
            for index, (folder, _) in enumerate(loras):
                try:
                    pipe.load_lora_weights(folder, adapter_name=f"request_{index}", use_safetensors=True)
                except Exception as exc:  # diffusers raises many kinds here; all mean "cannot load it"
                    raise BadRequest(f"LoRA {Path(folder).name!r} could not be loaded into {type(pipe).__name__}: {exc}") from exc
                names.append(f"request_{index}")
            pipe.set_adapters(names, adapter_weights=[weight for _, weight in loras])
            yield
        finally:
            if names:
                pipe.unload_lora_weights()

    def _has_safety_checker(self, model_id: str) -> bool:
        return model_id in self._own_checker or self._shared_safety_source is not None

    def _safety_flags(self, model: _LoadedModel, images: list[Any]) -> list[bool]:
        safety = model.safety or self._shared_safety
        if safety is None:  # start() loads the shared one before the node is ready; check() refuses without one
            raise InternalError("The safety checker is not loaded on this node.")
        checker, extractor = safety
        clip_input = extractor(images, return_tensors="pt").pixel_values.to(self.device, checker.dtype)
        # The checker blacks out flagged arrays in place; it gets copies, we only keep the flags.
        _, flags = checker(clip_input=clip_input, images=[np.array(image) for image in images])
        return [bool(flag) for flag in flags]

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


def _restore_vae_dtype(pipe: Any) -> None:
    """SDXL pipelines upcast a float16 VAE to float32 for decoding and cast it back afterwards; an error
    in between (out of memory while decoding) would leave it float32 and break every later request."""
    vae = getattr(pipe, "vae", None)
    if vae is not None and vae.dtype != pipe.dtype:
        vae.to(dtype=pipe.dtype)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
