"""Which models a node offers (the models file) and how each family of model must be driven.

The models file has the shape of Livepeer's ``aiModels.json``: a JSON list of objects such as
``{"pipeline": "text-to-image", "model_id": "stabilityai/sd-turbo", "warm": true}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate

from t2i_common.config import ConfigError
from t2i_common.errors import BadRequest
from t2i_common.schemas import StrictBoolean, TextToImageRequest

from .demo_model import DEMO_MODEL_ID

PIPELINE = "text-to-image"
# Repositories the node's loaders know by name.
SDXL_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
SAFETY_CHECKER_ID = "CompVis/stable-diffusion-safety-checker"


def lightning_unet_file(steps: int) -> str:
    """The file in ``SDXL_LIGHTNING_REPO`` holding the ``steps``-step UNet (diffusers format)."""
    return f"sdxl_lightning_{steps}step_unet.safetensors"


DTYPES = ("float16", "bfloat16", "float32")
# Optimisation switches a models file may set, as in Livepeer's optimization_flags.
OPTIMIZATION_FLAGS = ("TORCH_COMPILE", "BFLOAT16", "ATTENTION_SLICING", "VAE_TILING")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model a node offers."""

    model_id: str
    warm: bool = False
    pipeline: str = PIPELINE
    capacity: int = 1
    path: str | None = None  # a local diffusers folder; else the id is looked up in the Hugging Face cache
    dtype: str | None = None  # None: the model family's, else float16 on CUDA and float32 on CPU
    optimization_flags: frozenset[str] = frozenset()
    variant: str | None = None  # weight files to load, e.g. "fp16"; None: found from the files present
    unet_path: str | None = None  # SDXL-Lightning: the Lightning UNet file (then "path" is the SDXL base folder)
    family: str | None = None  # whose rules apply (see FAMILIES); None: matched from the model id
    default_steps: int | None = None  # overrides the family's
    default_guidance: float | None = None  # overrides the family's


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """How a family of models must be driven; what Livepeer's runner special-cases, in one table."""

    default_steps: int = 25
    default_guidance: float = 7.5
    fixed_guidance: float | None = None  # distilled models ignore guidance: always use this value
    fixed_steps: int | None = None  # a Lightning UNet is distilled for exactly this many steps
    dtype: str | None = None  # forced dtype on CUDA (FLUX needs bfloat16)
    negative_prompt: bool = True
    loader: str = "auto"  # "auto" (AutoPipelineForText2Image) or "sdxl-lightning" (SDXL base + Lightning UNet)

    def steps_for(self, request: TextToImageRequest) -> int:
        return request.num_inference_steps or self.default_steps

    def guidance_for(self, request: TextToImageRequest) -> float:
        if self.fixed_guidance is not None:
            return self.fixed_guidance
        return self.default_guidance if request.guidance_scale is None else request.guidance_scale

    def check(self, request: TextToImageRequest, model_id: str) -> None:
        """Refuse what the family cannot do (a 400), before anything is queued or loaded."""
        steps = self.steps_for(request)
        if self.fixed_steps and steps != self.fixed_steps:
            raise BadRequest(
                f"{model_id} is distilled for exactly {self.fixed_steps} steps, got num_inference_steps={steps}; "
                "leave it out or pick the model variant for that many steps."
            )


def _lightning(steps: int) -> ModelProfile:
    return ModelProfile(default_steps=steps, fixed_steps=steps, fixed_guidance=0.0, loader="sdxl-lightning")


# The families a models file may name with "family"; their rules are those of the real models.
FAMILIES: dict[str, ModelProfile] = {
    "default": ModelProfile(),  # any other diffusers text-to-image model (SD 1.x, 2.x, SDXL, ...)
    "demo": ModelProfile(default_steps=2, default_guidance=0.0),  # fast when a request names only prompt and size
    "turbo": ModelProfile(default_steps=1, fixed_guidance=0.0),  # sd-turbo, sdxl-turbo and their fine-tunes
    "sdxl-lightning-2step": _lightning(2),
    "sdxl-lightning-4step": _lightning(4),
    "sdxl-lightning-8step": _lightning(8),
    "lightning": ModelProfile(default_steps=6, default_guidance=1.5),  # full Lightning fine-tunes (RealVisXL_V4.0_Lightning)
    "flux-schnell": ModelProfile(default_steps=4, fixed_guidance=0.0, dtype="bfloat16", negative_prompt=False),
    "flux-dev": ModelProfile(default_steps=28, default_guidance=3.5, dtype="bfloat16", negative_prompt=False),
}

