"""How the gateway finds orchestrators: one small interface, several backends.

A backend keeps a current set of ``Endpoint``s. The gateway calls ``refresh()`` from a background
task and reads ``snapshot()`` whenever it needs the set; handlers never wait on discovery. A backend
whose nodes publish reports of themselves (Redis) also hands those on (``take_reports()``), and the
gateway then need not probe those nodes while it does not use them.

- ``StaticDiscovery``: a fixed list (``--orchestrator URL``, repeatable).
- ``RegistryFileDiscovery``: a JSON registry file that nodes add themselves to (``registry.py``).
- ``RedisDiscovery``: a Redis registry shared by a fleet's gateways and nodes (``redis_registry.py``).

Nodes join a registry through a ``Registrar``; ``open_discovery`` and ``open_registrar`` pick the
backend from the registry's location: a ``redis://`` or ``rediss://`` URL, else a file path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from t2i_common.config import ConfigError, read_secret

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One orchestrator, by its base URL (``http(s)://host:port``, no trailing slash)."""

    url: str
    secret: str | None = None  # its own bearer secret; None: the gateway's --orchestrator-secret


class Discovery(Protocol):
    def snapshot(self) -> tuple[Endpoint, ...]:
        """The endpoints known now; cheap and non-blocking."""
        ...

    def take_reports(self) -> dict[str, dict[str, Any]]:
        """The reports nodes published of themselves (the body of their ``/capabilities``), by url, that
        arrived since the last call; cheap and non-blocking. Empty from a backend that carries none."""
        ...

    async def refresh(self) -> bool:
        """Look for changes; True when the set changed."""
        ...

    def problem(self) -> str | None:
        """What keeps it from following its source now (for ``/health`` and a metric); None: nothing."""
        ...

    async def close(self) -> None: ...


class Registrar(Protocol):
    """A node's membership of a registry."""

    where: str  # the registry, for logs (no password)

    async def heartbeat(self, report: dict[str, Any], *, changed: bool) -> None:
        """Join, or say it is still alive. ``report`` is what the node offers now (the body of its
        ``/capabilities``); ``changed``: the offer differs from the last heartbeat's by more than its
        load. A registry that passes reports on to gateways announces a changed one at once."""
        ...

    async def deregister(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    location: str  # a registry file's path, or redis://[user:password@]host:port/db (rediss:// for TLS)
    prefix: str = "t2i"
    password: str | None = None
    ca: Path | None = None

    @property
    def is_redis(self) -> bool:
        return self.location.startswith(("redis://", "rediss://"))


def registry_settings(values: dict[str, Any], name: str) -> RegistrySettings | None:
    """The settings of ``--<name>`` (``--registry``, ``--register``, ``--limits-redis``) and the ``--registry-*`` options."""
    location = values[name.replace("-", "_")]
    if not location:
        return None
    if location.startswith(("redis://", "rediss://")):
        try:
            parts = urlsplit(location)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ConfigError(f"--{name}: {exc}") from None
        if not parts.hostname:
            raise ConfigError(f"--{name}: a Redis URL needs a host, as in redis://host:6379/0")
    elif "://" in location:
        raise ConfigError(f"--{name}: {location!r} is neither a file path nor a redis:// or rediss:// URL")
    ca = values["registry_ca"]
    if ca and not ca.is_file():
        raise ConfigError(f"--registry-ca: {ca} is not a file")
    return RegistrySettings(location, values["registry_prefix"], read_secret(values, "registry-password"), ca)


def open_discovery(settings: RegistrySettings, *, heartbeat_ttl_s: float, on_error: Callable[[str], None] | None = None) -> Discovery:
    if settings.is_redis:
        from .redis_registry import RedisDiscovery

        return RedisDiscovery(settings, outage_grace_s=heartbeat_ttl_s, on_error=on_error)
    from .registry import RegistryFileDiscovery

    return RegistryFileDiscovery(Path(settings.location), heartbeat_ttl_s=heartbeat_ttl_s, on_error=on_error)


def open_registrar(settings: RegistrySettings, url: str, *, heartbeat_ttl_s: float) -> Registrar:
    if settings.is_redis:
        from .redis_registry import RedisRegistrar

        return RedisRegistrar(settings, url, ttl_s=heartbeat_ttl_s)
    from .registry import RegistryFileRegistrar

    return RegistryFileRegistrar(Path(settings.location), url)


def normalize_url(url: str) -> str:
    """Check an orchestrator URL and return it without a trailing slash; ValueError if unusable."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"orchestrator URL must be http(s)://host[:port], got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"orchestrator URL must not carry a query, fragment or credentials, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError(f"orchestrator URL has an invalid port: {url!r}") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")


class StaticDiscovery:
    """A fixed set of orchestrators."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self._endpoints = tuple(dict.fromkeys(endpoints))

    def snapshot(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def take_reports(self) -> dict[str, dict[str, Any]]:
        return {}

    async def refresh(self) -> bool:
        return False

    def problem(self) -> str | None:
        return None

    async def close(self) -> None:
        pass


class CombinedDiscovery:
    """Several backends as one (e.g. a static list plus a registry)."""

    def __init__(self, backends: Iterable[Discovery]) -> None:
        self._backends = tuple(backends)

    def snapshot(self) -> tuple[Endpoint, ...]:
        return tuple(dict.fromkeys(e for backend in self._backends for e in backend.snapshot()))

    def take_reports(self) -> dict[str, dict[str, Any]]:
        return {url: report for backend in self._backends for url, report in backend.take_reports().items()}

    async def refresh(self) -> bool:
        # Side by side, and one backend's failure does not keep the others from refreshing.
        results = await asyncio.gather(*(backend.refresh() for backend in self._backends), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.error("discovery refresh failed; keeping that backend's last set: %s", result)
        return any(result is True for result in results)

    def problem(self) -> str | None:
        return "; ".join(filter(None, (backend.problem() for backend in self._backends))) or None

    async def close(self) -> None:
        await asyncio.gather(*(backend.close() for backend in self._backends), return_exceptions=True)
