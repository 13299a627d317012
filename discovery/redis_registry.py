"""The Redis registry: one registry that every gateway and node of a fleet reaches over the network.

Under a key prefix (``--registry-prefix``, default ``t2i``, so that several fleets can share a Redis):

- ``<prefix>:orchestrators`` is a sorted set: member = a node's URL, score = when its entry expires, in
  seconds on Redis's own clock (``TIME``), ``+inf`` for a static entry (``t2i-register`` without
  ``--heartbeat``). A heartbeat moves the score forward; every read removes what has expired, in the
  same script. So expiry is decided by one clock, Redis's, never by a gateway's or a node's.
- ``<prefix>:orchestrators:reports`` is a hash: field = a node's URL, value = its report, the JSON body
  of its ``/capabilities`` (status, capacity, load, models), written with each heartbeat and removed
  with its entry. Gateways take a reporting node's state from here instead of probing it while idle:
  probing every node from every gateway is what a large fleet cannot afford.
- ``<prefix>:orchestrators:events`` is a channel on which joins, leaves and changed offers are announced
  (``join <url>``, ``leave <url>``, ``report <url>``), so that gateways hear of them at once; a full read
  every few seconds is the safety net for a missed message, and brings everyone's latest load. A full
  read is one round trip, however large the fleet.

A gateway keeps each node while Redis holds its entry, until its ``leave``: when the expiry it last
read (measured by Redis, counted down by the gateway) has passed, it reads again rather than drop the
node, since a heartbeat that only moved the load renews the entry without an announcement. When Redis
is unreachable the gateway keeps the last known set, and when Redis comes back (even restarted empty)
it keeps each node for at least ``outage_grace_s`` more, time enough for the nodes' next heartbeats to
put them back.

Anyone who can write to Redis can publish on the channel or write a report: a message or report that
is not what a node writes is skipped, and the follower task that reads them is supervised (restarted
with backoff, its state in ``problem()``, which the gateway shows in ``/health`` and a metric).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis
from redis import __version__ as redis_py_version
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError, RedisError

from . import Endpoint, RegistrySettings, normalize_url

logger = logging.getLogger(__name__)

# Add or refresh a node and its report; announce it when it is new, or when its offer changed.
# KEYS: set, reports, channel. ARGV: url, ttl seconds ("" = static), report ("" = none), "1" = offer changed.
_HEARTBEAT = """
local now = redis.call('TIME')
local expiry = '+inf'
if ARGV[2] ~= '' then expiry = tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[2]) end
local added = redis.call('ZADD', KEYS[1], expiry, ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) end
if added == 1 then
  redis.call('PUBLISH', KEYS[3], 'join ' .. ARGV[1])
elseif ARGV[4] == '1' then
  redis.call('PUBLISH', KEYS[3], 'report ' .. ARGV[1])
end
return added
"""

# Drop expired entries and their reports, then return Redis's time, every entry with its expiry,
# and every report. KEYS: set, reports.
_READ = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1e6
for _, url in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. t)) do
  redis.call('ZREM', KEYS[1], url)
  redis.call('HDEL', KEYS[2], url)
end
return {tostring(t), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('HGETALL', KEYS[2])}
"""

# Remove a node and its report, and announce it. KEYS: set, reports, channel. ARGV: url.
_LEAVE = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], 'leave ' .. ARGV[1])
return removed
"""

FULL_READ_S = 5.0
RECONNECT_S = 1.0
MAX_RESTART_S = 30.0  # the longest wait before following again after a failure of our own


class RedisRegistry:
    """The registry's operations, for nodes (heartbeat, leave), ``t2i-register`` and gateways (read)."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.key = f"{settings.prefix}:orchestrators"
        self.reports = f"{self.key}:reports"
        self.channel = f"{self.key}:events"
        self.client = connect(settings)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._read = self.client.register_script(_READ)
        self._leave = self.client.register_script(_LEAVE)

    async def heartbeat(
        self, url: str, ttl_s: float | None, report: str = "", *, changed: bool = False, pipeline: Pipeline | None = None
    ) -> bool:
        """Add or refresh ``url`` (for ``ttl_s`` seconds; None: static) with its ``report`` (JSON; "":
        none), announcing the report when ``changed``. True when it was new; with ``pipeline``, only
        queued on it (its ``execute()`` has the result)."""
        args = [url, "" if ttl_s is None else repr(ttl_s), report, "1" if changed else ""]
        added = await self._heartbeat(keys=[self.key, self.reports, self.channel], args=args, client=pipeline)
        return pipeline is None and bool(added)

    async def leave(self, url: str) -> bool:
        """Remove ``url``; False when it was not there."""
        return bool(await self._leave(keys=[self.key, self.reports, self.channel], args=[url]))

    async def read(self) -> tuple[float, dict[str, float], dict[str, str]]:
        """Redis's time now, every live entry's expiry on that clock (``inf`` for static ones), and the
        reports of the nodes that sent one."""
        now, flat, reports = await self._read(keys=[self.key, self.reports])
        return float(now), _pairs(flat, float), _pairs(reports, str)

    async def close(self) -> None:
        await self.client.aclose()


