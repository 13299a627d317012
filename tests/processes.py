"""Starting the real daemons as processes on loopback, for end-to-end tests (on ``bench.common``'s helpers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import Process as Daemon
from bench.common import free_port, launch

__all__ = ["PRODUCT", "STARTED", "Daemon", "blockbuster_env", "free_port", "run_bench", "start", "wait_for_line", "wait_healthy"]

# The project's own packages, checked by blockbuster in the tests and in the daemons they start: file
# I/O, time.sleep or a blocking lock called from them on a running event loop fails the test (as
# aiohttp's own suite does for aiohttp). Executor threads have no running loop, so the blocking work
# that belongs there passes.
PRODUCT = ["t2i_common", "t2i_gateway", "t2i_orchestrator", "t2i_cli", "discovery", "metrics"]
BLOCKBUSTER_SITE = Path(__file__).parent / "blockbuster_site"
ROOT = Path(__file__).resolve().parent.parent
STARTED: list[Daemon] = []  # every daemon started, whose log the blockbuster fixture reads after each test


def start(module: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> Daemon:
    """``python -m module args`` on loopback, with blockbuster on in it (see ``blockbuster_site``)."""
    port = port or free_port()
    daemon = launch(["-m", module, *args], log_dir, f"{module}-{port}", {**blockbuster_env(), **(env or {})}, port)
    STARTED.append(daemon)
    return daemon


def blockbuster_env() -> dict[str, str]:
    """The environment that turns blockbuster on in a process the tests start, and in the daemons it
    starts in turn (a bench's, which then exits 1 on a blocking call: ``bench.common.BLOCKED``)."""
    path = os.pathsep.join(filter(None, [str(BLOCKBUSTER_SITE), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "T2I_BLOCKBUSTER": ",".join(PRODUCT)}


def wait_healthy(daemon: Daemon, timeout: float = 90, path: str = "/health") -> None:
    """Until ``GET path`` answers 200 (``/health``: ready; another path: listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{daemon.url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    daemon.stop()
    raise AssertionError(f"{daemon.url} did not become healthy:\n{daemon.log.read_text()[-3000:]}")


def wait_for_line(daemon: Daemon, text: str) -> str:
    """The first line of the daemon's log that holds ``text``, read as it is written (``tail -F``
    follows the file), once it is there."""
    with subprocess.Popen(["tail", "-n", "+1", "-F", str(daemon.log)], stdout=subprocess.PIPE, text=True) as tail:
        try:
            for line in tail.stdout or ():
                if text in line:
                    return line
        finally:
            tail.kill()
    raise AssertionError(f"{daemon.log} ended without {text!r}")


def run_bench(*args: str, timeout: float) -> list[str]:
    """``python -m <args>`` from the project's root, with blockbuster on; its output's lines, once it exited 0."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=blockbuster_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()
