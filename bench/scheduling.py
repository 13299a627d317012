"""How well the gateway spreads work over nodes of different speeds: measured, against a simulation of the
same arrivals under two policies.

    python -m bench.scheduling [--scenarios A,B,C,D] [--loads 0.5,0.7,0.9] [--duration 10] [--requests N]

The fleet is simulated nodes (``bench.sim_node``, named as a simulation: each serves one job at a time in
arrival order for ``work x its s_per_mpx_step`` seconds, holds at most ``--node-capacity`` jobs, 9 as a
real node, and reports its speed and the seconds of work it holds, as the speed-report contract says),
each its own process on loopback, behind the real gateway (``python -m t2i_gateway --orchestrator URL ...``;
two of them on a real ``redis-server`` registry for D). A request's work is ``width x height / 1e6 x steps``
megapixel-steps. Speeds: a 512x512 1-step job takes 20 ms on a fast node and 80 ms on a slow one.

- A "4:1 one size": 2 fast + 2 slow nodes, every request 512x512 1 step;
- B "4:1 mixed": the same nodes, half the requests 512x512 1 step, half 1024x1024 4 steps (16x the work);
- C "equal": 4 equal nodes (32 ms per 512x512 step: the fleet's capacity is B's), B's mix;
- D "two gateways": B's fleet registered in Redis (``--register``), two gateways (``--registry``), each
  sent every other arrival.

For each scenario and load (``--loads``, a share of the fleet's capacity, the sum over nodes of 1 / the
mean job's seconds there), one open-loop trace is drawn from a seeded RNG: Poisson arrivals for
``--duration`` seconds (or ``--requests`` of them), each request sent at its time whatever is still
outstanding, and timed from that time until its JSON answer is read. Every request must be answered 200
(the gateways wait rather than refuse: a large ``--max-queued``, a long ``--queue-timeout``).

The same trace is simulated (``simulate``: a discrete-event simulation, pure Python, deterministic), each
node first-in first-out, one job at a time, at most ``--node-capacity`` jobs (beyond, a job waits in one
queue, in arrival order, for the first slot, as at the gateway), under two policies:

- JSQ, join the shortest queue: the node holding the fewest jobs, ties at random (a seeded RNG); this is
  the gateway's slot counting (most free slots, equal capacities);
- SED, shortest expected delay: the node where the job would finish first, ``(the work it holds + this
  job's) x its speed`` (ties at random): what the speed reports are for.

The HTTP round trip (RTT) is measured in each scenario, before its loads, on the idle fleet: the median,
over ``--probes`` sequential 64x64 1-step requests through each gateway, of the client's latency minus the
time the request spent in the node (from the node's own record of it, matched by ``X-Request-ID``): what
the gateway and its two HTTP exchanges (client to gateway, gateway to node) add to a request, which the
simulation does not count.

Prints, per scenario, a markdown table: the measured p50 and p99; the in-node p99 (of the measured
requests' time in their node, from arrival there to answer, by the node's record: queue and work, as the
simulation counts, without the gateway); the simulated p50 and p99; the measured p99 over (simulated SED
p99 + RTT); the share of the work done by the fast nodes (measured / JSQ / SED), and
the goals at 70 % load: A and B, measured p99 <= 1.25x (SED p99 + RTT); D, <= 1.4x; C (where SED's only
edge is knowing sizes), measured p50 and p99 each at most 5 % above (JSQ's + RTT). Then a verdict and a
summary line. A missed goal is reported, not an error; a request not answered 200, or a blocking call on
a daemon's event loop (``bench.common.BLOCKED``, with ``T2I_BLOCKBUSTER``), exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .common import Process, RedisServer, free_port, launch, wait_healthy
from .sim_node import MODEL, work_of

SMALL = (512, 512, 1)  # width, height, steps
BIG = (1024, 1024, 4)
FAST = 0.020 / work_of(*SMALL)  # s per megapixel-step: 20 ms for a 512x512 1-step job
SLOW = 4 * FAST  # 80 ms
EQUAL = 1.6 * FAST  # 32 ms: four of them have the capacity of 2 FAST + 2 SLOW
POLICIES = ("jsq", "sed")
PREFIX = "sched"  # the registry prefix of scenario D
GOAL_LOAD = 0.7
SETTLE_TIMEOUT_S = 5.0  # a node's changed report reaches Redis within a second, a gateway's view within another


# -- the simulation ---------------------------------------------------------------------------------


@dataclass
class Simulated:
    latencies: list[float]  # per job, in the trace's order: completion - arrival
    nodes: list[int]  # the node each job ran on


def simulate(
    jobs: Sequence[tuple[float, float]], speeds: Sequence[float], policy: str, *, capacity: int | None = None, seed: int = 0
) -> Simulated:
    """Serve ``jobs`` (arrival second, work in megapixel-steps; in arrival order) on nodes of ``speeds``
    (seconds per megapixel-step), each first-in first-out, one job at a time.

    ``policy``: ``"jsq"``, the node holding the fewest jobs; ``"sed"``, the node where the job would
    finish first (the work it holds, then this job's, at its speed). Ties go to one of the equals drawn by
    ``random.Random(seed)``. With ``capacity``, a node holds at most that many jobs (running and queued);
    a job that finds every node full waits in one queue, in arrival order, and goes to a node (by the
    policy, among those with a free slot) as soon as one has a slot. A job done at the instant another
    arrives frees its slot first."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if capacity is not None and capacity < 1:
        raise ValueError("capacity must be >= 1")
    rng = random.Random(seed)
    count = len(speeds)
    held: list[deque[float]] = [deque() for _ in speeds]  # the finish times of the jobs each node holds
    free_at = [0.0] * count  # when each node will have finished everything it holds
    latencies = [math.nan] * len(jobs)
    nodes = [-1] * len(jobs)
    waiting: deque[int] = deque()

    def place(j: int, now: float) -> bool:
        work = jobs[j][1]
        open_ = [k for k in range(count) if capacity is None or len(held[k]) < capacity]
        if not open_:
            return False
        if policy == "jsq":
            keys = [float(len(held[k])) for k in open_]
        else:
            keys = [max(free_at[k], now) + work * speeds[k] for k in open_]
        best = min(keys)
        equals = [k for k, key in zip(open_, keys) if key <= best + 1e-12]
        k = equals[0] if len(equals) == 1 else rng.choice(equals)
        finish = max(free_at[k], now) + work * speeds[k]
        free_at[k] = finish
        held[k].append(finish)
        latencies[j], nodes[j] = finish - jobs[j][0], k
        return True

    i = 0
    while i < len(jobs) or waiting:
        done_at, k = min(((held[k][0], k) for k in range(count) if held[k]), default=(math.inf, -1))
        arrival = jobs[i][0] if i < len(jobs) else math.inf
        if done_at <= arrival:
            held[k].popleft()
            while waiting and place(waiting[0], done_at):
                waiting.popleft()
        else:
            if waiting or not place(i, arrival):
                waiting.append(i)
            i += 1
    return Simulated(latencies, nodes)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (the smallest value with at least q % of the values at or below it)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- scenarios and traces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    speeds: tuple[float, ...]
    mix: tuple[tuple[int, int, int], ...]  # request sizes, in equal shares
    gateways: int = 1
    goal: str = "sed"  # "sed": p99 against SED's; "jsq": p50 and p99 against JSQ's
    goal_ratio: float = 1.25
    trace_of: str = ""  # the scenario whose arrivals it gets (default: its own)

    @property
    def mean_work(self) -> float:
        return statistics.fmean(work_of(*size) for size in self.mix)

    @property
    def capacity_rps(self) -> float:
        """Requests per second the fleet can serve: the sum over nodes of 1 / the mean job's seconds."""
        return sum(1 / (self.mean_work * speed) for speed in self.speeds)

    def is_fast(self, node: int) -> bool:
        return self.speeds[node] < max(self.speeds)


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("A", "4:1 one size", (FAST, FAST, SLOW, SLOW), (SMALL,)),
        Scenario("B", "4:1 mixed", (FAST, FAST, SLOW, SLOW), (SMALL, BIG)),
        Scenario("C", "equal", (EQUAL,) * 4, (SMALL, BIG), goal="jsq", goal_ratio=1.05),
        Scenario("D", "two gateways", (FAST, FAST, SLOW, SLOW), (SMALL, BIG), gateways=2, goal_ratio=1.4, trace_of="B"),
    )
}


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the run's start
    width: int
    height: int
    steps: int

    @property
    def work(self) -> float:
        return work_of(self.width, self.height, self.steps)


