"""Starting the real daemons as processes on loopback, for end-to-end tests (on ``bench.common``'s helpers)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from bench.common import Process as Daemon
from bench.common import free_port, launch

__all__ = ["Daemon", "free_port", "start", "wait_healthy"]


def start(module: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> Daemon:
    port = port or free_port()
    return launch(["-m", module, *args], log_dir, f"{module}-{port}", env, port)


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
