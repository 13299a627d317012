"""A large fleet behind one gateway: discovery, selection, idle cost and throughput at N nodes.

Starts a real ``redis-server`` on loopback, N zero-cost fake orchestrators (named as fakes: one
process serves one aiohttp app on N loopback ports; each answers ``/capabilities`` as a ready node
offering ``t2i/tiny-sd`` warm and ``m/other`` on demand, and ``/text-to-image`` at once with a tiny
image url), registers them all in Redis in one pipeline of heartbeats that carry each one's report
(its ``/capabilities``, as real nodes' heartbeats do; ``--without-reports``: urls only, so that the
gateway probes them), and runs one real gateway (``python -m t2i_gateway --registry redis://...``,
default probe settings). It measures, in one run:

1. seconds from registration (all N heartbeats written) until the gateway's ``/orchestrators`` lists
   all N as healthy;
2. the selection cost per request (``NodePool.select`` + ``models_on_offer`` + ``default_model``) on
   synthetic nodes at 10, 100 and 1,000 nodes, in this process;
3. the gateway's CPU (``/proc/<pid>/stat``) while idle with N nodes, and its memory;
4. requests/s through the gateway with N nodes against a second gateway that sees one of them.
   The fake nodes advertise a capacity of ``--fake-capacity`` (1,000 by default, far above the
   load's concurrency), so that the one-node case is never refused as busy: both cases measure the
   gateway, not the node. The two gateways are loaded in alternating rounds (``--rounds``), so that a
   slow spell of a shared machine does not fall on one side only.

It prints a table, the goals with "met" or "MISSED", and one summary line; a missed goal is reported,
not an error, so that the figures are always printed. A fleet that never becomes routable, and any
request not answered 200, fail the run (exit 1): the figures would not measure what they claim.

    .venv/bin/python -m bench.fleet --nodes 1000
    .venv/bin/python -m bench.fleet --nodes 1000 --without-reports
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from t2i_gateway.nodes import MAX_IDLE_PROBES_PER_S

from .common import Process, RedisServer, launch, raise_fd_limit
from .fake_node import PNG

MODEL = "t2i/tiny-sd"
OTHER = "m/other"
BODY = {"prompt": "a fleet of fakes", "model_id": MODEL, "width": 64, "height": 64}
TTL_S = 3600.0  # one heartbeat holds a node for the whole run
SELECTION_SIZES = (10, 100, 1000)
GOAL_SELECT_US = 50.0
GOAL_IDLE_CPU = 10.0  # % of one core
GOAL_RATIO = 0.9


# -- the fake fleet (a child process) -------------------------------------------------------------


def fake_speed(host: str) -> float:
    """Seconds per megapixel-step of a fake node: 0.05 to 0.2, the same for a host every time."""
    return 0.05 * (1 + sum(host.encode()) % 4)


def fake_report(host: str, capacity: int) -> dict[str, Any]:
    """A fake node's ``/capabilities``, which is also the report its heartbeat carries."""
    return {
        "node_id": f"fake-{host}",
        "version": "0",
        "device": "none",
        "status": "ready",
        "capacity": capacity,
        "in_flight": 0,
        "queued": 0,
        "held_s": 0.0,
        "models": [
            # Speeds of a mixed fleet (1x to 4x), as nodes measure and report them: selection weighs them.
            {
                "model_id": MODEL,
                "pipeline": "text-to-image",
                "warm": True,
                "loaded": True,
                "s_per_mpx_step": fake_speed(host),
                "default_steps": 1,
            },
            {"model_id": OTHER, "pipeline": "text-to-image", "warm": False, "loaded": False},
        ],
    }


