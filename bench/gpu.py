"""The node's engine against the bare diffusers pipeline on one GPU, with random weights at the real sizes.

Why: ``DiffusersEngine.generate`` wraps each pipeline call (request checks, one CPU generator per image,
a step callback for cancellation), on the node's device thread. This measures what the wrapping costs
against calling the same loaded pipeline directly (goal: at most 1.05x), and beside it the PNG encoding
that the node's store does off the device thread (2026-11-26 on an H200, it cost 47 ms of 121 ms per
sd-turbo image while it still ran inside the engine), load and warm-up times,
torch.compile, images/s at 1 and 4 images per call, and recovery from out-of-memory, in one run on one
machine, so that every ratio compares like with like.

Nothing is downloaded: sd-turbo (SD 2.1) and SDXL are built from their real configurations with small
random weights (the pictures are noise; speed depends only on shapes and dtypes), saved to a temporary
folder and loaded by the node's own loaders: AutoPipelineForText2Image for sd-turbo, the SDXL-Lightning
loader (SDXL base folder + a float16 UNet file) for the SDXL shape. It needs only torch and the project's
dependencies, and is meant to take under 8 minutes on one H100:

    python -m bench.gpu [--repeats 5] [--skip-compile] [--out report.md]

``--device cpu --tiny`` runs every path but float16, torch.compile and the out-of-memory check on a CPU
in seconds (tiny configurations, 64x64); tests/test_bench_gpu.py runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import io
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from t2i_common.config import ConfigError
from t2i_common.schemas import TextToImageRequest
from t2i_orchestrator.engine import Generation
from t2i_orchestrator.models import ModelSpec, dtype_for, profile_for

PROMPT = "a photo of an astronaut riding a horse, detailed, studio light"
SEED = 1234
NODE_REQUESTS = 8  # sent at once through the node's device queue and store
GIB = 1024**3


def _text(hidden: int, layers: int, heads: int, intermediate: int, act: str = "gelu", projection: int = 32) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_act=act,
        projection_dim=projection,
    )


_XL = dict(addition_embed_type="text_time", use_linear_projection=True)
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
_TINY_BLOCKS = dict(
    block_out_channels=(32, 64),
    attention_head_dim=(2, 4),
    sample_size=32,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)
_TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), sample_size=256)
# Constructor arguments per component: the real models' sizes (parameter counts checked against
# sd-turbo's and SDXL's own), and tiny ones of the same shapes (as in t2i_orchestrator.tiny_models).
# Vocabulary sizes do not matter for speed: the tokenizer is the project's small self-made BPE.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "real": {
        "sd2_unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
            sample_size=64,
        ),
        "sd2_text": _text(1024, 23, 16, 4096, projection=512),  # OpenCLIP ViT-H
        "sd2_vae": dict(_SD_VAE, sample_size=768),
        "sdxl_unet": dict(
            _XL,
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2048,  # both encoders' hidden states side by side: 768 + 1280
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),  # 6 x 256 + 1280
        "sdxl_text": _text(768, 12, 12, 3072, act="quick_gelu", projection=768),  # CLIP ViT-L
        "sdxl_text_2": _text(1280, 32, 20, 5120, projection=1280),  # OpenCLIP ViT-bigG
        "sdxl_vae": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
    },
    "tiny": {
        "sd2_unet": dict(_TINY_BLOCKS, cross_attention_dim=32, use_linear_projection=True),
        "sd2_text": _text(32, 2, 4, 37),
        "sd2_vae": _TINY_VAE,
        "sdxl_unet": dict(
            _XL,
            **_TINY_BLOCKS,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        ),
        "sdxl_text": _text(32, 2, 4, 37),
        "sdxl_text_2": _text(32, 2, 4, 37),
        "sdxl_vae": dict(_TINY_VAE, scaling_factor=0.13025),
    },
}


@dataclass
class Case:
    """One model as the node serves it, and the request it is measured with."""

    name: str
    spec: ModelSpec
    request: TextToImageRequest
    check_oom: bool = False  # on the larger model only


class Report:
    """A markdown table, printed row by row as measured, so that a run cut short still shows its figures."""

    def __init__(self, header: list[str]) -> None:
        self.lines = [*header, "", "| model | measurement | value | note |", "|---|---|---|---|"]
        print("\n".join(self.lines), flush=True)

    def row(self, model: str, what: str, value: str, note: str = "") -> None:
        self.lines.append(f"| {model:<14} | {what:<50} | {value:>10} | {note} |")
        print(self.lines[-1], flush=True)

    def end(self, *lines: str) -> None:
        self.lines += ["", *lines]
        print("\n".join(["", *lines]), flush=True)


# ----------------------------------------------------------------------------------- building the models


@contextlib.contextmanager
def _building(device: str, dtype: Any) -> Iterator[None]:
    """Modules made inside are created on ``device`` in ``dtype``, seeded: a full-size SDXL made in
    float32 on the CPU, then converted and moved, would need 14 GB of RAM and take minutes."""
    import torch

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(previous)


def _small(module: Any) -> Any:
    """Weights with std 0.02 (norms keep their 1 and 0), so that activations stay well inside float16's range."""
    for parameter in module.parameters():
        if parameter.dim() >= 2:
            parameter.normal_(0.0, 0.02)
    return module