def make_trace(scenario: Scenario, load: float, count: int, seed: int) -> list[Arrival]:
    """``count`` Poisson arrivals at ``load`` x the fleet's capacity, the mix's sizes in equal shares
    (shuffled), all from one RNG seeded by the scenario, the load and ``seed``."""
    rng = random.Random(f"{scenario.trace_of or scenario.key}-{load:.3f}-{seed}")
    rate = load * scenario.capacity_rps
    sizes = [scenario.mix[i % len(scenario.mix)] for i in range(count)]
    rng.shuffle(sizes)
    at, trace = 0.0, []
    for size in sizes:
        at += rng.expovariate(rate)
        trace.append(Arrival(at, *size))
    return trace


# -- the fleet --------------------------------------------------------------------------------------


@dataclass
class Fleet:
    scenario: Scenario
    nodes: list[Process] = field(default_factory=list)
    gateways: list[Process] = field(default_factory=list)
    redis: RedisServer | None = None

    def stop(self) -> None:
        for process in (*self.gateways, *self.nodes):
            process.stop()
        if self.redis:
            self.redis.stop()


async def start_fleet(scenario: Scenario, folder: Path, node_capacity: int) -> Fleet:
    fleet = Fleet(scenario)
    if scenario.gateways > 1:
        fleet.redis = RedisServer(folder)
        fleet.redis.start()
    try:
        for k, speed in enumerate(scenario.speeds):
            port = free_port()
            args = ["-m", "bench.sim_node", "--s-per-mpx-step", repr(speed), "--capacity", str(node_capacity)]
            args += ["--node-id", f"sim-{scenario.key}{k}-{'fast' if scenario.is_fast(k) else 'slow'}"]
            if fleet.redis:
                args += ["--register", fleet.redis.url, "--registry-prefix", PREFIX, "--advertise-url", f"http://127.0.0.1:{port}"]
            fleet.nodes.append(launch(args, folder, f"sim-{scenario.key}{k}", port=port))
        for node in fleet.nodes:
            await wait_healthy(node, timeout=60)
        if fleet.redis:
            where = ["--registry", fleet.redis.url, "--registry-prefix", PREFIX]
        else:
            where = [arg for node in fleet.nodes for arg in ("--orchestrator", node.url)]
        # Waiting rather than refusing: a request waits at the gateway for a slot as long as it takes,
        # and each node may be tried once (every node full is the only other way to a 503).
        patience = ["--max-queued", "100000", "--queue-timeout", "600", "--request-timeout", "600", "--max-in-flight", "100000"]
        patience += ["--max-attempts", str(len(scenario.speeds))]
        for g in range(scenario.gateways):
            fleet.gateways.append(launch(["-m", "t2i_gateway", *where, *patience], folder, f"gateway-{scenario.key}{g}"))
        urls = {node.url for node in fleet.nodes}
        for gateway in fleet.gateways:
            await wait_routable(gateway, urls)
    except BaseException:
        fleet.stop()
        raise
    return fleet


