"""The registry file: t2i-register, concurrent writers, a gateway following it, bad files, stale heartbeats."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from discovery import Endpoint, RegistrySettings
from discovery.registry import RegistryError, RegistryFileDiscovery, parse_registry, read_registry, register
from metrics import GatewayMetrics
from t2i_gateway.app import POOL, create_app
from t2i_gateway.config import GatewayConfig

from .fakes import FakeOrchestrator
from .helpers import BODY, wait_until


def t2i_register(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from discovery.cli import main; main()", *args], capture_output=True, text=True, timeout=30
    )


def test_register_list_and_remove_from_the_command_line(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    assert t2i_register("--registry", str(registry), "http://10.0.0.5:8936/").returncode == 0
    assert t2i_register("--registry", str(registry), "--heartbeat", "https://node-2:8936").returncode == 0
    listing = t2i_register("--registry", str(registry), "--list")
    static, fresh = listing.stdout.splitlines()
    assert static == "http://10.0.0.5:8936\tstatic" and re.fullmatch(r"https://node-2:8936\theartbeat \d+s ago", fresh)
    assert t2i_register("--registry", str(registry), "--remove", "http://10.0.0.5:8936").returncode == 0
    assert [entry.url for entry in read_registry(registry)] == ["https://node-2:8936"]
    missing = t2i_register("--registry", str(registry), "--remove", "http://10.0.0.5:8936")
    assert missing.returncode != 0 and "not in" in missing.stderr
    bad = t2i_register("--registry", str(registry), "ftp://node")
    assert bad.returncode != 0 and "http(s)" in bad.stderr


def _register_many(args: tuple[str, int]) -> None:
    path, worker = args
    for i in range(15):
        register(Path(path), f"http://10.{worker}.0.{i}:8936", heartbeat=True)


def test_concurrent_registrations_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    with ProcessPoolExecutor(max_workers=6) as pool:
        list(pool.map(_register_many, [(str(registry), worker) for worker in range(6)]))
    assert len(read_registry(registry)) == 6 * 15


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", '"orchestrators"'),
        ('{"orchestrators": [{"url": 5}]}', "string 'url'"),
        ('{"orchestrators": [{"url": "gopher://x"}]}', r"http\(s\)"),
        ('{"orchestrators": [{"url": "http://x:99999"}]}', "port"),
        ('{"orchestrators": [{"url": "http://x"}, {"url": "http://x/"}]}', "twice"),
        ('{"orchestrators": [{"url": "http://x", "weight": 2}]}', "unknown key"),
        ('{"orchestrators": [{"url": "http://x", "heartbeat": "now"}]}', "heartbeat"),
        ('{"orchestrators": [], "extra": 1}', '"orchestrators"'),
    ],
)
def test_bad_registry_files_are_rejected_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        parse_registry(text)


async def test_corrupt_file_keeps_the_last_good_set_and_counts_it(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    await asyncio.to_thread(register, registry, "http://127.0.0.1:1", heartbeat=False)  # off the loop, as nodes do
    errors: list[str] = []
    discovery = RegistryFileDiscovery(registry, on_error=errors.append)
    assert await discovery.refresh() is True
    registry.write_text('{"orchestrators": [{"url": "http://127.0.0.1:2"')  # half written
    assert await discovery.refresh() is False
    assert await discovery.refresh() is False
    assert discovery.snapshot() == (Endpoint("http://127.0.0.1:1"),)
    assert len(errors) == 1 and "keeping the last good set" in errors[0]
    registry.write_text(json.dumps({"orchestrators": [{"url": "http://127.0.0.1:2"}]}))
    assert await discovery.refresh() is True
    assert discovery.snapshot() == (Endpoint("http://127.0.0.1:2"),)


async def test_stale_heartbeats_are_ignored(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    registry.write_text(
        json.dumps(
            {
                "orchestrators": [
                    {"url": "http://fresh:1", "heartbeat": time.time()},
                    {"url": "http://stale:1", "heartbeat": time.time() - 120},
                    {"url": "http://static:1"},
                ]
            }
        )
    )
    discovery = RegistryFileDiscovery(registry, heartbeat_ttl_s=30)
    await discovery.refresh()
    assert [e.url for e in discovery.snapshot()] == ["http://fresh:1", "http://static:1"]
    discovery.heartbeat_ttl_s = 1e-6  # as if time had passed without the file changing: the fresh one is stale
    assert await discovery.refresh() is True
    assert [e.url for e in discovery.snapshot()] == ["http://static:1"]


async def test_gateway_follows_the_registry_without_a_restart(tmp_path: Path, aiohttp_client: Any, aiohttp_server: Any) -> None:
    first, second = FakeOrchestrator(), FakeOrchestrator()
    servers = [await aiohttp_server(first.app()), await aiohttp_server(second.app())]
    urls = [str(server.make_url("")).rstrip("/") for server in servers]
    registry = tmp_path / "registry.json"
    metrics = GatewayMetrics(CollectorRegistry())
    discovery = RegistryFileDiscovery(registry, on_error=lambda _: metrics.registry_errors.inc())
    app = create_app(GatewayConfig(registry=RegistrySettings(str(registry))), discovery=discovery, stream_secret=b"k", metrics_=metrics)
    client = await aiohttp_client(app)
    pool = app[POOL]
    assert (await client.get("/health")).status == 503

    await asyncio.to_thread(register, registry, urls[0], heartbeat=True)
    await wait_until(lambda: len(pool.healthy()) == 1)
    assert (await client.post("/text-to-image", json=BODY)).status == 200
    await asyncio.to_thread(register, registry, urls[1], heartbeat=True)
    await wait_until(lambda: len(pool.healthy()) == 2)
    registry.write_text("garbage")
    await wait_until(lambda: metrics.registry.get_sample_value("t2i_gateway_registry_errors_total") == 1)
    assert len(pool.nodes) == 2  # the last good set stays
    registry.write_text(json.dumps({"orchestrators": [{"url": urls[1]}]}))
    await wait_until(lambda: list(pool.nodes) == [urls[1]])
    before = len(first.requests)
    for _ in range(3):
        assert (await client.post("/text-to-image", json=BODY)).status == 200
    assert len(first.requests) == before and len(second.requests) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["t2i_gateway", "--registry", "{bad}"], "not valid JSON"),
        (["t2i_gateway"], "nothing to route to"),
        (["t2i_gateway", "--orchestrator", "file:///etc/passwd"], "http(s)"),
        (["t2i_orchestrator", "--models", "{bad}"], "not valid JSON"),
        (["t2i_orchestrator", "--models", "{missing}"], "cannot read"),
        (["t2i_orchestrator", "--register", "{bad}"], "--advertise-url"),
    ],
)
def test_bad_files_and_flags_stop_the_daemons_at_start_with_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"orchestrators": [')
    argv = [arg.replace("{bad}", str(bad)).replace("{missing}", str(tmp_path / "missing.json")) for arg in args]
    done = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_the_daemons_that_tests_start_fail_on_a_blocking_call(tmp_path: Path) -> None:
    """The end-to-end tests' daemons run with blockbuster (tests/processes.py): a file read on the loop raises."""
    from .processes import BLOCKBUSTER_SITE, PRODUCT

    registry = tmp_path / "registry.json"
    register(registry, "http://127.0.0.1:1", heartbeat=False)
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from discovery.registry import read_registry\n"
        "async def main():\n"
        "    await asyncio.to_thread(read_registry, Path(sys.argv[1]))  # off the loop: fine\n"
        "    try:\n"
        "        read_registry(Path(sys.argv[1]))  # on it: raises...\n"
        "    except Exception:\n"
        "        pass  # ...and a handler that swallows it does not hide it\n"
        "    read_registry(Path(sys.argv[1]))\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(registry)],
        env={**os.environ, "PYTHONPATH": str(BLOCKBUSTER_SITE), "T2I_BLOCKBUSTER": ",".join(PRODUCT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "BlockingError: Blocking call to io.TextIOWrapper.read" in result.stderr, result.stderr
    assert result.stderr.count("(announced as raised)") == 2  # the swallowed one too


def test_a_bench_whose_daemon_blocked_its_loop_exits_1(tmp_path: Path) -> None:
    """The daemons a bench starts run with blockbuster too, when the tests run the bench: a blocking call
    in one fails the bench, whatever its figures (``bench.common.BLOCKED``)."""
    from .processes import blockbuster_env

    registry = tmp_path / "registry.json"
    register(registry, "http://127.0.0.1:1", heartbeat=False)
    daemon = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from discovery.registry import read_registry\n"
        "async def main():\n"
        "    try:\n"
        f"        read_registry(Path({str(registry)!r}))  # on the loop\n"
        "    except Exception:\n"
        "        pass\n"
        "asyncio.run(main())\n"
    )
    bench = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bench.common import launch\n"
        f"daemon = launch(['-c', {daemon!r}], Path({str(tmp_path)!r}), 'daemon')\n"
        "daemon.process.wait(60)  # it has run its course\n"
        "daemon.stop()\n"
        "print('figures: all fine')\n"
    )
    result = subprocess.run([sys.executable, "-c", bench], env=blockbuster_env(), capture_output=True, text=True, timeout=60)
    assert "figures: all fine" in result.stdout
    assert result.returncode == 1 and "a blocking call on a daemon's event loop" in result.stderr, result.stderr
