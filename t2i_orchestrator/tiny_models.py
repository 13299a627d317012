"""Tiny random-weight stand-ins for every real architecture the node serves, in a Hugging Face hub cache.

Tests and demos must exercise the node's REAL loading code (hub ids, ``variant="fp16"``, the
SDXL-Lightning UNet swap, FLUX's two text encoders) without network access and without gigabytes of
weights. So this module builds each architecture from tiny configs with seeded random weights
(a few MB each, a few seconds in all) and places the folders in a standard hub cache
(``models--{org}--{name}/{refs,snapshots,blobs}``) under the real repository ids. With
``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing there, unchanged ``from_pretrained(repo_id)`` and
``hf_hub_download(repo_id, filename)`` calls find them exactly as they would find real weights in an
operator's cache. The pictures are noise-like; only shapes, classes and file layouts are real.

torch, diffusers and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import math
import os
import re
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .demo_model import _CORPUS, _train_tokenizer, tiny_safety_checker
from .models import SAFETY_CHECKER_ID, SDXL_BASE_ID, SDXL_LIGHTNING_REPO, lightning_unet_file

# Bump when any recipe below changes, so that stale cached builds are not reused.
_RECIPE_VERSION = "1"

SD2_REPO = "stabilityai/sd-turbo"
SDXL_TURBO_REPO = "stabilityai/sdxl-turbo"
SDXL_BASE_REPO = SDXL_BASE_ID
FLUX_SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"
FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"
SAFETY_CHECKER_REPO = SAFETY_CHECKER_ID

# repo id -> what is built for it. "fp16" marks the repos that a Livepeer-style cache holds only as the
# fp16 variant (its download script fetches ``*.fp16.safetensors`` for them); the others are always full.
REPOS: dict[str, dict[str, Any]] = {
    SD2_REPO: {"builder": "sd2", "fp16": True},
    SDXL_TURBO_REPO: {"builder": "sdxl", "scheduler": "euler-ancestral-trailing", "fp16": True},
    SDXL_BASE_REPO: {"builder": "sdxl", "scheduler": "euler", "fp16": True},
    SDXL_LIGHTNING_REPO: {"builder": "sdxl-lightning", "base": SDXL_BASE_REPO, "fp16": False},
    FLUX_SCHNELL_REPO: {"builder": "flux", "guidance_embeds": False, "fp16": False},
    FLUX_DEV_REPO: {"builder": "flux", "guidance_embeds": True, "fp16": False},
    SAFETY_CHECKER_REPO: {"builder": "safety-checker", "fp16": False},
}

LIGHTNING_STEPS = (2, 4, 8)


# --------------------------------------------------------------------------------------------- shared parts


def _clip_tokenizer() -> tuple[Any, dict[str, int]]:
    from transformers import CLIPTokenizer

    vocab, merges = _train_tokenizer(_CORPUS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), vocab


def _clip_text_config(vocab: dict[str, int], *, hidden_size: int, hidden_act: str = "quick_gelu", **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        # The real end-of-text id: eos_token_id == 2 would select transformers' legacy pooling.
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **extra,
    )


def _vae(*, latent_channels: int = 4, **extra: Any) -> Any:
    """Four blocks: a scale factor of 8 as in the real models (two blocks make 256 px ~30x slower)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=[32, 32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=256,
        **extra,
    )


# The UNet both SD 2.x and SDXL build on (each adds what its family needs).
_UNET: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
)
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence save-time chatter: transformers' "Writing model shards" bars and diffusers' warning that
    ``.to(float16)`` bypasses keep-in-fp32 modules (these tiny models have none)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    verbosity = diffusers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _save(pipe: Any, out: Path, variant: str | None) -> None:
    """``save_pretrained``; with ``variant="fp16"`` cast first, so that only ``*.fp16.safetensors`` exist."""
    import torch

    with _quiet():
        if variant is not None:
            if variant != "fp16":
                raise ValueError(f"unsupported variant {variant!r} (only 'fp16')")
            pipe.to(torch.float16)
        pipe.save_pretrained(out, safe_serialization=True, variant=variant)


# ------------------------------------------------------------------------------------------------- builders


