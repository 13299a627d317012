"""CPU time and bytes per image of encoding generated pictures: PNG levels, fpng, JPEG and WebP.

    python -m bench.encoding [--sizes 512,1024] [--repeat 5] [--no-model]

Content, each as the Pillow ``RGB`` image the node holds before it encodes:

- ``photos``: scikit-image's bundled photographs ``astronaut``, ``coffee`` and ``chelsea`` (RGB uint8),
  each resized with Pillow's LANCZOS to every size (square: the originals' aspect is not kept); the
  figures of a row are the mean over the three;
- ``model output``: the demo model ``t2i/tiny-sd`` (random weights: noise-like pictures) through the
  real diffusers pipeline (``DiffusersEngine``, CPU, its default steps, seed 7), generated at every size
  (no upscaling), in a child process so that torch's threads never run while encoding is timed.
  ``--no-model`` leaves it out.

Encoders: Pillow PNG at ``compress_level`` 0, 1, 2, 3, 6 (no argument: Pillow's default and what the
node wrote before, the baseline) and 9; Pillow PNG ``compress_level=1, optimize=False`` (spelled out);
``fpng`` (the PyPI package, ``fpng.from_pil``); Pillow JPEG and WebP at quality 90 for reference (lossy).
Each encodes to memory (no disk). Per picture and encoder: one untimed call, whose PNG is decoded with
Pillow and must give back the same pixels, then ``--repeat`` calls timed with ``time.process_time()``
(CPU of this process, all its threads, so a threaded encoder is charged in full); the median counts.

Prints one table (ms per image, bytes per image, how many times cheaper than PNG level 6, bytes
against PNG level 6; both ratios from the row's means) and a verdict line. Goal: a lossless PNG encoder
at least 3x cheaper than PNG level 6 with at most +15 % bytes on the photos at every size, both their
mean and every single photo (the worst one against the same photo at level 6); the verdict names the
cheapest that qualifies (least photo CPU over all sizes; an encoder that wrote the same bytes as one
listed before it, everywhere, is only noted) with its figures, the worst photo's bytes among them. A missed goal is reported, not an error; a Pillow PNG that does not decode
to the same pixels exits 1; an fpng that cannot be imported or does not decode to the same pixels is
left out with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

PHOTOS = ("astronaut", "coffee", "chelsea")
MODEL = "t2i/tiny-sd"
PROMPT = "a cool cat on the beach"
SEED = 7
BASELINE = "Pillow PNG level 6 (default)"
GOAL_CHEAPER = 3.0  # at least this many times less CPU than the baseline
GOAL_BYTES = 0.15  # at most this much larger than the baseline: the photos' mean, and each photo
CONTENTS = ("photos", "model output")


@dataclass(frozen=True)
class Encoder:
    label: str
    encode: Callable[[Image.Image], bytes]
    png: bool  # lossless: its output is decoded and compared
    optional: bool = False  # left out with a note, rather than an error, when it fails


@dataclass(frozen=True)
class Sample:
    """One encoder on one picture."""

    seconds: float  # median CPU seconds per call
    size: int  # bytes
    digest: str  # of the bytes
    exact: bool  # decodes to the same pixels (True for the lossy formats, which are not checked)


@dataclass(frozen=True)
class Row:
    """One encoder on one content class at one size: the means over its pictures."""

    ms: float
    size: float
    exact: bool  # every picture's PNG decoded to the same pixels
    worst: float  # the largest of its pictures' bytes over the baseline's bytes for the same picture


@dataclass
class Results:
    kept: list[Encoder]  # those in the table, in order
    rows: dict[tuple[str, int, str], Row]  # by (content, size, encoder label)
    notes: list[str]
    failures: list[str]  # errors: a Pillow PNG that did not decode to the same pixels
    aliases: set[str]  # encoders that wrote the same bytes as one listed before them, everywhere


def times(baseline: float, other: float) -> float:
    """How many times ``other`` fits in ``baseline`` (infinite for a zero that a coarse clock can read)."""
    return baseline / other if other else math.inf


def pillow(format: str, **options: object) -> Callable[[Image.Image], bytes]:
    def encode(picture: Image.Image) -> bytes:
        buffer = io.BytesIO()
        picture.save(buffer, format=format, **options)
        return buffer.getvalue()

    return encode


def encoders() -> tuple[list[Encoder], list[str]]:
    """The encoders to measure, and notes on those that could not be set up."""
    found = [
        Encoder("Pillow PNG level 0", pillow("PNG", compress_level=0), png=True),
        Encoder("Pillow PNG level 1", pillow("PNG", compress_level=1), png=True),
        Encoder("Pillow PNG level 2", pillow("PNG", compress_level=2), png=True),
        Encoder("Pillow PNG level 3", pillow("PNG", compress_level=3), png=True),
        Encoder(BASELINE, pillow("PNG"), png=True),
        Encoder("Pillow PNG level 9", pillow("PNG", compress_level=9), png=True),
        Encoder("Pillow PNG level 1, optimize=False", pillow("PNG", compress_level=1, optimize=False), png=True),
    ]
    notes = []
    try:
        import fpng

        found.append(Encoder("fpng", fpng.from_pil, png=True, optional=True))
    except Exception as exc:  # a missing package or a broken build: report it, measure the others
        notes.append(f"fpng left out: it could not be imported ({type(exc).__name__}: {exc})")
    found.append(Encoder("Pillow JPEG q90", pillow("JPEG", quality=90), png=False))
    if features.check("webp"):
        found.append(Encoder("Pillow WebP q90", pillow("WEBP", quality=90), png=False))
    else:
        notes.append("Pillow WebP q90 left out: this Pillow has no WebP support")
    return found, notes


def decodes_to(data: bytes, picture: Image.Image) -> bool:
    """Whether ``data`` is a PNG that Pillow decodes to exactly ``picture``'s pixels."""
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
            return (
                decoded.format == "PNG"
                and decoded.size == picture.size
                and decoded.mode == picture.mode
                and decoded.tobytes() == picture.tobytes()
            )
    except Exception:  # anything Pillow cannot read is not a valid PNG
        return False


