"""Serving a daemon until SIGTERM or SIGINT, then draining: what was accepted finishes, new work gets 503.

aiohttp's own ``run_app`` stops listening at once on a signal; we keep listening for the grace
period so that new requests get a clear 503 (and load balancers or gateways move on) while the
requests in flight finish.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .config import ConfigError
from .errors import ServiceUnavailable

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Drain:
    """Counts the generation requests in flight and, once draining, refuses new ones."""

    def __init__(self, paths: frozenset[str] = frozenset({"/text-to-image", "/text-to-image/"})) -> None:
        self.paths = paths
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in self.paths:
            return await handler(request)
        if self.draining:
            raise ServiceUnavailable("This server is shutting down; send the request elsewhere.", retry_after=1)
        self.in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def drain(self, grace_s: float) -> None:
        self.draining = True
        if self.in_flight:
            logger.info("draining: waiting up to %.0f s for %d request(s) in flight", grace_s, self.in_flight)
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            logger.warning("grace period over: %d request(s) still in flight are cut off", self.in_flight)


# The application's Drain; its middleware must sit inside the error middleware.
DRAIN = web.AppKey("drain", Drain)


class Stop:
    """Asks ``serve`` to stop: on a signal (a clean stop) or on a failure the daemon cannot serve through."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.failure: str | None = None

    def fail(self, failure: str) -> None:
        """Stop serving; the process then exits non-zero with ``failure`` (so systemd and Kubernetes see it)."""
        self.failure = failure
        self.requested.set()


STOP = web.AppKey("stop", Stop)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server's TLS context from PEM files; a ConfigError says what is wrong with them."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: {exc}") from None
    return context


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind ``host:port`` (each address the name stands for, as aiohttp would) before anything starts.

    A daemon binds first, so that a port in use is one line at start, with nothing started yet (no
    child node, no model load), rather than a traceback after them.
    """
    try:
        addresses = {info[4]: info[0] for info in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    except OSError as exc:
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for address, family in addresses.items():
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(addresses) > 1:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # its IPv4 twin is bound on its own
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{host}:{port} is already in use (is another instance running?); stop it or choose another --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sockets


def inherited_socket(fd: int) -> socket.socket:
    """The listening socket a parent process passed as file descriptor ``fd`` (``--listen-fd``)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"--listen-fd {fd}: not an open socket ({exc.strerror})") from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise ConfigError(f"--listen-fd {fd}: not a TCP socket")
    return sock


async def serve(
    app: web.Application,
    sockets: list[socket.socket],
    *,
    grace_s: float,
    ssl_context: ssl.SSLContext | None = None,
    hello: str = "",
) -> str | None:
    """Serve on ``sockets`` (bound by ``listening_sockets`` or a parent process) until SIGTERM or SIGINT,
    then drain for up to ``grace_s`` seconds and clean up. ``hello`` is logged once listening.

    Returns None after a clean stop, or the failure that stopped the daemon (see ``Stop.fail``).
    """
    stop = app.setdefault(STOP, Stop())
    # handler_cancellation: a client that goes away cancels its handler, which stops its generation.
    # No aiohttp access log: each daemon writes its own line per generation request (with its
    # X-Request-ID and outcome), and a second line per request costs the gateway's hot path ~45 µs.
    # shutdown_timeout: the drain below already gave requests their grace; what still runs after it is
    # cut off at once (aiohttp would otherwise wait up to 60 s more).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=ssl_context).start()
            logger.info("listening on %s", base_url(sock, ssl_context))
        if hello:
            logger.info("%s", hello)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.requested.set)
        await stop.requested.wait()
        logger.info("shutting down")
        await app[DRAIN].drain(grace_s)
    finally:
        await runner.cleanup()
    logger.info("stopped")
    return stop.failure


def base_url(sock: socket.socket, ssl_context: ssl.SSLContext | None) -> str:
    """The URL a browser on this machine would use for ``sock`` (a wildcard address becomes loopback)."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{'https' if ssl_context else 'http'}://{f'[{host}]' if ':' in host else host}:{port}"