def build_sd2(out: Path, variant: str | None = None) -> None:
    """The stabilityai/sd-turbo shape (SD 2.x).

    What sets it apart from SD 1.x and what code paths may depend on: linear projections in the
    transformer blocks, per-block head dims, a wider OpenCLIP-style (gelu) text encoder, a trailing
    Euler schedule for 1-step sampling, and no safety checker at all (nulls in model_index.json).
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, vocab = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(vocab, hidden_size=64, hidden_act="gelu"))
    unet = UNet2DConditionModel(
        **_UNET,
        cross_attention_dim=64,
    )
    scheduler = EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipe, out, variant)


def build_sdxl(out: Path, variant: str | None = None, *, scheduler: str = "euler") -> None:
    """An SDXL pipeline: two CLIP text encoders (the second with projection) and text_time embeddings.

    ``scheduler="euler"`` is what stable-diffusion-xl-base-1.0 ships (leading Euler);
    ``"euler-ancestral-trailing"`` is what sdxl-turbo ships. The weights do not depend on it.
    """
    import torch
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if scheduler == "euler":
        sched = EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading")
    elif scheduler == "euler-ancestral-trailing":
        sched = EulerAncestralDiscreteScheduler(**_SD_BETAS, timestep_spacing="trailing")
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}")

    torch.manual_seed(0)
    tokenizer, vocab = _clip_tokenizer()
    tokenizer_2, _ = _clip_tokenizer()
    text_config = _clip_text_config(vocab, hidden_size=32, hidden_act="gelu", projection_dim=32)
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    unet = UNet2DConditionModel(
        **_UNET,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 time ids x 8 + the 32-wide pooled projection of text_encoder_2.
        projection_class_embeddings_input_dim=80,
        # The two encoders' hidden states are concatenated: 32 + 32.
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sched,
        force_zeros_for_empty_prompt=True,
    )
    _save(pipe, out, variant)


def build_sdxl_lightning_unets(out_dir: Path, sdxl_dir: Path) -> None:
    """The three files of ByteDance/SDXL-Lightning: full diffusers UNet state dicts in float16.

    They must fit the SDXL base's UNet config (the node builds the UNet from the base repo's config and
    loads one of these strictly), so the config is read from ``sdxl_dir/unet``. Each file has its own
    seed, so swapping step counts really changes the weights.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    config = UNet2DConditionModel.load_config(sdxl_dir, subfolder="unet")
    out_dir.mkdir(parents=True, exist_ok=True)
    for steps in LIGHTNING_STEPS:
        torch.manual_seed(1000 + steps)
        with _quiet():
            unet = UNet2DConditionModel.from_config(config).to(torch.float16)
        state = {name: tensor.contiguous() for name, tensor in unet.state_dict().items()}
        save_file(state, str(out_dir / lightning_unet_file(steps)))


def _t5_tokenizer() -> Any:
    """A tiny T5 tokenizer built in memory (a Unigram model; no sentencepiece file needed).

    T5's layout: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then pieces with log-probability scores.
    Pieces are the corpus words (with the ``▁`` word-start marker) plus single characters, so common
    prompt words are one token and other text still splits into characters. No sentinel tokens.
    """
    from transformers import T5Tokenizer  # T5TokenizerFast is the same (tokenizers-backed) class in transformers 5

    words = collections.Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", _CORPUS.lower()))
    total = sum(words.values())
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for word, count in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        pieces.append(("▁" + word, round(math.log(count / total), 4)))
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation) | {w for w in words if len(w) == 1})
    for char in chars:
        pieces.append((char, -12.0))
    first: dict[str, float] = {}
    for piece, score in pieces:
        first.setdefault(piece, score)  # a piece listed twice keeps its first score
    vocab = list(first.items())
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512), len(vocab)


def build_flux(out: Path, *, guidance_embeds: bool) -> None:
    """A FLUX.1 pipeline: CLIP + T5 text encoders, a flux transformer, a 16-channel VAE, flow matching.

    ``guidance_embeds=True`` is FLUX.1-dev (guidance distilled; dynamic shifting scheduler),
    ``False`` is FLUX.1-schnell (shift 1, no dynamic shifting). The transformer takes 2x2-packed
    16-channel latents (in_channels 64); its RoPE axes sum to the head dim, as in the real model.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer, vocab = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(vocab, hidden_size=32))
    tokenizer_2, t5_vocab_size = _t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's text_encoder_2
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    _save(pipe, out, None)


def build_safety_checker(out: Path, *, flag_everything: bool = False) -> None:
    """CompVis/stable-diffusion-safety-checker's layout: one transformers folder with the checker and its
    CLIP image processor (config.json, model.safetensors, preprocessor_config.json).

    ``flag_everything`` makes it flag every image (random weights never score above the thresholds).
    The processor is recorded as ``CLIPImageProcessor`` (transformers 5 without torchvision saves
    ``CLIPImageProcessorPil``, a name older transformers cannot load); both load it back.
    """
    import json

    import torch
    from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    checker = tiny_safety_checker(flag_everything=flag_everything)
    with _quiet():
        checker.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}).save_pretrained(out)
    path = out / "preprocessor_config.json"
    config = json.loads(path.read_text())
    if config.get("image_processor_type") == "CLIPImageProcessorPil":
        config["image_processor_type"] = "CLIPImageProcessor"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------- the hub cache


def repo_folder_name(repo_id: str) -> str:
    """huggingface_hub's folder name for a model repository: ``models--{org}--{name}``."""
    return "models--" + repo_id.replace("/", "--")


