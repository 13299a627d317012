"""The fault suite: a bounded client load through a gateway while nodes die, hang and answer garbage.

Three real orchestrators (demo model) and a garbage node behind one gateway. During the load node A
is SIGKILLed, node B is SIGSTOPped (hangs) for longer than any timeout (until the gateway's probe has
found it down and more requests have been served meanwhile) and then resumed, and the garbage node
answers malformed JSON, wrong types, truncated bodies and 500s throughout. Node C stays healthy, so
every request must succeed. Prints the figures; exits 1 if any request failed or the hang was never
detected.

    .venv/bin/python -m bench.fault_suite --requests 200 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from .common import Results, launch, metric, post_many, wait_healthy

BODY = {"prompt": "a cool cat on the beach", "width": 64, "height": 64}


async def run(requests: int, concurrency: int, cache_dir: Path | None, workdir: Path) -> dict[str, float]:
    node_args = ["-m", "t2i_orchestrator", "--threads", "1", *(["--cache-dir", str(cache_dir)] if cache_dir else [])]
    nodes = [launch([*node_args, "--storage-dir", str(workdir / name)], workdir, f"node-{name}") for name in "abc"]
    garbage = launch(["-m", "bench.fake_node", "--behaviour", "garbage"], workdir, "garbage")
    gateway = launch(
        [
            "-m",
            "t2i_gateway",
            *(arg for n in [*nodes, garbage] for arg in ("--orchestrator", n.url)),
            "--probe-interval",
            "1",
            "--probe-timeout",
            "2",
            "--max-attempts",
            "4",
        ],
        workdir,
        "gateway",
    )
    try:
        await asyncio.gather(*(wait_healthy(p) for p in [*nodes, gateway]))
        while len(await healthy(gateway.url)) < len(nodes) + 1:  # the gateway sees every node
            await asyncio.sleep(0.1)
        results = Results()
        started = time.monotonic()
        load = asyncio.create_task(post_many(gateway.url, BODY, requests, concurrency, results))

        async def at(fraction: float) -> None:
            while len(results.statuses) < fraction * requests and not load.done():
                await asyncio.sleep(0.01)

        a, b, _ = nodes
        await at(0.1)
        a.signal(signal.SIGKILL)
        await at(0.2)  # early: most of the load is still to come while it hangs, on any machine
        b.signal(signal.SIGSTOP)
        while b.url in await healthy(gateway.url) and not load.done():  # hung past the probe timeout: found down
            await asyncio.sleep(0.1)
        hang_detected = b.url not in await healthy(gateway.url)
        found_down_at = len(results.statuses)
        await at((found_down_at + 2 * concurrency) / requests)  # served around it, before it resumes
        served_while_hung = len(results.statuses) - found_down_at
        b.signal(signal.SIGCONT)
        await load
        elapsed = time.monotonic() - started
        return {
            "sent": requests,
            "succeeded": results.count(200),
            "failed": requests - results.count(200),
            "hang_detected": int(hang_detected),
            "served_while_hung": served_while_hung,
            "retried": await metric(gateway.url, "t2i_gateway_retries_total"),
            "p50_s": results.percentile(50),
            "p99_s": results.percentile(99),
            "elapsed_s": elapsed,
            "throughput_rps": requests / elapsed,
        }
    finally:
        for process in [gateway, garbage, *nodes]:
            process.stop()


async def healthy(gateway_url: str) -> set[str]:
    """The nodes the gateway sees as healthy now."""
    async with aiohttp.ClientSession() as session, session.get(f"{gateway_url}/orchestrators") as response:
        return {node["url"] for node in (await response.json())["orchestrators"] if node["healthy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, help="the orchestrators' --cache-dir (where the demo model is built)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="t2i-faults-") as workdir:
        figures = asyncio.run(run(args.requests, args.concurrency, args.cache_dir, Path(workdir)))
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:>15}: {value:.3f}" if isinstance(value, float) else f"{name:>15}: {value}")
    sys.exit(1 if figures["failed"] or not figures["hang_detected"] else 0)


if __name__ == "__main__":
    main()
