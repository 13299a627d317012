"""The built-in demo model ``t2i/tiny-sd``: a tiny Stable Diffusion built offline, deterministically.

The weights are random (seeded), so the pictures are noise-like, but every component is a real
diffusers/transformers class and the folder is loaded through ``from_pretrained`` like any other
model. It is built once into a cache folder (about 10 MB, a few seconds) and reused afterwards.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from t2i_common import DEMO_MODEL_ID

__all__ = ["DEMO_MODEL_ID", "ensure_demo_model"]
# Bump when the recipe below changes, so that stale cached builds are not reused.
_RECIPE_VERSION = "1"

# A small prompt corpus the tokenizer's merges are learned from; any text still encodes (byte fallback).
_CORPUS = """
a cool cat on the beach, a photo of an astronaut riding a horse on the moon, a painting of a
lighthouse at sunset in the style of van gogh, portrait of a woman with red hair, studio lighting,
a cute dog wearing sunglasses, a futuristic city at night with neon lights, highly detailed,
a bowl of fruit on a wooden table, watercolor landscape with mountains and a lake, cinematic,
an old man reading a book by the fire, digital art of a dragon flying over a castle, 4k, sharp focus,
a red sports car on a mountain road, a forest in autumn with golden leaves, photorealistic,
a robot playing the piano, a cup of coffee and a croissant, anime style girl in a school uniform,
blurry, low quality, ugly, deformed, bad anatomy, worst quality, text, watermark
"""


def demo_model_dir(cache_dir: Path) -> Path:
    """Where the demo model lives under ``cache_dir`` (built there on first use by ``ensure_demo_model``)."""
    return cache_dir / f"tiny-sd-v{_RECIPE_VERSION}"


def ensure_demo_model(cache_dir: Path) -> Path:
    """Build the demo model into ``cache_dir`` unless it is already there; safe across processes."""
    target = demo_model_dir(cache_dir)
    if (target / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several nodes may start together on one machine: one builds, the others wait for it.
    with open(cache_dir / ".tiny-sd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model_index.json").exists():
            staging = Path(tempfile.mkdtemp(prefix=".tiny-sd-", dir=cache_dir))
            try:
                build_demo_model(staging)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def build_demo_model(out_dir: Path, *, flag_everything: bool = False) -> None:
    """Write the tiny pipeline to ``out_dir`` with ``save_pretrained``.

    ``flag_everything`` makes the tiny safety checker flag every image, which is how tests reach
    the NSFW path: random checker weights can never score above their thresholds otherwise.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab, merges = _train_tokenizer(_CORPUS)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            layer_norm_eps=1e-5,
            max_position_embeddings=77,
            vocab_size=len(vocab),
            bos_token_id=vocab["<|startoftext|>"],
            # The real end-of-text id: eos_token_id == 2 would select transformers' legacy pooling.
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    # Four VAE blocks give a scale factor of 8, as in real SD: 256 px is a 32x32 latent, not 128x128.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=[32, 32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=256,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    safety_checker = tiny_safety_checker(flag_everything=flag_everything)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
        requires_safety_checker=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)


def tiny_safety_checker(*, flag_everything: bool = False) -> Any:
    """A tiny ``StableDiffusionSafetyChecker`` (random weights from torch's current seed).

    Random weights never score above the checker's thresholds; ``flag_everything`` lowers them so
    that every image is flagged, which is how tests reach the NSFW path.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=dict(
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=1000,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            ),
            vision_config=dict(
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=4
            ),
            projection_dim=32,
        )
    )
    if flag_everything:
        checker.concept_embeds_weights.data.fill_(-1.0)
    return checker


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _train_tokenizer(corpus: str, num_merges: int = 200) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a tiny byte-level BPE (CLIP's layout: ``</w>`` word ends, two special tokens last)."""
    byte_chars = _bytes_to_unicode()
    words = collections.Counter(
        tuple(byte_chars[b] for b in word.encode()[:-1]) + (byte_chars[word.encode()[-1]] + "</w>",)
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower())
    )
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Highest count first, then the smallest pair: a deterministic tie-break.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    symbols = list(byte_chars.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges
