"""What moving each image into an S3 image store (``--image-store``) adds to a request: latency and memory.

    python -m bench.image_store [--sizes 512,1024] [--requests 30] [--delay-ms 512=80,1024=200]

In one run, each its own process on loopback:

- SeaweedFS (``weed server`` with its S3 API, ``bench.common.S3Server``) and a bucket ``t2i-bench``;
- one fake orchestrator, ``bench.fake_node --behaviour ok --images photo`` (named as a fake: no GPU, no
  model). Its images are real PNGs of the size asked for: scikit-image's ``astronaut`` photograph resized,
  encoded once per size at start-up at the node's PNG level (2). It answers after an emulated generation
  time (``--delay-ms``), by default 80 ms at 512x512, sd-turbo's raw pipeline call (1 step) on an H200 in
  BENCHMARKS.md (75.1 and 84.0 ms), and 200 ms at 1024x1024: BENCHMARKS.md has no sd-turbo figure at that
  size (SDXL-Lightning's 4-step 1024x1024 call took 380 to 644 ms), so 200 ms is an estimate on the strict
  side: the shorter the request, the larger the store's share of it;
- two real gateways in front of it, ``python -m t2i_gateway --orchestrator <node>`` at default settings:
  ``plain`` (images stay on the node, the answer's urls relay them) and ``store`` (the same plus
  ``--image-store s3://t2i-bench/bench --s3-endpoint <weed>``, SeaweedFS's credentials in its
  environment: it GETs each image from the node and PUTs it into the bucket before it answers).

Phases, at each size (square, ``--sizes``):

1. one request at a time: ``--requests`` POST /text-to-image of 1 image to each gateway, alternately (the
   two share the machine's noise), after 3 untimed ones to each; p50 and p95 of each;
2. ``--concurrency`` requests at once: ``--concurrent-requests`` to each gateway, in alternating rounds;
3. memory: ``--memory-requests`` requests of ``--images`` images each, ``--concurrency`` at once, to the
   store gateway and then to the plain one, in two halves: each gateway's peak resident memory (VmHWM,
   /proc) before, after each half, and its growth over the second half (flat once the copies in flight,
   at most 16 at a time in the gateway, have reached their bound).

After phases 1 and 3, one image url the store gateway answered with is downloaded through it (from the
store) and must be byte for byte the node's image of that size; at the end the store gateway's metrics
must count every image it answered with as stored and no request answered with the node's urls
(``t2i_gateway_store_fallbacks_total``). Where the time goes: the store gateway's own mean time to move a
request's images (``t2i_gateway_store_seconds``, phase 1), and, timed in this process on the same node
and store, one copy's parts: the GET from the node, ``S3ImageStore.put`` of the bytes, the GET streamed
into the put as the gateway does it, and a put of 0 bytes (what one S3 request costs, whatever its size).

Prints three tables (latency, the parts of one copy, memory), a line of checks and a verdict. Goal: the
store gateway's p50 at most 1.15x the plain one's, one request at a time, at every size. A missed goal is
reported, not an error; a request not answered 200, a request answered with the node's urls, or a stored
image that differs from the node's fails the run (exit 1), as a blocking call on a daemon's event loop
does (with the tests' blockbuster on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .common import Process, S3Server, launch, metric, wait_healthy

BUCKET = "t2i-bench"
PROMPT = "a cool cat on the beach"
GOAL_RATIO = 1.15
WARMUP = 3
ROUNDS = 3  # of the load at once: the gateways take turns
PART_REPEATS = 10
CHUNK = 64 * 1024  # as the gateway reads a node's image
GATEWAYS = ("plain", "store")


@dataclass
class Client:
    """The bench's requests, with every failure kept (they fail the run) and the images answered counted."""

    session: aiohttp.ClientSession
    errors: list[str] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GATEWAYS, 0))

    async def generate(self, name: str, url: str, size: int, images: int = 1) -> tuple[float, list[str]]:
        """Seconds to the whole answer, and its image urls (none if it failed)."""
        body = {"prompt": PROMPT, "width": size, "height": size, "num_images_per_prompt": images}
        started = time.perf_counter()
        try:
            async with self.session.post(f"{url}/text-to-image", json=body) as response:
                status, text = response.status, await response.text()
            elapsed = time.perf_counter() - started
            if status != 200:
                self.errors.append(f"{name} {size}x{size}: answered {status}: {text[:300]}")
                return elapsed, []
            urls = [str(image["url"]) for image in json.loads(text)["images"]]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self.errors.append(f"{name} {size}x{size}: {type(exc).__name__}: {exc}")
            return math.nan, []
        self.images[name] += len(urls)
        return elapsed, urls

    async def download(self, url: str) -> bytes:
        async with self.session.get(url) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {url} answered {response.status}: {data[:300]!r}")
            return data


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else math.nan


