"""Per-tenant (per API key) rate limits and usage, counted in this gateway or in a Redis that several share.

Each per-minute limit is a GCRA (generic cell rate algorithm): per tenant and dimension one number, the
theoretical arrival time (TAT). A limit of L per minute spaces units T = 60/L s apart; a request of cost c
moves the TAT to max(TAT, now) + c*T and is allowed while that stays within a minute of now, so a tenant may
spend a whole minute's worth at once and then earns it back steadily. Nothing runs in the background to
refill anything: each check is one read and one write.

With Redis, one script checks and takes every limit at once on Redis's clock (one round trip per request).
When Redis cannot be reached the limiter FAILS OPEN WITH A LOCAL LIMIT: it decides with this gateway's own
counts (each gateway then allows up to the whole limit, so a tenant may get up to N times its limit from N
gateways during an outage) rather than refuse every request, and says so in ``problem()``. Usage is kept in
memory until Redis takes it, so an outage delays it but does not lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from redis.exceptions import RedisError, ResponseError

from discovery import RegistrySettings
from discovery.redis_registry import connect, redacted

from .redis_line import RedisLine

logger = logging.getLogger(__name__)

MINUTE = 60.0
EPSILON = 1e-6  # float error allowed in "within a minute" and in counting what remains
CONCURRENT_RETRY_S = 1.0  # when a slot frees is unknown: a guess, for Retry-After
RETRY_S = 1.0  # while Redis is away: how often an admit or a flush tries it again
FLUSH_S = 0.5  # usage is written to Redis at most this long after its request ended
RELEASE_S = 0.05  # a slot released at most this long after its request ended, if no admit carried it sooner
CLOSE_FLUSH_S = 3.0


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits; None: unlimited."""

    requests_per_minute: int | None = None
    images_per_minute: int | None = None
    mpx_steps_per_minute: float | None = None  # megapixel-steps: width*height/1e6 * steps * images
    concurrent: int | None = None  # requests at once


@dataclass(frozen=True, slots=True)
class Cost:
    images: int
    mpx_steps: float


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    headers: dict[str, str]  # x-ratelimit-* for each per-minute limit set; on denial also Retry-After, retry-after-ms
    exceeded: str | None = None  # on denial: "requests", "images", "megapixel-steps" or "concurrent"
    retry_after_s: float = 0.0  # on denial: until the same request would be allowed (inf: never, it is over a minute's limit)


@dataclass(frozen=True, slots=True)
class Usage:
    status: int  # HTTP status the request ended with
    images: int  # images delivered (0 unless status 200)
    mpx_steps: float  # work delivered (0 unless 200)
    seconds: float  # seconds of generation (time the request spent at nodes)


class Limiter(Protocol):
    async def admit(self, tenant: str, quota: Quota, cost: Cost, ticket: str) -> Verdict:
        """Check every limit; take them all (one concurrency slot held under ``ticket``) only if all allow."""
        ...

    def finish(self, tenant: str, ticket: str, usage: Usage) -> None:
        """Release the ticket's slot (if it held one) and add ``usage``; never blocks, never raises."""
        ...

    async def usage(self) -> dict[str, dict[str, Any]]: ...

    def problem(self) -> str | None: ...

    async def close(self) -> None: ...


def duration(seconds: float) -> str:
    """As Go writes a duration (OpenAI's x-ratelimit-reset-*): "20ms", "1s", "1.5s", "6m0s", "1h0m0s";
    rounded up to the millisecond, since a client waits for it."""
    ms = max(0, _ms(seconds))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


def _ms(seconds: float) -> int:
    """Rounded up, less the float error of times near Redis's epoch (microseconds): 20.0000002 s is 20000 ms."""
    return math.ceil(seconds * 1000 - 1e-3)


class _Check(NamedTuple):  # made three times on every request: a tuple is cheaper than a frozen dataclass
    dimension: str
    limit: float
    cost: float
    tat: float  # before this request
    fits: bool


def _priced(quota: Quota, cost: Cost) -> list[tuple[str, float, float]]:
    """(dimension, limit per minute, this request's cost) for each per-minute limit the quota sets."""
    dims: list[tuple[str, float | None, float]] = [
        ("requests", quota.requests_per_minute, 1),
        ("images", quota.images_per_minute, cost.images),
        ("megapixel-steps", quota.mpx_steps_per_minute, cost.mpx_steps),
    ]
    return [(dim, float(limit), float(amount)) for dim, limit, amount in dims if limit is not None]


