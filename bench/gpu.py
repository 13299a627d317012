"""The node's engine against the bare diffusers pipeline, on one GPU, with random weights at the real sizes.

Why: ``DiffusersEngine.generate`` wraps each pipeline call (request checks, one CPU generator per
image, a step callback for cancellation, PNG encoding). This measures what the wrapping costs against
calling the same loaded pipeline directly (goal: at most 1.05x), and beside it load and warm-up
times, torch.compile, images/s at 1 and 4 images per call, and recovery from out-of-memory, all in
one run on one machine, so that every ratio compares like with like.

Nothing is downloaded: sd-turbo (SD 2.1) and SDXL are built from their real configurations with
small random weights (the pictures are noise; speed depends only on shapes and dtypes), saved to a
temporary folder, and loaded through the node's own loaders: AutoPipelineForText2Image for sd-turbo,
and the SDXL-Lightning loader (SDXL base folder + a float16 UNet file) for the SDXL shape. It needs
only torch and the project's dependencies, and takes under 8 minutes on one H100:

    python -m bench.gpu [--repeats 5] [--skip-compile] [--out report.md]

``--device cpu --tiny`` runs every path but float16, torch.compile and the out-of-memory check on a
CPU in under a minute (tiny configurations, 64x64); tests/test_bench_gpu.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
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
from t2i_orchestrator.models import ModelSpec, dtype_for, profile_for

PROMPT = "a photo of an astronaut riding a horse, detailed, studio light"
SEED = 1234
GIB = 1024**3
# Per-component constructor arguments: the real models' sizes, and tiny ones of the same shapes
# (as in t2i_orchestrator.tiny_models) for a CPU. Vocabulary sizes do not matter for speed.
_SD2_UNET = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_SDXL_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
_TINY_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
REAL = {
    "sd2_unet": dict(_SD2_UNET, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, sample_size=64),
    "sd2_text": dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu", projection_dim=512),
    "sd2_vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=768),
    "sdxl_unet": dict(
        _SDXL_BLOCKS,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,  # the two encoders' hidden states side by side: 768 + 1280
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-wide pooled projection
        sample_size=128,
    ),
    "sdxl_text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu", projection_dim=768),
    "sdxl_text_2": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, hidden_act="gelu", projection_dim=1280),
    "sdxl_vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024, scaling_factor=0.13025),
}
_TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, hidden_act="gelu", projection_dim=32)
TINY = {
    "sd2_unet": dict(_TINY_BLOCKS, block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=32, sample_size=32),
    "sd2_text": _TINY_TEXT,
    "sd2_vae": dict(block_out_channels=(32, 32, 64, 64), sample_size=256),
    "sdxl_unet": dict(
        _TINY_BLOCKS,
        block_out_channels=(32, 64),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        sample_size=32,
    ),
    "sdxl_text": _TINY_TEXT,
    "sdxl_text_2": _TINY_TEXT,
    "sdxl_vae": dict(block_out_channels=(32, 32, 64, 64), sample_size=256, scaling_factor=0.13025),
}


@dataclass
class Case:
    """One model as the node serves it, and the request it is measured with."""

    name: str
    spec: ModelSpec
    request: TextToImageRequest
    check_oom: bool = False  # the out-of-memory check runs on the larger model only


class Report:
    """A markdown table, printed row by row as measured (a run cut short still shows its figures)."""

    def __init__(self, header: list[str]) -> None:
        self.lines = [*header, "", "| model | measurement | value | note |", "|---|---|---|---|"]
        self.values: dict[tuple[str, str], str] = {}
        print("\n".join(self.lines), flush=True)

    def row(self, model: str, what: str, value: str, note: str = "") -> None:
        self.values[model, what] = value
        self.lines.append(f"| {model:<14} | {what:<48} | {value:>10} | {note} |")
        print(self.lines[-1], flush=True)

    def end(self, *lines: str) -> None:
        self.lines += ["", *lines]
        print("\n".join(["", *lines]), flush=True)


# --------------------------------------------------------------------------------- building the models


@contextlib.contextmanager
def _building(device: str, dtype: Any) -> Iterator[None]:
    """Modules made inside are created on ``device`` in ``dtype`` directly: a full-size SDXL UNet
    made in float32 on the CPU and then moved would cost a minute and 10 GB of RAM."""
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
    """Weights with std 0.02 (norms keep 1 and 0), so that activations stay far inside float16's range."""
    for parameter in module.parameters():
        if parameter.dim() >= 2:
            parameter.normal_(0.0, 0.02)
    return module


