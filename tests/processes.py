"""Starting the real daemons as processes on loopback, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start(module: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> Daemon:
    port = port or free_port()
    log = log_dir / f"{module}-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--port", str(port), *args],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    return Daemon(process, f"http://127.0.0.1:{port}", log)


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
