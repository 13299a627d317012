"""Entry point of ``t2i-orchestrator``."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from t2i_common import logs
from t2i_common.config import ConfigError
from t2i_common.server import inherited_socket, listening_sockets, serve, tls_context

from .config import OrchestratorConfig, load_config

logger = logging.getLogger("t2i_orchestrator")


def build_app(config: OrchestratorConfig) -> web.Application:
    """The real node: diffusers on the configured device (imports torch, which takes seconds)."""
    # OMP_WAIT_POLICY is left to OpenMP's default (idle threads spin briefly, then sleep). PASSIVE, which
    # this node set before, puts them to sleep after every parallel region: a CPU request at 64x64 took
    # 1.5x to 1.9x as long through the node (bench.end_to_end). Where several nodes share a few cores,
    # an operator may still set it.
    from .app import create_app
    from .diffusers_engine import DiffusersEngine

    engine = DiffusersEngine(
        config.models,
        device=config.device,
        cache_dir=config.cache_dir,
        safety_checker=config.safety_checker,
        max_loaded_models=config.max_loaded_models,
        threads=config.threads,
    )
    return create_app(config, engine=engine)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = load_config(argv)
        logs.configure(config.log_level)
        ssl_context = tls_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        if config.listen_fd is not None:
            sockets = [inherited_socket(config.listen_fd)]
        else:
            sockets = listening_sockets(config.host, config.port)
        app = build_app(config)
    except ConfigError as exc:
        sys.exit(f"t2i-orchestrator: {exc}")
    logger.info("serving %s", ", ".join(m.model_id for m in config.models))
    failure = asyncio.run(serve(app, sockets, grace_s=config.shutdown_grace_s, ssl_context=ssl_context))
    if failure:
        sys.exit(f"t2i-orchestrator: {failure}")


if __name__ == "__main__":
    main()