async def orchestrators(session: aiohttp.ClientSession, gateway: Process) -> list[dict[str, Any]]:
    async with session.get(f"{gateway.url}/orchestrators") as response:
        return (await response.json())["orchestrators"]  # type: ignore[no-any-return]


async def wait_routable(gateway: Process, urls: set[str], timeout: float = 60) -> None:
    """Until the gateway's ``/orchestrators`` lists exactly ``urls``, all healthy."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and gateway.process.poll() is None:
            try:
                listed = await orchestrators(session, gateway)
                if {o["url"] for o in listed if o["healthy"]} == urls and len(listed) == len(urls):
                    return
            except (aiohttp.ClientError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{gateway.url} never listed the {len(urls)} nodes as healthy; see {gateway.log}")


async def settle(session: aiohttp.ClientSession, fleet: Fleet) -> str | None:
    """Until each gateway sees every node idle (all slots free, no work held, its speed known where the
    gateway shows speeds), for at most ``SETTLE_TIMEOUT_S``: a gateway probes a node it used a second
    later, but a node known by its registry reports is not probed while idle, and the load in its last
    report stands until its next heartbeat. None when settled, else what the gateways still believed."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        stale = [
            f"{o['node_id'] or o['url']} {o['capacity'] - o['free']} slot(s) busy, held_s {o.get('held_s')}, speed {o.get('s_per_mpx_step')}"
            for gateway in fleet.gateways
            for o in await orchestrators(session, gateway)
            if o["free"] != o["capacity"] or o.get("held_s") or ("s_per_mpx_step" in o and not o["s_per_mpx_step"])
        ]
        if not stale:
            return None
        if time.monotonic() >= deadline:
            return "; ".join(stale)
        await asyncio.sleep(0.1)