def vm(process: Process, field_name: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of the process, in MiB."""
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Latency:
    plain: list[float]
    store: list[float]

    def p(self, name: str, q: float) -> float:
        return 1000 * percentile(getattr(self, name), q)

    @property
    def ratio(self) -> float:
        return self.p("store", 50) / self.p("plain", 50)


@dataclass
class Memory:
    before: float
    half: float
    after: float
    rss: float


@dataclass
class Parts:
    image_bytes: int
    get_ms: float
    put_ms: float
    copy_ms: float
    empty_ms: float  # a put of 0 bytes: the cost of one S3 request, whatever its size
    gateway_move_ms: float = math.nan  # from the store gateway's histogram, phase 1


@dataclass
class Figures:
    one: dict[int, Latency] = field(default_factory=dict)
    many: dict[int, Latency] = field(default_factory=dict)
    memory: dict[tuple[str, int], Memory] = field(default_factory=dict)
    parts: dict[int, Parts] = field(default_factory=dict)
    checked: int = 0  # stored images compared with the node's
    stored: float = 0.0  # the store gateway's t2i_gateway_stored_images_total
    fallbacks: float = 0.0
    objects: int = 0  # in the bucket at the end


# -- phases ------------------------------------------------------------------------------------------


async def one_at_a_time(client: Client, gateways: dict[str, Process], size: int, count: int) -> tuple[Latency, str | None]:
    """``count`` requests to each gateway, alternately (the first of each pair alternating too)."""
    seconds: dict[str, list[float]] = {name: [] for name in GATEWAYS}
    stored_url = None
    for i in range(count):
        for name in GATEWAYS if i % 2 == 0 else GATEWAYS[::-1]:
            elapsed, urls = await client.generate(name, gateways[name].url, size)
            if urls:
                seconds[name].append(elapsed)
                if name == "store":
                    stored_url = urls[0]
    return Latency(seconds["plain"], seconds["store"]), stored_url


async def at_once(
    client: Client, name: str, url: str, size: int, images: int, count: int, concurrency: int
) -> tuple[list[float], str | None]:
    """``count`` requests, ``concurrency`` at a time: the seconds of those answered, and one image url."""
    semaphore = asyncio.Semaphore(concurrency)
    seconds: list[float] = []
    last: list[str] = []

    async def one() -> None:
        async with semaphore:
            elapsed, urls = await client.generate(name, url, size, images)
            if urls:
                seconds.append(elapsed)
                last[:] = urls

    await asyncio.gather(*(one() for _ in range(count)))
    return seconds, (last[-1] if last else None)


async def many_at_once(client: Client, gateways: dict[str, Process], size: int, count: int, concurrency: int) -> Latency:
    seconds: dict[str, list[float]] = {name: [] for name in GATEWAYS}
    for round_ in range(ROUNDS):
        share = count // ROUNDS + (1 if round_ < count % ROUNDS else 0)
        for name in GATEWAYS if round_ % 2 == 0 else GATEWAYS[::-1]:
            got, _ = await at_once(client, name, gateways[name].url, size, 1, share, concurrency)
            seconds[name] += got
    return Latency(seconds["plain"], seconds["store"])


async def memory_phase(client: Client, name: str, gateway: Process, size: int, args: argparse.Namespace) -> tuple[Memory, str | None]:
    before = vm(gateway, "VmHWM")
    first = args.memory_requests // 2
    _, url = await at_once(client, name, gateway.url, size, args.images, first, args.concurrency)
    half = vm(gateway, "VmHWM")
    _, later = await at_once(client, name, gateway.url, size, args.images, args.memory_requests - first, args.concurrency)
    return Memory(before, half, vm(gateway, "VmHWM"), vm(gateway, "VmRSS")), later or url


async def node_image(client: Client, node: Process, size: int) -> bytes:
    """The fake node's image of ``size``, fetched from it as a gateway would."""
    async with client.session.post(f"{node.url}/text-to-image", json={"prompt": PROMPT, "width": size, "height": size}) as response:
        response.raise_for_status()
        url = (await response.json())["images"][0]["url"]
    return await client.download(url)


async def check_stored(client: Client, url: str | None, expected: bytes, what: str, figures: Figures) -> None:
    """One stored image, downloaded through the store gateway: it must be the node's, byte for byte."""
    if url is None:
        client.errors.append(f"{what}: no image url to check (every request failed)")
        return
    try:
        data = await client.download(url)
    except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
        client.errors.append(f"{what}: the stored image could not be downloaded: {exc}")
        return
    figures.checked += 1
    if data != expected:
        client.errors.append(f"{what}: the stored image ({len(data)} bytes) is not the node's ({len(expected)} bytes)")


async def store_seconds(url: str) -> tuple[float, float]:
    return await metric(url, "t2i_gateway_store_seconds_sum"), await metric(url, "t2i_gateway_store_seconds_count")


async def copy_parts(client: Client, node: Process, s3: S3Server, size: int) -> Parts:
    """One copy's parts, timed here with the gateway's own store class on the same node and store (medians)."""
    from t2i_gateway.image_store import S3ImageStore, StoreLocation

    os.environ.update(S3Server.CREDENTIALS)  # the standard AWS chain, as the gateway's
    store = S3ImageStore(StoreLocation.parse(f"s3://{BUCKET}/bench-parts"), endpoint=s3.url, ttl_s=3600.0, timeout_s=10.0)
    await store.start()
    try:
        async with client.session.post(f"{node.url}/text-to-image", json={"prompt": PROMPT, "width": size, "height": size}) as response:
            url = (await response.json())["images"][0]["url"]

        async def pieces(data: bytes) -> AsyncIterator[bytes]:
            for at in range(0, len(data), CHUNK):
                yield data[at : at + CHUNK]

        async def streamed() -> AsyncIterator[bytes]:
            async with client.session.get(url) as upstream:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    yield chunk

        gets, puts, copies, empties = [], [], [], []
        data = b""
        for i in range(2 + PART_REPEATS):  # the first two untimed
            started = time.perf_counter()
            data = await client.download(url)
            got = time.perf_counter()
            await store.put(f"{store.location.prefix}{size}/put-{i}.png", pieces(data), "image/png")
            put = time.perf_counter()
            await store.put(f"{store.location.prefix}{size}/copy-{i}.png", streamed(), "image/png")
            copied = time.perf_counter()
            await store.put(f"{store.location.prefix}{size}/empty-{i}.png", pieces(b""), "image/png")
            if i >= 2:
                gets.append(got - started)
                puts.append(put - got)
                copies.append(copied - put)
                empties.append(time.perf_counter() - copied)
        return Parts(len(data), *(1000 * statistics.median(values) for values in (gets, puts, copies, empties)))
    finally:
        await store.close()


def count_objects(s3: S3Server) -> int:
    """Objects under the store gateway's prefix (blocking: run in a thread)."""
    paginator = s3.client().get_paginator("list_objects_v2")
    return sum(len(page.get("Contents", [])) for page in paginator.paginate(Bucket=BUCKET, Prefix="bench/"))


async def measure(args: argparse.Namespace, workdir: Path) -> tuple[Figures, list[str]]:
    figures = Figures()
    s3 = S3Server(workdir / "s3")
    (workdir / "s3").mkdir()
    processes: list[Process] = []
    try:
        await asyncio.to_thread(s3.start)
        await asyncio.to_thread(s3.make_bucket, BUCKET)
        sizes = ",".join(f"{size}x{size}" for size in args.sizes)
        delays = ",".join(f"{size}x{size}={ms:g}" for size, ms in args.delays.items())
        node = launch(
            ["-m", "bench.fake_node", "--behaviour", "ok", "--images", "photo", "--image-sizes", sizes, "--delay-ms", delays],
            workdir,
            "fake-node",
        )
        processes.append(node)
        await wait_healthy(node, path="/capabilities")
        gateways = {
            "plain": launch(["-m", "t2i_gateway", "--orchestrator", node.url], workdir, "gateway-plain"),
            "store": launch(
                ["-m", "t2i_gateway", "--orchestrator", node.url, "--image-store", f"s3://{BUCKET}/bench", "--s3-endpoint", s3.url],
                workdir,
                "gateway-store",
                env=S3Server.CREDENTIALS,
            ),
        }
        processes += gateways.values()
        for gateway in gateways.values():
            await wait_healthy(gateway, timeout=60)

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            client = Client(session)
            expected = {size: await node_image(client, node, size) for size in args.sizes}
            for size in args.sizes:
                for name in GATEWAYS:  # untimed: the first connections to the node and the store
                    for _ in range(WARMUP):
                        await client.generate(name, gateways[name].url, size)
                before = await store_seconds(gateways["store"].url)
                figures.one[size], url = await one_at_a_time(client, gateways, size, args.requests)
                after = await store_seconds(gateways["store"].url)
                moved = after[1] - before[1]
                move_ms = 1000 * (after[0] - before[0]) / moved if moved else math.nan
                figures.parts[size] = Parts(len(expected[size]), math.nan, math.nan, math.nan, math.nan, move_ms)  # the rest below
                await check_stored(client, url, expected[size], f"{size}x{size} one at a time", figures)
            for size in args.sizes:
                figures.many[size] = await many_at_once(client, gateways, size, args.concurrent_requests, args.concurrency)
            for size in args.sizes:
                for name in ("store", "plain"):
                    figures.memory[(name, size)], url = await memory_phase(client, name, gateways[name], size, args)
                    if name == "store":
                        await check_stored(client, url, expected[size], f"{size}x{size} memory phase", figures)
            figures.stored = await metric(gateways["store"].url, "t2i_gateway_stored_images_total")
            figures.fallbacks = await metric(gateways["store"].url, "t2i_gateway_store_fallbacks_total")
            figures.objects = await asyncio.to_thread(count_objects, s3)
            for size in args.sizes:
                parts = await copy_parts(client, node, s3, size)
                parts.gateway_move_ms = figures.parts[size].gateway_move_ms
                figures.parts[size] = parts
        errors = client.errors
        if figures.fallbacks:
            errors.append(f"{figures.fallbacks:.0f} requests were answered with the node's image urls (the store failed or was slow)")
        if figures.stored != client.images["store"]:
            errors.append(f"the store gateway answered with {client.images['store']} images but counts {figures.stored:.0f} stored")
        return figures, errors
    finally:
        for process in reversed(processes):
            process.stop()
        s3.stop()


# -- the report --------------------------------------------------------------------------------------


def report(figures: Figures, args: argparse.Namespace) -> list[str]:
    delays = ", ".join(f"{size}x{size} {args.delays[size]:g} ms" for size in args.sizes)
    lines = [
        f"bench.image_store: POST /text-to-image to a plain gateway and to one with --image-store (SeaweedFS on loopback), in front of one "
        f"FAKE node (bench.fake_node: no GPU, no model; real PNGs of the size asked for, astronaut photo at PNG level 2; emulated "
        f"generation time {delays}); {os.cpu_count()} CPU cores shared by the node, both gateways, SeaweedFS and the load",
        "",
        "| load | size | image bytes | plain p50 ms | plain p95 ms | store p50 ms | store p95 ms | store/plain p50 | store - plain p50 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, table in (("1 at a time", figures.one), (f"{args.concurrency} at once", figures.many)):
        for size in args.sizes:
            latency = table[size]
            lines.append(
                f"| {label} | {size}x{size} | {figures.parts[size].image_bytes} | {latency.p('plain', 50):.1f} | {latency.p('plain', 95):.1f} "
                f"| {latency.p('store', 50):.1f} | {latency.p('store', 95):.1f} | {latency.ratio:.3f}x "
                f"| {latency.p('store', 50) - latency.p('plain', 50):+.1f} |"
            )
    lines += [
        "",
        f"Where the time goes, one image (1 at a time): the store gateway's mean move per request (t2i_gateway_store_seconds, phase 1); "
        f"then timed in the bench process on the same node and store, median of {PART_REPEATS}:",
        "",
        "| size | image bytes | gateway: move per request ms | GET from node ms | S3ImageStore.put ms | GET streamed into put ms "
        "| put of 0 bytes ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size in args.sizes:
        parts = figures.parts[size]
        lines.append(
            f"| {size}x{size} | {parts.image_bytes} | {parts.gateway_move_ms:.1f} | {parts.get_ms:.1f} | {parts.put_ms:.1f} | {parts.copy_ms:.1f} "
            f"| {parts.empty_ms:.1f} |"
        )
    lines += [
        "",
        f"Memory: {args.memory_requests} requests of {args.images} images, {args.concurrency} at once, per gateway and size, in two halves; "
        "peak RSS is VmHWM (/proc), RSS now is VmRSS at the end of the phase:",
        "",
        "| gateway | phase | peak RSS before MiB | after 1st half MiB | after 2nd half MiB | growth over 2nd half MiB | RSS now MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size in args.sizes:
        for name in ("store", "plain"):
            memory = figures.memory[(name, size)]
            lines.append(
                f"| {name} | {size}x{size} x {args.images} | {memory.before:.1f} | {memory.half:.1f} | {memory.after:.1f} "
                f"| {memory.after - memory.half:+.1f} | {memory.rss:.1f} |"
            )
    lines += [
        "",
        f"checks: stored images (t2i_gateway_stored_images_total) {figures.stored:.0f}, answered with node urls "
        f"(t2i_gateway_store_fallbacks_total) {figures.fallbacks:.0f}, objects under the prefix {figures.objects}; "
        f"stored images downloaded and compared with the node's: {figures.checked}",
    ]
    ratios = {size: figures.one[size].ratio for size in args.sizes}
    met = all(ratio <= GOAL_RATIO for ratio in ratios.values())
    growth = ", ".join(
        f"{size}x{size} {figures.memory[('store', size)].half - figures.memory[('store', size)].before:+.1f} then "
        f"{figures.memory[('store', size)].after - figures.memory[('store', size)].half:+.1f} MiB"
        for size in args.sizes
    )
    lines.append(
        f"verdict: goal {'met' if met else 'not met'}: store/plain p50, 1 request at a time: "
        + ", ".join(
            f"{size}x{size} {ratios[size]:.3f}x ({figures.one[size].p('store', 50) - figures.one[size].p('plain', 50):+.1f} ms)"
            for size in args.sizes
        )
        + f" (goal <= {GOAL_RATIO}x at every size, against a fake node's emulated generation time of {delays}); "
        f"store gateway's peak RSS over the memory phases' halves: {growth}"
    )
    return lines


def parse_delays(text: str, sizes: list[int]) -> dict[int, float]:
    """``512=80,1024=200`` (or one number for every size) as ms by size; every size must have one."""
    given: dict[int | None, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        size, _, ms = item.rpartition("=")
        given[int(size) if size else None] = float(ms)
    if any(ms < 0 for ms in given.values()):
        raise ValueError("a delay is negative")
    missing = [size for size in sizes if size not in given and None not in given]
    if missing:
        raise ValueError(f"no delay for {', '.join(map(str, missing))}: give SIZE=MS for it, or one number for every size")
    return {size: given.get(size, given.get(None, 0.0)) for size in sizes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.image_store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="512,1024", help="square sizes in pixels, comma-separated")
    parser.add_argument("--requests", type=int, default=30, help="requests per gateway and size, one at a time")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once, in the load at once and the memory phases")
    parser.add_argument("--concurrent-requests", type=int, default=48, help="requests per gateway and size, --concurrency at once")
    parser.add_argument("--memory-requests", type=int, default=120, help="requests per gateway and size in the memory phases")
    parser.add_argument("--images", type=int, default=4, help="num_images_per_prompt in the memory phases")
    parser.add_argument(
        "--delay-ms",
        default="512=80,1024=200",
        help="the fake node's emulated generation time: SIZE=MS per size, comma-separated, or one number for every size",
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
        args.delays = parse_delays(args.delay_ms, args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.sizes or min(args.sizes) < 64:
        parser.error("--sizes: at least one, each at least 64 (the gateway's smallest)")
    if min(args.requests, args.concurrency, args.concurrent_requests, args.memory_requests, args.images) < 1:
        parser.error("--requests, --concurrency, --concurrent-requests, --memory-requests and --images must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups of the children
    with tempfile.TemporaryDirectory(prefix="t2i-bench-image-store-") as folder:
        figures, errors = asyncio.run(measure(args, Path(folder)))
    print("\n".join(report(figures, args)), flush=True)
    if errors:
        sys.stderr.write("".join(f"error: {error}\n" for error in errors[:20]))
        if len(errors) > 20:
            sys.stderr.write(f"error: and {len(errors) - 20} more\n")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
