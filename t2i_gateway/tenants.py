"""Tenants: who a request comes from, by its API key, and what that key may do.

The keys file (``--keys-file``, TOML) names each key and its limits; it holds the SHA-256 of each
secret, never the secret, so that it can be read by more people than the keys (an API key is a long
random string: a fast hash cannot be reversed by guessing)::

    [[keys]]
    name = "acme"                       # in metrics, logs and usage; letters, digits, '.', '_', '-'
    sha256 = "9f86d081884c7d65..."      # of the secret: t2i-gateway-key NAME makes both
    requests_per_minute = 600           # each limit is optional: none, no limit
    images_per_minute = 1200
    megapixel_steps_per_minute = 40000  # width x height / 1e6 x steps x images: the unit of work
    concurrent = 16                     # requests at once
    models = ["t2i/tiny-sd"]            # the models it may use (default: every model)
    weight = 2                          # its share of the wait queue against other keys' (default 1)
    admin = true                        # may read GET /admin/usage

``--api-key`` and ``--api-keys-file`` (one secret per line) keep working: each such key is a tenant of
its own, named ``key-`` and the first 8 hex digits of its secret's hash, without limits. With no key at
all, every request is the one tenant ``anonymous``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import re
import secrets
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .limits import Quota

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
HEX64 = re.compile(r"[0-9a-f]{64}")
WATCH_S = 1.0  # how often the files are checked for a change
MAX_KEYS = 10_000  # a keys file is the operator's; bounded all the same (metrics are labelled by name)
_FIELDS = {
    "name",
    "sha256",
    "requests_per_minute",
    "images_per_minute",
    "megapixel_steps_per_minute",
    "concurrent",
    "models",
    "weight",
    "admin",
}


class KeysError(Exception):
    """A keys file that cannot be used; the message says where and what to fix."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    quota: Quota = field(default_factory=Quota)
    models: frozenset[str] | None = None  # None: every model
    weight: float = 1.0
    admin: bool = False

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


ANONYMOUS = Tenant("anonymous")


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """The keys the gateway accepts now (replaced whole when a file is reloaded)."""

    by_hash: dict[str, Tenant]

    @property
    def required(self) -> bool:
        return bool(self.by_hash)

    def tenant_for(self, authorization: str) -> Tenant | None:
        """The tenant of an ``Authorization: Bearer <key>`` header; None when it names no key of ours.

        Looked up by the key's hash: timing can tell at most how much of a hash matched, which says
        nothing of a secret that hashes to it."""
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        return self.by_hash.get(secret_hash(key.strip()))

    def names(self) -> list[str]:
        return sorted({tenant.name for tenant in self.by_hash.values()})