def _period(limit: float) -> float:
    return MINUTE / max(limit, 1e-9)  # a limit of 0 lets nothing through (but a cost of 0)


def _end(now: float, tat: float, limit: float, cost: float) -> float:
    return max(tat, now) + cost * _period(limit)  # the Lua script computes exactly this, in this order


def _verdict(now: float, checks: list[_Check], busy: bool, concurrent: int | None) -> Verdict:
    allowed = not busy and all(check.fits for check in checks)
    headers: dict[str, str] = {}
    denials: list[tuple[float, str]] = []
    for check in checks:
        period, start = _period(check.limit), max(check.tat, now)
        end = _end(now, check.tat, check.limit, check.cost) if allowed else start  # a denial takes nothing
        limit = str(int(check.limit)) if check.limit.is_integer() else repr(check.limit)
        headers[f"x-ratelimit-limit-{check.dimension}"] = limit
        headers[f"x-ratelimit-remaining-{check.dimension}"] = str(max(0, math.floor((MINUTE - (end - now)) / period + EPSILON)))
        headers[f"x-ratelimit-reset-{check.dimension}"] = duration(end - now)
        if not check.fits:
            wait = _end(now, check.tat, check.limit, check.cost) - MINUTE - now
            denials.append((math.inf if check.cost > check.limit else max(wait, 0.001), check.dimension))
    if busy:
        denials.append((math.inf if (concurrent or 0) < 1 else CONCURRENT_RETRY_S, "concurrent"))
    if allowed:
        return Verdict(True, headers)
    retry, exceeded = max(denials)  # the longest wait: after it, every limit allows the request
    if not math.isinf(retry):
        ms = _ms(retry)
        headers |= {"Retry-After": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)}
    return Verdict(False, headers, exceeded, retry)


def _fields(usage: Usage) -> dict[str, float]:
    """A request's usage as the fields of a tenant's usage hash."""
    return {f"requests:{usage.status}": 1, "images": usage.images, "megapixel_steps": usage.mpx_steps, "generation_seconds": usage.seconds}


def _add(into: dict[str, float], fields: dict[str, float]) -> None:
    for name, amount in fields.items():
        if amount:
            into[name] = into.get(name, 0) + amount


def _numbers(fields: dict[str, str]) -> dict[str, float]:
    """A usage hash as read; a field that is not a finite number (not ours) is left out."""
    numbers = {}
    for name, text in fields.items():
        try:
            number = float(text)
        except ValueError:
            continue
        if math.isfinite(number):
            numbers[name] = number
    return numbers


