"""Tenants on one node: whether a light tenant gets its turn behind a heavy one's queue, what serving keys
in turn costs the heavy one, and whether two gateways over one Redis hold a key to one request limit.

    python -m bench.tenants [--seconds 20] [--heavy 32] [--light-every 0.5] [--limit 600] [--window 60] [--parts fairness,limit]

Fairness (``--parts fairness``): one simulated node (``bench.sim_node``, named as a simulation: one job at
a time, in arrival order, holding up to 9 as a real node) where a 512x512 2-step request (the simulated
model's default steps, sent explicitly) runs ``--job-ms`` (100 ms), behind the real gateway (``python -m t2i_gateway``, a fresh
process for each phase, with a keys file of two keys, ``heavy`` and ``light``, without limits; it waits
rather than refuses: a large ``--max-queued``, a long ``--queue-timeout``). Two tenants:

- heavy: ``--heavy`` (32) requests in flight all the time (a closed loop: each worker sends its next as
  its last is answered);
- light: one request at a time, at a pace: each sent ``--light-every`` (0.5 s) x a factor drawn between
  0.5 and 1.5 (a seeded RNG, the same draws in every phase; the jitter keeps its requests from locking
  onto the heavy jobs' boundaries) after the one before it, or when that one is answered if later.

Phases, each ``--seconds`` (20) measured after a second of load not counted:

1. idle: the light tenant alone: its median latency is L0;
2. arrival order (the gateway's behaviour without keys' turns): both tenants send with the same key, the
   node takes its 9 (the default ``--node-queue``): one queue, in arrival order;
3. in turn: each tenant its own key, ``--node-queue 0``: every wait is at the gateway, where keys are
   served in turn;
4. heavy alone, default ``--node-queue``, and 5. heavy alone, ``--node-queue 0``: what keeping the queue
   at the gateway costs the device, without the light tenant.

Latency is from a request's send to its JSON answer, for the light requests sent in the window; heavy
throughput is the heavy answers received in the window, per second. The light tenant, served faster,
sends more in phase 3 than in phase 2 (one at a time, it waits out a phase-2 answer of seconds), and its
jobs take device time from the heavy one; so throughput is compared per second of device time the light
tenant left (the window less the light jobs' seconds on the device, from the node's record of each
request, matched by ``X-Request-ID``), as well as raw. The node's record also splits the light median
into its parts: at the gateway, waiting in the node, running; and it gives the device's idle spells
between two jobs (with ``--node-queue 0``, a round trip through the gateway each).

Goals: light median in phase 3 at most 2x L0; heavy throughput per device-second left in phase 3 at
least 0.95x phase 2's.

Shared limit (``--parts limit``): a real ``redis-server``, one fake node that answers at once
(``bench.fake_node --behaviour ok``), two gateways with ``--limits-redis`` and a keys file of one key
with ``requests_per_minute = --limit`` (600). ``--workers`` (4) per gateway send back to back with that
key (a 429 comes at once). The limit's burst (a minute's worth, at once) is spent first; from the first
429 on, the requests sent over ``--window`` (60) seconds and answered 200 across both gateways are
counted. Goal: within 5 % of ``--limit x window / 60`` (without the shared limit each gateway would
allow the whole limit: 2x).

Prints a markdown table per part, the ratios, the goals as met or MISSED, and a summary line. A missed
goal is reported, not an error; a request answered other than 200 (or 429 in the shared-limit part),
or a blocking call on a daemon's event loop (``bench.common.BLOCKED``, with ``T2I_BLOCKBUSTER``), exits 1.
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from t2i_gateway.tenants import secret_hash

from .common import Process, RedisServer, free_port, launch, wait_healthy
from .sim_node import DEFAULT_STEPS, MODEL, work_of

WIDTH = HEIGHT = 512
WARM_S = 1.0  # of load, before each fairness window
READY_TIMEOUT_S = 60.0
LIGHT_GOAL = 2.0  # light median in turn <= this x L0
THROUGHPUT_GOAL = 0.95  # heavy throughput in turn >= this x in arrival order
LIMIT_GOAL = 0.05  # accepted within this share of the limit
PATIENCE = ["--max-queued", "100000", "--queue-timeout", "600", "--request-timeout", "600", "--max-in-flight", "100000"]
SECRETS = {"heavy": "bench-tenants-heavy-secret", "light": "bench-tenants-light-secret", "limited": "bench-tenants-limited-secret"}
BODY = {"prompt": "a tenants bench", "model_id": MODEL, "width": WIDTH, "height": HEIGHT, "num_inference_steps": DEFAULT_STEPS}


def keys_file(folder: Path, name: str, limits: dict[str, dict[str, int]]) -> Path:
    """A keys file of ``limits``' keys (name -> its limits), with the secrets of ``SECRETS``."""
    lines = []
    for key, fields in limits.items():
        lines += ["[[keys]]", f'name = "{key}"', f'sha256 = "{secret_hash(SECRETS[key])}"']
        lines += [f"{field_} = {value}" for field_, value in fields.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[key]}"}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (the smallest value with at least q % of the values at or below it)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


