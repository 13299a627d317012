"""The node benchmarks run from a fresh clone and print their tables (tiny settings: figures are not checked)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from .processes import blockbuster_env

pytestmark = pytest.mark.slow


def bench(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=240, env=blockbuster_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def ratios(summary: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d+\.\d+)x", summary)]


def test_bench_batching_prints_every_cell_and_the_ratios() -> None:
    out = bench("bench.batching", "--sizes", "64", "--clients", "1,2", "--rounds", "1", "--repeats", "1")
    assert "| 64x64 | 1 |" in out and "| 64x64 | 2 |" in out
    [summary] = [line for line in out.splitlines() if line.startswith("summary:")]
    assert ratios(summary) and all(math.isfinite(r) and r > 0 for r in ratios(summary))


def test_bench_burst_serves_the_whole_burst_with_waiting_and_refuses_without() -> None:
    out = bench("bench.burst", "--requests", "12", "--size", "64")
    waiting = next(line for line in out.splitlines() if line.startswith("| --max-queued 64 |"))
    assert waiting.split("|")[2].strip() == "12"  # every request of the burst answered 200
    assert next(line for line in out.splitlines() if line.startswith("| --max-queued 0 |"))
    assert "summary: with waiting 12/12 served" in out and "every request served with waiting: met" in out
    assert re.search(r"at most [\d.]+x the node alone: (met|MISSED)", out)  # a verdict, whatever this machine's speed
