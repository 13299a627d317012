"""A burst of requests at once on one demo node behind a gateway, with and without waiting at the gateway.

    python -m bench.burst [--requests 30] [--size 128]

With the gateway's wait queue (``--max-queued 64``) every request of the burst should get its image, in
about the time the node needs for them all; with ``--max-queued 0`` (no waiting) the gateway refuses what
does not fit at once, as before. Prints both, and the time the node itself needs for the same requests
(sent to it directly, as many at a time as it holds: its capacity), and a verdict: with waiting, every
request served (else the run fails, exit 1) in at most ``GOAL_RATIO`` times the node's own time (a
missed speed goal is reported, not an error).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from .common import Results, launch, post_many, wait_healthy

GOAL_RATIO = 1.25


async def _burst(gateway: str, requests: int, size: int) -> tuple[Counter[int], float]:
    body = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "safety_check": False}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one(seed: int) -> int:
            async with session.post(f"{gateway}/text-to-image", json={**body, "seed": seed}) as response:
                await response.read()
                return response.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(one(seed) for seed in range(requests)))
        return Counter(statuses), time.monotonic() - started


async def run(requests: int, size: int, workdir: Path) -> tuple[float, list[tuple[int, Counter[int], float]]]:
    node = launch(
        [
            "-m",
            "t2i_orchestrator",
            "--cache-dir",
            str(workdir / "cache"),
            "--storage-dir",
            str(workdir / "images"),
            "--log-level",
            "warning",
        ],
        workdir,
        "node",
    )
    results = []
    try:
        await wait_healthy(node)
        body = {"prompt": "a lighthouse at dusk", "width": size, "height": size, "safety_check": False}
        await post_many(node.url, body, requests, 9, Results())  # warm: the node's batch policy learns this size
        started = time.monotonic()
        await post_many(node.url, body, requests, 9, Results())  # 9: one generating and --max-queue 8 waiting
        node_alone = time.monotonic() - started
        for max_queued in (64, 0):
            gateway = launch(
                ["-m", "t2i_gateway", "--orchestrator", node.url, "--max-queued", str(max_queued), "--log-level", "warning"],
                workdir,
                f"gateway-{max_queued}",
            )
            try:
                await wait_healthy(gateway)
                statuses, seconds = await _burst(gateway.url, requests, size)
                results.append((max_queued, statuses, seconds))
            finally:
                gateway.stop()
    finally:
        node.stop()
    return node_alone, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="t2i-bench-burst-") as folder:
        node_alone, results = asyncio.run(run(args.requests, args.size, Path(folder)))
    print(f"{args.requests} requests at once, {args.size}x{args.size}, one demo node; the node alone needs {node_alone:.2f} s for them")
    print("| gateway | answered 200 | refused 503 | other | burst took |")
    print("| --- | --- | --- | --- | --- |")
    for max_queued, statuses, seconds in results:
        other = sum(n for status, n in statuses.items() if status not in (200, 503))
        print(f"| --max-queued {max_queued} | {statuses[200]} | {statuses[503]} | {other} | {seconds:.2f} s |")
    (_, waited, took), (_, refused, _) = results
    all_served = waited[200] == args.requests
    fast = took / node_alone <= GOAL_RATIO
    print(
        f"summary: with waiting {waited[200]}/{args.requests} served in {took:.2f} s ({took / node_alone:.2f}x the node alone); "
        f"with --max-queued 0, {refused[200]}/{args.requests} served; "
        f"goals: every request served with waiting: {'met' if all_served else 'MISSED'}, "
        f"at most {GOAL_RATIO}x the node alone: {'met' if fast else 'MISSED'}"
    )
    if not all_served:
        sys.exit(f"bench.burst: with waiting, {args.requests - waited[200]} of {args.requests} requests were not served")


if __name__ == "__main__":
    main()
