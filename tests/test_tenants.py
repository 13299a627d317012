"""Tenants in one gateway (real HTTP to fake nodes on loopback): the keys file, its reload, models and
limits per key, 429 in both APIs' shapes, turns in the wait queue, and usage."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from discovery import Endpoint
from t2i_common.config import ConfigError
from t2i_gateway.config import load_config
from t2i_gateway.nodes import LEAD_S, FairQueue, Node, _Waiter
from t2i_gateway.state import KEYS, POOL
from t2i_gateway.tenants import KeyFiles, KeysError, main, read_keys, secret_hash

from .fakes import FakeOrchestrator
from .helpers import BODY, MakeGateway, wait_until

ACME, GLOBEX, ADMIN = "t2i-acme-secret", "t2i-globex-secret", "t2i-admin-secret"


def keys_toml(*entries: str) -> str:
    return "\n".join(f"[[keys]]\n{entry}\n" for entry in entries)


def key(name: str, secret: str, extra: str = "") -> str:
    return f'name = "{name}"\nsha256 = "{secret_hash(secret)}"\n{extra}'


def replace(path: Path, text: str) -> None:
    """Write a keys file as an operator should: whole, by renaming, so that it is never read half written."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(
        keys_toml(
            key("acme", ACME, "requests_per_minute = 3\nweight = 1"),
            key("globex", GLOBEX, 'models = ["m/other"]'),
            key("ops", ADMIN, "admin = true"),
        )
    )
    return path


# -- the keys file --------------------------------------------------------------------------


def test_keys_file_names_each_key_with_its_limits(keys_file: Path) -> None:
    ring = read_keys(["plain-secret"], None, keys_file)
    acme = ring.tenant_for(f"Bearer {ACME}")
    assert acme is not None and acme.name == "acme" and acme.quota.requests_per_minute == 3 and not acme.admin
    globex = ring.tenant_for(f"bearer {GLOBEX}")  # the scheme in any case, as HTTP says
    assert globex is not None and globex.may_use("m/other") and not globex.may_use("m/warm")
    plain = ring.tenant_for("Bearer plain-secret")
    assert plain is not None and plain.name == f"key-{hashlib.sha256(b'plain-secret').hexdigest()[:8]}"
    assert ring.tenant_for(f"Bearer {ACME}x") is None and ring.tenant_for(ACME) is None  # no scheme: no key
    assert ring.names() == sorted(["acme", "globex", "ops", plain.name])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[keys]]\nname = ", "not valid TOML"),
        ('[settings]\nx = 1\n[[keys]]\nname = "a"', "expected [[keys]] tables only"),
        (keys_toml(key("a", "s1", "rpm = 3")), "key 1 ('a'): unknown field(s) rpm"),
        (keys_toml(key("a b", "s1")), "name must be 1 to 64 letters"),
        (keys_toml('name = "a"\nsha256 = "s1"'), "sha256 must be the 64 hex digits"),
        (keys_toml(key("a", "s1", "concurrent = 0")), "concurrent must be a positive whole number, got 0"),
        (keys_toml(key("a", "s1", "requests_per_minute = 1.5")), "requests_per_minute must be a positive whole number"),
        (keys_toml(key("a", "s1", 'models = "m"')), "models must be a list of model ids"),
        (keys_toml(key("a", "s1"), key("a", "s2")), "key 2 ('a'): its name is another key's too"),
        (keys_toml(key("a", "s1"), key("b", "s1")), "key 2 ('b'): its sha256 is another key's too"),
    ],
)
def test_a_bad_keys_file_says_where_and_what(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeysError, match="^--keys-file") as raised:
        read_keys([], None, path)
    assert message in str(raised.value)


def test_gateway_stops_at_start_on_a_bad_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(key("a", "s1", "weight = -1")))
    with pytest.raises(ConfigError, match=r"key 1 \('a'\): weight must be a positive number, got -1"):
        load_config(["--orchestrator", "http://127.0.0.1:1", "--keys-file", str(path)])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--orchestrator", "http://127.0.0.1:1", "--keys-file", str(tmp_path / "missing.toml")])


