"""What the gateway adds to a request: latency and throughput against a zero-cost node and other proxies.

    python -m bench.gateway_overhead [--seconds 5] [--clients 1,32] [--pairs 7]

In one run, each its own process on loopback, in front of one zero-cost fake node (``bench.fake_node
--behaviour ok``, named as a fake: it answers at once with a tiny image url; it advertises capacity 64,
above the load's concurrency, so the node is never busy):

- ``direct``: the fake node itself;
- ``minimal aiohttp proxy``: ``bench.reference_proxy`` (parse, forward over one keep-alive session,
  rewrite the image urls, answer), the floor for any Python proxy;
- ``nginx proxy_pass``: when ``nginx`` is installed (one worker, upstream keep-alive, the client's
  ``Host`` passed on so that the node's image urls name nginx), else the row is skipped with a note;
- ``gateway``: the real ``python -m t2i_gateway --orchestrator <fake node>``, default settings;
- ``gateway, keys on``: the same with ``--keys-file`` (one key with a requests, images, megapixel-steps
  and concurrency limit, all too high to be reached) and ``--limits-redis`` (a ``redis-server`` of its
  own on loopback): each request's limits are checked in Redis (one round trip) and its usage is
  written there. Without ``redis-server`` installed, the row is skipped with a note.

For each number of concurrent clients, each path gets the same load: ``POST /text-to-image`` with
``{"prompt": "a cool cat on the beach", "width": 64, "height": 64}`` back to back over keep-alive
connections for ``--seconds`` (after an untimed warm-up). The load generator is ``wrk`` (a Lua script
for the POST) when it is installed, else one written with aiohttp in this process (``--load``). Prints a
table (p50, p99, requests/s, and the CPU the front process spent per request) and one summary line:
the gateway's p50 minus the direct p50 at 1 client (goal: at most +0.5 ms), the gateway's requests/s
over the minimal proxy's at 32 clients (goal: at least 0.8x), and the p50 with keys on minus without at
1 client (goal: at most +0.3 ms). A missed goal is reported, not an error. Every request carries the
key (``Authorization: Bearer``), which the other paths ignore.

The keys on/off difference is a fraction of a millisecond, while back-to-back cells on a shared machine
drift by as much: so after the table, the two gateways are measured again in ``--pairs`` pairs of slices
of 1 s (or ``--seconds``, if shorter, with the aiohttp load) at the lowest number of clients, each pair's
two slices seconds apart and in turns keys off or keys on first, and the goal is judged on the median of
the pairs' differences (``--pairs 0``: on the table's cells). The table's difference is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from t2i_gateway.tenants import secret_hash

from .common import Process, RedisServer, free_port, launch, wait_healthy

BODY = {"prompt": "a cool cat on the beach", "width": 64, "height": 64}
PAYLOAD = json.dumps(BODY).encode()
KEY = "t2i-bench-overhead-key"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
# Every limit set, none reached: the cost of checking them is what is measured.
KEYS_FILE = f"""[[keys]]
name = "bench"
sha256 = "{secret_hash(KEY)}"
requests_per_minute = 100000000
images_per_minute = 100000000
megapixel_steps_per_minute = 100000000
concurrent = 100000
"""
GOAL_OVERHEAD_MS = 0.5
GOAL_RATIO = 0.8
GOAL_KEYS_MS = 0.3
PATHS = (
    ("direct", "direct (fake node)"),
    ("proxy", "minimal aiohttp proxy"),
    ("nginx", "nginx proxy_pass"),
    ("gateway", "gateway"),
    ("keys", "gateway, keys on"),
)
LABELS = dict(PATHS)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Cell:
    latencies: list[float]  # seconds, of the 200 answers
    errors: int  # answers other than 200, and connection errors
    seconds: float
    cpu_s: float  # of the front process (and its children) during the timed part
    p50_s: float | None = None  # from wrk, which reports percentiles rather than every latency
    p99_s: float | None = None
    counted: int | None = None  # from wrk: the 200 answers

    def percentile(self, q: float) -> float:
        given = {50: self.p50_s, 99: self.p99_s}.get(int(q))
        if given is not None:
            return given
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else math.nan

    @property
    def ok(self) -> int:
        return len(self.latencies) if self.counted is None else self.counted

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else math.nan

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / self.ok if self.ok else math.nan


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its direct children (nginx's worker), from /proc."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    total = 0.0
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


# -- load generators -------------------------------------------------------------------------------


async def aiohttp_load(url: str, pid: int, clients: int, seconds: float, warmup: float) -> Cell:
    """``clients`` workers posting back to back over keep-alive connections; every latency recorded."""
    target = f"{url}/text-to-image"
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker(until: float, record: bool) -> None:
            nonlocal errors
            while (started := time.perf_counter()) < until:
                try:
                    async with session.post(target, data=PAYLOAD, headers=HEADERS) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if record:
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(time.perf_counter() + warmup, False) for _ in range(clients)))
        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker(started + seconds, True) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before
    return Cell(latencies, errors, elapsed, cpu)


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("T2I-RESULT %%f %%f %%f %%f %%f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout + e.status, latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_load(wrk: str, script: Path, url: str, pid: int, clients: int, seconds: float, warmup: float) -> Cell:
    """``wrk`` with one thread (its durations are whole seconds, at least 1)."""

    def run(duration: float) -> str:
        command = [
            wrk,
            "-t",
            "1",
            "-c",
            str(clients),
            "-d",
            f"{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"{url}/text-to-image",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
        if result.returncode != 0:
            raise RuntimeError(f"wrk failed: {result.stdout}{result.stderr}")
        return result.stdout

    if warmup:
        run(warmup)
    cpu_before = cpu_seconds(pid)
    output = run(seconds)
    cpu = cpu_seconds(pid) - cpu_before
    match = re.search(r"^T2I-RESULT (\S+) (\S+) (\S+) (\S+) (\S+)$", output, re.MULTILINE)
    if not match:
        raise RuntimeError(f"no result from wrk in: {output}")
    requests, duration_us, errors, p50_us, p99_us = (float(x) for x in match.groups())
    return Cell([], int(errors), duration_us / 1e6, cpu, p50_s=p50_us / 1e6, p99_s=p99_us / 1e6, counted=int(requests - errors))


# -- the paths -------------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def start_nginx(nginx: str, node_url: str, workdir: Path) -> Process:
    """``nginx`` in the foreground as the current user, one worker, its config, pid and logs in ``workdir``."""
    prefix = workdir / "nginx"
    prefix.mkdir()
    port, node = free_port(), node_url.removeprefix("http://")
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.geteuid() == 0 else ""  # else the worker would drop to nobody
    temp = " ".join(f"{kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    config = prefix / "nginx.conf"
    config.write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    {temp}
    upstream node {{ server {node}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;  # the node then writes its image urls on nginx's host
        }}
    }}
}}
""")
    command = [nginx, "-p", str(prefix), "-c", str(config)]
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    if found and tuple(int(x) for x in found.groups()) >= (1, 19, 5):
        command += ["-e", str(prefix / "error.log")]  # not the default log, which only root may open
    log = workdir / "nginx.log"
    process = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return Process(process, f"http://127.0.0.1:{port}", log)