def _text_encoder(cls: Any, vocab: dict[str, int], config: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    return _small(cls(CLIPTextConfig(**config, vocab_size=len(vocab), max_position_embeddings=77, layer_norm_eps=1e-5, **ids)))


def _vae(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    blocks = len(config["block_out_channels"])
    return _small(AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks, **config))


def build_sd_turbo(out: Path, sizes: dict[str, dict[str, Any]], device: str, dtype: Any) -> None:
    """An sd-turbo-shaped SD 2.1 pipeline folder (OpenCLIP-H-sized text encoder, trailing Euler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from t2i_orchestrator.tiny_models import _SD_BETAS, _clip_tokenizer, _quiet

    tokenizer, vocab = _clip_tokenizer()
    with _building(device, dtype):
        pipe = StableDiffusionPipeline(
            vae=_vae(sizes["sd2_vae"]),
            text_encoder=_text_encoder(CLIPTextModel, vocab, sizes["sd2_text"]),
            tokenizer=tokenizer,
            unet=_small(UNet2DConditionModel(**sizes["sd2_unet"], use_linear_projection=True)),
            scheduler=EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="trailing"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    with _quiet():
        pipe.save_pretrained(out, safe_serialization=True)


def build_sdxl_lightning(base: Path, unet_file: Path, sizes: dict[str, dict[str, Any]], device: str, dtype: Any) -> None:
    """An SDXL base folder and a float16 Lightning UNet file, as ByteDance/SDXL-Lightning ships it.

    The node's loader reads only the UNet's config from the base folder, so its UNet weights are not
    written (5 GB and a minute saved at full size).
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from t2i_orchestrator.tiny_models import _SD_BETAS, _clip_tokenizer, _quiet

    tokenizer, vocab = _clip_tokenizer()
    with _building(device, dtype):
        unet = _small(UNet2DConditionModel(**sizes["sdxl_unet"], addition_embed_type="text_time", use_linear_projection=True))
        pipe = StableDiffusionXLPipeline(
            vae=_vae(sizes["sdxl_vae"]),
            text_encoder=_text_encoder(CLIPTextModel, vocab, sizes["sdxl_text"]),
            text_encoder_2=_text_encoder(CLIPTextModelWithProjection, vocab, sizes["sdxl_text_2"]),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading"),
            force_zeros_for_empty_prompt=True,
        )
    with _quiet():
        pipe.save_config(base)  # model_index.json
        for name, component in pipe.components.items():
            if name == "unet":
                component.save_config(base / name)
            elif component is not None:
                component.save_pretrained(base / name)
    save_file({name: tensor.to(torch.float16).contiguous() for name, tensor in unet.state_dict().items()}, str(unet_file))


# ------------------------------------------------------------------------------------------- measuring


def _timed(call: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    started = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - started


def _medians(calls: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each call, taking turns, so that clock or thermal drift hits all of them alike."""
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


def _check_oom(engine: Any, case: Case, device: str) -> tuple[str, str]:
    """Leave ~1 GiB of the GPU free with a ballast tensor: generating must raise ``OutOfMemory``,
    and once the ballast is gone the same engine must generate again (the node keeps serving)."""
    import torch

    from t2i_orchestrator.engine import OutOfMemory

    torch.cuda.empty_cache()  # blocks cached by torch would otherwise not count as free
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
    return "PASS", "OutOfMemory raised with ~1 GiB free; generated again after freeing it"


def run_case(case: Case, report: Report, args: argparse.Namespace, cache: Path, sync: Callable[[], None]) -> dict[str, Any]:
    """All rows for one model; returns its ratios (and the OOM verdict) for the summary."""
    import torch

    from t2i_orchestrator.diffusers_engine import DiffusersEngine, _encode_png

    name, spec, request, device = case.name, case.spec, case.request, args.device
    steps = request.num_inference_steps
    size = f"{request.width}x{request.height}, {steps} step{'s' if steps > 1 else ''}"
    timed_note = f"median of {args.repeats}; {size}"

    def generate(engine: Any, images: int = 1) -> Any:
        return engine.generate(replace(request, num_images_per_prompt=images), spec.model_id, SEED, lambda: False)

    engine = DiffusersEngine([spec], device=device, cache_dir=cache, safety_checker=None)
    report.row(name, "load (engine.load)", f"{_timed(lambda: engine.load(spec.model_id), sync):.2f} s", dtype_for(spec, device))
    report.row(name, "warm-up (first engine.generate)", f"{_timed(lambda: generate(engine), sync):.2f} s", size)

    pipe = engine._loaded[spec.model_id].pipe  # the very pipeline object the engine drives
    guidance = profile_for(spec).guidance_for(request)

    def raw() -> Any:
        generator = torch.Generator("cpu").manual_seed(SEED)  # the engine's kind: the same noise on any device
        return pipe(PROMPT, width=request.width, height=request.height, num_inference_steps=steps,
                    guidance_scale=guidance, generator=generator).images

    image = raw()[0]  # also the raw call's warm-up
    medians = _medians({"engine": lambda: generate(engine), "raw": raw}, args.repeats, sync)
    results: dict[str, Any] = {"engine/raw": medians["engine"] / medians["raw"], "compiled/raw": None, "oom": None}
    report.row(name, "raw pipeline call", f"{medians['raw'] * 1000:.1f} ms", timed_note)
    report.row(name, "engine.generate (incl. PNG encoding)", f"{medians['engine'] * 1000:.1f} ms", timed_note)
    report.row(name, "engine/raw", f"{results['engine/raw']:.3f}x", "goal: at most 1.05x")
    png = _medians({"png": lambda: _encode_png(image)}, args.repeats, lambda: None)["png"]
    report.row(name, "PNG encoding of one image (inside engine)", f"{png * 1000:.1f} ms", "this run's random-weight image")

    generate(engine, 4)  # warm-up at the larger batch
    four = _medians({"four": lambda: generate(engine, 4)}, args.repeats, sync)["four"]
    report.row(name, "images/s, 1 image per call", f"{1 / medians['engine']:.2f}", "engine.generate")
    report.row(name, "images/s, num_images_per_prompt=4", f"{4 / four:.2f}", "one pipeline call; the node does not batch requests")

    if case.check_oom:
        results["oom"] = _check_oom(engine, case, device) if device.startswith("cuda") else ("skipped (CUDA only)", "")
        report.row(name, "out-of-memory, then recovery", *results["oom"])
    del pipe
    _free(engine)
    if args.skip_compile or not device.startswith("cuda"):
        report.row(name, "TORCH_COMPILE", "skipped", "--skip-compile" if args.skip_compile else "CUDA only")
        return results

    spec = replace(spec, optimization_flags=frozenset({"TORCH_COMPILE"}))
    compiled = DiffusersEngine([spec], device=device, cache_dir=cache, safety_checker=None)
    compiled.load(spec.model_id)
    report.row(name, "TORCH_COMPILE: compile + warm-up (first generate)", f"{_timed(lambda: generate(compiled), sync):.1f} s", size)
    generate(compiled)  # a second call, in case the first left anything to recompile
    seconds = _medians({"compiled": lambda: generate(compiled)}, args.repeats, sync)["compiled"]
    results["compiled/raw"] = seconds / medians["raw"]
    report.row(name, "TORCH_COMPILE: engine.generate", f"{seconds * 1000:.1f} ms", timed_note)
    report.row(name, "TORCH_COMPILE: compiled/raw", f"{results['compiled/raw']:.3f}x", "against the raw uncompiled call")
    _free(compiled)
    return results


# ------------------------------------------------------------------------------------------------ main


def _machine(device: str) -> str:
    import diffusers
    import torch
    import transformers

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / GIB:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return (f"machine: {where}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny model configurations at 64x64 (for a CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure, after warm-up (default 5)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the TORCH_COMPILE rows")
    parser.add_argument("--out", type=Path, help="also write the report to this markdown file")
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
    sizes = TINY if args.tiny else REAL
    side = 64 if args.tiny else None
    report = Report([
        "# bench.gpu: the node's engine against the raw diffusers pipeline",
        "",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        _machine(args.device),
        f"models: random weights, {'tiny configurations' if args.tiny else 'real sizes'}, built here and loaded by the node's loaders; "
        f"{args.repeats} timed runs per figure after warm-up. The node does not batch separate requests yet: "
        "4 images per call means one request with num_images_per_prompt=4.",
    ])
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="t2i-bench-gpu-") as tmp:
        folder = Path(tmp)
        build_dtype = torch.float16 if cuda else torch.float32
        seconds = _timed(lambda: build_sd_turbo(folder / "sd-turbo", sizes, args.device, build_dtype), sync)
        report.row("sd-turbo", "build + save (random weights; not node work)", f"{seconds:.1f} s")
        turbo = Case("sd-turbo", ModelSpec("stabilityai/sd-turbo", path=str(folder / "sd-turbo")),
                     TextToImageRequest(PROMPT, width=side or 512, height=side or 512, num_inference_steps=1, safety_check=False))
        results["sd-turbo"] = run_case(turbo, report, args, folder, sync)

        unet_file = folder / "sdxl_lightning_4step_unet.safetensors"
        seconds = _timed(lambda: build_sdxl_lightning(folder / "sdxl-base", unet_file, sizes, args.device, build_dtype), sync)
        report.row("sdxl-lightning", "build + save (random weights; not node work)", f"{seconds:.1f} s")
        spec = ModelSpec("ByteDance/SDXL-Lightning-4step", path=str(folder / "sdxl-base"), unet_path=str(unet_file))
        request = TextToImageRequest(PROMPT, width=side or 1024, height=side or 1024, num_inference_steps=4, safety_check=False)
        results["sdxl-lightning"] = run_case(Case("sdxl-lightning", spec, request, check_oom=True), report, args, folder, sync)

    summary = [f"{name} engine/raw {r['engine/raw']:.2f}x" for name, r in results.items()]
    compiled = [f"{name} compiled/raw {r['compiled/raw']:.2f}x" for name, r in results.items() if r["compiled/raw"]]
    summary += compiled or [f"compiled/raw skipped ({'--skip-compile' if args.skip_compile and cuda else 'CUDA only'})"]
    oom = results["sdxl-lightning"]["oom"]
    summary.append(f"oom-recovery {oom[0]}")
    report.end(f"total wall time: {time.perf_counter() - started:.0f} s", "summary: " + ", ".join(summary))
    if args.out:
        args.out.write_text("\n".join(report.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