def repo_commit(repo_id: str) -> str:
    """A deterministic 40-hex "commit" for the tiny build of ``repo_id`` (changes with the recipe)."""
    return hashlib.sha1(f"t2i-tiny-models/{_RECIPE_VERSION}/{repo_id}".encode()).hexdigest()


def snapshot_dir(hub_cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a cache made by ``ensure_hub_cache``/``place_in_hub_cache``."""
    return hub_cache / repo_folder_name(repo_id) / "snapshots" / repo_commit(repo_id)


def _blob_name(data: bytes, path: Path) -> str:
    # The Hub names LFS blobs by sha256 and plain git files by their git blob sha1.
    if path.suffix in (".safetensors", ".bin"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def place_in_hub_cache(hub_cache: Path, repo_id: str, folder: Path) -> Path:
    """Copy ``folder``'s files into ``hub_cache`` as huggingface_hub lays out a downloaded repo.

    ``blobs/<hash>`` are the real files, ``snapshots/<commit>/<path>`` are relative symlinks to them
    and ``refs/main`` holds the commit, so offline ``from_pretrained(repo_id)`` resolves ``main``
    to this snapshot. Returns the snapshot path.
    """
    repo_dir = hub_cache / repo_folder_name(repo_id)
    commit = repo_commit(repo_id)
    snapshot = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = src.relative_to(folder)
        data = src.read_bytes()
        blob = blobs / _blob_name(data, src)
        if not blob.exists():
            shutil.copyfile(src, blob)
            os.chmod(blob, 0o644)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def hub_cache_dir(cache_dir: Path, *, fp16_only: bool = False) -> Path:
    """Where ``ensure_hub_cache`` puts its hub cache under ``cache_dir``."""
    return cache_dir / f"tiny-hub{'-fp16' if fp16_only else ''}-v{_RECIPE_VERSION}"


def _build_repo(repo_id: str, out: Path, *, fp16_only: bool, built: dict[str, Path]) -> None:
    spec = REPOS[repo_id]
    variant = "fp16" if fp16_only and spec["fp16"] else None
    kind = spec["builder"]
    if kind == "sd2":
        build_sd2(out, variant)
    elif kind == "sdxl":
        build_sdxl(out, variant, scheduler=spec["scheduler"])
    elif kind == "sdxl-lightning":
        build_sdxl_lightning_unets(out, built[spec["base"]])
    elif kind == "flux":
        build_flux(out, guidance_embeds=spec["guidance_embeds"])
    elif kind == "safety-checker":
        build_safety_checker(out)
    else:  # pragma: no cover - REPOS is ours
        raise ValueError(kind)


def ensure_hub_cache(cache_dir: Path, *, fp16_only: bool = False) -> Path:
    """Build every repo in ``REPOS`` into a hub cache under ``cache_dir`` once; return the hub cache path.

    Point ``HF_HUB_CACHE`` at the result (or pass ``cache_dir=``) with ``HF_HUB_OFFLINE=1``. With
    ``fp16_only`` the stabilityai repos hold only ``*.fp16.safetensors`` weights, as in caches made by
    Livepeer's download script, so they load only with ``variant="fp16"``. Safe across processes:
    one builds under a file lock into a staging folder that is renamed into place; the others wait.
    """
    target = hub_cache_dir(cache_dir, fp16_only=fp16_only)
    if (target / ".complete").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".tiny-hub.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            staging = Path(tempfile.mkdtemp(prefix=".tiny-hub-", dir=cache_dir))
            try:
                hub = staging / "hub"
                built: dict[str, Path] = {}
                for repo_id in REPOS:
                    out = staging / "build" / repo_folder_name(repo_id)
                    _build_repo(repo_id, out, fp16_only=fp16_only, built=built)
                    built[repo_id] = out
                    place_in_hub_cache(hub, repo_id, out)
                (hub / ".complete").write_text(_RECIPE_VERSION + "\n")
                os.replace(hub, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_local_folders(cache_dir: Path, *, fp16_only: bool = False) -> dict[str, Path]:
    """``ensure_hub_cache``, then each repo id's snapshot folder (usable as a local model path)."""
    hub = ensure_hub_cache(cache_dir, fp16_only=fp16_only)
    return {repo_id: snapshot_dir(hub, repo_id) for repo_id in REPOS}
