"""Per-tenant limits (t2i_gateway.limits): GCRA in this process on a clock of the test's own, and in a real
Redis shared by two gateways, through an outage. Redis tests use limits where elapsed time does not matter."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from discovery import RegistrySettings
from discovery.redis_registry import connect
from t2i_gateway import limits
from t2i_gateway.limits import Cost, LocalLimiter, Quota, RedisLimiter, Usage, Verdict, duration

from .services import RedisServer

ONE = Cost(1, 1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def requests_headers(remaining: int, reset: str, limit: int = 3) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(remaining), "x-ratelimit-reset-requests": reset}


@pytest.fixture
async def limiters(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisLimiter]]:
    """Makes RedisLimiters on the test's Redis (gateways sharing it), closed at the end."""
    made: list[RedisLimiter] = []

    def make(hold_s: float = 60.0) -> RedisLimiter:
        made.append(RedisLimiter(RegistrySettings(redis_server.url), hold_s=hold_s))
        return made[-1]

    yield make
    for limiter in made:
        await limiter.close()


def test_duration_is_written_as_go_and_openai_write_it() -> None:
    cases = {0: "0s", 0.02: "20ms", 0.0201: "21ms", 0.999: "999ms", 1: "1s", 1.5: "1.5s", 20.0000002: "20s", 59.999: "59.999s"}
    cases |= {60: "1m0s", 90: "1m30s", 360: "6m0s", 3600: "1h0m0s", 3725.5: "1h2m5.5s", -1: "0s"}
    assert {seconds: duration(seconds) for seconds in cases} == cases


async def test_a_burst_of_a_minutes_worth_then_a_denial_until_one_is_earned_back() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    quota = Quota(requests_per_minute=3)
    assert [await limiter.admit("a", quota, ONE, f"t{i}") for i in range(3)] == [
        Verdict(True, requests_headers(2, "20s")),
        Verdict(True, requests_headers(1, "40s")),
        Verdict(True, requests_headers(0, "1m0s")),
    ]
    denied = requests_headers(0, "1m0s") | {"Retry-After": "20", "retry-after-ms": "20000"}
    assert await limiter.admit("a", quota, ONE, "t3") == Verdict(False, denied, "requests", 20.0)
    clock.now += 5.5
    denied = requests_headers(0, "54.5s") | {"Retry-After": "15", "retry-after-ms": "14500"}
    assert await limiter.admit("a", quota, ONE, "t3") == Verdict(False, denied, "requests", 14.5)
    clock.now += 14.5
    assert await limiter.admit("a", quota, ONE, "t3") == Verdict(True, requests_headers(0, "1m0s"))
    assert await limiter.admit("b", quota, ONE, "t0") == Verdict(True, requests_headers(2, "20s"))  # tenants apart
    clock.now += 60  # idle for a minute: the whole burst again
    assert await limiter.admit("a", quota, ONE, "t4") == Verdict(True, requests_headers(2, "20s"))


