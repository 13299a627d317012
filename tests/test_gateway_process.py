"""The real ``t2i-gateway`` process: the README's one-command system, and HTTPS."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .processes import free_port, start, wait_healthy

pytestmark = pytest.mark.slow


def test_local_orchestrator_answers_the_seed_request(tmp_path: Path, model_cache: Path) -> None:
    gateway = start(
        "t2i_gateway",
        ["--local-orchestrator"],
        tmp_path,
        {"T2I_ORCHESTRATOR_CACHE_DIR": str(model_cache), "T2I_ORCHESTRATOR_STORAGE_DIR": str(tmp_path / "images")},
    )
    try:
        wait_healthy(gateway)
        # The seed's request, verbatim but for the address.
        curl = subprocess.run(
            [
                "curl",
                "-sS",
                "-X",
                "POST",
                f"{gateway.url}/text-to-image",
                "-H",
                "Content-Type: application/json",
                "-d",
                '{\n    "prompt":"A cool cat on the beach",\n    "width": 1024,\n    "height": 1024\n}',
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        [image] = json.loads(curl.stdout)["images"]
        assert image["url"].startswith(f"{gateway.url}/stream/") and image["nsfw"] is False
        subprocess.run(["curl", "-sS", "-f", "-O", image["url"]], cwd=tmp_path, timeout=60, check=True)
        [png] = tmp_path.glob("*.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.read_bytes()[16:24] == (1024).to_bytes(4, "big") * 2  # IHDR width and height
        assert f"the playground: {gateway.url}/ in a browser" in gateway.log.read_text()  # the log says where to go
    finally:
        assert gateway.stop() == 0


@pytest.mark.parametrize("module", ["t2i_gateway", "t2i_orchestrator"])
def test_a_port_in_use_is_one_line_and_starts_nothing(tmp_path: Path, module: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = ["--local-orchestrator"] if module == "t2i_gateway" else []
        run = subprocess.run(
            [sys.executable, "-m", module, *args, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "T2I_ORCHESTRATOR_CACHE_DIR": str(tmp_path)},
        )
    assert run.returncode == 1 and run.stdout == ""
    assert (
        run.stderr
        == f"{module.replace('_', '-')}: 127.0.0.1:{port} is already in use (is another instance running?); stop it or choose another --port\n"
    )
    assert not list(tmp_path.iterdir())  # no node started, no model built


def test_tls_serves_https(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    gateway = start("t2i_gateway", ["--orchestrator", "http://127.0.0.1:9", "--tls-cert", str(cert), "--tls-key", str(key)], tmp_path)
    url = gateway.url.replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    try:
        for _ in range(50):
            try:
                with urllib.request.urlopen(f"{url}/openapi.json", context=context, timeout=2) as response:
                    assert response.status == 200 and json.load(response)["openapi"].startswith("3.")
                    break
            except OSError:
                if gateway.process.poll() is not None:
                    raise
                time.sleep(0.2)
        else:
            raise AssertionError(gateway.log.read_text())
    finally:
        gateway.stop()


def test_metrics_can_have_a_listener_of_their_own(tmp_path: Path) -> None:
    metrics_port = free_port()
    gateway = start("t2i_gateway", ["--orchestrator", "http://127.0.0.1:9", "--metrics-port", str(metrics_port)], tmp_path)
    try:
        wait_healthy(gateway, path="/openapi.json")  # listening (without a node it is never ready)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{gateway.url}/metrics", timeout=5)
        assert caught.value.code == 404  # not on the public port
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"t2i_gateway_requests_total" in response.read()
    finally:
        assert gateway.stop() == 0
