"""OpenAI's Images API on the gateway, driven by the official ``openai`` Python package against real processes."""

from __future__ import annotations

import base64
import io
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import openai
import pytest
from PIL import Image

from .processes import start, wait_healthy

pytestmark = pytest.mark.slow

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("openai")
    node = start("t2i_orchestrator", ["--cache-dir", str(model_cache), "--storage-dir", str(folder / "images"), "--threads", "1"], folder)
    gateway = start("t2i_gateway", ["--orchestrator", node.url, "--api-key", KEY], folder)
    try:
        wait_healthy(node)
        wait_healthy(gateway)
        yield gateway.url
    finally:
        gateway.stop()
        node.stop()


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0)


def png_size(data: bytes) -> tuple[int, int]:
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG"
    return picture.size


def test_generate_with_urls(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="a cool cat on the beach", size="128x64", n=2)
    assert result.created > 0 and result.data and len(result.data) == 2
    for image in result.data:
        assert image.url and "/stream/" in image.url and image.b64_json is None
        with urllib.request.urlopen(image.url, timeout=30) as response:
            assert png_size(response.read()) == (128, 64)


def test_generate_with_base64(client: openai.OpenAI) -> None:
    result = client.images.generate(
        prompt="a lighthouse", model="t2i/tiny-sd", size="64x64", response_format="b64_json", quality="standard"
    )
    [image] = result.data or []
    assert image.url is None and png_size(base64.b64decode(image.b64_json or "")) == (64, 64)


@pytest.mark.parametrize(("output_format", "pillow_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats_come_as_asked_by_url_and_in_base64(
    client: openai.OpenAI, output_format: Literal["jpeg", "webp"], pillow_format: str
) -> None:
    by_url = client.images.generate(prompt="a cat", size="64x64", output_format=output_format, output_compression=80)
    [image] = by_url.data or []
    assert image.url and image.url.endswith(f".{output_format}")
    with urllib.request.urlopen(image.url, timeout=30) as response:
        assert response.headers["Content-Type"] == f"image/{output_format}"
        downloaded = Image.open(io.BytesIO(response.read()))
    inline = client.images.generate(prompt="a cat", size="64x64", output_format=output_format, response_format="b64_json")
    [encoded] = inline.data or []
    decoded = Image.open(io.BytesIO(base64.b64decode(encoded.b64_json or "")))
    assert (downloaded.format, downloaded.size) == (decoded.format, decoded.size) == (pillow_format, (64, 64))


def test_models_are_listed(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["t2i/tiny-sd"]


def test_an_invalid_size_is_a_bad_request_with_the_gateways_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a cat", size="65x64")
    assert caught.value.status_code == 400 and "The width must be a multiple of 8, got 65." in caught.value.message
    assert caught.value.param == "size"
    with pytest.raises(openai.BadRequestError, match="Must be one of png, jpeg, webp"):
        client.images.generate(prompt="a cat", size="64x64", output_format="gif")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="not offered by any orchestrator"):
        client.images.generate(prompt="a cat", size="64x64", model="dall-e-3")


def test_a_wrong_key_is_an_authentication_error(gateway: str) -> None:
    wrong = openai.OpenAI(base_url=f"{gateway}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a cat", size="64x64")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_livepeer_fields_ride_along_as_extras(client: openai.OpenAI) -> None:
    first = client.images.generate(
        prompt="a cat", size="64x64", response_format="b64_json", extra_body={"seed": 42, "num_inference_steps": 3}
    )
    again = client.images.generate(
        prompt="a cat", size="64x64", response_format="b64_json", extra_body={"seed": 42, "num_inference_steps": 3}
    )
    assert first.data and again.data and first.data[0].b64_json == again.data[0].b64_json  # the same seed: the same image
