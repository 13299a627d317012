"""Selection over a large fleet, with synthetic nodes (no HTTP): warm first, free capacity, spread."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from discovery import Endpoint, StaticDiscovery
from metrics import GatewayMetrics
from t2i_gateway.nodes import MAX_PROBES_AT_ONCE, Demand, Node, NodePool, _check_capabilities


def pool_of(count: int, *, warm: str = "m/warm", cold: str = "m/cold", capacity: int = 4) -> NodePool:
    pool = NodePool(StaticDiscovery(()), GatewayMetrics(CollectorRegistry()))
    for i in range(count):
        node = Node(Endpoint(f"http://10.0.{i // 250}.{i % 250}:8936"), ready=True, capacity=capacity, tiers={warm: 0, cold: 1})
        pool.nodes[node.url] = node
    return pool


def test_a_large_fleet_spreads_requests_and_prefers_free_nodes() -> None:
    pool = pool_of(1000)
    busy = list(pool.nodes.values())[:500]
    for node in busy:
        node.in_flight = 3  # one slot left
    picks = Counter(pool.select("m/warm", exclude=set()).url for _ in range(2000))  # type: ignore[union-attr]
    assert len(picks) > 400  # spread over the 500 free nodes (about 491 expected), not piled on a few
    on_busy = sum(picks[node.url] for node in busy)
    assert on_busy < 100  # only when all 8 drawn are busy: 1 in 256, so about 8 of 2000 expected


def test_the_one_node_with_room_is_found_among_a_thousand_full_ones() -> None:
    pool = pool_of(1000)
    nodes = list(pool.nodes.values())
    for node in nodes:
        node.in_flight = 4
    nodes[777].in_flight = 0
    assert pool.select("m/warm", exclude=set()) is nodes[777]
    assert pool.select("m/warm", exclude={nodes[777].url}) is None


def test_warm_nodes_come_before_on_demand_ones_whatever_their_load() -> None:
    pool = pool_of(100, warm="m/a", cold="m/b")
    extra = Node(Endpoint("http://10.9.9.9:8936"), ready=True, capacity=64, tiers={"m/b": 0})
    pool.nodes[extra.url] = extra
    pool._stale = True  # noqa: SLF001 - nodes were added behind the pool's back
    assert all(pool.select("m/b", exclude=set()) is extra for _ in range(50))
    extra.in_flight = 64
    assert pool.select("m/b", exclude=set()) in pool.nodes.values()  # then on demand
    assert pool.models_on_offer() == ["m/a", "m/b"] and pool.default_model() == "m/a"


async def test_a_light_load_keeps_to_the_nodes_that_went_idle_last() -> None:
    pool = pool_of(1000)
    used = set()
    for _ in range(100):  # four requests at a time, a hundred times over
        nodes = [await pool.acquire("m/warm", set(), timeout_s=0) for _ in range(4)]
        for node in nodes:
            assert node is not None
            used.add(node.url)
            pool.release(node)
    assert len(used) <= 8  # not about 330 (four fresh draws from 1,000 each time): connections stay open to few


async def test_a_node_that_went_idle_last_still_loses_to_a_freer_one() -> None:
    pool = pool_of(1000)
    recent = await pool.acquire("m/warm", set(), timeout_s=0)
    assert recent is not None
    pool.release(recent)
    assert pool.select("m/warm", exclude=set()) is recent
    recent.reported_busy = 1  # another gateway's request, seen by a probe: 3 free against 4 elsewhere
    assert all(pool.select("m/warm", exclude=set()) is not recent for _ in range(50))


async def test_an_idle_node_as_free_as_any_can_be_is_taken_without_drawing_others(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_of(1000)
    recent = await pool.acquire("m/warm", set(), timeout_s=0)
    assert recent is not None
    pool.release(recent)

    def no_draws(*args: object, **kwargs: object) -> None:
        raise AssertionError("drew nodes at random")

    monkeypatch.setattr("t2i_gateway.nodes.random.choices", no_draws)
    assert pool.select("m/warm", exclude=set()) is recent  # none drawn could be freer: not drawn at all
    with pytest.raises(AssertionError, match="drew"):  # excluded (a retry): the others are drawn from
        pool.select("m/warm", exclude={recent.url})


class GatedDiscovery:
    """A fake discovery whose refresh waits until the test opens its gate."""

    def __init__(self) -> None:
        self.gate: asyncio.Future[bool] | None = None

    def snapshot(self) -> tuple[Endpoint, ...]:
        return ()

    def problem(self) -> str | None:
        return None

    def take_reports(self) -> dict[str, dict[str, Any]]:
        return {}

    async def refresh(self) -> bool:
        self.gate = asyncio.get_running_loop().create_future()
        return await self.gate

    async def close(self) -> None:
        pass


async def test_stopping_the_pool_as_a_refresh_ends_stops_it() -> None:
    """Python 3.11's wait_for swallows a cancellation that arrives as the awaited call ends (the task
    then ran on, and a daemon's shutdown hung); the pool's bounded waits must not."""
    discovery = GatedDiscovery()
    pool = NodePool(discovery, GatewayMetrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(pool.run(session))
        while discovery.gate is None:
            await asyncio.sleep(0.001)
        discovery.gate.set_result(False)  # the refresh ends...
        task.cancel()  # ...in the same turn of the loop as the shutdown
        done, _ = await asyncio.wait([task], timeout=2)
        assert task in done and task.cancelled()


class ReportingDiscovery:
    """A fake discovery whose nodes publish reports, as a Redis registry's do."""

    def __init__(self, *urls: str) -> None:
        self.endpoints = tuple(Endpoint(url) for url in urls)
        self.reports: dict[str, dict[str, Any]] = {}

    def snapshot(self) -> tuple[Endpoint, ...]:
        return self.endpoints

    def problem(self) -> str | None:
        return None

    def take_reports(self) -> dict[str, dict[str, Any]]:
        reports, self.reports = self.reports, {}
        return reports

    async def refresh(self) -> bool:
        return False

    async def close(self) -> None:
        pass