def read_keys(api_keys: Iterable[str], plain_file: Path | None, keys_file: Path | None) -> KeyRing:
    """The keys of ``--api-key``, ``--api-keys-file`` and ``--keys-file`` (blocking: files are read);
    KeysError when a file cannot be read or is not valid."""
    plain = list(api_keys)
    if plain_file is not None:
        plain += [
            line.strip() for line in _read(plain_file, "--api-keys-file").splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    by_hash = {}
    for secret in plain:
        digest = secret_hash(secret)
        by_hash[digest] = Tenant(f"key-{digest[:8]}")
    if keys_file is not None:
        for digest, tenant in _parse_keys(keys_file, _read(keys_file, "--keys-file")).items():
            if digest in by_hash:
                raise KeysError(f"--keys-file {keys_file}: key {tenant.name!r} has the same secret as another key")
            by_hash[digest] = tenant
    return KeyRing(by_hash)


class KeyFiles:
    """The keys now in force: read at start, and read again when a file changes or on ``reload()``
    (``SIGHUP``). A file that turns invalid keeps the keys in force (and says why in the log): a typo
    never locks every client out. Requests in flight keep the tenant they came in with."""

    def __init__(self, api_keys: Iterable[str], plain_file: Path | None, keys_file: Path | None) -> None:
        """Blocking (files are read): see ``open``."""
        self._api_keys = tuple(api_keys)
        self._files = tuple(path for path in (plain_file, keys_file) if path is not None)
        self._plain_file, self._keys_file = plain_file, keys_file
        self._stamps = self._stamp()
        self.ring = read_keys(self._api_keys, plain_file, keys_file)
        self._reload = asyncio.Event()
        self.reloads = 0  # the key rings taken since start

    @classmethod
    async def open(cls, api_keys: Iterable[str], plain_file: Path | None, keys_file: Path | None) -> KeyFiles:
        """Read in a thread, off the event loop."""
        return await asyncio.to_thread(cls, api_keys, plain_file, keys_file)

    def reload(self) -> None:
        """Read the files again now (``SIGHUP``)."""
        self._reload.set()

    async def watch(self) -> None:
        """Until cancelled: reload on request, or when a file's size, time or inode changed."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_S):
                    await self._reload.wait()
            asked = self._reload.is_set()
            self._reload.clear()
            await asyncio.to_thread(self._check, asked)

    def _check(self, asked: bool) -> None:  # in a thread: files are read
        stamps = self._stamp()
        if not asked and stamps == self._stamps:
            return
        self._stamps = stamps
        try:
            ring = read_keys(self._api_keys, self._plain_file, self._keys_file)
        except KeysError as exc:
            logger.error("keys not reloaded, the %d key(s) in force stay: %s", len(self.ring.by_hash), exc)
            return
        self.ring = ring  # one assignment: a request sees the old ring or the new one, whole
        self.reloads += 1
        logger.info("keys reloaded: %d key(s) of %d tenant(s)", len(ring.by_hash), len(ring.names()))

    def _stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._files:
            try:
                stat = path.stat()
                stamps.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)


def _read(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysError(f"{option}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _parse_keys(path: Path, text: str) -> dict[str, Tenant]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysError(f"--keys-file {path}: not valid TOML: {exc}") from None
    entries = document.get("keys", [])
    if set(document) - {"keys"} or not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise KeysError(f"--keys-file {path}: expected [[keys]] tables only (see the README's 'Keys, limits and usage')")
    if len(entries) > MAX_KEYS:
        raise KeysError(f"--keys-file {path}: {len(entries)} keys; at most {MAX_KEYS}")
    by_hash: dict[str, Tenant] = {}
    names: set[str] = set()
    for number, entry in enumerate(entries, 1):
        try:
            digest, tenant = _tenant(entry)
        except ValueError as exc:
            raise KeysError(f"--keys-file {path}: key {number} ({entry.get('name', 'no name')!r}): {exc}") from None
        if tenant.name in names or digest in by_hash:
            what = "name" if tenant.name in names else "sha256"
            raise KeysError(f"--keys-file {path}: key {number} ({tenant.name!r}): its {what} is another key's too")
        names.add(tenant.name)
        by_hash[digest] = tenant
    return by_hash


def _tenant(entry: dict[str, Any]) -> tuple[str, Tenant]:
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_FIELDS))}")
    name, digest = entry.get("name"), entry.get("sha256")
    if not isinstance(name, str) or not NAME.fullmatch(name) or name == ANONYMOUS.name:
        raise ValueError("name must be 1 to 64 letters, digits, '.', '_' or '-' (and not 'anonymous')")
    if not isinstance(digest, str) or not HEX64.fullmatch(digest.lower()):
        raise ValueError("sha256 must be the 64 hex digits of the secret's SHA-256 (t2i-gateway-key makes it)")
    models = entry.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
        raise ValueError("models must be a list of model ids")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError("admin must be true or false")
    quota = Quota(
        requests_per_minute=_positive(entry, "requests_per_minute", int),
        images_per_minute=_positive(entry, "images_per_minute", int),
        mpx_steps_per_minute=_positive(entry, "megapixel_steps_per_minute", float),
        concurrent=_positive(entry, "concurrent", int),
    )
    weight = _positive(entry, "weight", float) or 1.0
    return digest.lower(), Tenant(name, quota, frozenset(models) if models is not None else None, weight, admin)


def _positive(entry: dict[str, Any], name: str, kind: type[int] | type[float]) -> Any:
    value = entry.get(name)
    if value is None:
        return None
    numeric = isinstance(value, int) or (kind is float and isinstance(value, float))
    if isinstance(value, bool) or not numeric or not math.isfinite(value) or value <= 0 or value > 1e12:
        raise ValueError(f"{name} must be a positive {'whole ' if kind is int else ''}number, got {value!r}")
    return kind(value)


def main(argv: list[str] | None = None) -> None:
    """``t2i-gateway-key NAME``: a new secret, and the keys-file entry that holds its hash."""
    parser = argparse.ArgumentParser(prog="t2i-gateway-key", description="Make an API key: its secret, and its entry for --keys-file.")
    parser.add_argument("name", help="the key's name (letters, digits, '.', '_', '-')")
    args = parser.parse_args(argv)
    if not NAME.fullmatch(args.name) or args.name == ANONYMOUS.name:
        parser.error("the name must be 1 to 64 letters, digits, '.', '_' or '-' (and not 'anonymous')")
    secret = "t2i-" + secrets.token_urlsafe(32)
    print(f"# the secret, for the key's holder alone (it is shown once):\n# {secret}")
    print(f'[[keys]]\nname = "{args.name}"\nsha256 = "{secret_hash(secret)}"')
