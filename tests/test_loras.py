"""Finding a request's LoRAs before it is queued: the node's folder, the hub cache, downloads (with a fake hub)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from t2i_common.errors import BadRequest
from t2i_orchestrator.loras import LoraFetcher


class FakeHub:
    """A fake Hugging Face Hub: repositories with sizes; downloads wait on ``gate`` and are counted."""

    def __init__(self, root: Path, sizes: dict[str, int]) -> None:
        self.root = root
        self.sizes = sizes
        self.in_cache: set[str] = set()
        self.downloads: list[str] = []
        self.revisions: list[str] = []  # the revision each download asked for
        self.deleted: list[tuple[str, str]] = []
        self.head = "rev-1"  # the repositories' current revision
        self.gate = threading.Event()
        self.gate.set()
        self._started = threading.Condition()  # notified as each download starts

    async def started(self, count: int = 1) -> None:
        """Until ``count`` downloads have started (they run in threads of their own)."""

        def wait() -> None:
            with self._started:
                self._started.wait_for(lambda: len(self.downloads) >= count)

        await asyncio.to_thread(wait)

    def cached(self, repo_id: str) -> Path | None:
        return self.root / repo_id if repo_id in self.in_cache else None

    def size(self, repo_id: str) -> tuple[int, str]:
        if repo_id not in self.sizes:
            raise LookupError(repo_id)
        return self.sizes[repo_id], self.head

    def download(self, repo_id: str, revision: str) -> Path:
        with self._started:
            self.downloads.append(repo_id)
            self._started.notify_all()
        self.revisions.append(revision)
        self.gate.wait(10)
        self.in_cache.add(repo_id)
        return self.root / repo_id

    def delete(self, repo_id: str, revision: str) -> None:
        self.deleted.append((repo_id, revision))
        self.in_cache.discard(repo_id)


@pytest.fixture
def hub(tmp_path: Path) -> FakeHub:
    return FakeHub(tmp_path / "hub", {"nerijs/pixel-art-xl": 2**20, "big/lora": 600 * 2**20})


def fetcher(hub: FakeHub, lora_dir: Path | None = None, **settings: object) -> LoraFetcher:
    return LoraFetcher(lora_dir, hub=hub, **settings)  # type: ignore[arg-type]


async def test_a_name_in_the_lora_folder_is_that_folder(tmp_path: Path, hub: FakeHub) -> None:
    (tmp_path / "loras" / "style").mkdir(parents=True)
    resolved = await fetcher(hub, tmp_path / "loras", hub_policy="off").resolve((("style", 0.5),))
    assert resolved == ((str((tmp_path / "loras" / "style").resolve()), 0.5),)


# A NUL byte (no file can have it) and ids the hub itself rejects ("--", "..", a leading "-", ".git").
@pytest.mark.parametrize("lora_id", ["missing-style", "../loras", "/etc", "a/../../b", "a\x00b", "a/b..c", "a--b/c", "-a/b", "a/b.git"])
async def test_names_outside_the_folder_or_not_repo_ids_are_refused(tmp_path: Path, hub: FakeHub, lora_id: str) -> None:
    (tmp_path / "loras").mkdir()
    with pytest.raises(BadRequest, match="could not be loaded") as caught:
        await fetcher(hub, tmp_path / "loras", hub_policy="on").resolve(((lora_id, 1.0),))
    assert repr(lora_id) in caught.value.message
    assert hub.downloads == []


async def test_by_default_only_loras_already_in_the_cache_are_used(hub: FakeHub) -> None:
    with pytest.raises(BadRequest, match="not in this node's Hugging Face cache.*--lora-hub cached"):
        await fetcher(hub).resolve((("nerijs/pixel-art-xl", 1.0),))
    hub.in_cache.add("nerijs/pixel-art-xl")
    [(folder, _)] = await fetcher(hub).resolve((("nerijs/pixel-art-xl", 1.0),))
    assert folder == str(hub.root / "nerijs/pixel-art-xl") and hub.downloads == []


async def test_off_refuses_every_hub_repository(hub: FakeHub) -> None:
    hub.in_cache.add("nerijs/pixel-art-xl")
    with pytest.raises(BadRequest, match="--lora-hub off"):
        await fetcher(hub, hub_policy="off").resolve((("nerijs/pixel-art-xl", 1.0),))


async def test_an_allow_list_downloads_only_matching_repositories(hub: FakeHub) -> None:
    allow = fetcher(hub, hub_policy="nerijs/*, someone/one")
    await allow.resolve((("nerijs/pixel-art-xl", 1.0),))
    with pytest.raises(BadRequest, match="matching nerijs/\\*, someone/one"):
        await allow.resolve((("big/lora", 1.0),))
    assert hub.downloads == ["nerijs/pixel-art-xl"]


async def test_concurrent_requests_for_one_lora_download_it_once(hub: FakeHub) -> None:
    hub.gate.clear()
    loras = fetcher(hub, hub_policy="on")
    waiting = [asyncio.create_task(loras.resolve((("nerijs/pixel-art-xl", 1.0),))) for _ in range(5)]
    await hub.started()  # the others join it, or find it in the cache once it is done
    hub.gate.set()
    results = await asyncio.gather(*waiting)
    assert len(set(results)) == 1 and hub.downloads == ["nerijs/pixel-art-xl"]
    await loras.resolve((("nerijs/pixel-art-xl", 1.0),))  # now cached
    assert hub.downloads == ["nerijs/pixel-art-xl"]


async def test_a_download_does_not_block_the_event_loop(hub: FakeHub) -> None:
    hub.gate.clear()
    loras = fetcher(hub, hub_policy="on")
    download = asyncio.create_task(loras.resolve((("nerijs/pixel-art-xl", 1.0),)))
    ticks = 0
    while not hub.downloads or ticks < 10:  # the loop keeps turning while the download waits
        await asyncio.sleep(0.005)
        ticks += 1
    hub.gate.set()
    await download


async def test_a_lora_over_the_size_limit_is_a_400_that_says_so(hub: FakeHub) -> None:
    with pytest.raises(BadRequest, match="600 MB, over this node's limit of 512 MB"):
        await fetcher(hub, hub_policy="on").resolve((("big/lora", 1.0),))
    assert hub.downloads == []


async def test_a_repository_that_does_not_exist_is_a_400(hub: FakeHub) -> None:
    with pytest.raises(BadRequest, match="no such repository"):
        await fetcher(hub, hub_policy="on").resolve((("nobody/nothing", 1.0),))


async def test_a_slow_download_is_a_400_and_goes_on_in_the_background(hub: FakeHub) -> None:
    hub.gate.clear()
    loras = fetcher(hub, hub_policy="on", timeout_s=0.1)
    with pytest.raises(BadRequest, match="took longer than 0.1 s"):
        await loras.resolve((("nerijs/pixel-art-xl", 1.0),))
    hub.gate.set()
    for _ in range(500):  # the download finishes into the cache; the next request finds it there
        if "nerijs/pixel-art-xl" in hub.in_cache:
            break
        await asyncio.sleep(0.01)
    await loras.resolve((("nerijs/pixel-art-xl", 1.0),))
    assert hub.downloads == ["nerijs/pixel-art-xl"]


async def test_the_revision_whose_size_was_checked_is_the_one_downloaded(hub: FakeHub) -> None:
    hub.gate.clear()
    loras = fetcher(hub, hub_policy="on")
    fetching = asyncio.create_task(loras.resolve((("nerijs/pixel-art-xl", 1.0),)))
    await hub.started()
    hub.head = "rev-2-much-larger"  # the repository moves on between the size check and the download
    hub.gate.set()
    await fetching
    assert hub.revisions == ["rev-1"]


def test_the_size_counts_every_file_a_download_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import huggingface_hub

    from t2i_orchestrator.loras import HuggingFaceHub

    files = [("lora.safetensors", 100), ("adapter_config.json", 7 * 2**20), ("model.bin", 10**9), ("README.md", 50)]
    info = SimpleNamespace(sha="abc123", siblings=[SimpleNamespace(rfilename=name, size=size) for name, size in files])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, files_metadata: info)
    assert HuggingFaceHub().size("someone/lora") == (100 + 7 * 2**20, "abc123")  # a large .json counts; the pickle is never taken


async def test_what_the_node_downloaded_is_kept_to_its_cache_size_least_recently_used_first(hub: FakeHub) -> None:
    hub.sizes = {"a/one": 2**20, "b/two": 2**20, "c/three": 2**20}
    loras = fetcher(hub, hub_policy="on", cache_bytes=int(2.5 * 2**20))
    for repo in ("a/one", "b/two"):
        await loras.resolve(((repo, 1.0),))
    await loras.resolve((("a/one", 1.0),))  # used again: b/two is now the least recently used
    await loras.resolve((("c/three", 1.0),))
    assert hub.deleted == [("b/two", "rev-1")] and hub.in_cache == {"a/one", "c/three"}


async def test_local_loras_are_never_stuck_behind_downloads_and_downloads_are_bounded(tmp_path: Path, hub: FakeHub) -> None:
    import threading

    from t2i_common.errors import ServiceUnavailable
    from t2i_orchestrator.loras import DOWNLOADS_AT_ONCE, MAX_PENDING_DOWNLOADS

    (tmp_path / "loras" / "style").mkdir(parents=True)
    hub.sizes = {f"user/lora-{i}": 2**20 for i in range(MAX_PENDING_DOWNLOADS + 1)}
    hub.gate.clear()  # every download hangs
    loras = fetcher(hub, tmp_path / "loras", hub_policy="on")
    pending = [asyncio.create_task(loras.resolve(((f"user/lora-{i}", 1.0),))) for i in range(MAX_PENDING_DOWNLOADS)]
    await hub.started(DOWNLOADS_AT_ONCE)
    assert await loras.resolve((("style", 0.5),)) == ((str((tmp_path / "loras" / "style").resolve()), 0.5),)
    with pytest.raises(ServiceUnavailable, match="downloading 16 LoRAs already"):
        await loras.resolve(((f"user/lora-{MAX_PENDING_DOWNLOADS}", 1.0),))
    assert len(hub.downloads) == DOWNLOADS_AT_ONCE  # at most this many at a time
    assert all(thread.daemon for thread in threading.enumerate() if thread.name == "t2i-lora-download")  # exit never waits
    hub.gate.set()
    await asyncio.gather(*pending)
    assert len(hub.downloads) == MAX_PENDING_DOWNLOADS
