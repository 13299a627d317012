"""bench.fleet at a small size: real Redis, fake nodes, real gateways; every row and the summary are printed."""

from __future__ import annotations

import math
import re

import pytest

from .processes import run_bench

pytestmark = pytest.mark.slow

ROWS = (
    "heartbeats written (1 pipeline)",
    "registered -> 20 routable",
    "selection/request @ 10 nodes",
    "selection/request @ 100 nodes",
    "selection/request @ 1000 nodes",
    "gateway idle CPU, 20 nodes",
    "probes/s seen by the fakes, idle",
    "gateway RSS / HWM idle, 20 nodes",
    "gateway RSS / HWM after load",
    "gateway idle CPU, 1 node",
    "gateway RSS idle, 1 node",
    "requests/s, 20 nodes",
    "requests/s, 1 node",
    "requests/s ratio 20 : 1",
    "ratio in each round",
    "gateway CPU/request, 20 nodes",
    "gateway CPU/request, 1 node",
)
SUMMARY_KEYS = (
    "nodes",
    "routable_s",
    "select_us_10",
    "select_us_100",
    "select_us_1000",
    "select_ratio_1000_10",
    "idle_cpu_pct",
    "idle_cpu_pct_1",
    "rss_mib",
    "hwm_mib",
    "rps_n",
    "rps_1",
    "rps_ratio",
)


def test_the_fleet_bench_prints_every_row_and_a_summary_of_finite_figures() -> None:
    lines = run_bench("bench.fleet", "--nodes", "20", "--seconds", "1", "--idle-seconds", "1", timeout=120)
    output = "\n".join(lines)
    for row in ROWS:
        matching = [line for line in lines if line.startswith(row)]
        assert matching, f"no row {row!r} in:\n{output}"
        assert re.search(r"\d", matching[0][len(row) :]) and "nan" not in matching[0], matching[0]
    for goal_row in ("selection/request @ 1000 nodes", "gateway idle CPU, 20 nodes", "requests/s ratio 20 : 1"):
        line = next(line for line in lines if line.startswith(goal_row))
        assert line.endswith(("met", "MISSED")), line
    summary = [line for line in lines if line.startswith("summary: ")]
    assert len(summary) == 1, output
    figures = dict(pair.split("=", 1) for pair in summary[0].removeprefix("summary: ").split())
    for key in SUMMARY_KEYS:
        assert math.isfinite(float(figures[key])), f"{key}={figures.get(key)} in {summary[0]}"
    assert float(figures["nodes"]) == 20 and float(figures["rps_n"]) > 0 and float(figures["rps_1"]) > 0
    assert re.fullmatch(r"select:(met|MISSED),idle_cpu:(met|MISSED),rps_ratio:(met|MISSED)", figures["goals"]), summary[0]
