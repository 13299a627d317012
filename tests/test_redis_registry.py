"""The Redis registry against a real ``redis-server``: joins, leaves, expiry by Redis's clock, outages."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from discovery import Discovery, RegistrySettings, open_discovery, open_registrar
from discovery.redis_registry import RedisDiscovery, RedisRegistry, connect
from metrics import GatewayMetrics, OrchestratorMetrics

from .services import RedisServer, make_ca


async def until(condition, timeout: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    """Wait for ``condition()``; returns how long it took. Discovery is refreshed as the gateway does."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await condition():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


REPORT = {"status": "ready", "capacity": 1, "in_flight": 0, "queued": 0, "models": []}


def urls(discovery: Discovery) -> set[str]:
    return {endpoint.url for endpoint in discovery.snapshot()}


async def sees(discovery: Discovery, expected: set[str]) -> bool:
    await discovery.refresh()
    return urls(discovery) == expected


async def test_joins_and_leaves_reach_a_gateway_at_once(redis_server: RedisServer) -> None:
    settings = RegistrySettings(redis_server.url)
    # No periodic read within the test: whatever reaches the gateway came through the channel.
    discovery = RedisDiscovery(settings, full_read_s=3600)
    node = open_registrar(settings, "http://10.0.0.1:8936", heartbeat_ttl_s=30)
    try:
        assert await discovery.refresh() is False and discovery.snapshot() == ()
        await until(lambda: asyncio.sleep(0, discovery._connected))  # noqa: SLF001 - subscribed
        await node.heartbeat(REPORT, changed=False)
        await until(lambda: sees(discovery, {"http://10.0.0.1:8936"}))
        await node.deregister()
        await until(lambda: sees(discovery, set()))
    finally:
        await node.close()
        await discovery.close()


async def test_reports_reach_a_gateway_and_a_changed_offer_is_announced_at_once(redis_server: RedisServer) -> None:
    settings = RegistrySettings(redis_server.url)
    discovery = RedisDiscovery(settings, full_read_s=3600)  # whatever reaches it came through the channel
    registry = RedisRegistry(settings)
    node = open_registrar(settings, "http://10.0.0.7:8936", heartbeat_ttl_s=30)
    loading = REPORT | {"status": "loading"}

    async def reported(expected: dict[str, object]) -> bool:
        await discovery.refresh()
        return discovery.take_reports().get("http://10.0.0.7:8936") == expected

    try:
        await until(lambda: asyncio.sleep(0, discovery._connected) if discovery._task else discovery.refresh())  # noqa: SLF001
        await node.heartbeat(loading, changed=True)  # the join brings its report
        await until(lambda: reported(loading))
        await node.heartbeat(REPORT, changed=True)  # ready: announced
        await until(lambda: reported(REPORT))
        assert discovery.take_reports() == {}  # each report is handed over once
        events = registry.client.pubsub(ignore_subscribe_messages=True)
        await events.subscribe(registry.channel)
        busy = REPORT | {"in_flight": 1}
        await node.heartbeat(busy, changed=False)  # only its load moved: kept for the next full read, not announced
        assert (await registry.read())[2] == {"http://10.0.0.7:8936": json.dumps(busy, separators=(",", ":"))}
        await node.heartbeat(loading, changed=True)
        await node.heartbeat(loading, changed=False)  # what comes after the announcement marks the end
        await node.deregister()
        announced: list[str] = []
        for _ in range(10):  # until the leave; None is the subscription's confirmation, or a wait that ran out
            message = await events.get_message(timeout=1)
            announced += [message["data"]] if message else []
            if announced and announced[-1].startswith("leave"):
                break
        assert announced == ["report http://10.0.0.7:8936", "leave http://10.0.0.7:8936"]  # the second heartbeat's only
        await events.aclose()
        await until(lambda: sees(discovery, set()))
        assert (await registry.read())[2] == {}  # a leave takes the report with it
    finally:
        await node.close()
        await registry.close()
        await discovery.close()