def fake_fleet_app(capacity: int) -> web.Application:
    """One app for every fake node; ``/fake-stats`` counts what all of them were asked."""
    counts = {"capabilities": 0, "text_to_image": 0}

    async def capabilities(request: web.Request) -> web.Response:
        counts["capabilities"] += 1
        return web.json_response(fake_report(request.host, capacity))

    async def text_to_image(request: web.Request) -> web.Response:
        counts["text_to_image"] += 1
        body = json.loads(await request.read())
        base, seed = f"http://{request.host}", body.get("seed") or 0
        images = [
            {"url": f"{base}/stream/{os.urandom(16).hex()}/{os.urandom(8).hex()}.png", "seed": seed + i, "nsfw": False}
            for i in range(body.get("num_images_per_prompt", 1))
        ]
        return web.json_response({"images": images})

    async def stream(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application()
    app.router.add_get("/capabilities", capabilities)
    app.router.add_post("/text-to-image", text_to_image)
    app.router.add_get("/stream/{id}/{name}.png", stream)
    app.router.add_get("/fake-stats", stats)
    return app


async def serve_fakes(count: int, capacity: int) -> None:
    """Serve ``count`` fake nodes on loopback ports; print the ports as one JSON line; run until killed."""
    runner = web.AppRunner(fake_fleet_app(capacity), access_log=None)
    await runner.setup()
    ports = []
    for _ in range(count):  # one site per port, bound here so that the kernel picks a free port
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock, backlog=1024).start()
        ports.append(sock.getsockname()[1])
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()  # SIGTERM's default action ends the process


# -- services -------------------------------------------------------------------------------------


class Fakes:
    def __init__(self, count: int, capacity: int, folder: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet", "--serve-fakes", str(count), "--fake-capacity", str(capacity)],
            stdout=subprocess.PIPE,
            stderr=(folder / "fakes.log").open("ab"),
        )
        self.log = folder / "fakes.log"
        self.ports: list[int] = []

    async def started(self, timeout: float = 120) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"the fake fleet did not start: {self.log.read_text()[-2000:]}")
        self.ports = json.loads(line)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    async def stats(self) -> dict[str, int]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.urls()[0]}/fake-stats") as response:
            return await response.json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


async def register(redis_url: str, urls: list[str], prefix: str, capacity: int | None) -> float:
    """Heartbeat every url with its report (capacity None: without, as ``t2i-register`` does) into the
    registry in one pipeline, as nodes do; the seconds it took."""
    from discovery import RegistrySettings
    from discovery.redis_registry import RedisRegistry

    registry = RedisRegistry(RegistrySettings(redis_url, prefix=prefix))
    try:
        started = time.monotonic()
        pipe = registry.client.pipeline(transaction=False)
        for url in urls:
            report = "" if capacity is None else json.dumps(fake_report(url.removeprefix("http://"), capacity))
            await registry.heartbeat(url, TTL_S, report, changed=True, pipeline=pipe)
        results = await pipe.execute()
        assert sum(map(int, results)) == len(urls), "some heartbeats did not add a node"
        return time.monotonic() - started
    finally:
        await registry.close()


def start_gateway(redis_url: str, prefix: str, folder: Path, name: str) -> Process:
    return launch(["-m", "t2i_gateway", "--registry", redis_url, "--registry-prefix", prefix], folder, name)


