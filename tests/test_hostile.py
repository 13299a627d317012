"""Faults, load and hostile input against the real daemons: the fuzzer, the fault suite, backpressure.

The fault suite and the backpressure run are the scripts under ``bench/``, run in full here; they
print their figures (shown with ``pytest -s``) and these tests check them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .fakes import FakeOrchestrator
from .helpers import MakeClient, MakeGateway
from .processes import blockbuster_env, start, wait_healthy

pytestmark = pytest.mark.slow


def run_bench(module: str, *args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", module, "--json", *args], capture_output=True, text=True, timeout=400, env=blockbuster_env()
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(module, json.dumps(figures, indent=1))
    assert done.returncode == 0, (figures, done.stderr[-3000:])
    return figures


def test_fault_suite_loses_no_request(model_cache: Path) -> None:
    figures = run_bench("bench.fault_suite", "--requests", "200", "--concurrency", "8", "--cache-dir", str(model_cache))
    assert figures["sent"] == figures["succeeded"] == 200 and figures["failed"] == 0
    assert figures["retried"] > 0  # the faults really were met, and absorbed
    assert figures["hang_detected"] == 1 and figures["served_while_hung"] > 0  # hung past every timeout, served around


def test_backpressure_refuses_quickly_with_bounded_memory(model_cache: Path) -> None:
    figures = run_bench("bench.backpressure", "--clients", "2000", "--cache-dir", str(model_cache))
    assert figures["accepted_200"] >= 1
    assert figures["accepted_200"] + figures["refused_503"] == 2000 and figures["refusals_without_retry_after"] == 0
    assert figures["gateway_peak_rss_mib"] < 400


def test_fuzzing_the_public_api_finds_nothing(tmp_path: Path) -> None:
    node = start("bench.fake_node", ["--behaviour", "ok"], tmp_path)
    gateway = start("t2i_gateway", ["--orchestrator", node.url], tmp_path)
    try:
        wait_healthy(gateway)
        # Every check but one: a schema-valid request may still be refused for rules that JSON Schema
        # cannot say (a model no node offers, the width x height x images budget, the loras string's JSON).
        done = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{gateway.url}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "60",
                "--seed",
                "1",
                "--no-color",
                "--continue-on-failure",
                "--request-timeout",
                "10",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout[-5000:]
        assert "No issues found" in done.stdout
        assert "unhandled error" not in gateway.log.read_text()  # our middleware logs every 500 so
    finally:
        gateway.stop()
        node.stop()


DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


async def test_json_nested_too_deeply_is_a_400_on_both_daemons(make_client: MakeClient, make_gateway: MakeGateway) -> None:
    node = await make_client()
    gateway = await make_gateway(FakeOrchestrator())
    for client in (node, gateway.client):
        response = await client.post("/text-to-image", data=DEEP, headers={"Content-Type": "application/json"})
        assert response.status == 400 and "nested too deeply" in (await response.json())["detail"]["msg"]
        loras = json.dumps({"prompt": "a", "loras": "[" * 100_000 + "]" * 100_000})
        response = await client.post("/text-to-image", data=loras, headers={"Content-Type": "application/json"})
        assert response.status == 422 and (await response.json())["detail"][0]["loc"] == ["body", "loras"]
