"""bench.image_store at tiny settings (64x64, a few requests, no emulated generation time): every table row,
its checks and the verdict, with the daemons under blockbuster; and the fake node's photo images."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bench import fake_node, image_store
from t2i_common import IMAGE_PATH

from .processes import blockbuster_env

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[-+]?\d+(?:\.\d+)?"
ARGS = ["--sizes", "64", "--requests", "3", "--concurrency", "2", "--concurrent-requests", "4", "--memory-requests", "4"]
ARGS += ["--images", "2", "--delay-ms", "0"]


def cells(lines: list[str], prefix: str) -> list[str]:
    """The cells after ``prefix`` of the one table row that starts with it."""
    matching = [line for line in lines if line.startswith(prefix)]
    assert len(matching) == 1, f"{len(matching)} rows {prefix!r} in:\n" + "\n".join(lines)
    return [cell.strip() for cell in matching[0].removeprefix(prefix).strip("|").split("|")]


def finite(text: str) -> float:
    value = float(text.removesuffix("x"))
    assert math.isfinite(value), text
    return value


def test_the_bench_prints_every_row_its_checks_and_a_verdict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.image_store", *ARGS], cwd=ROOT, capture_output=True, text=True, timeout=120, env=blockbuster_env()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "FAKE node" in lines[0] and "emulated generation time 64x64 0 ms" in lines[0]
    for load in ("1 at a time", "2 at once"):
        image_bytes, *latency = cells(lines, f"| {load} | 64x64 |")
        assert int(image_bytes) == len(fake_node.photo_png((64, 64)))
        plain_p50, plain_p95, store_p50, store_p95, ratio, difference = map(finite, latency)
        assert 0 < plain_p50 <= plain_p95 and 0 < store_p50 <= store_p95 and ratio > 0
    image_bytes, *parts = cells(lines, "| 64x64 |")
    assert int(image_bytes) > 0 and all(finite(cell) > 0 for cell in parts)
    for gateway in ("store", "plain"):
        before, half, after, growth, now = map(finite, cells(lines, f"| {gateway} | 64x64 x 2 |"))
        assert 0 < before <= half <= after and growth >= 0 and now > 0
    [checks] = [line for line in lines if line.startswith("checks: ")]
    # 3 untimed + 3 timed requests of 1 image, 4 of 1, 4 of 2: every image stored, none left on the node
    assert "stored images (t2i_gateway_stored_images_total) 18, answered with node urls (t2i_gateway_store_fallbacks_total) 0" in checks
    assert "objects under the prefix 18; stored images downloaded and compared with the node's: 2" in checks
    [verdict] = [line for line in lines if line.startswith("verdict: ")]
    assert re.match(rf"verdict: goal (met|not met): store/plain p50, 1 request at a time: 64x64 {NUMBER}x \({NUMBER} ms\)", verdict), (
        verdict
    )


def test_delays_must_name_every_size() -> None:
    assert image_store.parse_delays("512=80,1024=200", [512, 1024]) == {512: 80.0, 1024: 200.0}
    assert image_store.parse_delays("512=80,5", [512, 768]) == {512: 80.0, 768: 5.0}
    with pytest.raises(ValueError, match="no delay for 768"):
        image_store.parse_delays("512=80", [512, 768])
    with pytest.raises(SystemExit):
        image_store.main(["--sizes", "512", "--delay-ms", "1024=200"])
    assert fake_node.parse_delays("512x512=80,1024x1024=200,7") == {(512, 512): 0.08, (1024, 1024): 0.2, None: 0.007}


async def test_the_fake_node_serves_photos_of_the_size_asked_for(aiohttp_client: Any) -> None:
    client = await aiohttp_client(fake_node.create_app("ok", "photo", [(64, 64)], {(64, 64): 0.0}))
    for width, height in ((64, 64), (96, 72)):  # at start-up, and first asked for
        response = await client.post("/text-to-image", json={"prompt": "p", "width": width, "height": height, "num_images_per_prompt": 2})
        assert response.status == 200
        images = (await response.json())["images"]
        assert len(images) == 2
        bodies = []
        for image in images:
            path = image["url"].split(str(client.server.port), 1)[1]
            assert IMAGE_PATH.fullmatch(path), path
            served = await client.get(path)
            assert served.status == 200 and served.content_type == "image/png"
            bodies.append(await served.read())
        assert bodies[0] == bodies[1] == fake_node.photo_png((width, height))
        with Image.open(io.BytesIO(bodies[0])) as picture:
            assert picture.format == "PNG" and picture.size == (width, height)
    assert (await client.get(f"/stream/{'0' * 32}/{'0' * 16}.png")).status == 404


async def test_the_fake_node_answers_tiny_images_in_the_format_asked_for(aiohttp_client: Any) -> None:
    client = await aiohttp_client(fake_node.create_app("ok"))
    for fmt in ("png", "jpeg", "webp"):
        response = await client.post("/text-to-image", json={"prompt": "p", "width": 512, "height": 512, "output_format": fmt})
        [image] = (await response.json())["images"]
        path = image["url"].split(str(client.server.port), 1)[1]
        assert IMAGE_PATH.fullmatch(path) and path.endswith(f".{fmt}"), path
        served = await client.get(path)
        with Image.open(io.BytesIO(await served.read())) as picture:
            assert picture.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt] and picture.size == (1, 1)
    photo = await aiohttp_client(fake_node.create_app("ok", "photo"))
    assert (await photo.post("/text-to-image", json={"prompt": "p", "width": 64, "height": 64, "output_format": "jpeg"})).status == 400