def test_gateway_stops_at_start_on_bad_limits_options() -> None:
    node = ["--orchestrator", "http://127.0.0.1:1"]
    with pytest.raises(ConfigError, match="--limits-redis: a redis:// or rediss:// URL"):
        load_config([*node, "--limits-redis", "/tmp/limits"])
    with pytest.raises(ConfigError, match="--node-queue must be 0 or more, got -1"):
        load_config([*node, "--node-queue", "-1"])
    shared = load_config([*node, "--registry", "redis://127.0.0.1:6379/0"])
    assert shared.limits_redis is not None and shared.limits_redis.location == "redis://127.0.0.1:6379/0"


def test_key_command_makes_a_secret_and_its_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["acme"])
    out = capsys.readouterr().out
    secret = out.splitlines()[1].removeprefix("# ")
    path = tmp_path / "keys.toml"
    path.write_text("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    tenant = read_keys([], None, path).tenant_for(f"Bearer {secret}")
    assert tenant is not None and tenant.name == "acme" and secret not in path.read_text()


async def test_keys_file_is_reloaded_when_it_changes_and_on_request(keys_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = await KeyFiles.open((), None, keys_file)
    watching = asyncio.create_task(keys.watch())
    try:
        replace(keys_file, keys_toml(key("acme", ACME, "requests_per_minute = 30000")))
        await wait_until(lambda: keys.reloads == 1)
        acme = keys.ring.tenant_for(f"Bearer {ACME}")
        assert acme is not None and acme.quota.requests_per_minute == 30000 and keys.ring.tenant_for(f"Bearer {GLOBEX}") is None
        replace(keys_file, "[[keys]]\nname = ")  # a typo: the keys in force stay
        keys.reload()
        await wait_until(lambda: "keys not reloaded, the 1 key(s) in force stay: --keys-file" in caplog.text)
        assert keys.reloads == 1 and keys.ring.names() == ["acme"]
        replace(keys_file, keys_toml(key("acme", ACME), key("globex", GLOBEX)))
        keys.reload()
        await wait_until(lambda: keys.reloads == 2)
        assert keys.ring.names() == ["acme", "globex"]
    finally:
        watching.cancel()


# -- the queue's turns ----------------------------------------------------------------------


def _waiter(tenant: str, weight: float = 1.0) -> _Waiter:
    return _Waiter("m", set(), asyncio.get_running_loop().create_future(), None, None, tenant, weight)  # type: ignore[arg-type]


async def test_fair_queue_serves_tenants_in_turn_by_weight() -> None:
    queue = FairQueue()
    heavy = [_waiter("heavy") for _ in range(6)]
    for waiter in heavy:
        queue.append(waiter)
    light = _waiter("light")
    queue.append(light)
    assert queue.in_turn()[:2] == [light, heavy[0]]  # equal turns: one request goes before a backlog
    queue.remove(light, granted=True)
    queue.remove(heavy[0], granted=True)
    light = _waiter("light")
    queue.append(light)  # back after its answer: next, not behind the five
    assert queue.in_turn()[0] is light
    queue.remove(light, granted=True)
    queue.remove(heavy[1], granted=True)
    # Weight 2 against 1: two of the heavier's for each of the other's, each tenant's in arrival order.
    double = [_waiter("double", 2.0) for _ in range(4)]
    for waiter in double:
        queue.append(waiter)
    order = [waiter.tenant for waiter in queue.in_turn()][:6]
    assert order.count("double") == 4 and order.count("heavy") == 2
    assert [w for w in queue.in_turn() if w.tenant == "double"] == double and len(queue) == 8


async def test_a_tenant_with_one_request_at_a_time_gets_its_weights_share_and_no_more() -> None:
    queue = FairQueue()
    for _ in range(40):
        queue.append(_waiter("heavy", 4.0))
    queue.append(_waiter("light"))
    served = []
    for _ in range(20):
        waiter = queue.in_turn()[0]
        queue.remove(waiter, granted=True)
        served.append(waiter.tenant)
        if waiter.tenant == "light":
            queue.append(_waiter("light"))  # its next request, as soon as the last is answered
    assert served.count("light") == 4  # 1 in 5: weight 1 against 4, although it is always waiting


async def test_fair_queue_keeps_room_for_a_tenant_when_another_filled_it() -> None:
    queue = FairQueue()
    for _ in range(4):
        assert queue.has_room("heavy", 4)
        queue.append(_waiter("heavy"))
    assert not queue.has_room("heavy", 4) and queue.has_room("light", 4)
    queue.append(_waiter("light"))
    assert not queue.has_room("light", 4)  # one each beyond the limit, no more


# -- one gateway ----------------------------------------------------------------------------


async def test_keys_name_tenants_and_limit_their_models(make_gateway: MakeGateway, keys_file: Path) -> None:
    gateway = await make_gateway(FakeOrchestrator(), keys_file=keys_file)
    assert (await gateway.post()).status == 401
    assert (await gateway.post(headers=bearer(ACME))).status == 200
    refused = await gateway.post(headers=bearer(GLOBEX))
    assert refused.status == 403
    assert (await refused.json())["detail"]["msg"] == "Key 'globex' may not use model 'm/warm'; it may use: m/other."
    openai = await gateway.client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=bearer(GLOBEX))
    assert openai.status == 403 and "may not use model" in (await openai.json())["error"]["message"]


@pytest.mark.parametrize("api", ["livepeer", "openai"])
async def test_over_its_limit_a_key_gets_429_with_openai_headers(make_gateway: MakeGateway, keys_file: Path, api: str) -> None:
    gateway = await make_gateway(FakeOrchestrator(), keys_file=keys_file)

    async def send(secret: str) -> Any:
        if api == "openai":
            return await gateway.client.post("/v1/images/generations", json={"prompt": "a cat"}, headers=bearer(secret))
        return await gateway.post(headers=bearer(secret))

    for remaining in (2, 1, 0):
        ok = await send(ACME)
        assert ok.status == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "3" and ok.headers["x-ratelimit-remaining-requests"] == str(remaining)
    refused = await send(ACME)
    assert refused.status == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 20 and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    body = await refused.json()
    message = body["error"]["message"] if api == "openai" else body["detail"]["msg"]
    assert message.startswith("Key 'acme' is over its limit of 3 requests per minute; retry in")
    if api == "openai":
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_exceeded"
    assert (await send(ADMIN)).status == 200  # another key's limits are its own


async def test_a_request_larger_than_a_minute_of_work_is_a_400(make_gateway: MakeGateway, tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(key("small", ACME, "megapixel_steps_per_minute = 1\nimages_per_minute = 2\nconcurrent = 1")))
    gateway = await make_gateway(FakeOrchestrator(), keys_file=path)
    big = await gateway.post({**BODY, "width": 1024, "height": 1024, "num_inference_steps": 2}, headers=bearer(ACME))
    assert big.status == 400
    assert "needs 2.09715 megapixel-steps, more than key 'small' may use in a minute (1)" in (await big.json())["detail"]["msg"]
    many = await gateway.post({**BODY, "num_images_per_prompt": 3}, headers=bearer(ACME))
    assert many.status == 400 and "needs 3 images" in (await many.json())["detail"]["msg"]


async def test_concurrent_limit_holds_until_a_request_ends(make_gateway: MakeGateway, tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(key("one", ACME, "concurrent = 1")))
    fake = FakeOrchestrator()
    gateway = await make_gateway(fake, keys_file=path)
    fake.mode = "hold"
    first = asyncio.create_task(gateway.post(headers=bearer(ACME)))
    await wait_until(lambda: len(fake.requests) == 1)
    second = await gateway.post(headers=bearer(ACME))
    assert second.status == 429 and second.headers["Retry-After"] == "1"
    assert "has 1 requests in progress, its limit" in (await second.json())["detail"]["msg"]
    fake.release.set()
    assert (await first).status == 200
    assert (await gateway.post(headers=bearer(ACME))).status == 200  # its slot came back


async def test_waiting_requests_are_served_by_key_in_turn(make_gateway: MakeGateway, tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(key("heavy", ACME), key("light", GLOBEX)))
    fake = FakeOrchestrator(capacity=1)
    gateway = await make_gateway(fake, keys_file=path, max_queued=16)
    pool = gateway.client.app[POOL]  # type: ignore[index]
    fake.mode = "hold"
    heavy = [asyncio.create_task(gateway.post({**BODY, "prompt": f"heavy {i}"}, headers=bearer(ACME))) for i in range(4)]
    await wait_until(lambda: len(fake.requests) == 1 and len(pool._waiters) == 3)  # noqa: SLF001
    light = asyncio.create_task(gateway.post({**BODY, "prompt": "light"}, headers=bearer(GLOBEX)))
    await wait_until(lambda: len(pool._waiters) == 4)  # noqa: SLF001
    fake.release.set()
    assert [r.status for r in await asyncio.gather(*heavy, light)] == [200] * 5
    # Arrival order would have served it last; in turn, it goes next.
    assert [body["prompt"] for body in fake.requests] == ["heavy 0", "light", "heavy 1", "heavy 2", "heavy 3"]


async def test_usage_is_counted_by_key(make_gateway: MakeGateway, keys_file: Path) -> None:
    gateway = await make_gateway(FakeOrchestrator(), keys_file=keys_file)
    assert (await gateway.post({**BODY, "num_images_per_prompt": 2, "num_inference_steps": 10}, headers=bearer(ACME))).status == 200
    assert (await gateway.post({**BODY, "width": 7}, headers=bearer(ACME))).status == 422
    assert (await gateway.client.get("/admin/usage", headers=bearer(ACME))).status == 403  # not an admin key
    assert (await gateway.client.get("/admin/usage")).status == 401
    response = await gateway.client.get("/admin/usage", headers=bearer(ADMIN))
    usage = (await response.json())["keys"]["acme"]
    work = 64 * 64 / 1e6 * 10 * 2
    assert usage["requests"] == {"200": 1, "422": 1} and usage["images"] == 2
    assert usage["megapixel_steps"] == pytest.approx(work) and usage["generation_seconds"] > 0
    metrics = gateway.metrics.registry
    assert metrics.get_sample_value("t2i_gateway_tenant_requests_total", {"key": "acme", "status": "422"}) == 1
    assert metrics.get_sample_value("t2i_gateway_tenant_megapixel_steps_total", {"key": "acme"}) == pytest.approx(work)
    assert metrics.get_sample_value("t2i_gateway_tenant_images_total", {"key": "acme"}) == 2


async def test_a_reloaded_key_takes_effect_without_a_restart(make_gateway: MakeGateway, keys_file: Path) -> None:
    gateway = await make_gateway(FakeOrchestrator(), keys_file=keys_file)
    keys = gateway.client.app[KEYS]  # type: ignore[index]
    new = "t2i-new-secret"
    replace(keys_file, keys_toml(key("newcomer", new)))
    keys.reload()
    await wait_until(lambda: keys.reloads == 1)
    assert (await gateway.post(headers=bearer(new))).status == 200
    assert (await gateway.post(headers=bearer(ACME))).status == 401


async def test_node_queue_keeps_the_wait_at_the_gateway(make_gateway: MakeGateway) -> None:
    fake = FakeOrchestrator(capacity=4)  # it would take 4
    gateway = await make_gateway(fake, node_queue=0)
    pool = gateway.client.app[POOL]  # type: ignore[index]
    fake.mode = "hold"
    requests = [asyncio.create_task(gateway.post()) for _ in range(3)]
    await wait_until(lambda: len(pool._waiters) == 2)  # noqa: SLF001
    assert len(fake.requests) == 1  # one on the node, the rest wait here
    fake.release.set()
    assert [r.status for r in await asyncio.gather(*requests)] == [200] * 3


def test_where_the_gateway_keeps_the_queue_a_node_takes_the_next_request_as_the_last_ends() -> None:
    node = Node(Endpoint("http://127.0.0.1:1"), capacity=1, advertised=9, in_flight=1)  # --node-queue 0
    node.busy_until = time.monotonic() + 1.0
    assert node.free() == 0  # a second of work left: the next waits at the gateway
    node.busy_until = time.monotonic() + LEAD_S / 2
    assert node.free() == 1  # about to end: the next goes now, and the device does not wait for it
    node.in_flight = 2
    assert node.free() == 0  # one ahead, no more
    node.capacity = node.advertised = node.in_flight = 1
    assert node.free() == 0  # never beyond what it advertises