async def test_images_and_megapixel_steps_are_counted_by_cost() -> None:
    limiter = LocalLimiter(clock=Clock())
    quota = Quota(images_per_minute=10, mpx_steps_per_minute=100.0)
    headers = lambda images, images_reset, mpx, mpx_reset: {  # noqa: E731
        "x-ratelimit-limit-images": "10",
        "x-ratelimit-remaining-images": str(images),
        "x-ratelimit-reset-images": images_reset,
        "x-ratelimit-limit-megapixel-steps": "100",
        "x-ratelimit-remaining-megapixel-steps": str(mpx),
        "x-ratelimit-reset-megapixel-steps": mpx_reset,
    }
    assert await limiter.admit("a", quota, Cost(4, 30.5), "t0") == Verdict(True, headers(6, "24s", 69, "18.3s"))
    assert await limiter.admit("a", quota, Cost(4, 30.5), "t1") == Verdict(True, headers(2, "48s", 39, "36.6s"))
    denied = await limiter.admit("a", quota, Cost(4, 1.0), "t2")
    assert denied == Verdict(False, headers(2, "48s", 39, "36.6s") | {"Retry-After": "12", "retry-after-ms": "12000"}, "images", 12.0)
    denied = await limiter.admit("a", quota, Cost(1, 50.0), "t2")  # megapixel-steps deny it, 6.6 s late
    assert (denied.exceeded, denied.headers["retry-after-ms"]) == ("megapixel-steps", "6600")
    # Both deny: the longer wait is the one that lets it through.
    assert (await limiter.admit("a", quota, Cost(5, 50.0), "t2")).exceeded == "images"
    assert (await limiter.admit("b", Quota(mpx_steps_per_minute=2.5), Cost(1, 1.0), "t2")).headers == {
        "x-ratelimit-limit-megapixel-steps": "2.5",
        "x-ratelimit-remaining-megapixel-steps": "1",
        "x-ratelimit-reset-megapixel-steps": "24s",
    }


async def test_a_denial_in_one_dimension_takes_nothing_in_the_others() -> None:
    limiter = LocalLimiter(clock=Clock())
    quota = Quota(requests_per_minute=10, images_per_minute=4, concurrent=2)
    assert (await limiter.admit("a", quota, Cost(3, 0.0), "t1")).allowed
    denied = await limiter.admit("a", quota, Cost(3, 0.0), "t2")
    assert (denied.allowed, denied.exceeded) == (False, "images")
    assert denied.headers["x-ratelimit-remaining-requests"] == "9"  # not taken
    allowed = await limiter.admit("a", quota, Cost(1, 0.0), "t3")  # the second slot: t2 took none
    assert allowed.headers["x-ratelimit-remaining-requests"] == "8" and allowed.headers["x-ratelimit-remaining-images"] == "0"
    busy = await limiter.admit("a", quota, Cost(0, 0.0), "t4")
    assert busy.exceeded == "concurrent" and busy.headers["x-ratelimit-remaining-requests"] == "8"  # not taken either


async def test_a_cost_over_a_minutes_limit_never_passes() -> None:
    limiter = LocalLimiter(clock=Clock())
    quota = Quota(requests_per_minute=10, images_per_minute=4)
    verdict = await limiter.admit("a", quota, Cost(5, 0.0), "t0")
    assert (verdict.allowed, verdict.exceeded, verdict.retry_after_s) == (False, "images", math.inf)
    assert "Retry-After" not in verdict.headers and "retry-after-ms" not in verdict.headers
    assert verdict.headers["x-ratelimit-remaining-requests"] == "10" and verdict.headers["x-ratelimit-remaining-images"] == "4"
    assert (await limiter.admit("a", quota, Cost(4, 0.0), "t1")).allowed  # exactly a minute's worth passes, once
    over = await limiter.admit("a", Quota(mpx_steps_per_minute=10.0), Cost(1, 10.5), "t2")
    assert (over.exceeded, over.retry_after_s) == ("megapixel-steps", math.inf)
    never = await limiter.admit("a", Quota(images_per_minute=0), Cost(1, 0.0), "t3")
    assert (never.exceeded, never.retry_after_s) == ("images", math.inf)


async def test_concurrency_is_held_until_finish() -> None:
    limiter = LocalLimiter(clock=Clock())
    quota = Quota(concurrent=2)
    assert [await limiter.admit("a", quota, ONE, ticket) for ticket in ("t1", "t2")] == [Verdict(True, {})] * 2
    busy = Verdict(False, {"Retry-After": "1", "retry-after-ms": "1000"}, "concurrent", 1.0)
    assert await limiter.admit("a", quota, ONE, "t3") == busy
    limiter.finish("a", "", Usage(429, 0, 0.0, 0.0))  # a request that held no slot frees none
    assert await limiter.admit("a", quota, ONE, "t3") == busy
    assert (await limiter.admit("b", quota, ONE, "t3")).allowed  # another tenant's slots
    limiter.finish("a", "t1", Usage(200, 1, 1.0, 2.0))
    assert (await limiter.admit("a", quota, ONE, "t3")).allowed
    assert (await limiter.admit("a", Quota(), ONE, "t4")).allowed  # no limits at all


