"""Entry point of ``t2i-gateway``."""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

import metrics
from discovery import CombinedDiscovery, Discovery, Endpoint, StaticDiscovery, open_discovery
from metrics import GatewayMetrics
from t2i_common import logs
from t2i_common.config import ConfigError
from t2i_common.server import base_url, listening_sockets, serve, tls_context

from .app import METRICS, create_app
from .config import GatewayConfig, load_config
from .local import LocalOrchestrator
from .state import KEYS


def build_app(config: GatewayConfig) -> web.Application:
    metrics = GatewayMetrics()
    backends: list[Discovery] = []
    static = [Endpoint(url) for url in config.orchestrators]
    local = LocalOrchestrator() if config.local_orchestrator else None
    if local:
        static.append(local.endpoint)
    if static:
        backends.append(StaticDiscovery(static))
    if config.registry:
        backends.append(
            open_discovery(config.registry, heartbeat_ttl_s=config.heartbeat_ttl_s, on_error=lambda _: metrics.registry_errors.inc())
        )
    stream_secret = config.stream_secret.encode() if config.stream_secret else secrets.token_bytes(32)
    app = create_app(config, discovery=CombinedDiscovery(backends), stream_secret=stream_secret, metrics_=metrics)
    if local:
        app.cleanup_ctx.insert(0, local.cleanup_ctx())
    return app


async def _reload_keys_on_sighup(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, app[KEYS].reload)
    yield
    loop.remove_signal_handler(signal.SIGHUP)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = load_config(argv)
        logs.configure(config.log_level)
        ssl_context = tls_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        sockets = listening_sockets(config.host, config.port)  # first: a port in use starts nothing
        metrics_sockets = listening_sockets(config.metrics_host, config.metrics_port) if config.metrics_port is not None else []
        app = build_app(config)
    except ConfigError as exc:
        sys.exit(f"t2i-gateway: {exc}")
    app.cleanup_ctx.append(_reload_keys_on_sighup)
    if metrics_sockets:
        app.cleanup_ctx.append(metrics.listener(metrics_sockets, app[METRICS].registry))
    url = base_url(sockets[0], ssl_context)
    hello = f"the playground: {url}/ in a browser; the API: POST {url}/text-to-image, {url}/v1/images/generations"
    if config.local_orchestrator:
        hello += "; the local orchestrator is loading its model (GET /health answers 200 once it is ready)"
    try:
        asyncio.run(serve(app, sockets, grace_s=config.shutdown_grace_s, ssl_context=ssl_context, hello=hello))
    except ConfigError as exc:  # found at start: an image store that cannot be used
        sys.exit(f"t2i-gateway: {exc}")


if __name__ == "__main__":
    main()
