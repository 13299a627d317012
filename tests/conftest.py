from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from blockbuster import blockbuster_ctx
from prometheus_client import CollectorRegistry

from bench.common import RedisServer, S3Server
from discovery import Endpoint, StaticDiscovery
from metrics import GatewayMetrics, OrchestratorMetrics
from t2i_gateway.app import POOL
from t2i_gateway.app import create_app as create_gateway
from t2i_gateway.config import GatewayConfig
from t2i_orchestrator.app import create_app as create_orchestrator
from t2i_orchestrator.config import OrchestratorConfig
from t2i_orchestrator.models import ModelSpec

from .fakes import FakeEngine, FakeOrchestrator
from .helpers import Gateway, MakeClient, MakeGateway, wait_ready, wait_until
from .processes import PRODUCT, STARTED

# Tests never reach the Hugging Face Hub, and several torch processes share two cores.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[None]:
    """Blocking calls on a running loop from the project's packages (``PRODUCT``) fail the test."""
    with blockbuster_ctx(PRODUCT):
        yield
    # The daemons that end-to-end tests start run with it too (tests/blockbuster_site): their logs say.
    for daemon in list(STARTED):
        ended = daemon.process.poll() is not None
        blocked = daemon.log.exists() and "BlockingError" in daemon.log.read_text(errors="replace")
        if ended or blocked:
            STARTED.remove(daemon)  # read for the last time: it has ended, or its error is reported (once)
        if blocked:
            pytest.fail(f"a blocking call on {daemon.url}'s event loop; see {daemon.log}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a loopback port, for this test alone."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 service (SeaweedFS) on loopback, shared by the session's tests: each makes its own bucket."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 service, with its AWS credentials in the environment (as a gateway's would be)."""
    for name, value in S3Server.CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the built demo model (built once per test session)."""
    from t2i_orchestrator.demo_model import ensure_demo_model

    cache = tmp_path_factory.mktemp("t2i-cache")
    ensure_demo_model(cache)
    return cache


@pytest.fixture(scope="session")
def demo_model_path(model_cache: Path) -> Path:
    from t2i_orchestrator.demo_model import demo_model_dir

    return demo_model_dir(model_cache)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, demo_model_path: Path) -> Path:
    """A folder of LoRAs for the demo model: ``tiny-style`` (random, strong enough to change images)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(demo_model_path, local_files_only=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # peft starts lora_B at zero, which would change nothing: fill it with noise.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(folder / "tiny-style", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return folder


@pytest.fixture(scope="session")
def nsfw_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with a safety checker that flags every image."""
    from t2i_orchestrator.demo_model import build_demo_model

    folder = tmp_path_factory.mktemp("tiny-nsfw")
    build_demo_model(folder, flag_everything=True)
    return folder


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_client(aiohttp_client: Any, tmp_path: Path, engine: FakeEngine) -> MakeClient:
    async def make(**overrides: Any) -> TestClient:
        config = OrchestratorConfig(
            models=(ModelSpec("warm/model", warm=True), ModelSpec("cold/model")),
            storage_dir=tmp_path / "images",
            **overrides,
        )
        client = await aiohttp_client(create_orchestrator(config, engine=engine, metrics_=OrchestratorMetrics(CollectorRegistry())))
        await wait_ready(client)
        return client

    return make


@pytest.fixture
def make_gateway(aiohttp_client: Any, aiohttp_server: Any) -> MakeGateway:
    async def make(*fakes: FakeOrchestrator, wait_ready: bool = True, **overrides: Any) -> Gateway:
        servers = [await aiohttp_server(fake.app()) for fake in fakes]
        endpoints = [Endpoint(str(server.make_url("")).rstrip("/")) for server in servers]
        metrics = GatewayMetrics(CollectorRegistry())
        config = GatewayConfig(orchestrators=tuple(e.url for e in endpoints), **overrides)
        app = create_gateway(config, discovery=StaticDiscovery(endpoints), stream_secret=b"test-secret", metrics_=metrics)
        # As the daemon serves (t2i_common.server.serve): a client that leaves cancels its handler.
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        gateway = Gateway(client, servers, metrics)
        if wait_ready:
            await wait_until(lambda: all(n.capabilities for n in app[POOL].nodes.values()) and len(app[POOL].healthy()) > 0)
        return gateway

    return make
