"""The limiter's pipelined Redis connection (t2i_gateway.redis_line), against a real redis-server: replies in
order to concurrent callers on one connection, errors as redis-py's, password, TLS and database, a restart,
a cancelled caller, a Redis that stops answering, and a peer that answers garbage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError, InvalidResponse, ResponseError

from discovery import RegistrySettings
from discovery.redis_registry import connect
from t2i_gateway import redis_line
from t2i_gateway.redis_line import RedisLine

from .services import RedisServer, make_ca


@pytest.fixture
async def line(redis_server: RedisServer) -> AsyncIterator[RedisLine]:
    line = RedisLine(RegistrySettings(redis_server.url))
    yield line
    line.close()


async def blocked_clients(redis_server: RedisServer, count: int) -> None:
    """Returns once ``count`` clients wait in a blocking command: an event, not a guess."""
    client = connect(RegistrySettings(redis_server.url))
    try:
        while (await client.info("clients"))["blocked_clients"] != count:  # each look is a round trip: the callers run
            pass
    finally:
        await client.aclose()


async def test_concurrent_callers_share_one_connection_and_each_gets_its_own_reply(line: RedisLine) -> None:
    replies = await asyncio.gather(*(line.call("ECHO", f"message {i}") for i in range(200)))
    assert replies == [f"message {i}" for i in range(200)]
    ids = await asyncio.gather(*(line.call("CLIENT", "ID") for _ in range(20)))
    assert len(set(ids)) == 1


async def test_an_error_reply_is_redis_pys_error_and_the_line_goes_on(line: RedisLine) -> None:
    assert await line.call("SET", "text", "not a number") == "OK"
    with pytest.raises(ResponseError, match="not an integer"):
        await line.call("INCR", "text")
    assert await line.call("INCRBY", "counter", 2) == 2


async def test_password_tls_and_database_as_redis_py_reads_them(tmp_path: Path) -> None:
    tls = make_ca(tmp_path / "tls")
    server = RedisServer(tmp_path, password="s3cret", tls=tls)
    server.start()
    try:
        database_3 = server.url.removesuffix("/0") + "/3"
        line = RedisLine(RegistrySettings(database_3, password="s3cret", ca=tls.ca))
        try:
            assert await line.call("SET", "where", "database 3") == "OK"
        finally:
            line.close()
        client = connect(RegistrySettings(database_3, password="s3cret", ca=tls.ca))
        try:
            assert await client.get("where") == "database 3"
        finally:
            await client.aclose()
        wrong = RedisLine(RegistrySettings(database_3, password="not it", ca=tls.ca))
        with pytest.raises(ResponseError, match="WRONGPASS|invalid password"):
            await wrong.call("PING")
        untrusted = RedisLine(RegistrySettings(database_3, password="s3cret"))  # the system's CAs do not know this one
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.call("PING")
    finally:
        server.stop()


async def test_a_restart_fails_the_callers_waiting_and_the_next_call_connects_again(redis_server: RedisServer, line: RedisLine) -> None:
    waiting = asyncio.ensure_future(line.call("BLPOP", "never", 0))
    await blocked_clients(redis_server, 1)
    redis_server.stop()
    with pytest.raises(ConnectionError, match="lost"):
        await waiting
    with pytest.raises(OSError):  # refused while it is down
        await line.call("PING")
    redis_server.start()
    assert await line.call("PING") == "PONG"


async def test_a_cancelled_caller_does_not_shift_the_replies_of_those_after_it(redis_server: RedisServer, line: RedisLine) -> None:
    cancelled = asyncio.ensure_future(line.call("BLPOP", "queue", 0))
    await blocked_clients(redis_server, 1)
    cancelled.cancel()
    after = asyncio.ensure_future(line.call("ECHO", "after"))  # answered once the BLPOP before it is
    client = connect(RegistrySettings(redis_server.url))
    try:
        await client.rpush("queue", "for the cancelled caller")
    finally:
        await client.aclose()
    assert await after == "after"
    assert cancelled.cancelled()


async def test_a_redis_that_stops_answering_times_out_and_the_next_call_connects_again(
    redis_server: RedisServer, line: RedisLine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_line, "TIMEOUT_S", 0.2)
    assert await line.call("PING") == "PONG"
    client = connect(RegistrySettings(redis_server.url))
    try:
        await client.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")  # Redis holds every client's writes
        with pytest.raises(TimeoutError, match="did not answer within 0.2 s"):
            await line.call("SET", "held", "1")
        await client.execute_command("CLIENT", "UNPAUSE")
    finally:
        await client.aclose()
    assert await line.call("PING") == "PONG"


async def test_a_peer_that_answers_garbage_fails_the_caller() -> None:
    async def fake_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # a fake, not Redis
        await reader.read(100)
        writer.write(b"this is not RESP\r\n")
        await writer.drain()

    server = await asyncio.start_server(fake_redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    line = RedisLine(RegistrySettings(f"redis://127.0.0.1:{port}/0"))
    try:
        with pytest.raises(InvalidResponse):
            await line.call("PING")
    finally:
        line.close()
        server.close()
        await server.wait_closed()