async def wait_ready(session: aiohttp.ClientSession, gateway: Process, node_url: str, key: str, *, speed: bool) -> None:
    """Until the gateway's ``/orchestrators`` lists the node healthy, idle (none of our requests on it, a
    slot free) and, with ``speed``, with its speed known."""
    await wait_healthy(gateway, timeout=READY_TIMEOUT_S)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and gateway.process.poll() is None:
        try:
            async with session.get(f"{gateway.url}/orchestrators", headers=auth(key)) as response:
                listed = (await response.json())["orchestrators"]
            if any(
                o["url"] == node_url and o["healthy"] and not o["in_flight"] and o["free"] and (o["s_per_mpx_step"] or not speed)
                for o in listed
            ):
                return
        except (aiohttp.ClientError, ValueError, KeyError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{gateway.url} never listed {node_url} as ready and idle; see {gateway.log}")


async def wait_idle(session: aiohttp.ClientSession, node: Process) -> None:
    """Until the node holds no job (the last phase's requests all answered there)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        async with session.get(f"{node.url}/capabilities") as response:
            report = await response.json()
        if not report["in_flight"] and not report["queued"]:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{node.url} still holds jobs {READY_TIMEOUT_S:g} s after a phase; see {node.log}")


# -- fairness ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    heavy: bool
    light: bool
    node_queue: int | None  # None: the gateway's default (as many as the node takes)
    shared_key: bool = False  # both tenants send with the heavy tenant's key

    @property
    def gateway(self) -> str:
        return "default --node-queue (9 on the node)" if self.node_queue is None else f"--node-queue {self.node_queue}"


PHASES = (
    Phase("idle", "idle: light alone", heavy=False, light=True, node_queue=None),
    Phase("order", "arrival order: one key", heavy=True, light=True, node_queue=None, shared_key=True),
    Phase("turn", "in turn: two keys", heavy=True, light=True, node_queue=0),
    Phase("alone", "heavy alone", heavy=True, light=False, node_queue=None),
    Phase("alone0", "heavy alone", heavy=True, light=False, node_queue=0),
)


@dataclass
class Sent:
    request_id: str
    sent: float  # time.monotonic()
    answered: float
    status: int


@dataclass
class PhaseResult:
    phase: Phase
    window: tuple[float, float]
    light: list[Sent] = field(default_factory=list)  # sent in the window
    heavy: list[Sent] = field(default_factory=list)  # every heavy request
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> the node's record
    failed: int = 0  # answers other than 200, and connection errors, in the whole phase

    @property
    def seconds(self) -> float:
        return self.window[1] - self.window[0]

    def light_latencies(self) -> list[float]:
        return [s.answered - s.sent for s in self.light if s.status == 200]

    def heavy_rate(self) -> float:
        """Heavy images answered in the window, per second."""
        start, end = self.window
        return sum(1 for s in self.heavy if s.status == 200 and start <= s.answered < end) / self.seconds

    def device_s(self, tenant: str | None = None) -> float:
        """Seconds the device ran (``tenant``'s) jobs within the window, by the node's record."""
        start, end = self.window
        total = 0.0
        for request_id, job in self.jobs.items():
            if tenant is None or request_id.split("-")[1] == tenant:
                total += max(0.0, min(end, job["finished"]) - max(start, job["started"]))
        return total

    def heavy_rate_left(self) -> float:
        """Heavy images per second of the device time the light tenant left in the window."""
        start, end = self.window
        answered = sum(1 for s in self.heavy if s.status == 200 and start <= s.answered < end)
        return answered / (self.seconds - self.device_s("light"))

    def gaps(self) -> list[float]:
        """The device's idle spells between jobs that started within the window (by the node's record)."""
        start, end = self.window
        jobs = sorted(self.jobs.values(), key=lambda job: job["started"])
        return [b["started"] - a["finished"] for a, b in zip(jobs, jobs[1:]) if start <= b["started"] < end]

    def light_parts(self) -> tuple[float, float, float]:
        """Medians of the light requests' time at the gateway (latency less its time in the node), waiting
        in the node, and running there."""
        gateway, waiting, running = [], [], []
        for s in self.light:
            job = self.jobs.get(s.request_id)
            if s.status != 200 or job is None:
                continue
            gateway.append((s.answered - s.sent) - (job["answered"] - job["arrived"]))
            waiting.append(job["started"] - job["arrived"])
            running.append(job["finished"] - job["started"])
        return median(gateway), median(waiting), median(running)


async def post(session: aiohttp.ClientSession, url: str, key: str, request_id: str) -> Sent:
    sent = time.monotonic()
    try:
        async with session.post(f"{url}/text-to-image", json=BODY, headers={**auth(key), "X-Request-ID": request_id}) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    return Sent(request_id, sent, time.monotonic(), status)


async def run_phase(session: aiohttp.ClientSession, phase: Phase, gateway: Process, node: Process, args: argparse.Namespace) -> PhaseResult:
    loop = asyncio.get_running_loop()
    start = time.monotonic() + 0.05
    window = (start + WARM_S, start + WARM_S + args.seconds)
    result = PhaseResult(phase, window)
    heavy_key, light_key = ("heavy", "heavy" if phase.shared_key else "light")
    light_done = asyncio.Event()
    if not phase.light:
        light_done.set()
    count = 0

    def next_id(tenant: str) -> str:
        nonlocal count
        count += 1
        return f"{phase.key}-{tenant}-{count}"

    async def heavy_worker() -> None:
        await asyncio.sleep(max(0.0, start - loop.time()))
        while not (light_done.is_set() and time.monotonic() >= window[1]):
            sent = await post(session, gateway.url, heavy_key, next_id("heavy"))
            result.heavy.append(sent)
            result.failed += sent.status != 200

    async def light_worker() -> None:
        rng = random.Random(args.seed)  # the same pace in every phase
        due = window[0]
        try:
            while due < window[1]:
                await asyncio.sleep(max(0.0, due - loop.time()))
                sent = await post(session, gateway.url, light_key, next_id("light"))
                result.light.append(sent)
                result.failed += sent.status != 200
                due = max(sent.sent + args.light_every * rng.uniform(0.5, 1.5), sent.answered)
        finally:
            light_done.set()

    tasks = [asyncio.create_task(heavy_worker()) for _ in range(args.heavy if phase.heavy else 0)]
    if phase.light:
        tasks.append(asyncio.create_task(light_worker()))
    await asyncio.gather(*tasks)
    async with session.get(f"{node.url}/sim/jobs") as response:
        records = (await response.json())["jobs"]
    result.jobs = {job["request_id"]: job for job in records if job["request_id"].startswith(f"{phase.key}-") and job["answered"]}
    return result


async def fairness(args: argparse.Namespace, folder: Path) -> list[PhaseResult]:
    seconds = args.job_ms / 1000 / work_of(WIDTH, HEIGHT, DEFAULT_STEPS)
    node = launch(["-m", "bench.sim_node", "--s-per-mpx-step", repr(seconds), "--node-id", "sim-tenants"], folder, "sim-node")
    keys = keys_file(folder, "fairness-keys.toml", {"heavy": {}, "light": {}})
    results: list[PhaseResult] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        try:
            await wait_healthy(node, timeout=READY_TIMEOUT_S)
            # Its first job makes its speed known, which every gateway's first probe then reads.
            async with session.post(f"{node.url}/text-to-image", json=BODY) as response:
                await response.read()
            for phase in PHASES:
                flags = ["--orchestrator", node.url, "--keys-file", str(keys), *PATIENCE]
                if phase.node_queue is not None:
                    flags += ["--node-queue", str(phase.node_queue)]
                gateway = launch(["-m", "t2i_gateway", *flags], folder, f"gateway-{phase.key}")
                try:
                    await wait_ready(session, gateway, node.url, "heavy", speed=True)
                    results.append(await run_phase(session, phase, gateway, node, args))
                finally:
                    gateway.stop()
                await wait_idle(session, node)
        finally:
            node.stop()
    return results


def ms(seconds: float, digits: int = 0) -> str:
    return "-" if math.isnan(seconds) else f"{1000 * seconds:.{digits}f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def fairness_report(results: list[PhaseResult], args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    by = {r.phase.key: r for r in results}
    lines = [
        f"### fairness: one simulated node (bench.sim_node, capacity 9), a {WIDTH}x{HEIGHT} {DEFAULT_STEPS}-step job runs "
        f"{args.job_ms:g} ms; heavy: {args.heavy} requests in flight; light: one at a time, every {args.light_every:g} s "
        f"(x 0.5 to 1.5, seed {args.seed}) or at its answer; {args.seconds:g} s measured per phase after {WARM_S:g} s of load",
        "",
        "| phase | gateway | light sent | light p50 ms | light p90 ms | light max ms | light p50 / L0 "
        "| light p50 at gateway / in node queue / running ms | heavy images/s | device busy % | light's device % "
        "| heavy images/s per device-second left | not 200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    l0 = median(by["idle"].light_latencies())
    for r in results:
        latencies = r.light_latencies()
        light = r.phase.light
        parts = " / ".join(ms(x) for x in r.light_parts()) if light else "-"
        heavy = r.phase.heavy
        lines.append(
            f"| {r.phase.title} | {r.phase.gateway} | {len(r.light) if light else '-'} "
            f"| {ms(median(latencies)) if light else '-'} | {ms(percentile(latencies, 90)) if light else '-'} "
            f"| {ms(max(latencies, default=math.nan)) if light else '-'} | {f'{median(latencies) / l0:.2f}x' if light else '-'} "
            f"| {parts} | {f'{r.heavy_rate():.2f}' if heavy else '-'} | {100 * r.device_s() / r.seconds:.0f} "
            f"| {100 * r.device_s('light') / r.seconds:.0f} | {f'{r.heavy_rate_left():.2f}' if heavy else '-'} | {r.failed} |"
        )
    order, turn = by["order"], by["turn"]
    light_ratio = median(turn.light_latencies()) / l0
    today_ratio = median(order.light_latencies()) / l0
    raw_ratio = turn.heavy_rate() / order.heavy_rate()
    left_ratio = turn.heavy_rate_left() / order.heavy_rate_left()
    alone_ratio = by["alone0"].heavy_rate() / by["alone"].heavy_rate()
    goals = {"light": light_ratio <= LIGHT_GOAL, "throughput": left_ratio >= THROUGHPUT_GOAL}
    lines += [
        "",
        f"L0 (light p50, idle node): {ms(l0)} ms",
        f"light p50, arrival order / L0 (today): {today_ratio:.2f}x",
        f"light p50, in turn / L0: {light_ratio:.2f}x  (goal <= {LIGHT_GOAL:g}x: {verdict(goals['light'])})",
        f"heavy images/s per device-second left, in turn / arrival order: {left_ratio:.3f}x  "
        f"(goal >= {THROUGHPUT_GOAL:g}x: {verdict(goals['throughput'])})",
        f"heavy images/s raw, in turn / arrival order: {raw_ratio:.3f}x  (the light tenant, served sooner, sent "
        f"{len(turn.light)} requests in turn against {len(order.light)} in arrival order, and used "
        f"{100 * turn.device_s('light') / turn.seconds:.0f} % of the device against {100 * order.device_s('light') / order.seconds:.0f} %)",
        f"heavy alone, --node-queue 0 / default: {alone_ratio:.3f}x  (what keeping the queue at the gateway costs the device)",
        "device idle between two jobs, median / p90 ms (a round trip through the gateway with --node-queue 0): "
        + ", ".join(f"{r.phase.key} {ms(median(r.gaps()), 1)} / {ms(percentile(r.gaps(), 90), 1)}" for r in results if r.phase.heavy),
    ]
    figures = {
        "L0_ms": round(1000 * l0),
        "today_ratio": round(today_ratio, 2),
        "light_ratio": round(light_ratio, 2),
        "throughput_ratio": round(left_ratio, 3),
        "raw_throughput_ratio": round(raw_ratio, 3),
        "alone_ratio": round(alone_ratio, 3),
        "goals": goals,
        "failed": sum(r.failed for r in results),
    }
    return lines, figures


# -- the shared limit -------------------------------------------------------------------------------


@dataclass
class LimitResult:
    limit: int
    window: float
    burst: int  # 200s before the first 429
    accepted: list[int]  # per gateway: 200s of the requests sent in the window
    refused: int  # 429s of the requests sent in the window
    other: Counter[int]  # any other status, in the whole run

    @property
    def expected(self) -> float:
        return self.limit * self.window / 60

    @property
    def ratio(self) -> float:
        return sum(self.accepted) / self.expected


async def shared_limit(args: argparse.Namespace, folder: Path) -> LimitResult:
    redis = RedisServer(folder)
    redis.start()
    processes: list[Process] = []
    try:
        port = free_port()
        node = launch(["-m", "bench.fake_node", "--behaviour", "ok"], folder, "fake-node", port=port)
        processes.append(node)
        await wait_healthy(node, timeout=READY_TIMEOUT_S, path="/capabilities")
        keys = keys_file(folder, "limit-keys.toml", {"limited": {"requests_per_minute": args.limit}})
        flags = ["--orchestrator", node.url, "--keys-file", str(keys), "--limits-redis", redis.url]
        gateways = [launch(["-m", "t2i_gateway", *flags], folder, f"gateway-limit{g}") for g in range(2)]
        processes += gateways
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            for gateway in gateways:
                await wait_ready(session, gateway, node.url, "limited", speed=False)
            return await hammer(session, gateways, args)
    finally:
        for process in reversed(processes):
            process.stop()
        redis.stop()


async def hammer(session: aiohttp.ClientSession, gateways: list[Process], args: argparse.Namespace) -> LimitResult:
    """Back-to-back requests to both gateways: the burst until the first 429, then ``--window`` seconds."""
    first_429 = asyncio.Event()
    window: list[float] = []  # [start, end], set at the first 429
    burst = refused = 0
    accepted = [0] * len(gateways)
    other: Counter[int] = Counter()

    async def worker(g: int) -> None:
        nonlocal burst, refused
        url = f"{gateways[g].url}/text-to-image"
        while not window or time.monotonic() < window[1]:
            sent = time.monotonic()
            try:
                async with session.post(url, json=BODY, headers=auth("limited")) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            if status == 429 and not first_429.is_set():
                first_429.set()
                now = time.monotonic()
                window.extend((now, now + args.window))
            in_window = bool(window) and sent >= window[0]
            if status == 200:
                if in_window:
                    accepted[g] += 1
                else:
                    burst += 1
            elif status == 429:
                refused += in_window
            else:
                other[status] += 1

    async with asyncio.timeout(args.window + 120):  # the burst is spent in seconds
        await asyncio.gather(*(worker(g) for g in range(len(gateways)) for _ in range(args.workers)))
    return LimitResult(args.limit, args.window, burst, accepted, refused, other)


def limit_report(result: LimitResult, args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    ok = abs(result.ratio - 1) <= LIMIT_GOAL
    lines = [
        f"### shared limit: two gateways, --limits-redis on one redis-server, one key of requests_per_minute = {result.limit}; "
        f"{args.workers} workers per gateway back to back; counted from the first 429 for {result.window:g} s",
        "",
        "| burst accepted (before the first 429) | accepted in window (gateway 1 + 2) | expected (limit x window / 60) "
        "| accepted / expected | 429 in window | other statuses |",
        "|---|---|---|---|---|---|",
        f"| {result.burst} | {sum(result.accepted)} ({' + '.join(map(str, result.accepted))}) | {result.expected:g} "
        f"| {result.ratio:.3f}x | {result.refused} | {dict(result.other) or 'none'} |",
        "",
        f"accepted / expected: {result.ratio:.3f}x  (goal within {LIMIT_GOAL:.0%}: {verdict(ok)}; "
        f"each gateway limiting alone would allow up to {2 * result.expected:g}, 2x)",
    ]
    figures = {
        "burst": result.burst,
        "accepted": sum(result.accepted),
        "expected": result.expected,
        "limit_ratio": round(result.ratio, 3),
        "goals": {"limit": ok},
        "failed": sum(result.other.values()),
    }
    return lines, figures


# -- the run ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, folder: Path) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = [f"bench.tenants: real gateways (python -m t2i_gateway) and nodes on loopback, {', '.join(args.parts)}; times in ms"]
    figures: dict[str, Any] = {"goals": {}, "failed": 0}
    reports: list[tuple[list[str], dict[str, Any]]] = []
    if "fairness" in args.parts:
        reports.append(fairness_report(await fairness(args, folder), args))
    if "limit" in args.parts:
        reports.append(limit_report(await shared_limit(args, folder), args))
    for part, found in reports:
        lines += ["", *part]
        figures |= {k: v for k, v in found.items() if k not in ("goals", "failed")}
        figures["goals"] |= found["goals"]
        figures["failed"] += found["failed"]
    goals = figures["goals"]
    met = sum(goals.values())
    failed = figures["failed"]
    lines += [
        "",
        f"verdict: {met} of {len(goals)} goals met"
        + (f" (missed: {', '.join(k for k, ok in goals.items() if not ok)})" if met < len(goals) else "")
        + f"; {'every request answered as expected' if not failed else f'{failed} request(s) answered otherwise'}",
        "summary: "
        + " ".join(f"{k}={v}" for k, v in figures.items() if k not in ("goals", "failed"))
        + f" failed={failed} goals={','.join(f'{k}:{verdict(ok)}' for k, ok in goals.items())}",
    ]
    return lines, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="fairness,limit", help="of fairness, limit, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds measured per fairness phase")
    parser.add_argument("--heavy", type=int, default=32, help="the heavy tenant's requests in flight")
    parser.add_argument("--light-every", type=float, default=0.5, help="the light tenant's mean seconds between sends")
    parser.add_argument("--job-ms", type=float, default=100.0, help=f"milliseconds a {WIDTH}x{HEIGHT} {DEFAULT_STEPS}-step job runs")
    parser.add_argument("--seed", type=int, default=1, help="of the light tenant's pace")
    parser.add_argument("--limit", type=int, default=600, help="the shared key's requests_per_minute")
    parser.add_argument("--window", type=float, default=60.0, help="seconds the shared limit is measured over")
    parser.add_argument("--workers", type=int, default=4, help="clients per gateway in the shared-limit part")
    args = parser.parse_args()
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if not args.parts or set(args.parts) - {"fairness", "limit"}:
        parser.error("--parts: of fairness, limit")
    if min(args.seconds, args.light_every, args.job_ms, args.window) <= 0 or min(args.heavy, args.limit, args.workers) < 1:
        parser.error("--seconds, --heavy, --light-every, --job-ms, --limit, --window and --workers must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups of the children
    with tempfile.TemporaryDirectory(prefix="t2i-tenants-") as folder:
        lines, figures = asyncio.run(run(args, Path(folder)))
    print("\n".join(lines), flush=True)
    if figures["failed"]:
        sys.exit(f"bench.tenants: {figures['failed']} request(s) answered otherwise than expected")


if __name__ == "__main__":
    main()