def _report(flat: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {
        tenant: {
            "requests": {name.partition(":")[2]: int(n) for name, n in fields.items() if name.startswith("requests:")},
            "images": int(fields.get("images", 0)),
            "megapixel_steps": fields.get("megapixel_steps", 0.0),
            "generation_seconds": fields.get("generation_seconds", 0.0),
        }
        for tenant, fields in flat.items()
    }


class LocalLimiter:
    """Limits and usage counted in this process. Its dicts are keyed by tenant, and tenants are the names
    in the keys file: bounded, so nothing is ever dropped."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[tuple[str, str], float] = {}  # (tenant, dimension) -> TAT
        self._slots: dict[str, set[str]] = {}  # tenant -> tickets holding a concurrency slot
        self._usage: dict[str, dict[str, float]] = {}

    async def admit(self, tenant: str, quota: Quota, cost: Cost, ticket: str) -> Verdict:
        priced = _priced(quota, cost)
        if not priced and quota.concurrent is None:
            return Verdict(True, {})
        now = self._clock()
        tats = [self._tats.get((tenant, dim), now) for dim, _, _ in priced]
        checks = [_Check(dim, lim, c, tat, _end(now, tat, lim, c) - now <= MINUTE + EPSILON) for (dim, lim, c), tat in zip(priced, tats)]
        slots = self._slots.setdefault(tenant, set())
        verdict = _verdict(now, checks, quota.concurrent is not None and len(slots) >= quota.concurrent, quota.concurrent)
        if verdict.allowed:
            for check in checks:
                self._tats[tenant, check.dimension] = _end(now, check.tat, check.limit, check.cost)
            if quota.concurrent is not None:
                slots.add(ticket)
        return verdict

    def finish(self, tenant: str, ticket: str, usage: Usage) -> None:
        self._slots.get(tenant, set()).discard(ticket)
        _add(self._usage.setdefault(tenant, {}), _fields(usage))

    async def usage(self) -> dict[str, dict[str, Any]]:
        return _report(self._usage)

    def problem(self) -> str | None:
        return None

    async def close(self) -> None:
        pass


# Check every per-minute limit and the concurrency set, on Redis's clock; take them all or nothing. First,
# release the slots of this gateway's requests that ended since its last call (carried here: no round trip
# of their own while requests keep coming).
# KEYS: the concurrency set (member: ticket, score: when its slot expires), the tenant's TAT hash (field:
#   dimension), then the concurrency sets to release tickets from.
# ARGV: ticket, concurrency limit ("" = none), hold seconds, the number of limits n, then "dimension limit
#   cost" for each, then for each set to release from: the number of its tickets, and the tickets.
# Returns one string: now, 1 if the concurrency limit denies, then per limit its TAT before ('-': none) and
# 1 if the cost fits. (One reply, and one read and one write of the TATs: this runs on every request's path.)
_ADMIT = """
local n = tonumber(ARGV[4])
local a = 5 + 3 * n
for k = 3, #KEYS do
  local count = tonumber(ARGV[a])
  redis.call('ZREM', KEYS[k], unpack(ARGV, a + 1, a + count))
  a = a + 1 + count
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local reply, ok, last, fields = {string.format('%.17g', now), '0'}, true, now, {}
for i = 1, n do fields[i] = ARGV[2 + 3 * i] end
local tats = n > 0 and redis.call('HMGET', KEYS[2], unpack(fields)) or {}
local written = {}
for i = 1, n do
  local limit, cost = tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
  local tat = tonumber(tats[i])
  if tat ~= tat then tat = nil end  -- NaN: not a time
  -- No TAT of ours is ever more than a minute ahead: one written by anyone else counts as a minute's worth at most.
  if tat then tat = math.min(tat, now + 60 + 1e-6) end
  reply[#reply + 1] = tat and string.format('%.17g', tat) or '-'  -- not what is stored: anyone may have written that
  tat = tat or now
  local ends = math.max(tat, now) + cost * (60 / math.max(limit, 1e-9))
  local fits = ends - now <= 60 + 1e-6
  ok = ok and fits
  last = math.max(last, ends)
  reply[#reply + 1] = fits and '1' or '0'
  written[#written + 1] = fields[i]
  written[#written + 1] = string.format('%.17g', ends)
end
if ARGV[2] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', reply[1])
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then reply[2] = '1'; ok = false end
end
if ok and n > 0 then
  redis.call('HSET', KEYS[2], unpack(written))
  redis.call('PEXPIRE', KEYS[2], math.max(1, math.ceil((last - now) * 1000)))  -- an idle tenant's TATs outlive their meaning by nothing
end
if ok and ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[1], string.format('%.17g', now + tonumber(ARGV[3])), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(tonumber(ARGV[3]) * 1000)))
end
return table.concat(reply, ' ')
"""
_ADMIT_SHA = hashlib.sha1(_ADMIT.encode()).hexdigest()


class RedisLimiter:
    """Limits shared by every gateway on one Redis, under ``<prefix>:limits:``: ``<tenant>:rates`` (a hash:
    each limit's TAT), ``<tenant>:concurrent`` (a sorted set of tickets), ``<tenant>:usage`` (a hash) and ``tenants``
    (a set). Every suffix is free of ':', so no tenant name, whatever it holds, can reach another's keys.

    ``hold_s``: how long a slot outlives a gateway that died without finishing its request."""

    def __init__(self, settings: RegistrySettings, *, hold_s: float) -> None:
        self.where = redacted(settings.location)
        self.client = connect(settings)  # usage and releases, in batches
        self._line = RedisLine(settings)  # the admits: one round trip on each request's path, kept cheap
        self.fallbacks = 0  # admits decided by the local limiter, Redis being away
        self._prefix = f"{settings.prefix}:limits:"
        self._hold = repr(float(hold_s))
        self._local = LocalLimiter()  # decides during an outage; counts this gateway's usage for the local view
        self._held: set[tuple[str, str]] = set()  # (tenant, ticket) admitted with a slot in Redis: in flight, so bounded
        # Not yet in Redis: tenant -> usage field -> amount (bounded by the tenants), and tenant -> tickets to
        # release (bounded by the requests in flight when an outage began, plus at most one failed try of
        # Redis a second: the other admits of an outage do not reach it).
        self._pending: dict[str, dict[str, float]] = {}
        self._releases: dict[str, set[str]] = {}
        self._usage_due: float | None = None  # monotonic time by which the pending usage is to be written
        self._releases_due: float | None = None  # and the pending releases
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a due time came nearer, or flushed() asks for a flush at once
        self._flush_now = False
        self._lock = asyncio.Lock()  # a flush and a usage read: each sees a batch as either pending or in Redis
        self._problem: str | None = None
        self._down_at: float | None = None  # monotonic time of the last failed try; None: Redis is reachable

    def _key(self, tenant: str, suffix: str) -> str:
        return f"{self._prefix}{tenant}:{suffix}"

    def _away(self) -> bool:
        """Redis failed within RETRY_S; else, when it had failed, this caller is the one to try it again."""
        if self._down_at is None:
            return False
        if time.monotonic() - self._down_at < RETRY_S:
            return True
        self._down_at = time.monotonic()  # the others stay local while this one tries
        return False

    def _failed(self, error: BaseException) -> None:
        self._down_at = time.monotonic()
        if self._problem is None:
            logger.warning("limits: Redis at %s unreachable; limiting per gateway until it is back: %s", self.where, error)
        self._problem = f"Redis unreachable: {str(error) or type(error).__name__}"

    def _reached(self) -> None:
        if self._problem is not None:
            logger.warning("limits: Redis at %s reachable again; limits are shared", self.where)
        self._problem = self._down_at = None

    async def admit(self, tenant: str, quota: Quota, cost: Cost, ticket: str) -> Verdict:
        priced = _priced(quota, cost)
        if not priced and quota.concurrent is None:
            return Verdict(True, {})
        if self._away():
            return await self._fallback(tenant, quota, cost, ticket)
        keys = [self._key(tenant, "concurrent"), self._key(tenant, "rates")]
        args = [ticket, "" if quota.concurrent is None else str(quota.concurrent), self._hold, str(len(priced))]
        for dim, limit, amount in priced:
            args += [dim, repr(limit), repr(amount)]
        releases, self._releases, self._releases_due = self._releases, {}, None
        for releasing, tickets in releases.items():
            keys.append(self._key(releasing, "concurrent"))
            args += [str(len(tickets)), *tickets]
        try:
            reply = await self._run_admit(keys, args)
        except (RedisError, OSError) as error:  # TimeoutError included
            self._failed(error)
            self._unreleased(releases)
            self._release(tenant, ticket, quota)  # had the script run, the slot it took is not the one decided on
            return await self._fallback(tenant, quota, cost, ticket)
        except asyncio.CancelledError:
            self._unreleased(releases)
            self._release(tenant, ticket, quota)  # it may have taken a slot that no one will finish
            raise
        self._reached()
        now = float(reply[0])
        checks = [
            _Check(dim, lim, c, now if reply[2 + 2 * i] == "-" else float(reply[2 + 2 * i]), reply[3 + 2 * i] == "1")
            for i, (dim, lim, c) in enumerate(priced)
        ]
        verdict = _verdict(now, checks, reply[1] == "1", quota.concurrent)
        if verdict.allowed and quota.concurrent is not None:
            self._held.add((tenant, ticket))
        return verdict

    async def _run_admit(self, keys: list[str], args: list[str]) -> list[str]:
        """The script's reply, split in its fields."""
        try:
            reply = await self._line.call("EVALSHA", _ADMIT_SHA, len(keys), *keys, *args)
        except ResponseError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            reply = await self._line.call("EVAL", _ADMIT, len(keys), *keys, *args)  # which caches it for EVALSHA
        return str(reply).split()

    async def _fallback(self, tenant: str, quota: Quota, cost: Cost, ticket: str) -> Verdict:
        self.fallbacks += 1
        return await self._local.admit(tenant, quota, cost, ticket)

    def _unreleased(self, releases: dict[str, set[str]]) -> None:
        """Releases that a failed admit carried: for the next call."""
        for tenant, tickets in releases.items():
            self._queue_release(tenant, tickets)

    def _release(self, tenant: str, ticket: str, quota: Quota) -> None:
        if quota.concurrent is not None:
            self._queue_release(tenant, {ticket})

    def _queue_release(self, tenant: str, tickets: set[str]) -> None:
        self._releases.setdefault(tenant, set()).update(tickets)
        if self._releases_due is None:
            self._releases_due = time.monotonic() + RELEASE_S
            self._wake.set()  # the flusher may be waiting for the usage, due later
        self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    def finish(self, tenant: str, ticket: str, usage: Usage) -> None:
        try:
            self._local.finish(tenant, ticket, usage)  # releases a slot taken locally, and counts the local view
            _add(self._pending.setdefault(tenant, {}), _fields(usage))
            if self._usage_due is None:
                self._usage_due = time.monotonic() + FLUSH_S
            if (tenant, ticket) in self._held:
                self._held.discard((tenant, ticket))
                self._queue_release(tenant, {ticket})
            self._kick()
        except Exception:  # callers settle a response with it: never let it fail one
            logger.exception("limits: could not record usage of %r", tenant)

    def _due(self) -> float:
        """When the flusher is to write next: the earliest due time, or the next try of a Redis away."""
        if self._down_at is not None:
            return self._down_at + RETRY_S
        return min((due for due in (self._usage_due, self._releases_due) if due is not None), default=time.monotonic())

    async def _flush_loop(self) -> None:
        """Write what is pending a little later, so that one write carries many requests' usage: usage at most
        FLUSH_S after its request ended, released slots within RELEASE_S (another gateway may be waiting for
        one), unless an admit carried them sooner; flushed() asks for everything at once."""
        while self._pending or self._releases:
            if not self._flush_now and (wait_s := self._due() - time.monotonic()) > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                continue
            self._flush_now = False
            try:
                await self._flush()
            except (RedisError, OSError) as error:
                self._failed(error)
            else:
                self._reached()

    async def _flush(self) -> None:
        async with self._lock:
            pending, self._pending, self._usage_due = self._pending, {}, None
            releases, self._releases, self._releases_due = self._releases, {}, None
            try:
                # MULTI/EXEC: a flush that fails before EXEC applied nothing, and is retried whole.
                pipe = self.client.pipeline(transaction=True)
                for tenant, fields in pending.items():
                    pipe.sadd(f"{self._prefix}tenants", tenant)
                    for name, amount in fields.items():
                        if name == "images" or name.startswith("requests:"):
                            pipe.hincrby(self._key(tenant, "usage"), name, int(amount))
                        else:
                            pipe.hincrbyfloat(self._key(tenant, "usage"), name, amount)
                for tenant, tickets in releases.items():
                    pipe.zrem(self._key(tenant, "concurrent"), *tickets)
                results = await pipe.execute(raise_on_error=False)
            except BaseException:  # cancellation included: kept for the next try, due at once
                for tenant, fields in pending.items():
                    _add(self._pending.setdefault(tenant, {}), fields)
                for tenant, tickets in releases.items():
                    self._releases.setdefault(tenant, set()).update(tickets)
                now = time.monotonic()
                self._usage_due = now if pending else self._usage_due
                self._releases_due = now if releases else self._releases_due
                raise
        # A command Redis refused (a key of another type, written by someone else) would be refused again.
        for result in results:
            if isinstance(result, Exception):
                logger.error("limits: Redis refused a usage update (dropped): %s", result)

    async def flushed(self) -> None:
        """Returns once the usage finished so far is in Redis (during an outage: once Redis is back)."""
        while self._flusher is not None and not self._flusher.done():
            self._flush_now = True
            self._wake.set()
            await asyncio.wait([self._flusher])

    async def usage(self) -> dict[str, dict[str, Any]]:
        if self._away():
            return await self._local.usage()
        try:
            async with self._lock:
                tenants = sorted(str(tenant) for tenant in await self.client.smembers(f"{self._prefix}tenants"))
                pipe = self.client.pipeline(transaction=False)
                for tenant in tenants:
                    pipe.hgetall(self._key(tenant, "usage"))
                hashes = await pipe.execute()
                flat = {tenant: _numbers(fields) for tenant, fields in zip(tenants, hashes)}
                for tenant, fields in self._pending.items():
                    _add(flat.setdefault(tenant, {}), fields)
        except (RedisError, OSError) as error:
            self._failed(error)
            return await self._local.usage()
        self._reached()
        return _report(flat)

    def problem(self) -> str | None:
        return self._problem

    async def close(self) -> None:
        try:
            async with asyncio.timeout(CLOSE_FLUSH_S):
                await self.flushed()
        except TimeoutError:
            logger.warning("limits: usage of %d tenants not written to Redis at shutdown", len(self._pending))
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait([self._flusher])
        self._line.close()
        await self.client.aclose()
