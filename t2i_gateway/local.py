"""``--local-orchestrator``: an orchestrator run as a managed child process of the gateway.

A child rather than in-process, so that the gateway itself never imports torch. The child serves on
a socket the gateway binds on 127.0.0.1 (a free port) and hands over (``--listen-fd``): handing over
only the port number would leave it free for any other process to take during the seconds the child
spends loading. It gets a random secret (in its environment, never on a command line) and takes the
rest of its settings from the usual ``T2I_ORCHESTRATOR_*`` variables.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from discovery import Endpoint

logger = logging.getLogger(__name__)


class LocalOrchestrator:
    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.endpoint = Endpoint(f"http://127.0.0.1:{self.port}", secret=secrets.token_urlsafe(32))
        self._process: asyncio.subprocess.Process | None = None

    def cleanup_ctx(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """Start the child with the application, stop it with a SIGTERM (then SIGKILL) on cleanup."""

        async def run(app: web.Application) -> AsyncIterator[None]:
            env = {**os.environ, "T2I_ORCHESTRATOR_SECRET": self.endpoint.secret or ""}
            fd = self._sock.fileno()
            # --port too, though not bound: the node names itself by it (--node-id, <hostname>:<port>).
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "t2i_orchestrator", "--port", str(self.port), "--listen-fd", str(fd), pass_fds=(fd,), env=env
            )
            self._sock.close()  # the child holds its own copy
            logger.info("started the local orchestrator (pid %d) on %s", self._process.pid, self.endpoint.url)
            yield
            await self.stop()

        return run

    async def stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