async def test_local_usage_is_counted_per_tenant() -> None:
    limiter = LocalLimiter()
    limiter.finish("a", "t1", Usage(200, 2, 1.5, 3.0))
    limiter.finish("a", "t2", Usage(200, 1, 0.5, 1.0))
    limiter.finish("a", "", Usage(429, 0, 0.0, 0.0))
    limiter.finish("b", "", Usage(401, 0, 0.0, 0.0))
    assert await limiter.usage() == {
        "a": {"requests": {"200": 2, "429": 1}, "images": 3, "megapixel_steps": 2.0, "generation_seconds": 4.0},
        "b": {"requests": {"401": 1}, "images": 0, "megapixel_steps": 0.0, "generation_seconds": 0.0},
    }
    assert limiter.problem() is None


async def test_redis_a_burst_then_a_denial(redis_server: RedisServer, limiters: Callable[..., RedisLimiter]) -> None:
    limiter = limiters()
    quota = Quota(requests_per_minute=3)
    verdicts = [await limiter.admit("a", quota, ONE, f"t{i}") for i in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.headers["x-ratelimit-remaining-requests"] for v in verdicts] == ["2", "1", "0", "0"]
    assert verdicts[0].headers["x-ratelimit-reset-requests"] == "20s"  # on Redis's clock: no time passes within the script
    denied = verdicts[3]
    assert denied.exceeded == "requests" and 19 < denied.retry_after_s <= 20
    assert denied.headers["Retry-After"] == "20" and 19_000 < int(denied.headers["retry-after-ms"]) <= 20_000
    client = connect(RegistrySettings(redis_server.url))
    try:  # an idle tenant's TAT goes once it means nothing
        assert 59_000 < await client.pttl("t2i:limits:a:rates") <= 60_000
        assert await client.exists("t2i:limits:a:concurrent") == 0  # no concurrency limit, no set
    finally:
        await client.aclose()
    assert limiter.fallbacks == 0 and limiter.problem() is None


async def test_an_admit_is_one_round_trip(redis_server: RedisServer, limiters: Callable[..., RedisLimiter]) -> None:
    limiter = limiters()
    quota = Quota(requests_per_minute=100, images_per_minute=100, mpx_steps_per_minute=100.0, concurrent=5)
    await limiter.admit("a", quota, ONE, "t0")  # loads the script
    sent: list[object] = []

    def counted(call: Callable[..., Any]) -> Callable[..., Any]:
        async def spy(*args: Any, **options: Any) -> Any:
            sent.append(args[0])
            return await call(*args, **options)

        return spy

    limiter.client.execute_command = counted(limiter.client.execute_command)  # type: ignore[method-assign]
    limiter._line.call = counted(limiter._line.call)  # type: ignore[method-assign]
    client = connect(RegistrySettings(redis_server.url))
    try:
        before = (await client.info("commandstats"))["cmdstat_evalsha"]["calls"]
        assert (await limiter.admit("a", quota, Cost(2, 3.0), "t1")).allowed
        assert sent == ["EVALSHA"] and (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] == before + 1
    finally:
        await client.aclose()


async def test_two_gateways_on_one_redis_enforce_one_limit(limiters: Callable[..., RedisLimiter]) -> None:
    a, b = limiters(), limiters()
    quota = Quota(requests_per_minute=10, images_per_minute=100)
    verdicts = await asyncio.gather(*(limiter.admit("t", quota, ONE, f"r{i}") for i, limiter in enumerate([a, b] * 10)))
    assert sum(v.allowed for v in verdicts) == 10
    assert {v.exceeded for v in verdicts if not v.allowed} == {"requests"}
    # Tenant names reach only their own keys, whatever they hold.
    for tenant in ("x", "x:requests", "x y", "tenants"):
        assert (await a.admit(tenant, Quota(requests_per_minute=1), ONE, "r")).allowed


