"""Generated images on disk: written off the event loop, served by unguessable ids, swept after a TTL.

Layout: ``<root>/<id>/<name>.<format>`` where ``id`` (one per request) and ``name`` (one per image) are
random hex strings, and the format is png, jpeg or webp. Because images live on disk, they survive a
restart of the node until they expire.
Earlier versions wrote to ``<root>/<port>/<id>/``: the sweep empties and removes those folders too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import aiofiles
import aiofiles.os

from t2i_common import IMAGE_FORMATS, IMAGE_ID_PATTERN, IMAGE_NAME_PATTERN
from t2i_common.errors import BadRequest

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

_IMAGE_ID = re.compile(IMAGE_ID_PATTERN)
_IMAGE_NAME = re.compile(IMAGE_NAME_PATTERN)


# zlib level 2: 3.7x to 4.5x less CPU than Pillow's default level 6 on photographs, for 8% (512x512) and
# 11% (1024x1024) more bytes (bench.encoding, BENCHMARKS.md). Level 1 costs about the same, but one
# photograph grows by 16% there.
PNG_COMPRESS_LEVEL = 2
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encodable_formats() -> frozenset[str]:
    """The formats this node's Pillow can write (WebP needs libwebp, which a Pillow build may lack)."""
    from PIL import features

    return frozenset(fmt for fmt in IMAGE_FORMATS if fmt == "png" or features.check({"jpeg": "jpg", "webp": "webp"}[fmt]))


def _write_image(picture: Image, folder: Path, name: str, fmt: str, quality: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)  # here, on the image's own thread: one hand-off per image, not two
    # Under a temporary name, then renamed: a reader never sees half a file.
    partial = folder / f".{name}.partial"
    options = {"compress_level": PNG_COMPRESS_LEVEL} if fmt == "png" else {"quality": quality}
    picture.save(partial, format=_PILLOW_FORMATS[fmt], **options)
    os.replace(partial, folder / f"{name}.{fmt}")


class ImageStore:
    def __init__(self, root: Path, ttl_s: float) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.formats = encodable_formats()

    def check_format(self, fmt: str) -> None:
        """A 400 for a format this node cannot write: before the request waits for the device."""
        if fmt not in self.formats:
            raise BadRequest(
                f"This orchestrator cannot write {fmt} images (its Pillow lacks it); ask for {' or '.join(sorted(self.formats))}."
            )

    async def save(self, pictures: Sequence[Image], fmt: str = "png", quality: int = 90) -> tuple[str, list[str]]:
        """Encode one request's pictures (``quality``: JPEG's and WebP's) and write them; its id and each
        image's name, in order.

        Each image in a thread of its own: off the event loop, and off the device thread, which starts
        the next job meanwhile (PNG encoding takes 47 ms of a 121 ms sd-turbo request on an H200).
        Pillow lets go of the GIL while it compresses.
        """
        image_id = secrets.token_hex(16)
        folder = self.root / image_id
        names = [secrets.token_hex(8) for _ in pictures]
        await asyncio.gather(
            *(asyncio.to_thread(_write_image, picture, folder, name, fmt, quality) for picture, name in zip(pictures, names))
        )
        return image_id, names

    async def find(self, image_id: str, name: str, fmt: str) -> Path | None:
        """The file of a stored, unexpired image, else None. Ids are checked, never joined blindly."""
        if not (_IMAGE_ID.fullmatch(image_id) and _IMAGE_NAME.fullmatch(name) and fmt in IMAGE_FORMATS):
            return None
        path = self.root / image_id / f"{name}.{fmt}"
        try:
            stat = await aiofiles.os.stat(path)
        except OSError:
            return None
        return path if time.time() - stat.st_mtime < self.ttl_s else None

    async def sweep(self) -> int:
        """Delete the folders of requests older than the TTL; returns how many were deleted."""
        return await asyncio.to_thread(self._sweep)

    def _sweep(self, folder: Path | None = None) -> int:
        deadline = time.time() - self.ttl_s
        removed = 0
        try:
            entries = list(os.scandir(folder or self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if folder is None and entry.name.isdigit() and entry.is_dir(follow_symlinks=False):
                removed += self._sweep(Path(entry.path))  # an earlier version's per-port folder
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)  # only once empty
                continue
            if not (_IMAGE_ID.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue  # not ours: never delete what this store did not write
            try:
                # A folder is only as old as its newest image: nothing younger than the TTL goes.
                newest = max((f.stat().st_mtime for f in os.scandir(entry.path)), default=entry.stat().st_mtime)
                if newest < deadline:
                    shutil.rmtree(entry.path)
                    removed += 1
            except OSError as exc:
                logger.warning("could not sweep %s: %s", entry.path, exc)
        return removed
