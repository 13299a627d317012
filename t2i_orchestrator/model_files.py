"""Where a model's files are and which of them to load, as operators store them.

A model comes from a local diffusers folder (the models file's ``path``) or, by its id, from the
Hugging Face cache (``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), as ``hf download``
and Livepeer's download script leave it. Caches often hold only the half-precision weights
(``*.fp16.safetensors``); those are found here without configuration, as Livepeer's runner does.
No torch here: this module only looks at files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from .models import SDXL_BASE_ID, SDXL_LIGHTNING_REPO, ModelSpec, lightning_unet_file

_WEIGHTS = re.compile(r".+\.(safetensors|bin)")
# "model.fp16.safetensors", "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"
_VARIANT = re.compile(r"[^.]+\.(?P<variant>[\w-]+?)(-\d+-of-\d+)?\.(safetensors|bin)")


@dataclass(frozen=True, slots=True)
class ModelFiles:
    source: str  # what diffusers' from_pretrained is given: a local folder, or a repository id
    variant: str | None  # the weight files to load ("fp16"), None for the plain ones


def hub_cache() -> Path:
    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The repository's folder in the Hugging Face cache, or None when it is not there."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def locate(spec: ModelSpec, device: str, *, source: str | Path | None = None) -> ModelFiles:
    """The files of ``spec`` (or of ``source``, a folder or id that stands in for it) and the variant to load."""
    source = str(source or spec.path or spec.model_id)
    folder = Path(source) if Path(source).is_dir() else cached_snapshot(source)
    variant = spec.variant or (pick_variant(folder, device) if folder else None)
    return ModelFiles(source, variant)


def pick_variant(folder: Path, device: str) -> str | None:
    """ "fp16" when the folder has half-precision weights and either a GPU takes them or nothing else is there."""
    names = [path.name for path in folder.rglob("*") if _WEIGHTS.fullmatch(path.name)]
    variants = {match["variant"] for name in names if (match := _VARIANT.fullmatch(name))}
    plain = any(not _VARIANT.fullmatch(name) for name in names)
    if "fp16" in variants and (device.startswith("cuda") or not plain):
        return "fp16"  # on a CPU, loaded in float32 (upcast)
    return None


def ships_safety_checker(folder: Path) -> bool:
    """Whether the pipeline in ``folder`` has its own safety checker (SD 1.x does; turbo, SDXL, FLUX do not)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    entry = index.get("safety_checker")
    return isinstance(entry, list) and entry[0] is not None


def how_to_get(spec: ModelSpec, steps: int | None = None) -> str:
    """What an operator runs to get a model's files, for the error that says they are missing."""
    include = "--include '*.fp16.safetensors' --include '*.json' --include '*.txt'"  # what Livepeer's download script fetches
    if steps:  # SDXL-Lightning: the SDXL base plus one UNet file
        return (
            f"hf download {SDXL_BASE_ID} {include} && hf download {SDXL_LIGHTNING_REPO} "
            f"{lightning_unet_file(steps)} (into the Hugging Face cache, {hub_cache()}), "
            'or give the SDXL base folder as "path" and the UNet file as "unet_path" in the models file'
        )
    return (
        f"hf download {spec.model_id} (into the Hugging Face cache, {hub_cache()}; add {include} for the "
        'half-precision files only), or give a local diffusers folder as "path" in the models file'
    )
