"""bench.scheduling: its simulation by hand-checked cases, its simulated node, and a tiny run of the bench."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from bench.common import RedisServer
from bench.scheduling import SCENARIOS, make_trace, percentile, simulate
from bench.sim_node import MODEL, SimNode, create_app, work_of
from discovery import RegistrySettings
from discovery.redis_registry import RedisRegistry
from t2i_gateway.nodes import _check_capabilities

from .processes import run_bench

SMALL = {"prompt": "p", "model_id": MODEL, "width": 512, "height": 512, "num_inference_steps": 1}


# -- the simulation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["jsq", "sed"])
def test_one_node_serves_in_arrival_order_one_job_at_a_time_whatever_the_policy(policy: str) -> None:
    # Work 2 at t=0 runs until 2; work 1 at t=1 waits for it and runs 2..3; work 1 at t=5 runs 5..6 (speed 1 s per unit).
    result = simulate([(0.0, 2.0), (1.0, 1.0), (5.0, 1.0)], [1.0], policy)
    assert result.latencies == [2.0, 2.0, 1.0]
    assert result.nodes == [0, 0, 0]
    # Twice as fast: 0..1, 1..1.5, 5..5.5.
    assert simulate([(0.0, 2.0), (1.0, 1.0), (5.0, 1.0)], [0.5], policy).latencies == [1.0, 0.5, 0.5]


def test_sed_queues_on_a_fast_node_while_that_finishes_sooner() -> None:
    # Node 0 takes 1 s per unit, node 1 takes 4: three unit jobs at once all finish sooner on node 0 (1, 2, 3 < 4).
    result = simulate([(0.0, 1.0)] * 3, [1.0, 4.0], "sed")
    assert result.latencies == [1.0, 2.0, 3.0] and result.nodes == [0, 0, 0]
    # A fourth would finish at 4 on either: a tie, drawn at random, at 4 whichever is drawn.
    assert simulate([(0.0, 1.0)] * 4, [1.0, 4.0], "sed").latencies == [1.0, 2.0, 3.0, 4.0]


def test_jsq_counts_jobs_whatever_their_size() -> None:
    # Node 0 holds one job (work 10, until 10); the next goes to node 1 (holding none), the third finds both
    # holding one and draws one; each node's queue is first-in first-out.
    result = simulate([(0.0, 10.0), (0.0, 1.0), (0.0, 1.0)], [1.0, 1.0], "jsq", seed=3)
    assert result.latencies[:2] == [10.0, 1.0] and result.nodes[:2] in ([0, 1], [1, 0])
    assert result.latencies[2] in (11.0, 2.0)


def test_with_a_capacity_a_job_waits_for_the_first_free_slot_in_arrival_order() -> None:
    # Two nodes of one slot each: the third job at t=0 waits until the first slot frees at 1, and runs 1..2.
    for policy in ("jsq", "sed"):
        assert simulate([(0.0, 1.0)] * 3, [1.0, 1.0], policy, capacity=1).latencies == [1.0, 1.0, 2.0]
    # One node of one slot: those that find it full go to it in arrival order as it frees (0..3, 3..4, 4..5).
    result = simulate([(0.0, 3.0), (0.0, 1.0), (0.5, 1.0)], [1.0], "sed", capacity=1)
    assert result.latencies == [3.0, 4.0, 4.5]


def test_sed_beats_jsq_at_the_99th_percentile_on_a_4_to_1_fleet_and_is_deterministic() -> None:
    scenario = SCENARIOS["A"]
    jobs = [(a.at, a.work) for a in make_trace(scenario, 0.7, 600, seed=1)]
    jsq = simulate(jobs, scenario.speeds, "jsq", capacity=9, seed=1)
    sed = simulate(jobs, scenario.speeds, "sed", capacity=9, seed=1)
    assert percentile(sed.latencies, 99) < percentile(jsq.latencies, 99)
    assert simulate(jobs, scenario.speeds, "sed", capacity=9, seed=1) == sed  # the same trace and seed, the same result
    assert make_trace(scenario, 0.7, 600, seed=1) == make_trace(scenario, 0.7, 600, seed=1)
    assert all(latency >= work * min(scenario.speeds) - 1e-12 for latency, (_, work) in zip(sed.latencies, jobs))


def test_nearest_rank_percentile() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0


# -- the simulated node -----------------------------------------------------------------------------


async def test_the_sim_node_reports_capabilities_the_gateway_accepts_and_its_speed_after_its_first_job(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(SimNode(0.01, capacity=4)))
    report = _check_capabilities(await (await client.get("/capabilities")).json())
    assert report["status"] == "ready" and report["capacity"] == 4 and report["in_flight"] == report["queued"] == 0
    assert report["held_s"] == 0
    [model] = report["models"]
    assert model["model_id"] == MODEL and model["warm"] and model["loaded"] and model["default_steps"] == 2
    assert model["s_per_mpx_step"] is None and model["load_s"] is None  # not measured until its first job
    assert (await client.get("/health")).status == 200

    response = await client.post("/text-to-image", json={**SMALL, "width": 64, "height": 64, "seed": 5}, headers={"X-Request-ID": "one"})
    assert response.status == 200
    [image] = (await response.json())["images"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/stream/[0-9a-f]{32}/[0-9a-f]{16}\.png", image["url"]) and image["seed"] == 5
    report = _check_capabilities(await (await client.get("/capabilities")).json())
    assert report["models"][0]["s_per_mpx_step"] == 0.01


async def test_the_sim_node_serves_one_job_at_a_time_in_arrival_order(aiohttp_client: Any) -> None:
    node = SimNode(0.05, report_after_first=False)
    client = await aiohttp_client(create_app(node))
    first = asyncio.create_task(client.post("/text-to-image", json=SMALL, headers={"X-Request-ID": "first"}))
    await node.until_submitted(1)  # the second is sent once the node holds the first: their order is known
    second = await client.post("/text-to-image", json={**SMALL, "num_inference_steps": 2}, headers={"X-Request-ID": "second"})
    assert second.status == 200 and (await first).status == 200
    jobs = {job["request_id"]: job for job in (await (await client.get("/sim/jobs")).json())["jobs"]}
    one, two = jobs["first"], jobs["second"]
    assert one["work"] == pytest.approx(work_of(512, 512, 1)) and two["work"] == pytest.approx(work_of(512, 512, 2))
    assert two["seconds"] == pytest.approx(two["work"] * 0.05)
    assert one["arrived"] <= one["started"] < one["finished"] <= one["answered"]
    assert two["arrived"] < one["finished"]  # it came while the first ran...
    assert two["started"] == one["finished"]  # ...and started when the first finished, on the device's schedule
    assert two["finished"] == pytest.approx(two["started"] + two["seconds"]) and two["answered"] >= two["finished"]


async def test_the_sim_node_reports_the_work_it_holds_and_refuses_beyond_its_capacity(aiohttp_client: Any) -> None:
    node = SimNode(100.0, capacity=2)  # a 512x512 1-step job runs 26 s: nothing finishes during the test
    client = await aiohttp_client(create_app(node))
    held = [asyncio.create_task(client.post("/text-to-image", json=SMALL)) for _ in range(2)]
    await node.until_submitted(2)
    report = await (await client.get("/capabilities")).json()
    assert report["in_flight"] + report["queued"] == 2
    seconds = work_of(512, 512, 1) * 100.0
    assert seconds < report["held_s"] <= 2 * seconds  # the queued job's whole, and the running one's remaining part
    refused = await client.post("/text-to-image", json=SMALL)
    assert refused.status == 503
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    await client.close()  # the node answers what it holds at shutdown at once
    assert not node.waiting


async def test_the_sim_node_registers_its_report_in_redis(aiohttp_client: Any, redis_server: RedisServer) -> None:
    settings = RegistrySettings(redis_server.url, prefix="sim")
    registry = RedisRegistry(settings)
    try:
        url = "http://127.0.0.1:9"
        client = await aiohttp_client(create_app(SimNode(0.02), advertise_url=url, register=settings, heartbeat_interval_s=60))
        _, entries, reports = await registry.read()  # the first heartbeat is sent before the node serves
        assert url in entries
        report = _check_capabilities(json.loads(reports[url]))
        assert report["models"][0]["s_per_mpx_step"] is None
        events = registry.client.pubsub(ignore_subscribe_messages=True)
        await events.subscribe(registry.channel)
        response = await client.post("/text-to-image", json={**SMALL, "width": 64, "height": 64})
        assert response.status == 200 and (await response.json())["images"][0]["url"].startswith(f"{url}/stream/")
        # The changed offer (its speed measured) is announced within a second, not at the next heartbeat (60 s).
        message = None
        while message is None:  # None: the subscription's confirmation
            message = await events.get_message(timeout=None)
        assert message["data"] == f"report {url}"
        assert json.loads((await registry.read())[2][url])["models"][0]["s_per_mpx_step"] == 0.02
        await events.aclose()
        await client.close()
        assert url not in (await registry.read())[1]  # it left at shutdown
    finally:
        await registry.close()


# -- the bench --------------------------------------------------------------------------------------


def test_a_tiny_run_of_the_bench_prints_its_table_and_exits_0() -> None:
    lines = run_bench("bench.scheduling", "--scenarios", "A", "--loads", "0.7", "--requests", "40", "--probes", "3", timeout=120)
    output = "\n".join(lines)
    assert any(line.startswith('### A "4:1 one size"') for line in lines), output
    assert any(line.startswith("| load | requests | not 200 | measured p50 | measured p99 | in-node p99 | JSQ p50") for line in lines), (
        output
    )
    [row] = [line for line in lines if line.startswith("| 70% |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:3] == ["40", "0"], row
    figures = [float(cell.removesuffix("x")) for cell in cells[3:11]]  # the latencies and the ratio
    assert all(figure > 0 for figure in figures), row
    assert cells[-1] in ("met", "MISSED"), row
    assert any(re.match(r"verdict: (0|1) of 1 latency goals met.*; every request answered$", line) for line in lines), output
    [summary] = [line for line in lines if line.startswith("summary: ")]
    assert re.fullmatch(r"summary: A70_ratio=\d+\.\d+ not_200=0 goals=A:(met|MISSED)", summary), summary