def measure(encoder: Encoder, picture: Image.Image, repeat: int) -> Sample:
    data = encoder.encode(picture)  # untimed: warms up, and gives the output to check
    exact = decodes_to(data, picture) if encoder.png else True
    seconds = []
    for _ in range(repeat):
        started = time.process_time()
        encoder.encode(picture)
        seconds.append(time.process_time() - started)
    return Sample(statistics.median(seconds), len(data), hashlib.sha256(data).hexdigest(), exact)


def photos(size: int) -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size), Image.Resampling.LANCZOS) for name in PHOTOS]


def generate_model_images(sizes: list[int], cache: str) -> dict[int, bytes]:
    """The demo model's picture at each size, as raw RGB bytes (run in a child process)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: the encoders are timed after
    from t2i_common.schemas import TextToImageRequest
    from t2i_orchestrator.diffusers_engine import DiffusersEngine
    from t2i_orchestrator.models import ModelSpec

    engine = DiffusersEngine([ModelSpec(MODEL, warm=True)], device="cpu", cache_dir=Path(cache), safety_checker=None)
    engine.load(MODEL)
    pictures = {}
    for size in sizes:
        request = TextToImageRequest(prompt=PROMPT, model_id=MODEL, width=size, height=size, seed=SEED, safety_check=False)
        [image] = engine.generate(request, MODEL, SEED, lambda: False)
        picture = image.picture.convert("RGB")
        assert picture.size == (size, size), picture.size
        pictures[size] = picture.tobytes()
    return pictures


def model_images(sizes: list[int]) -> dict[int, Image.Image]:
    with tempfile.TemporaryDirectory(prefix="t2i-bench-encoding-") as folder:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch in this one
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as child:
            raw = child.submit(generate_model_images, sizes, str(Path(folder) / "cache")).result()
    return {size: Image.frombytes("RGB", (size, size), data) for size, data in raw.items()}


def run(sizes: list[int], repeat: int, with_model: bool) -> Results:
    measured, notes = encoders()
    pictures: dict[tuple[str, int], list[Image.Image]] = {("photos", size): photos(size) for size in sizes}
    if with_model:
        for size, picture in model_images(sizes).items():
            pictures[("model output", size)] = [picture]
        notes.append(
            f"model output: {MODEL} through DiffusersEngine on CPU, seed {SEED}, its default steps, generated at each size (no upscaling)"
        )
    samples = {
        (content, size, encoder.label): [measure(encoder, picture, repeat) for picture in group]
        for (content, size), group in pictures.items()
        for encoder in measured
    }
    results = Results([], {}, notes, [], set())
    for encoder in measured:
        wrong = sorted(
            {f"{content} {size}x{size}" for content, size in pictures if not all(s.exact for s in samples[(content, size, encoder.label)])}
        )
        if wrong and encoder.optional:
            notes.append(f"{encoder.label} left out: its PNG did not decode to the same pixels ({', '.join(wrong)})")
            continue
        if wrong:
            results.failures.append(f"{encoder.label}: its PNG did not decode to the same pixels ({', '.join(wrong)})")
        same = next(
            (
                earlier.label
                for earlier in results.kept
                if all(
                    [s.digest for s in samples[(*key, encoder.label)]] == [s.digest for s in samples[(*key, earlier.label)]]
                    for key in pictures
                )
            ),
            None,
        )
        if same:
            results.aliases.add(encoder.label)
            notes.append(f"{encoder.label} writes the same bytes as {same}")
        results.kept.append(encoder)
        for content, size in pictures:
            group, base = samples[(content, size, encoder.label)], samples[(content, size, BASELINE)]
            results.rows[(content, size, encoder.label)] = Row(
                1000 * statistics.mean(s.seconds for s in group),
                statistics.mean(s.size for s in group),
                all(s.exact for s in group),
                max(s.size / b.size for s, b in zip(group, base)),
            )
    return results


def verdict(results: Results, sizes: list[int]) -> str:
    rows = results.rows

    def figures(label: str) -> str:
        parts = []
        for size in sizes:
            row, base = rows[("photos", size, label)], rows[("photos", size, BASELINE)]
            parts.append(
                f"{size}x{size} {times(base.ms, row.ms):.1f}x cheaper ({row.ms:.2f} vs {base.ms:.2f} ms), "
                f"{100 * (row.size / base.size - 1):+.1f}% bytes (worst photo {100 * (row.worst - 1):+.1f}%)"
            )
        return ", ".join(parts)

    def qualifies(label: str) -> bool:
        return all(
            rows[("photos", size, label)].exact
            and rows[("photos", size, BASELINE)].ms >= GOAL_CHEAPER * rows[("photos", size, label)].ms
            and rows[("photos", size, label)].size <= (1 + GOAL_BYTES) * rows[("photos", size, BASELINE)].size
            and rows[("photos", size, label)].worst <= 1 + GOAL_BYTES
            for size in sizes
        )

    goal = (
        f"(goal: a lossless PNG >= {GOAL_CHEAPER:.0f}x cheaper than PNG level 6 with <= +{100 * GOAL_BYTES:.0f}% bytes, "
        "photos' means and every single photo, at every size)"
    )
    candidates = [e.label for e in results.kept if e.png and e.label != BASELINE and e.label not in results.aliases]
    winners = sorted(
        (label for label in candidates if qualifies(label)), key=lambda label: sum(rows[("photos", size, label)].ms for size in sizes)
    )
    if winners:
        return f"verdict: goal met by {winners[0]}: photos {figures(winners[0])} {goal}"
    return f"verdict: goal not met {goal}; photos: " + "; ".join(f"{label} {figures(label)}" for label in candidates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.encoding", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="512,1024", help="square sizes in pixels, comma-separated (multiples of 8 for the model)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per picture and encoder (the median counts)")
    parser.add_argument("--no-model", action="store_true", help="photos only: skip generating with the demo model")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.repeat < 1 or any(size < 8 for size in sizes):
        parser.error("--repeat must be at least 1 and every size at least 8")
    if not args.no_model and any(size % 8 for size in sizes):
        parser.error("the model's sizes must be multiples of 8 (or pass --no-model)")
    results = run(sizes, args.repeat, not args.no_model)
    zlib = f"zlib-ng {features.version('zlib_ng')}" if features.version("zlib_ng") else f"zlib {features.version('zlib')}"
    print(
        f"bench.encoding: CPU ms per image (time.process_time, median of {args.repeat} after 1 untimed call), encoded to memory; "
        f"photos: mean of {', '.join(PHOTOS)} resized with LANCZOS; Pillow {Image.__version__} ({zlib}), numpy {np.__version__}; "
        f"{os.cpu_count()} cores"
    )
    print("| content | size | encoder | ms/image | bytes/image | x cheaper vs PNG 6 | bytes vs PNG 6 | decoded |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for content in CONTENTS:
        for size in sizes:
            if (content, size, BASELINE) not in results.rows:
                continue
            base = results.rows[(content, size, BASELINE)]
            for encoder in results.kept:
                row = results.rows[(content, size, encoder.label)]
                decoded = ("lossless" if row.exact else "NOT THE SAME PIXELS") if encoder.png else "lossy"
                print(
                    f"| {content} | {size}x{size} | {encoder.label} | {row.ms:.2f} | {row.size:.0f} | {times(base.ms, row.ms):.2f}x "
                    f"| {100 * (row.size / base.size - 1):+.1f}% | {decoded} |"
                )
    for note in results.notes:
        print(f"note: {note}")
    print(verdict(results, sizes), flush=True)
    if results.failures:
        sys.stderr.write("".join(f"error: {failure}\n" for failure in results.failures))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
