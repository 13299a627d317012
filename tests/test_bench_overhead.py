"""bench.gateway_overhead and bench.end_to_end at tiny settings: every row and the summary, with finite figures."""

from __future__ import annotations

import math
import re

import pytest

from .processes import run_bench

pytestmark = pytest.mark.slow

NUMBER = r"[-+]?\d+(?:\.\d+)?"


def row_figures(lines: list[str], prefix: str) -> list[float]:
    matching = [line for line in lines if line.startswith(prefix)]
    assert len(matching) == 1, f"{len(matching)} rows {prefix!r} in:\n" + "\n".join(lines)
    cells = [cell.strip() for cell in matching[0].strip("|").split("|")][2:]
    figures = [float(cell.removesuffix("x")) for cell in cells]
    assert figures and all(math.isfinite(f) for f in figures), matching[0]
    return figures


def test_the_gateway_overhead_bench_prints_every_row_and_the_summary() -> None:
    lines = run_bench("bench.gateway_overhead", "--seconds", "0.5", "--pairs", "3", timeout=90)
    paths = ["direct (fake node)", "minimal aiohttp proxy", "gateway"]
    if not any(line.startswith("nginx proxy_pass: skipped") for line in lines):
        paths.append("nginx proxy_pass")
    paths.append("gateway, keys on")  # redis-server is installed wherever the tests run
    for path in paths:
        for clients in (1, 32):
            p50, p99, rps, errors, _cpu = row_figures(lines, f"| {path} | {clients} |")
            assert 0 < p50 <= p99 and rps > 0 and errors == 0
    [summary] = [line for line in lines if line.startswith("summary: ")]
    match = re.search(
        rf"gateway p50 - direct p50 @ 1 client: ({NUMBER}) ms \(goal <= \+0.5 ms: (met|MISSED)\); "
        rf"gateway/minimal proxy req/s @ 32 clients: ({NUMBER})x \(goal >= 0.8x: (met|MISSED)\)",
        summary,
    )
    assert match, summary
    assert math.isfinite(float(match.group(1))) and float(match.group(3)) > 0
    keys = re.search(rf"keys on p50 - keys off p50 @ 1: ({NUMBER}) ms \(goal <= \+0.3 ms: (met|MISSED)\)", summary)
    assert keys and math.isfinite(float(keys.group(1))), summary
    [pairs] = [line for line in lines if line.startswith("keys on p50 - keys off p50 @ 1, 3 alternating pairs of ")]
    differences = re.search(rf": ({NUMBER}), ({NUMBER}), ({NUMBER}) ms, median ({NUMBER}) ms; in the table's cells: ({NUMBER}) ms$", pairs)
    assert differences, pairs
    assert sorted(float(d) for d in differences.group(1, 2, 3))[1] == float(differences.group(4)) == float(keys.group(1))


def test_the_end_to_end_bench_prints_every_row_and_the_summary() -> None:
    lines = run_bench("bench.end_to_end", "--repeats", "2", "--warmup", "1", timeout=150)
    for size, steps in ((64, 1), (256, 2)):
        inside, main_thread, outside, _difference, ratio = row_figures(lines, f"| {size}x{size} | {steps} |")
        assert inside > 0 and main_thread > 0 and outside > 0 and ratio > 0
    [summary] = [line for line in lines if line.startswith("summary: ")]
    for case in ("64x64 1 step", "256x256 2 steps"):
        match = re.search(rf"{case} gateway/in-process ({NUMBER})x \(goal <= 1.10x: (met|MISSED)\)", summary)
        assert match and float(match.group(1)) > 0, summary
