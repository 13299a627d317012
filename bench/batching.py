"""Images/s of one demo node with batching off (``--max-batch 1``) and on, by size and concurrency.

    python -m bench.batching [--sizes 64,256,512] [--clients 1,4,8] [--rounds 4]

For each size and number of concurrent clients, the same requests go to a node started with
``--max-batch 1`` and to one started with ``--max-batch 8``, in alternating turns; each node first gets
untimed requests at that size, so that its batch policy has measured what pays there before the
timed part. Prints a table and a summary line of on/off ratios. Goals: never below 0.95x, and at
least 2x at 64x64 with 8 clients (2 CPU cores).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from .common import launch, wait_healthy

SEED = 7


async def _burst(url: str, size: int, clients: int, requests: int) -> float:
    """``requests`` generations, ``clients`` at a time; images per second."""
    body = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "num_inference_steps": 2, "safety_check": False}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            async with session.post(f"{url}/text-to-image", json={**body, "seed": SEED + index}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return requests / (time.monotonic() - started)


async def measure(sizes: list[int], clients: list[int], rounds: int, repeats: int, workdir: Path) -> dict[tuple[int, int, int], float]:
    """Both nodes run side by side but are loaded in turn, alternating, so that the machine's drift
    over the run falls on both; each figure is the median of ``repeats`` turns."""
    nodes = {
        max_batch: launch(
            [
                "-m",
                "t2i_orchestrator",
                "--cache-dir",
                str(workdir / "cache"),
                "--storage-dir",
                str(workdir / f"images-{max_batch}"),
                "--max-batch",
                str(max_batch),
                "--max-queue",
                "16",
                "--log-level",
                "warning",
            ],
            workdir,
            f"node-batch-{max_batch}",
        )
        for max_batch in (1, 8)
    }
    rates: dict[tuple[int, int, int], float] = {}
    try:
        for node in nodes.values():
            await wait_healthy(node)
        for size in sizes:
            for node in nodes.values():
                await _burst(node.url, size, max(clients), 6 * max(clients))  # untimed: the policy learns this size
            for count in clients:
                turns: dict[int, list[float]] = {1: [], 8: []}
                for _ in range(repeats):
                    for max_batch, node in nodes.items():
                        turns[max_batch].append(await _burst(node.url, size, count, rounds * count))
                for max_batch, figures in turns.items():
                    rates[(max_batch, size, count)] = statistics.median(figures)
    finally:
        for node in nodes.values():
            node.stop()
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,512", help="image sizes, comma-separated")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client in each timed turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per node and cell (the median counts)")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    clients = [int(x) for x in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="t2i-bench-batching-") as folder:
        rates = asyncio.run(measure(sizes, clients, args.rounds, args.repeats, Path(folder)))
    print("| size | clients | images/s, --max-batch 1 | images/s, --max-batch 8 | ratio |")
    print("| --- | --- | --- | --- | --- |")
    ratios = {}
    for size in sizes:
        for count in clients:
            off, on = rates[(1, size, count)], rates[(8, size, count)]
            ratios[(size, count)] = on / off
            print(f"| {size}x{size} | {count} | {off:.2f} | {on:.2f} | {on / off:.2f}x |")
    worst = min(ratios.values())
    small = ratios.get((64, 8))
    print(
        "summary: "
        + ", ".join(f"{s}px/{c}: {r:.2f}x" for (s, c), r in ratios.items())
        + f"; worst {worst:.2f}x (goal >= 0.95x: {'met' if worst >= 0.95 else 'MISSED'})"
        + (f"; 64px with 8 clients {small:.2f}x (goal >= 2x: {'met' if small >= 2 else 'MISSED'})" if small else "")
    )


if __name__ == "__main__":
    main()
