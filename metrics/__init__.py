"""Every Prometheus metric of both daemons, declared in one place on an injected registry.

Each daemon builds its metrics object with its own ``CollectorRegistry`` (tests build a fresh
one each time), and ``setup`` serves that registry at ``GET /metrics``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler

# Generation takes seconds to minutes; the client library's default buckets stop at 10 s.
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class OrchestratorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ns = "t2i_orchestrator"
        self.requests = Counter(
            "requests", "Text-to-image requests answered, by HTTP status.", ["status"], namespace=ns, registry=self.registry
        )
        self.queue_depth = Gauge("queue_depth", "Requests waiting for the device.", namespace=ns, registry=self.registry)
        self.queue_limit = Gauge(
            "queue_limit", "Requests that may wait for the device (--max-queue).", namespace=ns, registry=self.registry
        )
        self.in_flight = Gauge("in_flight", "Requests being generated on the device.", namespace=ns, registry=self.registry)
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time a request waited for the device.",
            ["model"],
            buckets=GENERATION_BUCKETS,
            namespace=ns,
            registry=self.registry,
        )
        self.inference = Histogram(
            "inference_seconds",
            "Time spent generating one request's images (model load excluded).",
            ["model"],
            buckets=GENERATION_BUCKETS,
            namespace=ns,
            registry=self.registry,
        )
        self.model_load = Histogram(
            "model_load_seconds",
            "Time spent loading a model (and warming it up).",
            ["model"],
            buckets=GENERATION_BUCKETS,
            namespace=ns,
            registry=self.registry,
        )
        self.images = Counter("images_generated", "Images generated.", ["model"], namespace=ns, registry=self.registry)
        self.loaded_models = Gauge("loaded_models", "Models loaded on the device.", namespace=ns, registry=self.registry)
        self.batch_size = Histogram(
            "batch_size_images",
            "Images made by one pipeline call (requests batched together, --max-batch).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            namespace=ns,
            registry=self.registry,
        )


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ns = "t2i_gateway"
        self.requests = Counter(
            "requests",
            "Text-to-image requests answered, by HTTP status and model.",
            ["status", "model"],
            namespace=ns,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "request_seconds",
            "Time to answer a text-to-image request, retries included.",
            ["model"],
            buckets=GENERATION_BUCKETS,
            namespace=ns,
            registry=self.registry,
        )
        self.attempts = Counter(
            "attempts",
            "Requests sent to orchestrators, by outcome (ok, client_error, busy, failed).",
            ["orchestrator", "outcome"],
            namespace=ns,
            registry=self.registry,
        )
        self.retries = Counter("retries", "Attempts moved to another orchestrator after a failure.", namespace=ns, registry=self.registry)
        self.orchestrators = Gauge(
            "orchestrators",
            "Orchestrators by state: known, healthy, suspended.",
            ["state"],
            namespace=ns,
            registry=self.registry,
        )
        self.in_flight = Gauge("in_flight", "Text-to-image requests being handled.", namespace=ns, registry=self.registry)
        # Usage by API key (its name in --keys-file; "anonymous" without keys), as it can be billed.
        self.tenant_requests = Counter(
            "tenant_requests", "Text-to-image requests by key and HTTP status.", ["key", "status"], namespace=ns, registry=self.registry
        )
        self.tenant_images = Counter("tenant_images", "Images delivered, by key.", ["key"], namespace=ns, registry=self.registry)
        self.tenant_megapixel_steps = Counter(
            "tenant_megapixel_steps",
            "Work delivered, by key: width x height / 1e6 x steps x images.",
            ["key"],
            namespace=ns,
            registry=self.registry,
        )
        self.tenant_generation_seconds = Counter(
            "tenant_generation_seconds", "Seconds of generation on nodes, by key.", ["key"], namespace=ns, registry=self.registry
        )
        self.queued = Gauge(
            "queued",
            "Requests waiting at the gateway for a free slot on a node (--max-queued).",
            namespace=ns,
            registry=self.registry,
        )
        self.stream_bytes = Counter("stream_bytes", "Image bytes proxied through /stream.", namespace=ns, registry=self.registry)
        self.streams = Gauge("streams", "Image downloads (/stream) being served now.", namespace=ns, registry=self.registry)
        self.stored_images = Counter(
            "stored_images", "Images moved from their node into the image store (--image-store).", namespace=ns, registry=self.registry
        )
        self.store_seconds = Histogram(
            "store_seconds",
            "Time to move a request's images from the node into the image store.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            namespace=ns,
            registry=self.registry,
        )
        self.store_fallbacks = Counter(
            "store_fallbacks",
            "Requests answered with the node's image urls because the image store failed or was too slow (--store-timeout).",
            namespace=ns,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "store_errors", "Image-store failures, by operation (put, get, sweep).", ["operation"], namespace=ns, registry=self.registry
        )
        self.registry_errors = Counter(
            "registry_errors",
            "Registry problems: registry file versions rejected, Redis registry outages (the last good set was kept).",
            namespace=ns,
            registry=self.registry,
        )

        self.discovery_ok = Gauge(
            "discovery_ok",
            "1 while discovery follows its sources (a Redis registry reachable and followed), else 0; /health says why.",
            namespace=ns,
            registry=self.registry,
        )

    ATTEMPT_OUTCOMES = ("ok", "client_error", "busy", "no_memory", "failed")

    def forget_orchestrator(self, url: str) -> None:
        """Drop a departed orchestrator's series."""
        for outcome in self.ATTEMPT_OUTCOMES:
            try:
                self.attempts.remove(url, outcome)
            except KeyError:
                pass


def setup(app: web.Application, registry: CollectorRegistry) -> None:
    """Serve ``registry`` at ``GET /metrics``."""
    app.router.add_get("/metrics", make_aiohttp_handler(registry))


def listener(sockets: list[socket.socket], registry: CollectorRegistry) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that serves ``GET /metrics`` alone on ``sockets`` (an operators' port) while the app runs."""

    async def serve_metrics(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        setup(metrics_app, registry)
        runner = web.AppRunner(metrics_app, access_log=None)
        await runner.setup()
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        yield
        await runner.cleanup()

    return serve_metrics
