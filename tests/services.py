"""Real services for tests, started on loopback in a temporary folder: a Redis server and a throwaway CA."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import tool
from .processes import free_port


@dataclass
class TLSFiles:
    ca: Path  # the throwaway CA's certificate: what clients are told to trust
    cert: Path  # a server certificate for 127.0.0.1 (and localhost), signed by that CA
    key: Path


def make_ca(folder: Path, name: str = "test") -> TLSFiles:
    """A CA made for this test, and a server certificate it signed, with openssl."""
    openssl = tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / f"{name}-{part}.pem" for part in ("ca-key", "ca", "key", "csr", "cert"))
    run = lambda *args: subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", f"/CN={name} test CA")
    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    extensions = folder / f"{name}-san.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1", "-extfile", extensions)
    return TLSFiles(ca, cert, key)


class RedisServer:
    """``redis-server`` on a loopback port, without persistence: a restart comes back empty."""

    def __init__(self, folder: Path, *, password: str | None = None, tls: TLSFiles | None = None) -> None:
        self.folder = folder
        self.password = password
        self.tls = tls
        self.port = 0
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on the same port as before, or a free one; a port taken meanwhile by another process is
        seen in the server's log and another is tried (no time-based guess)."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is missing: .ci/run installs it (apt-get install redis-server)")
        for _ in range(5):
            self.port = self.port or free_port()
            self.starts += 1
            log = self.folder / f"redis-{self.port}-{self.starts}.log"  # a fresh log: "Ready" means this start
            args = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.folder), "--logfile", str(log)]
            if self.password:
                args += ["--requirepass", self.password]
            if self.tls:
                args += [
                    "--port",
                    "0",
                    "--tls-port",
                    str(self.port),
                    "--tls-cert-file",
                    str(self.tls.cert),
                    "--tls-key-file",
                    str(self.tls.key),
                    "--tls-ca-cert-file",
                    str(self.tls.ca),
                    "--tls-auth-clients",
                    "no",
                ]
            else:
                args += ["--port", str(self.port)]
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            if self._wait_ready(log):
                return
            self.port = 0
        raise AssertionError(f"redis-server did not start:\n{log.read_text()[-2000:]}")

    def _wait_ready(self, log: Path) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = log.read_text() if log.exists() else ""
            if "Ready to accept connections" in text:
                return True
            if self.process.poll() is not None or "Address already in use" in text:
                self.process.wait()
                return False
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not start in 30 s:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
