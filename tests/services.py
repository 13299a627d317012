"""Real services for tests, started on loopback in a temporary folder: a Redis server and a throwaway CA."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.common import RedisServer

from .helpers import tool


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


__all__ = ["RedisServer", "TLSFiles", "make_ca"]
