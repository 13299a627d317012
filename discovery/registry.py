"""The registry file: a JSON list of orchestrators that nodes add themselves to.

Format: ``{"orchestrators": [{"url": "http://10.0.0.5:8936", "heartbeat": 1764000000.0}]}``. An entry
without ``heartbeat`` never goes stale (a hand-written, static entry). Writers take an exclusive lock
on ``<file>.lock`` and replace the file atomically, so concurrent registrations lose nothing and a
reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import Endpoint, normalize_url

logger = logging.getLogger(__name__)


class RegistryError(Exception):
    """The registry file cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Registration:
    url: str
    heartbeat: float | None = None  # seconds since the epoch; None: static, never stale


def parse_registry(text: str) -> list[Registration]:
    """Parse and check a registry file's text; RegistryError names the first problem."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RegistryError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"orchestrators"} or not isinstance(data["orchestrators"], list):
        raise RegistryError('must be an object with one key, "orchestrators", holding a list')
    entries: dict[str, Registration] = {}
    for index, entry in enumerate(data["orchestrators"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise RegistryError(f"entry {index} must be an object with a string 'url'")
        unknown = set(entry) - {"url", "heartbeat"}
        if unknown:
            raise RegistryError(f"entry {index} has unknown key(s) {', '.join(sorted(unknown))}")
        heartbeat = entry.get("heartbeat")
        if heartbeat is not None and (isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float))):
            raise RegistryError(f"entry {index}: 'heartbeat' must be a number of seconds since the epoch")
        try:
            url = normalize_url(entry["url"])
        except ValueError as exc:
            raise RegistryError(f"entry {index}: {exc}") from None
        if url in entries:
            raise RegistryError(f"entry {index}: {url} is listed twice")
        entries[url] = Registration(url, None if heartbeat is None else float(heartbeat))
    return list(entries.values())


def read_registry(path: Path) -> list[Registration]:
    """The file's entries; a missing file is an empty registry."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror}") from None
    return parse_registry(text)


def _as_dict(entry: Registration) -> dict[str, Any]:
    return {"url": entry.url} | ({"heartbeat": entry.heartbeat} if entry.heartbeat is not None else {})


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _update(path: Path, change: Callable[[dict[str, Registration]], None]) -> None:
    with _locked(path):
        entries = {entry.url: entry for entry in read_registry(path)}
        change(entries)
        payload = {"orchestrators": [_as_dict(entry) for entry in entries.values()]}
        fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(payload, out, indent=2)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(staging, 0o644)
            os.replace(staging, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise


def register(path: Path, url: str, *, heartbeat: bool) -> str:
    """Add or refresh ``url``; with ``heartbeat`` False the entry is static (never stale)."""
    url = normalize_url(url)
    stamp = time.time() if heartbeat else None
    _update(path, lambda entries: entries.__setitem__(url, Registration(url, stamp)))
    return url


def deregister(path: Path, url: str) -> bool:
    """Remove ``url``; False if it was not there."""
    url = normalize_url(url)
    found = False

    def remove(entries: dict[str, Registration]) -> None:
        nonlocal found
        found = entries.pop(url, None) is not None

    _update(path, remove)
    return found


class RegistryFileDiscovery:
    """Orchestrators from a registry file, re-read when it changes.

    A malformed or half-written file keeps the last good set; the error is logged and passed to
    ``on_error`` (the gateway counts it in a metric). Entries whose heartbeat is older than
    ``heartbeat_ttl_s`` are left out.
    """

    def __init__(self, path: Path, *, heartbeat_ttl_s: float = 30.0, on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._on_error = on_error
        self._entries: list[Registration] = []
        self._signature: tuple[int, int, int] | None = None
        self._bad_signature: tuple[int, int, int] | None = None
        self._current: tuple[Endpoint, ...] = ()

    def snapshot(self) -> tuple[Endpoint, ...]:
        return self._current

    def take_reports(self) -> dict[str, dict[str, Any]]:
        return {}  # the file holds urls only: gateways probe its nodes

    def problem(self) -> str | None:
        return None  # a file that cannot be read keeps the last good set, and is counted and logged

    async def close(self) -> None:
        pass

    async def refresh(self) -> bool:
        signature = await asyncio.to_thread(self._signature_now)
        if signature != self._signature:
            try:
                entries = await asyncio.to_thread(read_registry, self.path)
            except RegistryError as exc:
                message = f"registry file {self.path}: {exc}; keeping the last good set of {len(self._entries)}"
                if signature != self._bad_signature:  # each bad version of the file is reported once
                    logger.error("%s", message)
                    if self._on_error:
                        self._on_error(message)
                self._bad_signature = signature
                return self._recompute()
            self._entries = entries
            self._signature = signature
        return self._recompute()

    def _signature_now(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _recompute(self) -> bool:
        """Apply the heartbeat TTL (time moves even when the file does not)."""
        oldest = time.time() - self.heartbeat_ttl_s
        current = tuple(Endpoint(e.url) for e in self._entries if e.heartbeat is None or e.heartbeat >= oldest)
        changed = current != self._current
        self._current = current
        return changed


class RegistryFileRegistrar:
    """A node's membership of a registry file (the writes run off the event loop)."""

    def __init__(self, path: Path, url: str) -> None:
        self.where = str(path)
        self._path = path
        self._url = url

    async def heartbeat(self, report: dict[str, Any], *, changed: bool) -> None:
        await asyncio.to_thread(register, self._path, self._url, heartbeat=True)  # the file keeps no report

    async def deregister(self) -> None:
        await asyncio.to_thread(deregister, self._path, self._url)

    async def close(self) -> None:
        pass
