"""Which models a node offers (the models file) and how each family of model must be driven.

The models file has the shape of Livepeer's ``aiModels.json``: a JSON list of objects such as
``{"pipeline": "text-to-image", "model_id": "stabilityai/sd-turbo", "warm": true}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate

from t2i_common.config import ConfigError

from .demo_model import DEMO_MODEL_ID

PIPELINE = "text-to-image"
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


class _ModelSpecSchema(Schema):
    class Meta:
        unknown = RAISE

    pipeline = fields.String(required=True, validate=validate.Equal(PIPELINE, error="Only 'text-to-image' is served."))
    model_id = fields.String(required=True, validate=validate.Length(min=1, max=256))
    warm = fields.Boolean(load_default=False)
    capacity = fields.Integer(strict=True, load_default=1, validate=validate.Range(min=1, max=64))
    path = fields.String(load_default=None)
    dtype = fields.String(load_default=None, validate=validate.OneOf(DTYPES))
    optimization_flags = fields.Dict(
        keys=fields.String(validate=validate.OneOf(OPTIMIZATION_FLAGS)), values=fields.Boolean(), load_default=dict
    )
    # Livepeer's pricing fields are accepted so that an existing aiModels.json loads; they have no effect here.
    price_per_unit = fields.Raw(load_default=None)
    pixels_per_unit = fields.Raw(load_default=None)
    currency = fields.Raw(load_default=None)

    @post_load
    def _to_spec(self, data: dict[str, Any], **_: Any) -> ModelSpec:
        flags = frozenset(name for name, on in data.pop("optimization_flags").items() if on)
        for unused in ("price_per_unit", "pixels_per_unit", "currency"):
            data.pop(unused)
        return ModelSpec(**data, optimization_flags=flags)


def load_models_file(path: Path) -> list[ModelSpec]:
    """Read and check a models file; every problem is a ``ConfigError`` naming the entry and field."""
    try:
        entries = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read models file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"models file {path} is not valid JSON: {exc}") from None
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


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """How a family of models must be driven; what Livepeer's runner special-cases, in one table."""

    default_steps: int = 25
    default_guidance: float = 7.5
    fixed_guidance: float | None = None  # distilled models ignore guidance: always use this value
    fixed_steps: int | None = None  # a Lightning UNet is distilled for exactly this many steps
    dtype: str | None = None  # forced dtype on CUDA (FLUX needs bfloat16)
    negative_prompt: bool = True
    loader: str = "auto"  # "auto" (AutoPipelineForText2Image) or "sdxl-lightning"


def _lightning(steps: int) -> ModelProfile:
    return ModelProfile(default_steps=steps, fixed_steps=steps, fixed_guidance=0.0, loader="sdxl-lightning")


# First match wins. Patterns match the whole model id.
PROFILES: tuple[tuple[str, ModelProfile], ...] = (
    # The demo model behaves like a turbo model: a request naming only the prompt and size is fast.
    (re.escape(DEMO_MODEL_ID), ModelProfile(default_steps=2, default_guidance=0.0)),
    (r"stabilityai/sd(xl)?-turbo", ModelProfile(default_steps=1, fixed_guidance=0.0)),
    (r"ByteDance/SDXL-Lightning-2step", _lightning(2)),
    (r"ByteDance/SDXL-Lightning-4step", _lightning(4)),
    (r"ByteDance/SDXL-Lightning(-8step)?", _lightning(8)),
    (r".*Lightning.*", ModelProfile(default_steps=6, default_guidance=1.5)),  # e.g. RealVisXL_V4.0_Lightning
    (r"black-forest-labs/FLUX\.1-schnell", ModelProfile(default_steps=4, fixed_guidance=0.0, dtype="bfloat16", negative_prompt=False)),
    (r"black-forest-labs/FLUX\.1-dev", ModelProfile(default_steps=28, default_guidance=3.5, dtype="bfloat16", negative_prompt=False)),
)
DEFAULT_PROFILE = ModelProfile()


def profile_for(model_id: str) -> ModelProfile:
    for pattern, profile in PROFILES:
        if re.fullmatch(pattern, model_id):
            return profile
    return DEFAULT_PROFILE