def _pairs(flat: list[str], value: Callable[[str], Any]) -> dict[str, Any]:
    return {flat[i]: value(flat[i + 1]) for i in range(0, len(flat), 2)}


def connect(settings: RegistrySettings, *, decode: bool = True) -> redis.Redis:
    """A client for ``settings.location``; ``rediss://`` certificates are always verified, host name included.

    ``decode=False``: replies as bytes, for messages from parties that may send anything."""
    options: dict[str, Any] = {
        "decode_responses": decode,
        "socket_timeout": 2.0,
        "socket_connect_timeout": 2.0,
        # A pooled connection that a Redis restart closed fails its next command: try once more on a
        # fresh one (redis-py's default policy does not, and the heartbeat would be lost).
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [ConnectionError],
        # Named here, or redis-py reads the installed packages' metadata from disk for it on every new
        # connection, on the event loop.
        "driver_info": DriverInfo(lib_version=redis_py_version),
    }
    if settings.password:
        options["password"] = settings.password
    if settings.location.startswith("rediss://"):
        options |= {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        if settings.ca:
            options["ssl_ca_certs"] = str(settings.ca)
    return redis.Redis.from_url(settings.location, **options)


def redacted(location: str) -> str:
    """The URL without its password, for logs."""
    scheme, _, rest = location.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


class RedisRegistrar:
    """A node's membership: heartbeats that keep it in the set, a leave at shutdown."""

    def __init__(self, settings: RegistrySettings, url: str, *, ttl_s: float) -> None:
        self.where = redacted(settings.location)
        self._registry = RedisRegistry(settings)
        self._url = url
        self._ttl_s = ttl_s

    async def heartbeat(self, report: dict[str, Any], *, changed: bool) -> None:
        await self._registry.heartbeat(self._url, self._ttl_s, json.dumps(report, separators=(",", ":")), changed=changed)

    async def deregister(self) -> None:
        await self._registry.leave(self._url)

    async def close(self) -> None:
        await self._registry.close()


class RedisDiscovery:
    """The gateway's view of a Redis registry, kept current by a task of its own (see the module doc)."""

    def __init__(
        self,
        settings: RegistrySettings,
        *,
        outage_grace_s: float = 30.0,
        full_read_s: float = FULL_READ_S,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.where = redacted(settings.location)
        self._settings = settings
        self._outage_grace_s = outage_grace_s
        self._full_read_s = full_read_s
        self._on_error = on_error
        self._deadlines: dict[str, float] = {}  # url -> time.monotonic() when its entry expires, as last read
        self._reports: dict[str, str] = {}  # url -> its last report, as read
        self._fresh: dict[str, dict[str, Any]] = {}  # url -> its report, if new since the last take_reports()
        self._current: tuple[Endpoint, ...] = ()
        self._changed = False
        self._connected = False
        self._in_outage = False
        self._read_due = False  # an expiry has passed: ask Redis whether the entry was renewed
        self._grace_until = 0.0  # after an outage, entries Redis lacks are kept until then
        self._problem: str | None = "not connected yet"
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> tuple[Endpoint, ...]:
        return self._current

    def take_reports(self) -> dict[str, dict[str, Any]]:
        fresh, self._fresh = self._fresh, {}
        return fresh

    def problem(self) -> str | None:
        return self._problem

    async def refresh(self) -> bool:
        """Cheap: the follower task does the I/O; this supervises it and says whether the set changed."""
        if self._task is None or self._task.done():
            if self._task is not None and not self._task.cancelled() and self._task.exception() is not None:
                logger.error("registry %s: the follower stopped (%r); starting it again", self.where, self._task.exception())
            self._task = asyncio.create_task(self._follow())
        now = time.monotonic()
        if self._connected and any(deadline <= now for deadline in self._deadlines.values()):
            self._read_due = True  # never dropped on our count alone: Redis says whether it is still there
        if self._grace_until and now >= self._grace_until:
            self._grace_until, self._read_due = 0.0, True  # what Redis lacked since the outage goes now
        changed, self._changed = self._changed, False
        return changed

    async def close(self) -> None:
        self._closed = True  # redis-py may turn the cancellation of a read into a ConnectionError
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        restart_s = RECONNECT_S
        while not self._closed:
            registry = RedisRegistry(self._settings)
            # Messages as bytes, decoded here: one that is not UTF-8 is skipped, not the end of following.
            raw = connect(self._settings, decode=False)
            pubsub = raw.pubsub(ignore_subscribe_messages=True)
            wait_s = RECONNECT_S
            try:
                await pubsub.subscribe(registry.channel)
                await self._read(registry, after_outage=self._in_outage)
                self._came_back()
                restart_s = RECONNECT_S
                await self._listen(registry, pubsub)
            except (RedisError, OSError) as exc:
                if self._closed:
                    return
                self._went_away(exc)
            except Exception as exc:  # a defect of ours, or input we did not foresee: follow again, later
                if self._closed:
                    return
                logger.exception("registry %s: following it failed; starting again in %.0f s", self.where, restart_s)
                self._went_away(exc)
                wait_s, restart_s = restart_s, min(MAX_RESTART_S, restart_s * 2)
            finally:
                for close in (pubsub.aclose, raw.aclose, registry.close):
                    with contextlib.suppress(RedisError, OSError):
                        await close()
            await asyncio.sleep(wait_s)

    async def _listen(self, registry: RedisRegistry, pubsub: Any) -> None:
        next_read = time.monotonic() + self._full_read_s
        while not self._closed:
            # At most a second per wait: a cancellation that redis-py turns into a timeout is then
            # noticed through ``_closed``, and a due read made, within a second.
            message = await pubsub.get_message(timeout=min(1.0, max(0.0, next_read - time.monotonic())))
            read = time.monotonic() >= next_read or self._read_due
            while message is not None:  # take everything already there, then read once
                read = self._announced(message.get("data")) or read
                message = await pubsub.get_message(timeout=0.0)
            if read:
                self._read_due = False
                await self._read(registry)
                next_read = time.monotonic() + self._full_read_s

    def _announced(self, data: Any) -> bool:
        """Apply one message from the channel; True when it calls for a read. Anything else is skipped."""
        kind, _, url = (data.decode("utf-8", "replace") if isinstance(data, bytes) else "").partition(" ")
        if kind == "leave":
            with contextlib.suppress(ValueError):
                url = normalize_url(url)
            if url in self._deadlines:
                logger.info("orchestrator %s left the registry", url)
                self._forget(url)
                self._publish()
            return False
        return kind in ("join", "report")

    async def _read(self, registry: RedisRegistry, *, after_outage: bool = False) -> None:
        redis_now, entries, reports = await registry.read()
        local_now = time.monotonic()
        if after_outage:  # Redis may have restarted empty: what it lacks now its nodes' heartbeats restore
            self._grace_until = local_now + self._outage_grace_s
        present: dict[str, float] = {}
        for url, expiry in entries.items():
            try:
                present[normalize_url(url)] = local_now + (expiry - redis_now)  # inf stays inf
            except ValueError:
                continue  # not something a node or t2i-register wrote; never routed to
        # What Redis no longer holds is gone: a static entry at once, one that expired once its expiry
        # has passed (until then, Redis may be one restarted empty), and nothing while in the grace.
        for url, deadline in list(self._deadlines.items()):
            if url not in present and local_now >= self._grace_until and (math.isinf(deadline) or deadline <= local_now):
                logger.info("orchestrator %s: its registry entry is gone", url)
                self._forget(url)
        self._deadlines.update(present)
        for url, report in reports.items():
            if url in present and report != self._reports.get(url):  # parsed only when it changed
                self._reports[url] = report
                try:
                    self._fresh[url] = json.loads(report)
                except (ValueError, RecursionError):  # RecursionError: nested too deeply to be a report
                    logger.warning("orchestrator %s: its registry report is not usable JSON; ignored", url)
        self._publish()

    def _forget(self, url: str) -> None:
        self._deadlines.pop(url, None)
        self._reports.pop(url, None)
        self._fresh.pop(url, None)

    def _publish(self) -> None:
        current = tuple(Endpoint(url) for url in sorted(self._deadlines))
        if current != self._current:
            self._current = current
            self._changed = True

    def _came_back(self) -> None:
        if self._in_outage:
            logger.warning("registry %s is reachable again", self.where)
        self._connected, self._in_outage, self._problem = True, False, None

    def _went_away(self, exc: BaseException) -> None:
        self._connected = False
        if isinstance(exc, (RedisError, OSError)):
            self._problem = f"registry {self.where} is unreachable ({exc or type(exc).__name__})"
        else:
            self._problem = f"registry {self.where}: following it failed ({exc!r}); following it again shortly"
        if not self._in_outage:  # logged and counted once per outage, not once per retry
            self._in_outage = True
            message = (
                f"registry {self.where} is unreachable ({exc or type(exc).__name__}); "
                f"keeping the last known {len(self._deadlines)} orchestrator(s)"
            )
            logger.error("%s", message)
            if self._on_error:
                self._on_error(message)