def report(status: str = "ready", in_flight: int = 0) -> dict[str, Any]:
    models = [{"model_id": "m/warm", "warm": True, "loaded": True}, {"model_id": "m/cold", "warm": False, "loaded": False}]
    return {"status": status, "capacity": 2, "in_flight": in_flight, "queued": 0, "models": models}


async def test_a_node_known_from_its_reports_is_probed_once_then_only_while_in_use(aiohttp_server: Any) -> None:
    probes: list[str] = []

    async def capabilities(request: web.Request) -> web.Response:  # a fake node
        probes.append(request.headers.get("Connection", ""))
        return web.json_response(report("loading"))

    app = web.Application()
    app.router.add_get("/capabilities", capabilities)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    discovery = ReportingDiscovery(url)
    pool = NodePool(discovery, GatewayMetrics(CollectorRegistry()))
    discovery.reports = {url: report("ready")}
    pool._sync()  # noqa: SLF001 - one turn of the background task, without its timing
    node = pool.nodes[url]
    assert not node.ready and node.next_probe == 0.0  # not believed before this gateway has reached it
    async with aiohttp.ClientSession() as session:
        pool._session = session  # noqa: SLF001
        await pool._probe(node)  # noqa: SLF001
    assert probes == ["close"]  # reached, and its connection not kept: its reports follow
    assert not node.ready and node.next_probe == math.inf  # loading: its "ready" will be announced, not polled for
    discovery.reports = {url: report("ready", in_flight=1)}  # one request from another gateway
    pool._sync()  # noqa: SLF001
    assert node.ready and node.free() == 1 and node.next_probe == math.inf  # routable, without another probe
    assert pool.models_on_offer() == ["m/cold", "m/warm"]
    taken = await pool.acquire("m/warm", set(), timeout_s=0)
    assert taken is node and node.next_probe <= time.monotonic() + 1  # in use: probed every second
    discovery.reports = {url: report("ready", in_flight=0)}
    pool._sync()  # noqa: SLF001
    assert node.free() == 0  # ours and the other: a report is older than what our probes of a node in use say
    pool.release(node)
    pool._apply(node, report("ready"), time.monotonic())  # noqa: SLF001 - the probe that follows
    assert node.free() == 2 and node.next_probe == math.inf  # idle again: back to its reports


