"""End to end: the real ``t2i-orchestrator`` process with the demo model, over real HTTP."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from .processes import start, wait_healthy

NODE_SECRET = "node-secret-0123456789abcdef0123456"

pytestmark = pytest.mark.slow


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("node")
    daemon = start(
        "t2i_orchestrator",
        ["--cache-dir", str(model_cache), "--storage-dir", str(logs / "images"), "--threads", "1"],
        logs,
        {"T2I_ORCHESTRATOR_MAX_QUEUE": "3", "T2I_ORCHESTRATOR_SECRET": NODE_SECRET},
    )
    wait_healthy(daemon)
    yield daemon.url
    assert daemon.stop() == 0


AUTH = {"Authorization": f"Bearer {NODE_SECRET}"}


def test_the_seed_request_returns_a_downloadable_image(node: str) -> None:
    status, body = http("POST", f"{node}/text-to-image", {"prompt": "A cool cat on the beach", "width": 512, "height": 512}, AUTH)
    assert status == 200, body
    [image] = json.loads(body)["images"]
    assert image["url"].startswith(f"{node}/stream/") and image["nsfw"] is False and 0 <= image["seed"] < 2**32
    status, png = http("GET", image["url"], headers=AUTH)
    assert status == 200
    assert Image.open(io.BytesIO(png)).size == (512, 512)


def test_capabilities_and_settings_from_flags_and_environment(node: str) -> None:
    status, body = http("GET", f"{node}/capabilities", headers=AUTH)
    capabilities = json.loads(body)
    assert status == 200
    assert capabilities["capacity"] == 4  # 1 generating + T2I_ORCHESTRATOR_MAX_QUEUE=3
    [model] = capabilities["models"]
    assert {key: model[key] for key in ("model_id", "pipeline", "warm", "loaded", "capacity", "default_steps")} == {
        "model_id": "t2i/tiny-sd",
        "pipeline": "text-to-image",
        "warm": True,
        "loaded": True,
        "capacity": 1,
        "default_steps": 2,  # the demo model's
    }
    assert model["load_s"] > 0  # loaded at start, and timed


def test_errors_over_the_wire(node: str) -> None:
    assert http("POST", f"{node}/text-to-image", {"prompt": "a"})[0] == 401
    status, body = http("POST", f"{node}/text-to-image", {"prompt": "a", "width": 65}, AUTH)
    assert status == 422 and json.loads(body)["detail"][0]["loc"] == ["body", "width"]


def test_metrics_are_prometheus_text(node: str) -> None:
    status, body = http("GET", f"{node}/metrics")
    assert status == 200
    assert b"t2i_orchestrator_model_load_seconds_count" in body and b"t2i_orchestrator_requests_total" in body
