"""Finding the LoRAs a request names, before it is queued: never on the device thread.

A LoRA is a name in the node's ``--lora-dir`` or a Hugging Face repository id. Which repositories
a node may use is the operator's choice (``--lora-hub``): ``off``; ``cached`` (the default: those
already in the Hugging Face cache, never a download); ``on`` (any, downloaded on first use); or a
comma-separated list of repository patterns such as ``nerijs/*,ByteDance/Hyper-SD``, downloaded on
first use. A repository over ``--lora-max-mb`` (everything a download would take counted) or slower
than ``--lora-fetch-timeout`` is a 400 that says so; the download takes exactly the revision whose
size was checked. Downloads run in threads of their own, at most ``DOWNLOADS_AT_ONCE`` at a time and
``MAX_PENDING_DOWNLOADS`` waiting (beyond, a 503: another node may have it), so that local LoRAs are
never stuck behind them; concurrent requests for one repository share one download, and the node's
shutdown does not wait for one. What this node downloaded is kept to ``--lora-cache-mb``, the least
recently used removed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from t2i_common.errors import BadRequest, ServiceUnavailable

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_WEIGHTS = ("*.safetensors", "*.json")  # LoRAs are loaded from safetensors only, never from pickles
DOWNLOADS_AT_ONCE = 2
MAX_PENDING_DOWNLOADS = 16
T = TypeVar("T")


def _is_repo_id(lora_id: str) -> bool:
    """A Hugging Face repository id by the hub's own rules (which are stricter than "name/name")."""
    try:
        validate_repo_id(lora_id)
    except HFValidationError:
        return False
    return bool(_REPO_ID.fullmatch(lora_id))


def _downloaded(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in _WEIGHTS)


class LoraHub(Protocol):
    """The Hugging Face Hub as this module needs it; blocking calls, run off the event loop."""

    def cached(self, repo_id: str) -> Path | None: ...

    def size(self, repo_id: str) -> tuple[int, str]:
        """Bytes of the files a download takes, and the revision (commit) they were counted at; raises
        ``LookupError`` when there is no such repository."""
        ...

    def download(self, repo_id: str, revision: str) -> Path: ...

    def delete(self, repo_id: str, revision: str) -> None:
        """Remove that revision from the cache (it may be gone already)."""
        ...


class HuggingFaceHub:
    """The real hub, through ``huggingface_hub``; what it downloads lands in the usual cache."""

    def cached(self, repo_id: str) -> Path | None:
        from .model_files import cached_snapshot

        folder = cached_snapshot(repo_id)
        return folder if folder and any(folder.glob("*.safetensors")) else None

    def size(self, repo_id: str) -> tuple[int, str]:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            info = HfApi().model_info(repo_id, files_metadata=True)
        except RepositoryNotFoundError as exc:
            raise LookupError(repo_id) from exc
        return sum(f.size or 0 for f in info.siblings or () if _downloaded(f.rfilename)), str(info.sha)

    def download(self, repo_id: str, revision: str) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(_WEIGHTS)))

    def delete(self, repo_id: str, revision: str) -> None:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
        revisions = [r.commit_hash for repo in cache.repos if repo.repo_id == repo_id for r in repo.revisions if r.commit_hash == revision]
        if revisions:
            cache.delete_revisions(*revisions).execute()