async def test_a_reporting_node_this_gateway_cannot_reach_is_suspended_not_probed_four_times_a_second() -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    discovery = ReportingDiscovery(url)
    pool = NodePool(discovery, GatewayMetrics(CollectorRegistry()))
    discovery.reports = {url: report()}  # its registry says it is up
    pool._sync()  # noqa: SLF001
    node = pool.nodes[url]
    async with aiohttp.ClientSession() as session:
        pool._session = session  # noqa: SLF001
        await pool._probe(node)  # noqa: SLF001
    assert not node.ready and node.suspended(time.monotonic()) and node.suspensions == 1
    assert node.next_probe == node.suspended_until and "probe" in (node.last_error or "")


def test_a_suspended_node_is_believed_again_only_when_a_probe_reaches_it() -> None:
    discovery = ReportingDiscovery("http://10.0.0.1:8936")
    pool = NodePool(discovery, GatewayMetrics(CollectorRegistry()))
    pool._sync()  # noqa: SLF001
    node = pool.nodes["http://10.0.0.1:8936"]
    node.reached = True  # as after a first probe
    discovery.reports = {node.url: report()}
    pool._sync()  # noqa: SLF001
    assert node.ready
    pool._suspend(node, "probe: connection refused")  # noqa: SLF001 -- its registry says it is fine, but our probe failed
    node.suspended_until = 0.0  # the suspension is over; the probe that ends it has not answered yet
    discovery.reports = {node.url: report()}
    pool._sync()  # noqa: SLF001
    assert not node.ready and pool.select("m/warm", exclude=set()) is None
    assert node.next_probe < math.inf  # a probe decides


def test_a_malformed_report_is_ignored() -> None:
    discovery = ReportingDiscovery("http://10.0.0.1:8936")
    pool = NodePool(discovery, GatewayMetrics(CollectorRegistry()))
    discovery.reports = {"http://10.0.0.1:8936": {"status": "ready", "capacity": "lots", "models": []}}
    pool._sync()  # noqa: SLF001
    node = pool.nodes["http://10.0.0.1:8936"]
    assert not node.ready and not node.reports and node.next_probe == 0.0  # probed, as a node without reports


async def test_a_fleet_joining_at_once_is_probed_a_bounded_number_at_a_time(aiohttp_server: Any) -> None:
    waiting: list[str] = []
    at_once = peak = 0
    answer = asyncio.Event()

    async def capabilities(request: web.Request) -> web.Response:  # a fake fleet: one server, a node per path
        nonlocal at_once, peak
        waiting.append(request.match_info["node"])
        at_once += 1
        peak = max(peak, at_once)
        await answer.wait()
        at_once -= 1
        return web.json_response(report())

    app = web.Application()
    app.router.add_get("/{node}/capabilities", capabilities)
    server = await aiohttp_server(app)
    base = str(server.make_url("")).rstrip("/")
    pool = NodePool(StaticDiscovery(Endpoint(f"{base}/n{i}") for i in range(3 * MAX_PROBES_AT_ONCE)), GatewayMetrics(CollectorRegistry()))
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(pool.run(session))
        while len(waiting) < MAX_PROBES_AT_ONCE:
            await asyncio.sleep(0.01)
        answer.set()
        while len(pool.healthy()) < len(pool.nodes):  # then the rest, in turn
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert peak == MAX_PROBES_AT_ONCE  # never more at once, though all of them joined together


async def test_a_slot_granted_from_the_queue_is_held_once_whatever_cancellations_came_before() -> None:
    pool = pool_of(1, capacity=1)
    pool.max_queued = 4
    [node] = pool.nodes.values()
    first = await pool.acquire("m/warm", set(), timeout_s=1)

    async def second() -> Node | None:
        # A cancellation this task caught and got over earlier (as an attempt abandoning a node that was
        # found down does): it must not make a later, ordinary grant look like one made as it left.
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1)
        return await pool.acquire("m/warm", set(), timeout_s=5)

    waiting = asyncio.create_task(second())
    while not pool._waiters:  # noqa: SLF001 - queued behind the first
        await asyncio.sleep(0)
    assert first is node
    pool.release(first)  # granted to the waiting request
    assert await waiting is node and node.in_flight == 1  # held, once
    pool.release(node)
    assert node.in_flight == 0


async def test_a_request_that_leaves_as_its_slot_is_granted_gives_it_back_once() -> None:
    pool = pool_of(1, capacity=1)
    pool.max_queued = 4
    [node] = pool.nodes.values()
    first = await pool.acquire("m/warm", set(), timeout_s=1)
    waiting = asyncio.create_task(pool.acquire("m/warm", set(), timeout_s=5))
    while not pool._waiters:  # noqa: SLF001
        await asyncio.sleep(0)
    assert first is node
    pool.release(first)  # granted...
    waiting.cancel()  # ...and its client leaves in the same turn of the loop
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert node.in_flight == 0 and pool.select("m/warm", set()) is node