def _components(sizes: dict[str, dict[str, Any]], model: str) -> dict[str, Any]:
    """The random-weight VAE, text encoder(s), tokenizer(s) and UNet of ``model`` ("sd2" or "sdxl")."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from t2i_orchestrator.tiny_models import _clip_tokenizer

    tokenizer, vocab = _clip_tokenizer()
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])

    def text(cls: Any, key: str) -> Any:
        return _small(cls(CLIPTextConfig(**sizes[key], vocab_size=len(vocab), max_position_embeddings=77, layer_norm_eps=1e-5, **ids)))

    blocks = len(sizes[f"{model}_vae"]["block_out_channels"])
    parts = dict(
        vae=_small(
            AutoencoderKL(
                down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks, **sizes[f"{model}_vae"]
            )
        ),
        text_encoder=text(CLIPTextModel, f"{model}_text"),
        tokenizer=tokenizer,
        unet=_small(UNet2DConditionModel(**sizes[f"{model}_unet"])),
    )
    if model == "sdxl":
        parts.update(text_encoder_2=text(CLIPTextModelWithProjection, "sdxl_text_2"), tokenizer_2=tokenizer)
    return parts


def build_sd_turbo(out: Path, sizes: dict[str, dict[str, Any]], device: str, dtype: Any) -> None:
    """An sd-turbo-shaped SD 2.1 pipeline folder: trailing Euler, no safety checker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from t2i_orchestrator.tiny_models import _SD_BETAS, _quiet

    with _building(device, dtype):
        scheduler = EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="trailing")
        pipe = StableDiffusionPipeline(
            **_components(sizes, "sd2"), scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    with _quiet():
        pipe.save_pretrained(out, safe_serialization=True)


def build_sdxl_lightning(base: Path, unet_file: Path, sizes: dict[str, dict[str, Any]], device: str, dtype: Any) -> None:
    """An SDXL base folder and a float16 UNet file, as ByteDance/SDXL-Lightning ships it.

    The node's loader reads only the UNet's config from the base folder, so the base's UNet weights
    are not written (5 GB at full size).
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from t2i_orchestrator.tiny_models import _SD_BETAS, _quiet

    with _building(device, dtype):
        scheduler = EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading")  # the base's; the loader makes it trailing
        pipe = StableDiffusionXLPipeline(**_components(sizes, "sdxl"), scheduler=scheduler, force_zeros_for_empty_prompt=True)
    with _quiet():
        pipe.save_config(base)  # model_index.json
        for name, component in pipe.components.items():
            if name == "unet":
                component.save_config(base / name)
            elif component is not None:
                component.save_pretrained(base / name)
    save_file({name: tensor.to(torch.float16).contiguous() for name, tensor in pipe.unet.state_dict().items()}, str(unet_file))


# ------------------------------------------------------------------------------------------------ measuring


def _timed(call: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    started = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - started


def _medians(calls: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each call; the calls take turns, so that clock or thermal drift hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(_timed(call, sync))
    return {name: statistics.median(values) for name, values in times.items()}


def _free(*engines: Any) -> None:
    import torch

    for engine in engines:
        engine.unload_all()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _compile_skipped(args: argparse.Namespace) -> str | None:
    """Why the TORCH_COMPILE rows are left out, if they are."""
    if not args.device.startswith("cuda"):
        return "CUDA only"
    return "--skip-compile" if args.skip_compile else None


def _check_oom(engine: Any, case: Case, device: str) -> tuple[str, str]:
    """With a ballast tensor leaving ~1 GiB of the GPU free, generating must raise ``OutOfMemory``;
    once the ballast is gone the same engine must generate again (the node keeps serving)."""
    import torch

    from t2i_orchestrator.engine import OutOfMemory

    torch.cuda.empty_cache()  # blocks cached by torch do not count as free
    ballast = torch.empty(max(0, torch.cuda.mem_get_info(device)[0] - GIB), dtype=torch.uint8, device=device)
    try:
        engine.generate(case.request, case.spec.model_id, SEED, lambda: False)
        return "FAIL", "no OutOfMemory with ~1 GiB free"
    except OutOfMemory:
        pass
    finally:
        del ballast
        torch.cuda.empty_cache()
    try:
        engine.generate(case.request, case.spec.model_id, SEED, lambda: False)
    except Exception as exc:  # whatever breaks the recovery is the finding
        return "FAIL", f"after freeing the ballast: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return "PASS", "OutOfMemory with ~1 GiB free, then generated again"


def node_images_per_s(engine: Any, generation: Generation, requests: int, folder: Path) -> tuple[float, float]:
    """Images/s of ``requests`` requests through the node's own path, its device queue (one call at a
    time on the device thread, no batching) and its store (PNG encoded and written beside that thread):
    sent one after another, and all at once."""
    from prometheus_client import CollectorRegistry

    from metrics import OrchestratorMetrics
    from t2i_orchestrator.device import DeviceQueue
    from t2i_orchestrator.storage import ImageStore

    async def measure() -> tuple[float, float]:
        device = DeviceQueue(OrchestratorMetrics(CollectorRegistry()), engine, max_queue=requests)
        store = ImageStore(folder, ttl_s=3600)

        async def one(seed: int) -> None:
            images = await device.generate(replace(generation, seed=seed))
            await store.save([image.picture for image in images])

        try:
            await one(SEED)  # the device thread's first call
            started = time.perf_counter()
            for i in range(requests):
                await one(SEED + i)
            one_by_one = requests / (time.perf_counter() - started)
            started = time.perf_counter()
            await asyncio.gather(*(one(SEED + i) for i in range(requests)))
            return one_by_one, requests / (time.perf_counter() - started)
        finally:
            await device.close()

    return asyncio.run(measure())


def run_case(case: Case, report: Report, args: argparse.Namespace, cache: Path, sync: Callable[[], None]) -> dict[str, Any]:
    """Every row for one model; returns its ratios and out-of-memory verdict for the summary."""
    import torch

    from t2i_orchestrator.diffusers_engine import DiffusersEngine

    name, spec, request, device = case.name, case.spec, case.request, args.device
    steps = request.num_inference_steps or profile_for(spec).default_steps
    size = f"{request.width}x{request.height}, {steps} step{'s' if steps > 1 else ''}"
    timed = f"median of {args.repeats}; {size}"

    def generate(engine: Any, requests: int = 1) -> Any:
        """``requests`` requests in one pipeline call, as the node batches requests waiting together."""
        batch = [Generation(request, spec.model_id, SEED + i) for i in range(requests)]
        return engine.generate_batch(batch, lambda: False)

    engine = DiffusersEngine([spec], device=device, cache_dir=cache, safety_checker=None)
    report.row(name, "load (engine.load)", f"{_timed(lambda: engine.load(spec.model_id), sync):.2f} s", dtype_for(spec, device))
    report.row(name, "warm-up (first engine.generate)", f"{_timed(lambda: generate(engine), sync):.2f} s", size)
    pipe = engine._loaded[spec.model_id].pipe  # the very pipeline object the engine drives
    guidance = profile_for(spec).guidance_for(request)

    def raw() -> Any:
        generator = torch.Generator("cpu").manual_seed(SEED)  # the engine's kind: the same noise on any device
        return pipe(
            PROMPT, width=request.width, height=request.height, num_inference_steps=steps, guidance_scale=guidance, generator=generator
        ).images

    image = raw()[0]  # also the raw call's warm-up
    medians = _medians({"engine": lambda: generate(engine), "raw": raw}, args.repeats, sync)
    results: dict[str, Any] = {"engine/raw": medians["engine"] / medians["raw"], "compiled/raw": None, "oom": None}
    report.row(name, "raw pipeline call", f"{medians['raw'] * 1000:.1f} ms", timed)
    report.row(name, "engine.generate", f"{medians['engine'] * 1000:.1f} ms", timed)
    report.row(name, "engine/raw", f"{results['engine/raw']:.3f}x", "goal: at most 1.05x")
    png = _medians({"png": lambda: image.save(io.BytesIO(), format="PNG")}, args.repeats, lambda: None)["png"]
    report.row(
        name,
        "PNG encoding of one image (the store's, beside the device thread)",
        f"{png * 1000:.1f} ms",
        "noise-like image: near the worst case",
    )

    one_by_one, at_once = node_images_per_s(engine, Generation(request, spec.model_id, SEED), NODE_REQUESTS, cache / "images")
    results["node/raw"] = at_once * medians["raw"]
    report.row(name, "images/s through the node, one request at a time", f"{one_by_one:.2f}", "device queue, then store (PNG)")
    report.row(
        name, "images/s through the node, requests at once", f"{at_once:.2f}", f"{NODE_REQUESTS} at once: PNG encoded beside the next job"
    )
    report.row(name, "node/raw (images/s)", f"{results['node/raw']:.3f}x", "requests at once against the raw call; goal: at least 0.95x")
    generate(engine, 4)  # warm-up at the larger batch
    four = _medians({"four": lambda: generate(engine, 4)}, args.repeats, sync)["four"]
    report.row(name, "images/s, 1 image per call", f"{1 / medians['engine']:.2f}", "engine.generate")
    report.row(name, "images/s, 4 requests batched", f"{4 / four:.2f}", "one pipeline call, as the node's batching makes")
    if case.check_oom:
        results["oom"] = _check_oom(engine, case, device) if device.startswith("cuda") else ("skipped (CUDA only)", "")
        report.row(name, "out-of-memory, then recovery", *results["oom"])
    pipe = None  # the closure above holds it too: let it go before the compiled run
    _free(engine)

    if skipped := _compile_skipped(args):
        report.row(name, "TORCH_COMPILE", "skipped", skipped)
        return results
    spec = replace(spec, optimization_flags=frozenset({"TORCH_COMPILE"}))
    compiled = DiffusersEngine([spec], device=device, cache_dir=cache, safety_checker=None)
    compiled.load(spec.model_id)
    report.row(name, "TORCH_COMPILE: compile + warm-up (first generate)", f"{_timed(lambda: generate(compiled), sync):.1f} s", size)
    generate(compiled)  # a second call, in case the first left anything to recompile
    seconds = _medians({"compiled": lambda: generate(compiled)}, args.repeats, sync)["compiled"]
    results["compiled/raw"] = seconds / medians["raw"]
    report.row(name, "TORCH_COMPILE: engine.generate", f"{seconds * 1000:.1f} ms", timed)
    report.row(name, "TORCH_COMPILE: compiled/raw", f"{results['compiled/raw']:.3f}x", "against the raw uncompiled call")
    _free(compiled)
    return results


# ----------------------------------------------------------------------------------------------------- main


def _machine(device: str) -> str:
    import diffusers
    import torch
    import transformers

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    return (
        f"machine: {where}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny model configurations at 64x64 (for a CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure, after warm-up (default 5)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the TORCH_COMPILE rows (minutes on a GPU)")
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file (for BENCHMARKS.md)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    from t2i_orchestrator.diffusers_engine import resolve_device

    try:
        args.device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"bench.gpu: {exc}", file=sys.stderr)
        return 2
    cuda = args.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)
    sizes, build_dtype = SIZES["tiny" if args.tiny else "real"], torch.float16 if cuda else torch.float32
    report = Report(
        [
            "# bench.gpu: the node's engine against the raw diffusers pipeline",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- {_machine(args.device)}",
            f"- models: random weights at {'tiny' if args.tiny else 'the real'} sizes, built here, loaded by the node's loaders; "
            f"{args.repeats} timed runs per figure, after warm-up",
            "- batched: 4 requests in one pipeline call (engine.generate_batch), as the node runs compatible waiting requests",
        ]
    )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="t2i-bench-gpu-") as tmp:
        folder = Path(tmp)
        unet_file = folder / "sdxl_lightning_4step_unet.safetensors"
        cases = [
            (
                Case(
                    "sd-turbo",
                    ModelSpec("stabilityai/sd-turbo", path=str(folder / "sd-turbo")),
                    TextToImageRequest(PROMPT, width=512, height=512, num_inference_steps=1, safety_check=False),
                ),
                lambda: build_sd_turbo(folder / "sd-turbo", sizes, args.device, build_dtype),
            ),
            (
                Case(
                    "sdxl-lightning",
                    ModelSpec("ByteDance/SDXL-Lightning-4step", path=str(folder / "sdxl-base"), unet_path=str(unet_file)),
                    TextToImageRequest(PROMPT, width=1024, height=1024, num_inference_steps=4, safety_check=False),
                    check_oom=True,
                ),
                lambda: build_sdxl_lightning(folder / "sdxl-base", unet_file, sizes, args.device, build_dtype),
            ),
        ]
        for case, build in cases:
            seconds = _timed(build, sync)
            _free()
            report.row(case.name, "build + save (random weights; not node work)", f"{seconds:.1f} s")
            if args.tiny:
                case.request = replace(case.request, width=64, height=64)
            results[case.name] = run_case(case, report, args, folder, sync)

    summary = [f"{name} engine/raw {r['engine/raw']:.2f}x" for name, r in results.items()]
    summary += [f"{name} node/raw {r['node/raw']:.2f}x" for name, r in results.items()]
    summary += [f"{name} compiled/raw {r['compiled/raw']:.2f}x" for name, r in results.items() if r["compiled/raw"]]
    if skipped := _compile_skipped(args):
        summary.append(f"compiled/raw skipped ({skipped})")
    summary.append(f"oom-recovery {results['sdxl-lightning']['oom'][0]}")
    report.end(f"total wall time: {time.perf_counter() - started:.0f} s", "summary: " + ", ".join(summary))
    if args.out:
        args.out.write_text("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
