"""``t2i-register``: add, remove or list the orchestrators in a registry (a file or Redis)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import RegistrySettings, normalize_url
from .registry import RegistryError, deregister, read_registry, register


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="t2i-register", description="Edit a gateway's orchestrator registry.")
    parser.add_argument(
        "--registry", required=True, help="a registry file (created if missing) or redis://[user:password@]host:6379/0 (rediss:// for TLS)"
    )
    parser.add_argument("--registry-prefix", default="t2i", help="key prefix in a Redis registry (default: t2i)")
    parser.add_argument("--registry-password-file", type=Path, help="file holding the Redis password (or set T2I_REGISTRY_PASSWORD)")
    parser.add_argument("--registry-ca", type=Path, help="CA certificate (PEM) for a rediss:// registry (default: the system's)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("url", nargs="?", help="orchestrator URL to add (or refresh)")
    group.add_argument("--remove", metavar="URL", help="orchestrator URL to remove")
    group.add_argument("--list", action="store_true", help="print the registered orchestrators")
    parser.add_argument(
        "--heartbeat",
        action="store_true",
        help="the entry goes stale unless refreshed (nodes do this themselves); without it the entry is static and never goes stale",
    )
    parser.add_argument("--ttl", type=float, default=30.0, help="with --heartbeat, seconds a Redis registry keeps the entry (default 30)")
    args = parser.parse_args(argv)
    try:
        password = os.environ.get("T2I_REGISTRY_PASSWORD")
        if args.registry_password_file:
            password = args.registry_password_file.read_text().splitlines()[0].strip()
        settings = RegistrySettings(args.registry, args.registry_prefix, password or None, args.registry_ca)
        run = _redis if settings.is_redis else _file
        for line in run(settings, args):
            print(line)
    except (RegistryError, ValueError, OSError, IndexError) as exc:
        sys.exit(f"t2i-register: {exc}")


def _file(settings: RegistrySettings, args: argparse.Namespace) -> list[str]:
    path = Path(settings.location)
    if args.list:
        now = time.time()
        return [
            f"{entry.url}\t{'static' if entry.heartbeat is None else f'heartbeat {now - entry.heartbeat:.0f}s ago'}"
            for entry in read_registry(path)
        ]
    if args.remove:
        if not deregister(path, args.remove):
            raise ValueError(f"{args.remove} is not in {path}")
        return [f"removed {normalize_url(args.remove)}"]
    return [f"registered {register(path, args.url, heartbeat=args.heartbeat)}"]


def _redis(settings: RegistrySettings, args: argparse.Namespace) -> list[str]:
    from redis.exceptions import RedisError

    from .redis_registry import RedisRegistry, redacted

    async def run() -> list[str]:
        registry = RedisRegistry(settings)
        try:
            if args.list:
                now, entries, reports = await registry.read()
                return [
                    f"{url}\t{'static' if math.isinf(expiry) else f'expires in {expiry - now:.0f}s'}\t{_status(reports.get(url))}"
                    for url, expiry in sorted(entries.items())
                ]
            if args.remove:
                url = normalize_url(args.remove)
                if not await registry.leave(url):
                    raise ValueError(f"{url} is not in {redacted(settings.location)}")
                return [f"removed {url}"]
            url = normalize_url(args.url)
            await registry.heartbeat(url, args.ttl if args.heartbeat else None)
            return [f"registered {url}"]
        except RedisError as exc:
            raise OSError(f"registry {redacted(settings.location)}: {exc}") from None
        finally:
            await registry.close()

    return asyncio.run(run())


def _status(report: str | None) -> str:
    """The status in a node's report (ready, loading, draining), for ``--list``."""
    if report is None:
        return "no report"
    try:
        return str(json.loads(report)["status"])
    except (ValueError, KeyError, TypeError):
        return "unreadable report"