# -- scheduling by expected completion ------------------------------------------------------------

SMALL = Demand(megapixels=512 * 512 / 1e6, steps=1)  # 0.26 megapixel-steps
LARGE = Demand(megapixels=1024 * 1024 / 1e6, steps=4)  # 4.2: 16 times the work


def speed_report(pool: NodePool, node: Node, *, speed: float | None, held_s: float, busy: int = 0) -> None:
    """What the node says in /capabilities (or its Redis report), through the pool's own parsing."""
    model = {"model_id": "m/warm", "pipeline": "text-to-image", "warm": True, "loaded": True, "s_per_mpx_step": speed, "default_steps": 2}
    capabilities = {"capacity": 4, "in_flight": min(busy, 1), "queued": max(0, busy - 1), "held_s": held_s, "models": [model]}
    pool._apply(node, _check_capabilities(capabilities), time.monotonic())  # noqa: SLF001 - as a probe or a report would


def two_nodes() -> tuple[NodePool, Node, Node]:
    pool = pool_of(2)
    fast, slow = pool.nodes.values()
    return pool, fast, slow


def test_a_slow_node_with_a_shorter_queue_loses_to_a_fast_one_with_a_longer_queue() -> None:
    pool, fast, slow = two_nodes()
    speed_report(pool, fast, speed=0.1, held_s=0.3, busy=3)  # three requests held, 0.3 s of work
    speed_report(pool, slow, speed=0.4, held_s=0.1, busy=1)
    # Slot counting would pick the slow node (3 free against 1); it would finish the large request in
    # 0.1 + 4.2 x 0.4 = 1.8 s, the fast one in 0.3 + 4.2 x 0.1 = 0.72 s.
    assert all(pool.select("m/warm", set(), LARGE) is fast for _ in range(50))
    assert all(pool.select("m/warm", set()) is slow for _ in range(50))  # without a demand: most free, as before


def test_a_small_request_may_go_to_the_idle_slow_node_that_a_large_one_avoids() -> None:
    pool, fast, slow = two_nodes()
    speed_report(pool, fast, speed=0.1, held_s=0.5, busy=2)
    speed_report(pool, slow, speed=0.4, held_s=0.0)
    assert all(pool.select("m/warm", set(), SMALL) is slow for _ in range(50))  # 0.10 s there, 0.53 s on the fast one
    assert all(pool.select("m/warm", set(), LARGE) is fast for _ in range(50))  # 0.92 s there, 1.68 s on the slow one


def test_the_default_steps_a_node_reports_count_for_a_request_that_names_none() -> None:
    pool, fast, slow = two_nodes()
    speed_report(pool, fast, speed=0.1, held_s=0.0)
    assert SMALL.work(fast, "m/warm") == pytest.approx(0.262144)
    assert Demand(megapixels=1.0).work(fast, "m/warm") == 2.0  # its model's 2 steps


async def test_an_unknown_node_is_tried_and_then_weighed_by_what_it_measured() -> None:
    pool, known, new = two_nodes()
    speed_report(pool, known, speed=0.1, held_s=0.2, busy=1)
    speed_report(pool, new, speed=None, held_s=0.0)  # it has not measured its speed yet
    assert all(pool.select("m/warm", set(), LARGE) is new for _ in range(20))  # counted as fast as the fastest known
    speed_report(pool, new, speed=1.0, held_s=0.0)  # measured: ten times slower
    assert all(pool.select("m/warm", set(), LARGE) is known for _ in range(20))


def test_a_node_that_slows_down_is_followed() -> None:
    pool, first, second = two_nodes()
    speed_report(pool, first, speed=0.1, held_s=0.0)
    speed_report(pool, second, speed=0.2, held_s=0.0)
    assert all(pool.select("m/warm", set(), LARGE) is first for _ in range(20))
    speed_report(pool, first, speed=0.5, held_s=0.0)  # heat, a neighbour process: its own measure says so
    assert all(pool.select("m/warm", set(), LARGE) is second for _ in range(20))