async def test_a_node_that_stops_heartbeating_expires_by_redis_clock(redis_server: RedisServer) -> None:
    settings = RegistrySettings(redis_server.url)
    discovery = RedisDiscovery(settings, full_read_s=3600)  # only the countdown of Redis's expiry can remove it
    node = open_registrar(settings, "http://10.0.0.2:8936", heartbeat_ttl_s=1.0)
    try:
        await until(lambda: asyncio.sleep(0, discovery._connected) if discovery._task else discovery.refresh())  # noqa: SLF001
        joined = time.monotonic()
        await node.heartbeat(REPORT, changed=False)
        await until(lambda: sees(discovery, {"http://10.0.0.2:8936"}))
        await until(lambda: sees(discovery, set()))  # no more heartbeats: gone once the TTL has passed
        assert time.monotonic() - joined >= 1.0
        _, entries, reports = await RedisRegistry(settings).read()
        assert entries == {} and reports == {}  # and removed from Redis itself, its report too
    finally:
        await node.close()
        await discovery.close()


async def test_several_fleets_share_one_redis_by_prefix(redis_server: RedisServer) -> None:
    blue, green = RegistrySettings(redis_server.url, prefix="blue"), RegistrySettings(redis_server.url, prefix="green")
    discovery = open_discovery(blue, heartbeat_ttl_s=30)
    blue_node = open_registrar(blue, "http://blue:1", heartbeat_ttl_s=30)
    green_node = open_registrar(green, "http://green:1", heartbeat_ttl_s=30)
    try:
        await green_node.heartbeat(REPORT, changed=False)
        await blue_node.heartbeat(REPORT, changed=False)
        # Seen through a full read of the blue prefix, which would have brought green's entry too.
        await until(lambda: sees(discovery, {"http://blue:1"}))
    finally:
        for closing in (blue_node, green_node, discovery):
            await closing.close()


async def test_an_outage_keeps_the_last_known_set_and_a_restart_empty_loses_no_node(redis_server: RedisServer) -> None:
    settings = RegistrySettings(redis_server.url)
    errors: list[str] = []
    discovery = open_discovery(settings, heartbeat_ttl_s=3.0, on_error=errors.append)
    node = open_registrar(settings, "http://10.0.0.3:8936", heartbeat_ttl_s=1.0)
    static = "http://10.0.0.4:8936"  # a t2i-register entry: no heartbeat will put it back
    try:
        await RedisRegistry(settings).heartbeat(static, None)
        await node.heartbeat(REPORT, changed=False)
        await until(lambda: sees(discovery, {"http://10.0.0.3:8936", static}))
        redis_server.stop()
        await until(lambda: asyncio.sleep(0, bool(errors)))
        for _ in range(100):  # 2 s: longer than the node's TTL, but Redis is not there to say it expired
            await discovery.refresh()
            await asyncio.sleep(0.02)
        assert urls(discovery) == {"http://10.0.0.3:8936", static}
        assert len(errors) == 1 and "unreachable" in errors[0] and "keeping the last known 2" in errors[0]
        assert "unreachable" in (discovery.problem() or "")  # what /health shows
        redis_server.start()  # empty: the node's entry is gone until its next heartbeat
        await until(lambda: asyncio.sleep(0, discovery.problem() is None))  # reconnected, and read an empty set
        await discovery.refresh()
        assert urls(discovery) == {"http://10.0.0.3:8936", static}  # both kept for --heartbeat-ttl after the outage
        # The node's next heartbeat puts it back (for longer than the grace, with nothing else to renew it).
        await RedisRegistry(settings).heartbeat("http://10.0.0.3:8936", 30.0, json.dumps(REPORT))
        await until(lambda: sees(discovery, {"http://10.0.0.3:8936"}))  # the static entry goes once the grace is over
        assert len(errors) == 1
    finally:
        await node.close()
        await discovery.close()


