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
        self.gate = threading.Event()
        self.gate.set()

    def cached(self, repo_id: str) -> Path | None:
        return self.root / repo_id if repo_id in self.in_cache else None

    def size(self, repo_id: str) -> int:
        if repo_id not in self.sizes:
            raise LookupError(repo_id)
        return self.sizes[repo_id]

    def download(self, repo_id: str) -> Path:
        self.downloads.append(repo_id)
        self.gate.wait(10)
        self.in_cache.add(repo_id)
        return self.root / repo_id


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
    await asyncio.sleep(0.05)
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