async def test_two_gateways_on_stale_reports_spread_over_near_equals_and_count_their_own_requests() -> None:
    gateways = []
    for _ in range(2):  # each gateway has its own pool; both see the same (stale) reports
        pool = pool_of(3, capacity=8)
        nodes = list(pool.nodes.values())
        for node, speed in zip(nodes, (0.10, 0.105, 0.4)):
            speed_report(pool, node, speed=speed, held_s=0.0)
        gateways.append((pool, nodes))
    # Without new reports, each gateway's own requests count on the node they went to: four requests
    # from each spread over the two fast nodes (near equals, taken at random), none to the slow one
    # until those hold more than it would take.
    picks: Counter[str] = Counter()
    for _ in range(4):
        for pool, _nodes in gateways:
            taken = await pool.acquire("m/warm", set(), timeout_s=0, demand=LARGE)
            assert taken is not None
            picks[taken.url.rsplit(".", 1)[1]] += 1
    fast, near, slow = (node.url.rsplit(".", 1)[1] for node in gateways[0][1])
    assert picks[fast] == picks[near] == 4 and picks[slow] == 0
    # Near equals are taken at random: neither gateway piles every first request on the fastest node.
    pool = pool_of(2)
    first, second = pool.nodes.values()
    speed_report(pool, first, speed=0.100, held_s=0.0)
    speed_report(pool, second, speed=0.104, held_s=0.0)
    firsts = Counter(pool.select("m/warm", set(), LARGE) is first for _ in range(400))
    assert 100 < firsts[True] < 300


def test_a_node_lying_about_its_speed_or_load_in_unusable_ways_is_not_believed() -> None:
    model: dict[str, Any] = {"model_id": "m", "warm": True, "loaded": True}
    good: dict[str, Any] = {"capacity": 1, "in_flight": 0, "queued": 0, "models": [model]}
    _check_capabilities(good)  # an earlier version's report: no speed at all
    bad_models: list[dict[str, Any]] = [{"s_per_mpx_step": 0}, {"s_per_mpx_step": 1e300}, {"default_steps": True}, {"load_s": -5}]
    for bad in (
        {**good, "held_s": -1},
        {**good, "held_s": float("inf")},
        {**good, "held_s": "0"},
        *({**good, "models": [{**model, **fields}]} for fields in bad_models),
    ):
        with pytest.raises(ValueError):
            _check_capabilities(bad)


def test_a_node_that_reports_itself_far_faster_than_it_answers_is_weighed_by_what_it_does() -> None:
    pool, liar, honest = two_nodes()
    speed_report(pool, liar, speed=0.000001, held_s=0.0)  # bidding for every request
    speed_report(pool, honest, speed=0.1, held_s=0.0)
    assert pool.select("m/warm", set(), LARGE) is liar
    for _ in range(3):  # what this gateway saw: 4.2 megapixel-steps in 2.1 s each time
        pool.succeeded(liar, 2.1, "m/warm", LARGE)
    assert liar.speed("m/warm") == pytest.approx(2.1 / LARGE.work(liar, "m/warm"))  # 0.5: the quickest it was seen
    assert all(pool.select("m/warm", set(), LARGE) is honest for _ in range(20))
    for _ in range(8):  # an honest node's own quickest requests agree with its report: believed
        pool.succeeded(honest, 0.5, "m/warm", LARGE)
    assert honest.speed("m/warm") == 0.1
    pool.succeeded(honest, 0.01, "m/warm", SMALL)  # small requests are mostly overhead: not counted
    assert len(honest.observed["m/warm"]) == 8


async def test_in_a_large_fleet_of_equal_speeds_a_light_load_keeps_to_the_node_that_went_idle_last() -> None:
    pool = pool_of(1000)
    for node in pool.nodes.values():
        speed_report(pool, node, speed=0.1, held_s=0.0)
    recent = await pool.acquire("m/warm", set(), timeout_s=0, demand=LARGE)
    assert recent is not None
    pool.release(recent, "m/warm", LARGE, recent.epoch)
    assert recent.sent_s == 0  # its work is no longer counted there
    assert all(pool.select("m/warm", set(), LARGE) is recent for _ in range(50))  # its connection is open
    recent.held_s, recent.reported_at = 1.0, time.monotonic()  # busy now, by its report: no longer the soonest
    assert all(pool.select("m/warm", set(), LARGE) is not recent for _ in range(50))