async def test_redis_over_tls_is_verified_against_the_ca(tmp_path: Path) -> None:
    tls = make_ca(tmp_path / "tls")
    server = RedisServer(tmp_path, password="s3cret", tls=tls)
    server.start()
    try:
        trusted = RegistrySettings(server.url, password="s3cret", ca=tls.ca)
        assert server.url.startswith("rediss://")
        registry = RedisRegistry(trusted)
        assert await registry.heartbeat("http://10.0.0.4:8936", 30) is True
        assert "http://10.0.0.4:8936" in (await registry.read())[1]
        await registry.close()
        other = make_ca(tmp_path / "other", name="other")
        for settings in (RegistrySettings(server.url, password="s3cret", ca=other.ca), RegistrySettings(server.url, password="s3cret")):
            untrusted = RedisRegistry(settings)  # another CA, or the system's: the certificate is refused
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
                await untrusted.read()
            await untrusted.close()
        wrong_password = RedisRegistry(RegistrySettings(server.url, password="wrong", ca=tls.ca))
        with pytest.raises(Exception, match="(?i)password|auth"):
            await wrong_password.read()
        await wrong_password.close()
    finally:
        server.stop()


def t2i_register(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-c", "from discovery.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_t2i_register_adds_lists_and_removes_in_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="pw")
    server.start()
    try:
        (tmp_path / "password").write_text("pw\n")
        auth = ["--registry", server.url, "--registry-password-file", str(tmp_path / "password")]
        assert t2i_register(*auth, "http://10.0.0.5:8936/").stdout == "registered http://10.0.0.5:8936\n"
        before_heartbeat = time.monotonic()
        assert t2i_register(*auth, "--heartbeat", "--ttl", "60", "http://10.0.0.6:8936").returncode == 0
        listed = t2i_register("--registry", server.url, "--list", env={"T2I_REGISTRY_PASSWORD": "pw"}).stdout.splitlines()
        since_heartbeat = time.monotonic() - before_heartbeat
        assert listed[0] == "http://10.0.0.5:8936\tstatic\tno report"
        expiring = re.fullmatch(r"http://10\.0\.0\.6:8936\texpires in (\d+)s\tno report", listed[1])
        # 60 s from the heartbeat, less however long the two commands took, rounded to the second.
        assert expiring and round(60 - since_heartbeat) <= int(expiring[1]) <= 60, listed[1]
        assert t2i_register(*auth, "--remove", "http://10.0.0.5:8936").stdout == "removed http://10.0.0.5:8936\n"
        missing = t2i_register(*auth, "--remove", "http://10.0.0.5:8936")
        assert missing.returncode == 1 and "is not in redis://127.0.0.1" in missing.stderr and "pw" not in missing.stderr
        refused = t2i_register("--registry", server.url, "--list")
        assert refused.returncode == 1 and refused.stderr.startswith("t2i-register: registry redis://127.0.0.1")
    finally:
        server.stop()


async def test_a_departed_node_takes_its_metric_series_along() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.attempts.labels("http://gone:1", "ok").inc()
    metrics.attempts.labels("http://stays:1", "ok").inc()
    metrics.forget_orchestrator("http://gone:1")
    assert metrics.registry.get_sample_value("t2i_gateway_attempts_total", {"orchestrator": "http://gone:1", "outcome": "ok"}) is None
    assert metrics.registry.get_sample_value("t2i_gateway_attempts_total", {"orchestrator": "http://stays:1", "outcome": "ok"}) == 1


