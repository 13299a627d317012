"""Starting the real daemons as processes on loopback, for end-to-end tests (on ``bench.common``'s helpers)."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from bench.common import Process as Daemon
from bench.common import free_port, launch

__all__ = ["STARTED", "Daemon", "free_port", "start", "wait_healthy"]

BLOCKBUSTER_SITE = Path(__file__).parent / "blockbuster_site"
STARTED: list[Daemon] = []  # every daemon started, whose log the blockbuster fixture reads after each test


def start(module: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> Daemon:
    """``python -m module args`` on loopback, with blockbuster on in it (see ``blockbuster_site``)."""
    port = port or free_port()
    path = os.pathsep.join(filter(None, [str(BLOCKBUSTER_SITE), os.environ.get("PYTHONPATH")]))
    daemon = launch(["-m", module, *args], log_dir, f"{module}-{port}", {"PYTHONPATH": path, **(env or {})}, port)
    STARTED.append(daemon)
    return daemon


def wait_healthy(daemon: Daemon, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{daemon.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    daemon.stop()
    raise AssertionError(f"{daemon.url} did not become healthy:\n{daemon.log.read_text()[-3000:]}")