async def wait_listening(gateway: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and gateway.process.poll() is None:
            try:
                async with session.get(f"{gateway.url}/health") as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway did not start: {gateway.log.read_text()[-2000:]}")


async def wait_routable(gateway: Process, urls: list[str], timeout: float = 180) -> bool:
    """Until ``/orchestrators`` lists exactly ``urls``, all healthy (``/health`` is polled until then: cheaper)."""
    wanted = set(urls)
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(f"{gateway.url}/health") as response:
                ready = (await response.json()).get("orchestrators_ready", 0)
            if ready >= len(wanted):
                async with session.get(f"{gateway.url}/orchestrators") as response:
                    listed = (await response.json())["orchestrators"]
                if {o["url"] for o in listed if o["healthy"]} == wanted and len(listed) == len(wanted):
                    return True
            await asyncio.sleep(0.05)
    return False


# -- what is measured -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", math.nan), values.get("VmHWM", math.nan)


async def idle_cpu(gateway: Process, fakes: Fakes, seconds: float) -> tuple[float, float]:
    """The gateway's CPU over ``seconds`` with no requests (% of one core), and the probes/s the fakes saw."""
    pid = gateway.process.pid
    probes_before, cpu_before, started = (await fakes.stats())["capabilities"], cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu, elapsed, probes = cpu_seconds(pid) - cpu_before, time.monotonic() - started, (await fakes.stats())["capabilities"]
    return 100 * cpu / elapsed, (probes - probes_before) / elapsed


def selection_us(size: int, batches: int = 60, per_batch: int = 200) -> float:
    """Median µs of one request's selection work (select + models_on_offer + default_model), synthetic nodes."""
    from prometheus_client import CollectorRegistry

    from discovery import Endpoint, StaticDiscovery
    from metrics import GatewayMetrics
    from t2i_gateway.nodes import Demand, Node, NodePool

    pool = NodePool(StaticDiscovery(()), GatewayMetrics(CollectorRegistry()))
    for i in range(size):
        node = Node(Endpoint(f"http://10.0.{i // 250}.{i % 250}:8936"), ready=True, capacity=8, tiers={MODEL: 0, OTHER: 1})
        node.in_flight = random.randrange(8)  # some load, as under traffic
        node.speeds = {MODEL: fake_speed(node.url)}  # as reported: weighed by expected completion
        node.held_s = node.in_flight * 0.05
        pool.nodes[node.url] = node
    demand = Demand(megapixels=0.26, steps=1)  # 512x512, 1 step
    assert pool.select(MODEL, exclude=set(), demand=demand) is not None  # builds the index once, as the first request does
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(per_batch):
            pool.select(MODEL, exclude=set(), demand=demand)
            pool.models_on_offer()
            pool.default_model()
        times.append((time.perf_counter() - started) / per_batch * 1e6)
    return statistics.median(times)


@dataclass
class Load:
    ok: int
    other: int
    seconds: float
    gateway_cpu_s: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.gateway_cpu_s / self.ok if self.ok else math.nan


async def load(gateway: Process, seconds: float, concurrency: int) -> Load:
    """``concurrency`` clients posting back to back for ``seconds`` (after a short warm-up)."""
    counts = {"ok": 0, "other": 0}
    measuring = False
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client(until: float) -> None:
            while time.monotonic() < until:
                try:
                    async with session.post(f"{gateway.url}/text-to-image", json=BODY) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if measuring:
                    counts["ok" if ok else "other"] += 1

        warmup = max(0.5, 0.2 * seconds)
        await asyncio.gather(*(client(time.monotonic() + warmup) for _ in range(concurrency)))
        measuring = True
        cpu_before, started = cpu_seconds(gateway.process.pid), time.monotonic()
        await asyncio.gather(*(client(started + seconds) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(gateway.process.pid) - cpu_before
    return Load(counts["ok"], counts["other"], elapsed, cpu)


# -- the run --------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {"nodes": args.nodes}
    for size in SELECTION_SIZES:  # first, while nothing else runs on the machine
        figures[f"select_us_{size}"] = selection_us(size)
    redis = RedisServer(folder)
    redis.start()
    fakes = Fakes(args.nodes, args.fake_capacity, folder)
    gateways: list[Process] = []
    try:
        await fakes.started()
        urls = fakes.urls()

        # N nodes
        many = start_gateway(redis.url, "fleet", folder, "gateway-fleet")
        gateways.append(many)
        await wait_listening(many)
        reported = None if args.without_reports else args.fake_capacity
        figures["register_write_s"] = await register(redis.url, urls, "fleet", reported)
        written = time.monotonic()
        if not await wait_routable(many, urls):  # every figure after this would measure a broken fleet
            raise RuntimeError(f"the gateway never saw all {len(urls)} nodes routable: {many.log.read_text()[-2000:]}")
        figures["routable_s"] = time.monotonic() - written
        # Without reports, idle probes reach their steady rate after the shortest re-probe interval (the
        # burst of first probes is over by then).
        await asyncio.sleep(max(1.0, 0.5 * args.nodes / MAX_IDLE_PROBES_PER_S) if args.without_reports else 1.0)
        figures["idle_cpu_pct"], figures["idle_probes_per_s"] = await idle_cpu(many, fakes, args.idle_seconds)
        figures["idle_rss_mib"], figures["idle_hwm_mib"] = memory_mib(many.process.pid)

        # 1 node: another gateway, another registry prefix, one of the same fake nodes
        one = start_gateway(redis.url, "single", folder, "gateway-single")
        gateways.append(one)
        await wait_listening(one)
        await register(redis.url, urls[:1], "single", reported)
        if not await wait_routable(one, urls[:1]):
            raise RuntimeError(f"the one-node gateway never saw its node: {one.log.read_text()[-2000:]}")
        await asyncio.sleep(1)
        figures["idle_cpu_pct_1"], _ = await idle_cpu(one, fakes, args.idle_seconds)
        figures["idle_rss_mib_1"], _ = memory_mib(one.process.pid)

        # Throughput, in alternating rounds, so that a slow spell of this shared machine hits both sides.
        rounds: dict[str, list[Load]] = {"n": [], "1": []}
        for _ in range(args.rounds):
            rounds["n"].append(await load(many, args.seconds, args.concurrency))
            rounds["1"].append(await load(one, args.seconds, args.concurrency))
        figures["rss_after_load_mib"], figures["hwm_after_load_mib"] = memory_mib(many.process.pid)
        total = {
            side: Load(*(sum(getattr(r, f) for r in loads) for f in ("ok", "other", "seconds", "gateway_cpu_s")))
            for side, loads in rounds.items()
        }
        figures |= {
            "rps_n": total["n"].rps,
            "rps_1": total["1"].rps,
            "rps_ratio": total["n"].rps / total["1"].rps if total["1"].rps else math.nan,
            "rps_ratios": [n.rps / o.rps if o.rps else math.nan for n, o in zip(rounds["n"], rounds["1"])],
            "errors_n": total["n"].other,
            "errors_1": total["1"].other,
            "cpu_ms_per_req_n": total["n"].cpu_ms_per_request,
            "cpu_ms_per_req_1": total["1"].cpu_ms_per_request,
        }
        return figures
    finally:
        for gateway in gateways:
            gateway.stop()
        fakes.stop()
        redis.stop()


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(f: dict[str, Any], args: argparse.Namespace) -> str:
    n = f["nodes"]
    rows = [
        ("heartbeats written (1 pipeline)", f"{f['register_write_s']:.3f} s", ""),
        (f"registered -> {n} routable", f"{f['routable_s']:.2f} s", ""),
        *(
            (
                f"selection/request @ {size} nodes",
                f"{f[f'select_us_{size}']:.1f} µs",
                f"<= {GOAL_SELECT_US:.0f} µs @ 1000: {verdict(f[f'select_us_{size}'] <= GOAL_SELECT_US)}" if size == 1000 else "",
            )
            for size in SELECTION_SIZES
        ),
        (
            f"gateway idle CPU, {n} nodes",
            f"{f['idle_cpu_pct']:.1f} % of a core",
            f"<= {GOAL_IDLE_CPU:.0f} %: {verdict(f['idle_cpu_pct'] <= GOAL_IDLE_CPU)}",
        ),
        ("probes/s seen by the fakes, idle", f"{f['idle_probes_per_s']:.0f}", ""),
        (f"gateway RSS / HWM idle, {n} nodes", f"{f['idle_rss_mib']:.1f} / {f['idle_hwm_mib']:.1f} MiB", ""),
        ("gateway RSS / HWM after load", f"{f['rss_after_load_mib']:.1f} / {f['hwm_after_load_mib']:.1f} MiB", ""),
        ("gateway idle CPU, 1 node", f"{f['idle_cpu_pct_1']:.1f} % of a core", ""),
        ("gateway RSS idle, 1 node", f"{f['idle_rss_mib_1']:.1f} MiB", ""),
        (f"requests/s, {n} nodes", f"{f['rps_n']:.0f} ({f['errors_n']} not 200)", ""),
        ("requests/s, 1 node", f"{f['rps_1']:.0f} ({f['errors_1']} not 200)", ""),
        (
            f"requests/s ratio {n} : 1",
            f"{f['rps_ratio']:.2f}x",
            f">= {GOAL_RATIO}x, no errors: {verdict(f['rps_ratio'] >= GOAL_RATIO and not (f['errors_n'] or f['errors_1']))}",
        ),
        ("ratio in each round", " ".join(f"{r:.2f}" for r in f["rps_ratios"]), ""),
        (f"gateway CPU/request, {n} nodes", f"{f['cpu_ms_per_req_n']:.2f} ms", ""),
        ("gateway CPU/request, 1 node", f"{f['cpu_ms_per_req_1']:.2f} ms", ""),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [
        f"bench.fleet: {n} fake nodes (capacity {args.fake_capacity} each, so that one node is never busy), "
        f"{'registered without reports (probed)' if args.without_reports else 'reporting through Redis'}, one gateway, "
        f"load {args.concurrency} clients x {args.seconds:g} s x {args.rounds} rounds each, idle {args.idle_seconds:g} s",
        *(f"{name:<{width}}  {value:<{vwidth}}  {goal}".rstrip() for name, value, goal in rows),
    ]
    met = {
        "select": f["select_us_1000"] <= GOAL_SELECT_US,
        "idle_cpu": f["idle_cpu_pct"] <= GOAL_IDLE_CPU,
        "rps_ratio": f["rps_ratio"] >= GOAL_RATIO and not (f["errors_n"] or f["errors_1"]),  # errors are no throughput
    }
    lines.append(
        f"summary: nodes={n} routable_s={f['routable_s']:.2f} select_us_10={f['select_us_10']:.1f} "
        f"select_us_100={f['select_us_100']:.1f} select_us_1000={f['select_us_1000']:.1f} "
        f"select_ratio_1000_10={f['select_us_1000'] / f['select_us_10']:.2f} idle_cpu_pct={f['idle_cpu_pct']:.1f} "
        f"idle_cpu_pct_1={f['idle_cpu_pct_1']:.1f} rss_mib={f['idle_rss_mib']:.1f} hwm_mib={f['hwm_after_load_mib']:.1f} "
        f"rps_n={f['rps_n']:.0f} rps_1={f['rps_1']:.0f} rps_ratio={f['rps_ratio']:.2f} "
        f"goals={','.join(f'{k}:{verdict(v)}' for k, v in met.items())}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of each load phase")
    parser.add_argument("--rounds", type=int, default=3, help="load phases on each gateway, alternating")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="seconds over which idle CPU is measured")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fake-capacity", type=int, default=1000, help="capacity each fake node advertises")
    parser.add_argument(
        "--without-reports", action="store_true", help="register the fakes without reports, so that the gateway probes them"
    )
    parser.add_argument("--serve-fakes", type=int, metavar="N", help=argparse.SUPPRESS)  # the fake fleet's own process
    args = parser.parse_args()
    # Listening sockets, probes' and requests' connections: the children inherit the limit.
    raise_fd_limit(4 * max(args.nodes, args.serve_fakes or 0) + 4096)
    if args.serve_fakes:
        asyncio.run(serve_fakes(args.serve_fakes, args.fake_capacity))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups of the children
    with tempfile.TemporaryDirectory(prefix="t2i-fleet-") as folder:
        figures = asyncio.run(run(args, Path(folder)))
    print(report(figures, args), flush=True)
    if figures["errors_n"] or figures["errors_1"]:
        sys.exit(f"bench.fleet: {figures['errors_n'] + figures['errors_1']} request(s) not answered 200")


if __name__ == "__main__":
    main()