async def test_concurrency_across_gateways_is_held_until_finish(limiters: Callable[..., RedisLimiter]) -> None:
    a, b = limiters(), limiters()
    quota = Quota(concurrent=2)
    assert (await a.admit("t", quota, ONE, "r1")).allowed and (await b.admit("t", quota, ONE, "r2")).allowed
    busy = await a.admit("t", quota, ONE, "r3")
    assert (busy.allowed, busy.exceeded, busy.headers) == (False, "concurrent", {"Retry-After": "1", "retry-after-ms": "1000"})
    b.finish("t", "r3", Usage(429, 0, 0.0, 0.0))  # refused: held nothing, releases nothing
    a.finish("t", "r1", Usage(200, 1, 1.0, 1.0))
    await a.flushed()
    assert (await b.admit("t", quota, ONE, "r3")).allowed
    assert not (await a.admit("t", quota, ONE, "r4")).allowed  # r2 and r3 hold both


async def test_a_released_slot_goes_to_redis_without_waiting_for_the_usage_batch(
    redis_server: RedisServer, limiters: Callable[..., RedisLimiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "FLUSH_S", 3600.0)  # usage alone would wait an hour for its batch; a slot may not
    a = limiters()
    a.finish("t", "", Usage(401, 0, 0.0, 0.0))  # usage alone: the writer waits
    assert (await a.admit("t", Quota(concurrent=1), ONE, "r1")).allowed
    a.finish("t", "r1", Usage(200, 1, 1.0, 1.0))  # and no admit follows to carry its release
    client = connect(RegistrySettings(redis_server.url))
    try:
        while await client.zcard("t2i:limits:t:concurrent"):  # each look is a round trip: the writer runs
            pass
        usage = {"requests:401": "1", "requests:200": "1", "images": "1", "megapixel_steps": "1", "generation_seconds": "1"}
        assert await client.hgetall("t2i:limits:t:usage") == usage  # in the same write
    finally:
        await client.aclose()


async def test_a_limit_written_into_redis_by_someone_else_counts_as_a_minutes_worth_at_most(
    redis_server: RedisServer, limiters: Callable[..., RedisLimiter]
) -> None:
    limiter = limiters()
    quota = Quota(requests_per_minute=10)
    client = connect(RegistrySettings(redis_server.url))
    try:
        for far in ("1e999", "1e300"):  # far ahead: the key has used a minute's worth, no more
            await client.hset("t2i:limits:t:rates", "requests", far)
            denied = await limiter.admit("t", quota, ONE, "r")
            assert (denied.allowed, denied.headers["x-ratelimit-reset-requests"], denied.headers["retry-after-ms"]) == (
                False,
                "1m0s",
                "6000",
            )
        for nonsense in ("nan", "-1e999", "not a time"):  # none at all
            await client.hset("t2i:limits:t:rates", "requests", nonsense)
            allowed = await limiter.admit("t", quota, ONE, "r")
            assert (allowed.allowed, allowed.headers["x-ratelimit-remaining-requests"]) == (True, "9")
    finally:
        await client.aclose()


async def test_a_dead_gateways_slot_is_held_for_hold_s_only(limiters: Callable[..., RedisLimiter]) -> None:
    dead, live = limiters(hold_s=0.0), limiters()
    quota = Quota(concurrent=1)
    assert (await dead.admit("t", quota, ONE, "r1")).allowed  # and never finished
    assert (await live.admit("t", quota, ONE, "r2")).allowed  # r1's hold (0 s) is over by Redis's clock
    assert not (await live.admit("t", quota, ONE, "r3")).allowed


async def test_usage_is_summed_across_gateways(limiters: Callable[..., RedisLimiter]) -> None:
    a, b = limiters(), limiters()
    a.finish("t", "r1", Usage(200, 2, 1.5, 3.0))
    b.finish("t", "r2", Usage(200, 1, 0.5, 1.0))
    b.finish("t", "", Usage(429, 0, 0.0, 0.0))
    a.finish("u", "", Usage(401, 0, 0.0, 0.0))
    await a.flushed()
    await b.flushed()
    expected = {
        "t": {"requests": {"200": 2, "429": 1}, "images": 3, "megapixel_steps": 2.0, "generation_seconds": 4.0},
        "u": {"requests": {"401": 1}, "images": 0, "megapixel_steps": 0.0, "generation_seconds": 0.0},
    }
    assert await a.usage() == expected and await b.usage() == expected
    a.finish("u", "", Usage(401, 0, 0.0, 0.0))  # not yet flushed: counted once all the same
    assert (await a.usage())["u"]["requests"] == {"401": 2}
    await a.close()  # flushes what is pending
    assert (await b.usage())["u"]["requests"] == {"401": 2}


async def test_usage_that_someone_else_wrote_into_redis_is_left_out_when_not_a_number(
    redis_server: RedisServer, limiters: Callable[..., RedisLimiter]
) -> None:
    limiter = limiters()
    limiter.finish("t", "", Usage(200, 1, 0.5, 1.0))
    await limiter.flushed()
    client = connect(RegistrySettings(redis_server.url))
    try:
        await client.hset("t2i:limits:t:usage", mapping={"requests:500": "inf", "images:x": "nan", "generation_seconds": "-1e999"})
    finally:
        await client.aclose()
    assert await limiter.usage() == {"t": {"requests": {"200": 1}, "images": 1, "megapixel_steps": 0.5, "generation_seconds": 0.0}}


async def test_an_outage_is_limited_locally_and_its_usage_reaches_redis_when_it_is_back(
    redis_server: RedisServer, limiters: Callable[..., RedisLimiter]
) -> None:
    limiter = limiters()
    quota = Quota(requests_per_minute=3)
    assert (await limiter.admit("t", quota, ONE, "r0")).allowed and limiter.fallbacks == 0
    redis_server.stop()
    verdicts = [await limiter.admit("t", quota, ONE, f"r{i}") for i in range(1, 5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]  # this gateway's own limit of 3
    assert verdicts[3].exceeded == "requests" and verdicts[3].headers["Retry-After"] == "20"
    assert (await limiter.admit("c", Quota(concurrent=1), ONE, "c1")).allowed  # a slot taken locally...
    assert not (await limiter.admit("c", Quota(concurrent=1), ONE, "c2")).allowed
    limiter.finish("c", "c1", Usage(200, 1, 1.0, 1.0))  # ...is released locally
    assert (await limiter.admit("c", Quota(concurrent=1), ONE, "c2")).allowed
    assert limiter.fallbacks == 7
    assert (limiter.problem() or "").startswith("Redis unreachable")
    for i in range(4):
        limiter.finish("t", f"r{i}", Usage(200, 1, 2.0, 0.5))
    limiter.finish("t", "r4", Usage(429, 0, 0.0, 0.0))
    expected = {"requests": {"200": 4, "429": 1}, "images": 4, "megapixel_steps": 8.0, "generation_seconds": 2.0}
    assert (await limiter.usage())["t"] == expected  # this gateway's view, while Redis is away

    redis_server.start()  # empty: what it learns of usage is what the outage kept
    await limiter.flushed()
    assert limiter.problem() is None
    assert (await limiters().usage())["t"] == expected
    assert (await limiter.admit("t", quota, ONE, "r5")).allowed and limiter.fallbacks == 7  # shared again