# A model without a "family" key gets the first family whose pattern matches its whole id.
FAMILY_PATTERNS: tuple[tuple[str, str], ...] = (
    (re.escape(DEMO_MODEL_ID), "demo"),
    (r"stabilityai/sd(xl)?-turbo", "turbo"),
    (r"ByteDance/SDXL-Lightning-2step", "sdxl-lightning-2step"),
    (r"ByteDance/SDXL-Lightning-4step", "sdxl-lightning-4step"),
    (r"ByteDance/SDXL-Lightning(-8step)?", "sdxl-lightning-8step"),
    (r".*Lightning.*", "lightning"),
    (r"black-forest-labs/FLUX\.1-schnell", "flux-schnell"),
    (r"black-forest-labs/FLUX\.1-dev", "flux-dev"),
)


def family_of(spec: ModelSpec) -> str:
    if spec.family:
        return spec.family
    return next((family for pattern, family in FAMILY_PATTERNS if re.fullmatch(pattern, spec.model_id)), "default")


def profile_for(spec: ModelSpec) -> ModelProfile:
    """The family's rules, with the models file's own defaults on top."""
    profile = FAMILIES[family_of(spec)]
    if spec.default_steps is not None:
        profile = replace(profile, default_steps=spec.default_steps)
    if spec.default_guidance is not None:
        profile = replace(profile, default_guidance=spec.default_guidance)
    return profile


def dtype_for(spec: ModelSpec, device: str) -> str:
    """The torch dtype (by name) a model runs in on ``device``."""
    if not device.startswith("cuda"):
        return "float32"  # half precision is slow or unsupported on CPUs; half-precision files are upcast
    if spec.dtype:
        return spec.dtype
    if "BFLOAT16" in spec.optimization_flags or profile_for(spec).dtype == "bfloat16":
        return "bfloat16"
    return "float16"


class _ModelSpecSchema(Schema):
    class Meta:
        unknown = RAISE

    pipeline = fields.String(required=True, validate=validate.Equal(PIPELINE, error="Only 'text-to-image' is served."))
    model_id = fields.String(required=True, validate=validate.Length(min=1, max=256))
    warm = StrictBoolean(load_default=False)
    capacity = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=1, max=64))
    path = fields.String(load_default=None)
    dtype = fields.String(load_default=None, validate=validate.OneOf(DTYPES))
    optimization_flags = fields.Dict(
        keys=fields.String(validate=validate.OneOf(OPTIMIZATION_FLAGS)), values=StrictBoolean(), load_default=dict
    )
    # Livepeer's pricing fields are accepted so that an existing aiModels.json loads; they have no effect here.
    variant = fields.String(load_default=None, validate=validate.Regexp(r"[\w-]+\Z", error="Must be a name such as 'fp16'."))
    unet_path = fields.String(load_default=None)
    family = fields.String(load_default=None, validate=validate.OneOf(FAMILIES))
    default_steps = fields.Integer(strict=True, load_default=None, validate=validate.Range(min=1, max=1000))
    default_guidance = fields.Float(load_default=None, validate=validate.Range(min=0.0, max=100.0))
    price_per_unit = fields.Raw(load_default=None)
    pixels_per_unit = fields.Raw(load_default=None)
    currency = fields.Raw(load_default=None)

    @post_load
    def _to_spec(self, data: dict[str, Any], **_: Any) -> ModelSpec:
        flags = frozenset(name for name, on in data.pop("optimization_flags").items() if on)
        for unused in ("price_per_unit", "pixels_per_unit", "currency"):
            data.pop(unused)
        spec = ModelSpec(**data, optimization_flags=flags)
        profile = profile_for(spec)
        if profile.fixed_steps and profile.default_steps != profile.fixed_steps:
            raise ValidationError(f"The family {family_of(spec)} runs exactly {profile.fixed_steps} steps.", "default_steps")
        if spec.unet_path and profile.loader != "sdxl-lightning":
            raise ValidationError("Only SDXL-Lightning models (family sdxl-lightning-Nstep) take a separate UNet file.", "unet_path")
        return spec


def load_models_file(path: Path) -> list[ModelSpec]:
    """Read and check a models file; every problem is a ``ConfigError`` naming the entry and field."""
    try:
        entries = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read models file {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"models file {path} is not valid JSON: {exc or 'nested too deeply'}") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"models file {path} must be a non-empty JSON list of model objects")
    schema = _ModelSpecSchema()
    specs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"models file {path}, entry {index}: must be an object, got {entry!r}")
        try:
            specs.append(schema.load(entry))
        except ValidationError as exc:
            raise ConfigError(f"models file {path}, entry {index}: {exc.normalized_messages()}") from None
    return check_unique(specs, str(path))


def check_unique(specs: list[ModelSpec], source: str) -> list[ModelSpec]:
    seen: set[str] = set()
    for spec in specs:
        if spec.model_id in seen:
            raise ConfigError(f"{source}: model {spec.model_id!r} is listed twice")
        seen.add(spec.model_id)
    return specs