async def node_jobs(session: aiohttp.ClientSession, fleet: Fleet, prefix: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """The jobs the nodes served whose request id starts with ``prefix``: id -> (node index, its record)."""
    found: dict[str, tuple[int, dict[str, Any]]] = {}
    for k, node in enumerate(fleet.nodes):
        async with session.get(f"{node.url}/sim/jobs") as response:
            for job in (await response.json())["jobs"]:
                if job["request_id"].startswith(prefix) and job["answered"] is not None:
                    found[job["request_id"]] = (k, job)
    return found


def body(arrival: Arrival, seed: int) -> dict[str, Any]:
    return {
        "prompt": "a scheduling bench",
        "model_id": MODEL,
        "width": arrival.width,
        "height": arrival.height,
        "num_inference_steps": arrival.steps,
        "seed": seed,
    }


async def round_trip(session: aiohttp.ClientSession, fleet: Fleet, probes: int) -> float:
    """The median over sequential 64x64 1-step requests through each gateway of (the client's latency -
    the request's time in the node, as the node recorded it), in seconds."""
    latencies: dict[str, float] = {}
    probe = Arrival(0.0, 64, 64, 1)
    for g, gateway in enumerate(fleet.gateways):
        for n in range(probes):
            request_id = f"rtt-{fleet.scenario.key}-{g}-{n}"
            started = time.perf_counter()
            async with session.post(f"{gateway.url}/text-to-image", json=body(probe, n), headers={"X-Request-ID": request_id}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"a round-trip probe was answered {response.status}: see {gateway.log}")
            latencies[request_id] = time.perf_counter() - started
    served = await node_jobs(session, fleet, f"rtt-{fleet.scenario.key}-")
    return statistics.median(latencies[rid] - (job["answered"] - job["arrived"]) for rid, (_, job) in served.items())


@dataclass
class Measured:
    latencies: list[float]  # of the 200 answers, from each request's scheduled time
    failed: int  # answers other than 200, and connection errors
    lag_max: float  # the latest a request was sent after its scheduled time
    nodes: dict[int, int]  # trace index -> the node that served it (from the nodes' records)
    in_node: list[float]  # each answered request's time in its node (arrival to answer), by the node's record
    seconds: float


async def run_trace(session: aiohttp.ClientSession, fleet: Fleet, trace: list[Arrival], tag: str) -> Measured:
    """Each request sent at its time (to the gateways in turn), whatever is outstanding; every answer awaited."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failed = 0
    lag_max = 0.0
    tasks: list[asyncio.Task[None]] = []

    async def send(i: int, arrival: Arrival, due: float) -> None:
        nonlocal failed
        gateway = fleet.gateways[i % len(fleet.gateways)]
        try:
            async with session.post(
                f"{gateway.url}/text-to-image", json=body(arrival, i), headers={"X-Request-ID": f"{tag}-{i}"}
            ) as response:
                await response.json()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ok = False
        if ok:
            latencies.append(loop.time() - due)
        else:
            failed += 1

    start = loop.time() + 0.05
    for i, arrival in enumerate(trace):
        due = start + arrival.at
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        lag_max = max(lag_max, loop.time() - due)
        tasks.append(asyncio.create_task(send(i, arrival, due)))
    await asyncio.gather(*tasks)
    seconds = loop.time() - start
    served = await node_jobs(session, fleet, f"{tag}-")
    nodes = {int(rid.rpartition("-")[2]): k for rid, (k, _) in served.items()}
    in_node = [job["answered"] - job["arrived"] for _, job in served.values()]
    return Measured(latencies, failed, lag_max, nodes, in_node, seconds)


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: Scenario
    load: float
    requests: int
    measured: Measured
    jsq: Simulated
    sed: Simulated
    rtt: float
    fast_share: tuple[float, float, float]  # of the work, measured / JSQ / SED

    def ratio(self) -> float:
        return percentile(self.measured.latencies, 99) / (percentile(self.sed.latencies, 99) + self.rtt)

    def goal(self) -> bool | None:
        """Met, missed, or None: not a load with a goal."""
        if abs(self.load - GOAL_LOAD) > 1e-9:
            return None
        m = self.measured.latencies
        if self.scenario.goal == "jsq":
            return all(percentile(m, q) <= self.scenario.goal_ratio * (percentile(self.jsq.latencies, q) + self.rtt) for q in (50, 99))
        return self.ratio() <= self.scenario.goal_ratio


def fast_share(scenario: Scenario, trace: list[Arrival], nodes: dict[int, int] | list[int]) -> float:
    """The share of the work (of the jobs whose node is known) that fast nodes did."""
    pairs = nodes.items() if isinstance(nodes, dict) else enumerate(nodes)
    total = fast = 0.0
    for i, k in pairs:
        total += trace[i].work
        fast += trace[i].work if scenario.is_fast(k) else 0.0
    return fast / total if total else math.nan


async def run(args: argparse.Namespace, folder: Path) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    notes: dict[str, Any] = {"policy": None, "rtt": {}, "lag_max": 0.0, "unsettled": []}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        for key in args.scenarios:
            scenario = SCENARIOS[key]
            fleet = await start_fleet(scenario, folder, args.node_capacity)
            try:
                rtt = await round_trip(session, fleet, args.probes)  # also each node's first jobs: its speed becomes known
                notes["rtt"][key] = rtt
                for load in args.loads:
                    if stale := await settle(session, fleet):
                        notes["unsettled"].append(f"{key}@{load:.0%}: {stale}")
                    view = await orchestrators(session, fleet.gateways[0])
                    notes["policy"] = notes["policy"] or any("s_per_mpx_step" in o for o in view)
                    count = args.requests or max(1, round(load * scenario.capacity_rps * args.duration))
                    trace = make_trace(scenario, load, count, args.seed)
                    measured = await run_trace(session, fleet, trace, f"{key}{round(load * 100)}")
                    notes["lag_max"] = max(notes["lag_max"], measured.lag_max)
                    jobs = [(a.at, a.work) for a in trace]
                    sims = {p: simulate(jobs, scenario.speeds, p, capacity=args.node_capacity, seed=args.seed) for p in POLICIES}
                    share = (
                        fast_share(scenario, trace, measured.nodes),
                        fast_share(scenario, trace, sims["jsq"].nodes),
                        fast_share(scenario, trace, sims["sed"].nodes),
                    )
                    rows.append(Row(scenario, load, count, measured, sims["jsq"], sims["sed"], rtt, share))
            finally:
                fleet.stop()
    return rows, notes


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else "met" if ok else "MISSED"


def report(rows: list[Row], notes: dict[str, Any], args: argparse.Namespace) -> str:
    policy = {
        True: "speed-aware (its /orchestrators shows the nodes' s_per_mpx_step)",
        False: "slot counting (no s_per_mpx_step in its /orchestrators: most free slots, as today)",
        None: "unknown",
    }[notes["policy"]]
    lines = [
        f"bench.scheduling: simulated nodes (bench.sim_node, capacity {args.node_capacity}); a 512x512 1-step job takes "
        f"{1000 * FAST * work_of(*SMALL):.0f} ms on a fast node, {1000 * SLOW * work_of(*SMALL):.0f} ms on a slow one, "
        f"{1000 * EQUAL * work_of(*SMALL):.0f} ms on an equal one (C); 1024x1024 4 steps is 16x that",
        f"gateway policy: {policy}",
        f"open-loop Poisson arrivals ({f'{args.requests} requests' if args.requests else f'{args.duration:g} s'} per load, seed {args.seed}); "
        "latency from each request's scheduled time to its JSON answer; times in ms",
        f"RTT: median over {args.probes} sequential 64x64 1-step requests per gateway on the idle fleet, of the latency minus "
        "the time the request spent in the node (by the node's record); in-node: the measured requests' time in their node "
        "(arrival there to answer, by the node's record), what the simulation counts",
    ]
    for key in args.scenarios:
        scenario = SCENARIOS[key]
        goal = (
            f"measured p50 and p99 <= {scenario.goal_ratio:g}x (JSQ's + RTT)"
            if scenario.goal == "jsq"
            else f"measured p99 <= {scenario.goal_ratio:g}x (SED p99 + RTT)"
        )
        lines += [
            "",
            f'### {key} "{scenario.title}": {len(scenario.speeds)} nodes, {scenario.gateways} gateway(s), '
            f"capacity {scenario.capacity_rps:.1f} req/s, RTT {ms(notes['rtt'][key])} ms; goal at {GOAL_LOAD:.0%}: {goal}",
            "",
            "| load | requests | not 200 | measured p50 | measured p99 | in-node p99 | JSQ p50 | JSQ p99 | SED p50 | SED p99 "
            "| p99 / (SED p99 + RTT) | fast nodes' work % (measured / JSQ / SED) | goal |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r.scenario.key == key):
            m, j, s = row.measured.latencies, row.jsq.latencies, row.sed.latencies
            share = "-" if len(set(scenario.speeds)) == 1 else " / ".join(f"{100 * x:.0f}" for x in row.fast_share)
            lines.append(
                f"| {row.load:.0%} | {row.requests} | {row.measured.failed} | {ms(percentile(m, 50))} | {ms(percentile(m, 99))} "
                f"| {ms(percentile(row.measured.in_node, 99))} "
                f"| {ms(percentile(j, 50))} | {ms(percentile(j, 99))} | {ms(percentile(s, 50))} | {ms(percentile(s, 99))} "
                f"| {row.ratio():.2f}x | {share} | {verdict(row.goal())} |"
            )
    goals: dict[str, bool] = {}
    for row in rows:
        if (ok := row.goal()) is not None:
            goals[row.scenario.key] = ok
    failed = sum(row.measured.failed for row in rows)
    lines += ["", f"the client sent each request at most {ms(notes['lag_max'])} ms after its scheduled time"]
    for unsettled in notes["unsettled"]:
        lines.append(f"note: a run began with a gateway believing, {SETTLE_TIMEOUT_S:g} s after the last answer, {unsettled}")
    met = sum(goals.values())
    if not goals:
        judged = f"no latency goal judged (goals are at {GOAL_LOAD:.0%} load)"
    else:
        judged = f"{met} of {len(goals)} latency goals met" + (
            f" (missed: {', '.join(k for k, ok in goals.items() if not ok)})" if met < len(goals) else ""
        )
    lines.append(f"verdict: {judged}; {'every request answered' if not failed else f'{failed} request(s) NOT answered 200'}")
    lines.append(
        "summary: "
        + " ".join(f"{r.scenario.key}{round(100 * r.load)}_ratio={r.ratio():.2f}" for r in rows)
        + f" not_200={failed} goals={','.join(f'{k}:{verdict(ok)}' for k, ok in goals.items()) or 'none'}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="A,B,C,D", help="of A, B, C, D, comma-separated")
    parser.add_argument("--loads", default="0.5,0.7,0.9", help="shares of the fleet's capacity, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals per scenario and load")
    parser.add_argument("--requests", type=int, help="requests per scenario and load (instead of --duration)")
    parser.add_argument("--probes", type=int, default=20, help="sequential requests per gateway that measure the round trip")
    parser.add_argument("--node-capacity", type=int, default=9, help="jobs a simulated node holds (a real node's default: 9)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.scenarios = [key.strip().upper() for key in args.scenarios.split(",") if key.strip()]
    args.loads = [float(load) for load in args.loads.split(",") if load.strip()]
    unknown = [key for key in args.scenarios if key not in SCENARIOS]
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: of {', '.join(SCENARIOS)}, not {', '.join(unknown) or 'none'}")
    if not args.loads or not all(0 < load < 1.5 for load in args.loads):
        parser.error("--loads: shares of the capacity, above 0")
    if args.requests is not None and args.requests < 1 or args.probes < 1 or args.duration <= 0 or args.node_capacity < 1:
        parser.error("--requests, --probes, --duration and --node-capacity must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups of the children
    with tempfile.TemporaryDirectory(prefix="t2i-scheduling-") as folder:
        rows, notes = asyncio.run(run(args, Path(folder)))
    print(report(rows, notes, args), flush=True)
    failed = sum(row.measured.failed for row in rows)
    if failed:
        sys.exit(f"bench.scheduling: {failed} request(s) not answered 200")


if __name__ == "__main__":
    main()
