"""Backpressure: many concurrent clients against one slow, small node.

One orchestrator (queue of --node-queue) behind a gateway limited to --max-in-flight requests.
--clients clients post at once. What the node cannot hold must be refused quickly with 503 and
Retry-After, and the gateway's memory must stay bounded. Prints the figures; exits 1 if any answer
was neither 200 nor 503-with-Retry-After, or if a refusal took longer than --max-refusal-s.

    .venv/bin/python -m bench.backpressure --clients 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from .common import Results, launch, post_many, raise_fd_limit, wait_healthy

SLOW = {"prompt": "a slow one", "width": 256, "height": 256, "num_inference_steps": 20}


async def run(clients: int, max_in_flight: int, node_queue: int, cache_dir: Path | None, workdir: Path) -> dict[str, float]:
    node = launch(
        [
            "-m",
            "t2i_orchestrator",
            "--threads",
            "1",
            "--max-queue",
            str(node_queue),
            "--storage-dir",
            str(workdir / "images"),
            *(["--cache-dir", str(cache_dir)] if cache_dir else []),
        ],
        workdir,
        "node",
    )
    gateway = launch(
        # --max-queued 0: what is measured here is how fast the excess is refused; waiting for a slot is
        # bench.burst's subject.
        [
            "-m",
            "t2i_gateway",
            "--orchestrator",
            node.url,
            "--max-in-flight",
            str(max_in_flight),
            "--probe-interval",
            "0.5",
            "--max-queued",
            "0",
        ],
        workdir,
        "gateway",
    )
    try:
        await asyncio.gather(wait_healthy(node), wait_healthy(gateway))
        await asyncio.sleep(1)
        rss_before = gateway.peak_rss_mib()
        results = Results()
        started = time.monotonic()
        await post_many(gateway.url, SLOW, clients, clients, results)
        elapsed = time.monotonic() - started
        refused = [s for s, status in zip(results.seconds, results.statuses) if status == 503]
        return {
            "clients": clients,
            "accepted_200": results.count(200),
            "refused_503": results.count(503),
            "other": clients - results.count(200) - results.count(503),
            "refusals_without_retry_after": sum(1 for s, r in zip(results.statuses, results.retry_after) if s == 503 and not r),
            "refusal_p50_s": results.percentile(50, (503,)),
            "refusal_p99_s": results.percentile(99, (503,)),
            "refusal_max_s": max(refused, default=float("nan")),
            "elapsed_s": elapsed,
            "gateway_peak_rss_mib_before": rss_before,
            "gateway_peak_rss_mib": gateway.peak_rss_mib(),
        }
    finally:
        gateway.stop()
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--max-in-flight", type=int, default=64, help="the gateway's --max-in-flight")
    parser.add_argument("--node-queue", type=int, default=4, help="the orchestrator's --max-queue")
    parser.add_argument("--max-refusal-s", type=float, default=5.0, help="slowest acceptable 503")
    parser.add_argument("--cache-dir", type=Path, help="the orchestrator's --cache-dir (where the demo model is built)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args()
    # Each client holds a socket: make room for them (the gateway, started afterwards, inherits it).
    raise_fd_limit(4 * args.clients + 1024)
    with tempfile.TemporaryDirectory(prefix="t2i-backpressure-") as workdir:
        figures = asyncio.run(run(args.clients, args.max_in_flight, args.node_queue, args.cache_dir, Path(workdir)))
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:>30}: {value:.3f}" if isinstance(value, float) else f"{name:>30}: {value}")
    bad = figures["other"] or figures["refusals_without_retry_after"] or figures["refusal_max_s"] > args.max_refusal_s
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