Pair = tuple[Cell, Cell]  # keys off, keys on


async def measure(
    args: argparse.Namespace, clients: list[int], workdir: Path
) -> tuple[dict[tuple[str, int], Cell], list[Pair], str | None]:
    processes: dict[str, Process] = {}
    notes = []
    redis = RedisServer(workdir) if shutil.which("redis-server") else None
    try:
        processes["direct"] = launch(["-m", "bench.fake_node", "--behaviour", "ok"], workdir, "fake-node")
        await wait_healthy(processes["direct"], path="/capabilities")
        node = processes["direct"].url
        processes["proxy"] = launch(["-m", "bench.reference_proxy", "--node", node], workdir, "reference-proxy")
        processes["gateway"] = launch(["-m", "t2i_gateway", "--orchestrator", node], workdir, "gateway")
        if redis:
            redis.start()
            (workdir / "keys.toml").write_text(KEYS_FILE)
            keyed = ["--keys-file", str(workdir / "keys.toml"), "--limits-redis", redis.url]
            processes["keys"] = launch(["-m", "t2i_gateway", "--orchestrator", node, *keyed], workdir, "gateway-keys")
        else:
            notes.append("gateway, keys on: skipped (redis-server is not installed)")
        nginx = nginx_binary()
        if nginx:
            processes["nginx"] = start_nginx(nginx, node, workdir)
        else:
            notes.append("nginx proxy_pass: skipped (nginx is not installed)")
        await wait_healthy(processes["proxy"])
        await wait_healthy(processes["gateway"], timeout=60)
        if "keys" in processes:
            await wait_healthy(processes["keys"], timeout=60)
        if "nginx" in processes:
            try:
                await wait_healthy(processes["nginx"], path="/capabilities", timeout=20)
            except RuntimeError:
                tail = processes.pop("nginx")
                tail.stop()
                notes.append(f"nginx proxy_pass: skipped (nginx did not start: {tail.log.read_text()[-300:].strip()!r})")

        wrk = shutil.which("wrk") if args.load in ("auto", "wrk") else None
        if args.load == "wrk" and not wrk:
            raise SystemExit("bench.gateway_overhead: --load wrk, but wrk is not installed")
        script = workdir / "post.lua"
        script.write_text(WRK_SCRIPT % (PAYLOAD.decode(), KEY))
        warmup = max(0.2, min(1.0, 0.2 * args.seconds))

        async def load(key: str, count: int, seconds: float, warmup: float) -> Cell:
            process = processes[key]
            if wrk:
                return await asyncio.to_thread(wrk_load, wrk, script, process.url, process.process.pid, count, seconds, warmup)
            return await aiohttp_load(process.url, process.process.pid, count, seconds, warmup)

        cells: dict[tuple[str, int], Cell] = {}
        for count in clients:  # the paths one after another at each concurrency, so that their cells are close in time
            for key, _ in PATHS:
                if key in processes:
                    cells[(key, count)] = await load(key, count, args.seconds, warmup)
        pairs: list[Pair] = []
        args.slice_s = 1.0 if wrk else min(1.0, args.seconds)  # wrk's durations are whole seconds
        if "keys" in processes:
            for number in range(args.pairs):  # warm already
                first, second = ("gateway", "keys")[:: 1 if number % 2 == 0 else -1]
                cell = {first: await load(first, clients[0], args.slice_s, 0), second: await load(second, clients[0], args.slice_s, 0)}
                pairs.append((cell["gateway"], cell["keys"]))
        args.generator = "wrk (1 thread)" if wrk else "aiohttp (in the bench process)"
        return cells, pairs, "\n".join(notes) or None
    finally:
        for process in reversed(list(processes.values())):
            process.stop()
        if redis:
            redis.stop()


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(cells: dict[tuple[str, int], Cell], pairs: list[Pair], note: str | None, clients: list[int], args: argparse.Namespace) -> str:
    lines = [
        f"bench.gateway_overhead: POST /text-to-image 64x64 to a zero-cost fake node; load generator {args.generator}; "
        f"{args.seconds:g} s per cell; {os.cpu_count()} CPU cores shared by the load, the fake node and the proxy",
        "| path | clients | p50 ms | p99 ms | req/s | not 200 | front process CPU µs/req |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for count in clients:
        for key, label in PATHS:
            cell = cells.get((key, count))
            if cell:
                lines.append(
                    f"| {label} | {count} | {1000 * cell.percentile(50):.3f} | {1000 * cell.percentile(99):.3f} | {cell.rps:.0f} "
                    f"| {cell.errors} | {cell.cpu_us_per_request:.0f} |"
                )
    if note:
        lines.append(note)
    low, high = min(clients), max(clients)
    overhead = 1000 * (cells[("gateway", low)].percentile(50) - cells[("direct", low)].percentile(50))
    proxy_overhead = 1000 * (cells[("proxy", low)].percentile(50) - cells[("direct", low)].percentile(50))
    ratio = cells[("gateway", high)].rps / cells[("proxy", high)].rps
    extra = ""
    if ("nginx", high) in cells:
        extra = f"; gateway/nginx req/s @ {high} clients {cells[('gateway', high)].rps / cells[('nginx', high)].rps:.2f}x"
    lines.append(
        f"summary: gateway p50 - direct p50 @ {low} client{'s' if low != 1 else ''}: {overhead:+.3f} ms "
        f"(goal <= +{GOAL_OVERHEAD_MS} ms: {verdict(overhead <= GOAL_OVERHEAD_MS)}); "
        f"gateway/minimal proxy req/s @ {high} clients: {ratio:.2f}x (goal >= {GOAL_RATIO}x: {verdict(ratio >= GOAL_RATIO)}); "
        f"minimal proxy p50 - direct p50 @ {low}: {proxy_overhead:+.3f} ms{extra}"
    )
    if ("keys", low) in cells:
        cells_keys = 1000 * (cells[("keys", low)].percentile(50) - cells[("gateway", low)].percentile(50))
        differences = [1000 * (on.percentile(50) - off.percentile(50)) for off, on in pairs]
        keys = statistics.median(differences) if differences else cells_keys
        lines[-1] += f"; keys on p50 - keys off p50 @ {low}: {keys:+.3f} ms (goal <= +{GOAL_KEYS_MS} ms: {verdict(keys <= GOAL_KEYS_MS)})"
        if differences:
            lines.append(
                f"keys on p50 - keys off p50 @ {low}, {len(pairs)} alternating pairs of {args.slice_s:g} s: "
                f"{', '.join(f'{d:+.3f}' for d in differences)} ms, median {keys:+.3f} ms; in the table's cells: {cells_keys:+.3f} ms"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per cell (path x clients)")
    parser.add_argument("--clients", default="1,32", help="concurrent clients, comma-separated")
    parser.add_argument("--pairs", type=int, default=7, help="alternating keys off/on slices for the keys comparison")
    parser.add_argument(
        "--load", choices=("auto", "wrk", "aiohttp"), default="auto", help="load generator: wrk when installed (auto), or the aiohttp one"
    )
    args = parser.parse_args(argv)
    clients = sorted({int(x) for x in args.clients.split(",")})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups of the children
    with tempfile.TemporaryDirectory(prefix="t2i-bench-overhead-") as folder:
        cells, pairs, note = asyncio.run(measure(args, clients, Path(folder)))
    print(report(cells, pairs, note, clients, args), flush=True)


if __name__ == "__main__":
    main()