async def test_a_node_heartbeats_its_report_and_sends_a_changed_offer_within_a_second(
    aiohttp_client: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    from t2i_common.server import DRAIN
    from t2i_orchestrator.app import create_app
    from t2i_orchestrator.config import OrchestratorConfig

    from .fakes import FakeEngine

    settings = RegistrySettings(redis_server.url)
    registry = RedisRegistry(settings)
    engine = FakeEngine()
    engine.gate.clear()  # its warm-up waits: the node stays "loading"
    config = OrchestratorConfig(
        storage_dir=tmp_path / "images", register=settings, advertise_url="http://10.1.2.3:8936", heartbeat_interval_s=60
    )
    app = create_app(config, engine=engine, metrics_=OrchestratorMetrics(CollectorRegistry()))
    client = await aiohttp_client(app)

    async def report() -> dict[str, Any] | None:
        raw = (await registry.read())[2].get("http://10.1.2.3:8936")
        return None if raw is None else json.loads(raw)  # type: ignore[no-any-return]

    async def status_is(expected: str) -> bool:
        return (await report() or {}).get("status") == expected

    async def is_capabilities_but_load() -> bool:  # the load moves on; what it offers is sent within a second
        capabilities = await (await client.get("/capabilities")).json()
        return {**(await report() or {}), "in_flight": 0, "queued": 0} == {**capabilities, "in_flight": 0, "queued": 0}

    try:
        await until(is_capabilities_but_load, timeout=5)  # the report is /capabilities: the model loaded meanwhile
        assert await status_is("loading")
        engine.gate.set()
        await until(lambda: status_is("ready"), timeout=5)  # long before the next heartbeat, 60 s away
        app[DRAIN].draining = True
        await until(lambda: status_is("draining"), timeout=5)
    finally:
        await client.close()
    assert await report() is None  # left at shutdown, its report with it
    await registry.close()


async def connected(discovery: RedisDiscovery) -> None:
    await discovery.refresh()  # starts the follower
    await until(lambda: asyncio.sleep(0, discovery.problem() is None))


async def test_the_follower_survives_any_message_and_any_report(redis_server: RedisServer) -> None:
    settings = RegistrySettings(redis_server.url)
    discovery = RedisDiscovery(settings, full_read_s=3600)  # what reaches it comes through the channel
    registry = RedisRegistry(settings)
    raw = connect(settings, decode=False)
    try:
        await connected(discovery)
        follower = discovery._task  # noqa: SLF001
        for message in (b"\xff\xfe join \x80", b"leave", b"leave http://[::1", b"report", b"\x00" * 1000):
            await raw.publish(registry.channel, message)  # anyone who can write to Redis can send these
        deep = "[" * 100_000 + "]" * 100_000
        await registry.heartbeat("http://10.0.0.8:8936", 30.0, deep, changed=True)  # a report nested too deeply
        await registry.heartbeat("http://10.0.0.9:8936", 30.0, json.dumps(REPORT))
        await until(lambda: sees(discovery, {"http://10.0.0.8:8936", "http://10.0.0.9:8936"}))
        assert discovery._task is follower and discovery.problem() is None  # noqa: SLF001 - never stopped
        assert list(discovery.take_reports()) == ["http://10.0.0.9:8936"]  # the usable report only
    finally:
        await raw.aclose()
        await registry.close()
        await discovery.close()


async def test_a_follower_that_fails_is_started_again_and_says_so(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RegistrySettings(redis_server.url)
    discovery = RedisDiscovery(settings, full_read_s=3600)
    registry = RedisRegistry(settings)
    failures: list[bytes] = []

    def defect(data: Any) -> bool:  # a fault of ours that no test foresaw, on the first message
        failures.append(data)
        raise RuntimeError("an unforeseen defect")

    try:
        await connected(discovery)
        monkeypatch.setattr(discovery, "_announced", defect)
        await registry.heartbeat("http://10.0.0.5:8936", 30.0, json.dumps(REPORT))
        await until(lambda: asyncio.sleep(0, "an unforeseen defect" in (discovery.problem() or "")))
        monkeypatch.undo()
        # Followed again: the join it missed is in the full read it starts with.
        await until(lambda: sees(discovery, {"http://10.0.0.5:8936"}))
        assert discovery.problem() is None and len(failures) == 1
    finally:
        await registry.close()
        await discovery.close()


async def test_an_entry_renewed_without_an_announcement_is_never_dropped(redis_server: RedisServer) -> None:
    settings = RegistrySettings(redis_server.url)
    discovery = RedisDiscovery(settings, full_read_s=3600)  # no periodic read to rescue it
    registry = RedisRegistry(settings)
    url = "http://10.0.0.6:8936"
    try:
        await connected(discovery)
        await registry.heartbeat(url, 1.0, json.dumps(REPORT))  # joins (announced) for a second
        await until(lambda: sees(discovery, {url}))
        await registry.heartbeat(url, 3600.0, json.dumps(REPORT))  # renewed: its load only, not announced

        async def read_again() -> bool:
            await discovery.refresh()
            assert urls(discovery) == {url}  # throughout: Redis holds it, so the gateway does
            return discovery._deadlines[url] > time.monotonic() + 60  # noqa: SLF001 - it asked Redis again

        await until(read_again)
    finally:
        await registry.close()
        await discovery.close()
