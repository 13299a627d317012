"""bench.tenants in a short configuration: real gateways, a simulated node, a real Redis; every phase and
the shared limit are run and printed, with sane figures (the goals themselves are for the full bench)."""

from __future__ import annotations

import re

import pytest

from .processes import run_bench

pytestmark = pytest.mark.slow

PHASES = ("idle: light alone", "arrival order: one key", "in turn: two keys", "heavy alone", "heavy alone")
LIMIT, WINDOW = 600, 5


def test_a_short_run_of_the_bench_runs_every_phase_and_the_shared_limit_and_exits_0() -> None:
    lines = run_bench("bench.tenants", "--seconds", "3", "--window", str(WINDOW), "--limit", str(LIMIT), timeout=240)
    output = "\n".join(lines)

    # Fairness: one row per phase, in order; every request answered 200.
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith(tuple(f"| {p} |" for p in PHASES))]
    assert [row[0] for row in rows] == list(PHASES), output
    idle, order, turn, alone, alone0 = rows
    assert [row[1] for row in rows] == ["default --node-queue (9 on the node)"] * 2 + ["--node-queue 0"] + [
        "default --node-queue (9 on the node)",
        "--node-queue 0",
    ]
    assert all(row[-1] == "0" for row in rows), output
    light_p50 = {name: float(row[3]) for name, row in (("idle", idle), ("order", order), ("turn", turn))}
    assert 100 <= light_p50["idle"] < 1000, idle  # a 100 ms job, and the round trips
    # Behind the heavy tenant's 32 in arrival order the light one waits for most of them; in turn, for one.
    assert light_p50["idle"] <= light_p50["turn"] < light_p50["order"], output
    assert all(int(row[2]) >= 1 for row in (idle, order, turn)), output
    for row in (order, turn, alone, alone0):
        heavy, busy = float(row[8]), float(row[9])
        assert 0 < heavy <= 11 and 50 <= busy <= 101, row  # at most one 100 ms job at a time
    assert idle[8] == "-" and alone[2] == "-", output

    ratios = {
        name: float(value)
        for name, value in re.findall(r"^(light p50, in turn / L0|heavy images/s per device-second left, [^:]*): (\d+\.\d+)x", output, re.M)
    }
    assert len(ratios) == 2 and all(value > 0 for value in ratios.values()), output

    # The shared limit: the burst of a minute's worth, then about limit x window / 60 over both gateways.
    [limit_row] = [line for line in lines if re.match(r"\| \d+ \| \d+ \(\d+ \+ \d+\) \|", line)]
    cells = [cell.strip() for cell in limit_row.strip("|").split("|")]
    burst = int(cells[0])
    accepted, one, two = map(int, re.fullmatch(r"(\d+) \((\d+) \+ (\d+)\)", cells[1]).groups())  # type: ignore[union-attr]
    expected = LIMIT * WINDOW / 60
    assert LIMIT <= burst <= 2 * LIMIT, limit_row
    assert 0.5 * expected <= accepted <= 1.5 * expected and one + two == accepted, limit_row
    assert float(cells[2]) == expected and cells[5] == "none", limit_row
    assert int(cells[4]) > 0, limit_row  # the workers were refused meanwhile: the limit, not the load, set the pace

    assert any(re.match(r"verdict: \d of 3 goals met.*; every request answered as expected$", line) for line in lines), output
    [summary] = [line for line in lines if line.startswith("summary: ")]
    assert re.search(r" failed=0 goals=light:(met|MISSED),throughput:(met|MISSED),limit:(met|MISSED)$", summary), summary
