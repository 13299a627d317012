"""How the gateway finds orchestrators: one small interface, several backends.

A backend keeps a current set of ``Endpoint``s. The gateway calls ``refresh()`` from a background
task and reads ``snapshot()`` whenever it needs the set; handlers never wait on discovery.

- ``StaticDiscovery``: a fixed list (``--orchestrator URL``, repeatable).
- ``RegistryFileDiscovery``: a JSON registry file that nodes add themselves to (``registry.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One orchestrator, by its base URL (``http(s)://host:port``, no trailing slash)."""

    url: str
    secret: str | None = None  # its own bearer secret; None: the gateway's --orchestrator-secret


class Discovery(Protocol):
    def snapshot(self) -> tuple[Endpoint, ...]:
        """The endpoints known now; cheap and non-blocking."""
        ...

    async def refresh(self) -> bool:
        """Look for changes; True when the set changed."""
        ...


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

    async def refresh(self) -> bool:
        return False


class CombinedDiscovery:
    """Several backends as one (e.g. a static list plus a registry file)."""

    def __init__(self, backends: Iterable[Discovery]) -> None:
        self._backends = tuple(backends)

    def snapshot(self) -> tuple[Endpoint, ...]:
        return tuple(dict.fromkeys(e for backend in self._backends for e in backend.snapshot()))

    async def refresh(self) -> bool:
        changed = [await backend.refresh() for backend in self._backends]
        return any(changed)