async def _in_daemon_thread(call: Callable[[], T]) -> T:
    """``call()`` in a thread of its own that the process's exit does not wait for (a download may
    take minutes; a node that is told to stop should not)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            outcome: tuple[bool, object] = (True, call())
        except BaseException as exc:  # handed to the awaiting task
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, *outcome)

    threading.Thread(target=run, name="t2i-lora-download", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[T], ok: bool, outcome: object) -> None:
    if future.done():  # its waiter has gone
        return
    if ok:
        future.set_result(outcome)  # type: ignore[arg-type]
    else:
        future.set_exception(outcome)  # type: ignore[arg-type]


class LoraFetcher:
    def __init__(
        self,
        lora_dir: Path | None,
        *,
        hub_policy: str = "cached",
        max_bytes: int = 512 * 2**20,
        cache_bytes: int = 4 * 2**30,
        timeout_s: float = 120.0,
        hub: LoraHub | None = None,
    ) -> None:
        self._lora_dir = lora_dir  # resolved where it is looked at, off the loop
        self._policy = hub_policy
        self._patterns = [] if hub_policy in ("off", "cached", "on") else [p.strip() for p in hub_policy.split(",") if p.strip()]
        self._max_bytes = max_bytes
        self._cache_bytes = cache_bytes
        self._timeout_s = timeout_s
        self._hub = hub or HuggingFaceHub()
        self._fetching: dict[str, asyncio.Future[Path]] = {}
        self._download_slots = asyncio.Semaphore(DOWNLOADS_AT_ONCE)
        # What this node downloaded, least recently used first: repo id -> (revision, bytes).
        self._downloaded: OrderedDict[str, tuple[str, int]] = OrderedDict()
        # Local look-ups (quick disk reads) in their own threads: never behind a download.
        self._lookups = ThreadPoolExecutor(max_workers=2, thread_name_prefix="t2i-lora-lookup")

    async def resolve(self, loras: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        """The request's LoRAs as local folders (a 400 naming the LoRA for any that cannot be had)."""
        return tuple([(str(await self._folder(lora_id)), weight) for lora_id, weight in loras])

    def close(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)

    def _local(self, lora_id: str) -> Path | None:
        """The LoRA's folder in ``--lora-dir`` (never outside it), or None. Looks at the disk: off the loop."""
        if self._lora_dir is None:
            return None
        root = self._lora_dir.resolve()
        try:
            candidate = (root / lora_id).resolve()
            if candidate.is_relative_to(root) and candidate != root and candidate.is_dir():
                return candidate
        except (OSError, ValueError):  # a name no file can have (a NUL byte, too long): not a local LoRA
            pass
        return None

    async def _folder(self, lora_id: str) -> Path:
        loop = asyncio.get_running_loop()
        local = await loop.run_in_executor(self._lookups, self._local, lora_id)
        if local is not None:
            return local
        if not _is_repo_id(lora_id):
            raise BadRequest(f"LoRA {lora_id!r} could not be loaded: it is not in this node's LoRA folder nor a Hugging Face repo id.")
        if self._policy == "off":
            raise BadRequest(f"LoRA {lora_id!r} could not be loaded: this node takes LoRAs from its own folder only (--lora-hub off).")
        if self._patterns and not any(fnmatch.fnmatchcase(lora_id, pattern) for pattern in self._patterns):
            raise BadRequest(
                f"LoRA {lora_id!r} could not be loaded: this node allows only Hugging Face LoRAs matching {', '.join(self._patterns)}."
            )
        cached = await loop.run_in_executor(self._lookups, self._hub.cached, lora_id)
        if cached:
            if lora_id in self._downloaded:
                self._downloaded.move_to_end(lora_id)  # used: the last to be removed
            return cached
        if self._policy == "cached":
            raise BadRequest(
                f"LoRA {lora_id!r} could not be loaded: it is not in this node's Hugging Face cache, "
                "and this node does not download LoRAs (--lora-hub cached)."
            )
        fetch = self._fetching.get(lora_id)
        if fetch is None:  # the first request for it starts the one download; the others wait on it
            if len(self._fetching) >= MAX_PENDING_DOWNLOADS:
                raise ServiceUnavailable(f"This node is downloading {len(self._fetching)} LoRAs already; retry shortly.", retry_after=5)
            fetch = self._fetching[lora_id] = asyncio.ensure_future(self._download(lora_id))
            fetch.add_done_callback(lambda _: self._fetching.pop(lora_id, None))
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.shield(fetch)
        except TimeoutError:
            raise BadRequest(
                f"LoRA {lora_id!r} could not be loaded: downloading it took longer than {self._timeout_s:g} s "
                "(it goes on in the background; retry later)."
            ) from None

    async def _download(self, lora_id: str) -> Path:
        async with self._download_slots:
            try:
                size, revision = await _in_daemon_thread(lambda: self._hub.size(lora_id))
            except LookupError:
                raise BadRequest(f"LoRA {lora_id!r} could not be loaded: there is no such repository on the Hugging Face Hub.") from None
            except OSError as exc:
                raise BadRequest(f"LoRA {lora_id!r} could not be loaded: the Hugging Face Hub cannot be reached ({exc}).") from None
            if size > self._max_bytes:
                raise BadRequest(
                    f"LoRA {lora_id!r} could not be loaded: its weights are {size / 2**20:.0f} MB, over this node's limit of "
                    f"{self._max_bytes / 2**20:.0f} MB (--lora-max-mb)."
                )
            if size == 0:
                raise BadRequest(f"LoRA {lora_id!r} could not be loaded: the repository holds no .safetensors weights.")
            try:
                folder = await _in_daemon_thread(lambda: self._hub.download(lora_id, revision))  # the revision measured
            except OSError as exc:
                raise BadRequest(f"LoRA {lora_id!r} could not be loaded: downloading it failed ({exc}).") from None
        self._downloaded[lora_id] = (revision, size)
        await self._evict(keep=lora_id)
        return folder

    async def _evict(self, *, keep: str) -> None:
        """Remove what this node downloaded, least recently used first, until it fits --lora-cache-mb."""
        while sum(size for _, size in self._downloaded.values()) > self._cache_bytes:
            oldest = next(iter(self._downloaded))
            if oldest == keep:
                return  # the one just fetched is kept, whatever its size
            revision, _ = self._downloaded.pop(oldest)
            logger.info("LoRA cache over --lora-cache-mb: removing %s (least recently used)", oldest)
            try:
                await asyncio.get_running_loop().run_in_executor(self._lookups, self._hub.delete, oldest, revision)
            except OSError as exc:
                logger.warning("could not remove LoRA %s from the cache: %s", oldest, exc)
