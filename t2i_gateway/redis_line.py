"""One pipelined connection to Redis, for the one command on a request's path: the limiter's check.

redis-py's asyncio client spends about 150 µs of CPU on a command here (its connection pool, stream
reader, retry and timeout wrappers), half of all that keys may add to a request (0.3 ms, issue 20). This
line writes each command straight to one socket and hands the replies to the callers in order, since Redis
answers a connection's commands in the order they came, parsed by hiredis (redis-py's own parser): about
50 µs. Concurrent requests share the connection (auto-pipelining): N at once cost one connection, not N.
Errors are redis-py's, so that callers handle both clients alike; everything else goes through redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError, InvalidResponse, ResponseError

from discovery import RegistrySettings

TIMEOUT_S = 2.0  # connecting, and each reply: as redis-py's socket timeouts (discovery.redis_registry.connect)


class _Connection(asyncio.Protocol):
    """Commands written as they come, replies handed out in order; no answer within TIMEOUT_S closes it."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError, encoding="utf-8")
        self._waiting: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()  # (sent at, reply)
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None  # one timer for all, not one per command: cheaper
        self._error: Exception | None = None  # why it closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport's subclasses

    @property
    def closed(self) -> bool:
        return self._error is not None

    def send(self, command: bytes) -> asyncio.Future[Any]:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if self._error is not None:  # no reply would ever come
            reply.set_exception(self._error)
            return reply
        self._waiting.append((loop.time(), reply))
        self._transport.write(command)
        if self._watchdog is None:
            self._watchdog = loop.call_later(TIMEOUT_S, self._watch)
        return reply

    def _watch(self) -> None:
        self._watchdog = None
        if self._waiting and self._error is None:
            sent_at = self._waiting[0][0]
            loop = asyncio.get_running_loop()
            if loop.time() - sent_at >= TIMEOUT_S:
                self.close(TimeoutError(f"Redis did not answer within {TIMEOUT_S:g} s"))
            else:
                self._watchdog = loop.call_at(sent_at + TIMEOUT_S, self._watch)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                _, waiting = self._waiting.popleft()
                if not waiting.done():  # else its caller was cancelled
                    waiting.set_result(reply)
        except (InvalidResponse, IndexError) as error:  # garbage, or a reply no command asked for
            self.close(InvalidResponse(f"Redis sent what no command asked for: {error}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"Connection to Redis lost: {exc or 'closed by the server'}"))

    def close(self, error: Exception) -> None:
        """Fail every caller still waiting: the replies that would match them can no longer be told apart."""
        self._error = self._error or error
        while self._waiting:
            _, waiting = self._waiting.popleft()
            if not waiting.done():
                waiting.set_exception(error)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._transport is not None:
            self._transport.abort()


class RedisLine:
    """Commands to the Redis of ``settings`` (``redis://`` or ``rediss://``, password and database as
    redis-py reads them), over one connection, made on first use and again after a failure."""

    def __init__(self, settings: RegistrySettings) -> None:
        options = parse_url(settings.location)
        self._host: str = options.get("host", "localhost")
        self._port: int = options.get("port", 6379)
        self._tls = settings.location.startswith("rediss://")
        self._ca = settings.ca
        self._context: ssl.SSLContext | None = None  # made on the first connection
        password = options.get("password") or settings.password
        self._hello: list[tuple[Any, ...]] = []  # what a new connection sends first
        if password:
            self._hello.append(("AUTH", options["username"], password) if options.get("username") else ("AUTH", password))
        if options.get("db"):
            self._hello.append(("SELECT", options["db"]))
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def call(self, *args: Any) -> Any:
        """The reply to the command ``args``: redis-py's ``ResponseError`` for an error reply, its
        ``ConnectionError`` or ``TimeoutError`` when Redis cannot be reached or does not answer in time."""
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        reply = await connection.send(hiredis.pack_command(args))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _connect(self) -> _Connection:
        async with self._connecting:  # one caller connects; the others wait for it
            if self._connection is not None and not self._connection.closed:
                return self._connection
            if self._tls and self._context is None:  # certificates are read from disk: not on the event loop
                self._context = await asyncio.to_thread(ssl.create_default_context, cafile=self._ca)
            async with asyncio.timeout(TIMEOUT_S):
                _, connection = await asyncio.get_running_loop().create_connection(
                    _Connection, self._host, self._port, ssl=self._context, server_hostname=self._host if self._tls else None
                )
            try:
                for command in self._hello:
                    reply = await connection.send(hiredis.pack_command(command))
                    if isinstance(reply, ResponseError):
                        raise reply
            except BaseException as error:
                connection.close(ConnectionError(f"Connection to Redis refused: {error}"))
                raise
            self._connection = connection
            return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close(ConnectionError("Connection to Redis closed"))
            self._connection = None
