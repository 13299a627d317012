"""A fake orchestrator, named as such, for the fault suite, the fuzz test and the benches. It advertises
the demo model with plenty of capacity, so a gateway sends it work. With ``--behaviour garbage`` it
answers in turn with malformed JSON, wrong types, a truncated body or a 500; with ``ok`` it answers
with well-formed images, so that a gateway can be fuzzed or measured without generating anything.

With ``ok``, what the images are (``--images``):

- ``tiny`` (the default): every image url serves the same 1x1 image, whatever the size asked for, in
  the format asked for (``output_format``: a PNG, or a JPEG or WebP made with Pillow when first asked for);
- ``photo``: a real PNG of the width and height asked for: scikit-image's ``astronaut`` photograph
  resized with Pillow's LANCZOS, encoded at the node's own PNG level (``t2i_orchestrator.storage``),
  once per size: those of ``--image-sizes`` at start-up, any other on its first request (in a thread).
  Its urls are the node's form (``/stream/<32 hex>/<16 hex>.png``; the id carries the size, so that
  ``/stream`` serves the bytes of that size). A gateway that checks the image header against the size
  asked for accepts them, as it would a real node's. PNG only: another ``output_format`` is answered 400.

``--delay-ms`` emulates the GPU's generation time: the answer to ``POST /text-to-image`` comes that
many milliseconds after the request (an ``asyncio.sleep``: requests at once overlap, as if the device
had room for all of them). One number for every size, or per size: ``512x512=80,1024x1024=200,0``
(a bare number is for the sizes not listed).

    python -m bench.fake_node --port 9999 --behaviour garbage
    python -m bench.fake_node --port 9999 --behaviour ok --images photo --image-sizes 512x512 --delay-ms 512x512=80
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import secrets
from collections.abc import Iterable

from aiohttp import web

from t2i_common import FORMAT_PATTERN, IMAGE_FORMATS

MODES = ("malformed", "wrong_types", "truncated", "error")
# A 1x1 PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
IMAGES = ("tiny", "photo")

Size = tuple[int, int]


def parse_size(text: str) -> Size:
    """``WxH`` (or one number for a square) as (width, height)."""
    width, _, height = text.strip().lower().partition("x")
    size = (int(width), int(height or width))
    if min(size) < 1:
        raise ValueError(f"not a size: {text!r}")
    return size


def parse_delays(text: str) -> dict[Size | None, float]:
    """``80`` or ``512x512=80,1024x1024=200,0`` as seconds by size (None: the sizes not listed)."""
    delays: dict[Size | None, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        size, _, ms = item.rpartition("=")
        seconds = float(ms) / 1000
        if seconds < 0:
            raise ValueError(f"a negative delay: {item!r}")
        delays[parse_size(size) if size else None] = seconds
    return delays


def photo_png(size: Size) -> bytes:
    """The ``photo`` image of ``size``, as the node would write it (blocking: a few tens of ms at 1024x1024)."""
    import skimage.data
    from PIL import Image

    from t2i_orchestrator.storage import PNG_COMPRESS_LEVEL

    picture = Image.fromarray(skimage.data.astronaut()).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def tiny_image(fmt: str) -> bytes:
    """A 1x1 image in ``fmt``: the PNG above, or one made with Pillow (blocking, a few ms, once per format)."""
    if fmt == "png":
        return PNG
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (128, 128, 128)).save(buffer, format=fmt.upper())
    return buffer.getvalue()


def image_id(size: Size) -> str:
    """An image id of the node's form (32 hex) that says the size: 8 hex each, then 16 random."""
    return f"{size[0]:08x}{size[1]:08x}{secrets.token_hex(8)}"


def create_app(
    behaviour: str, images: str = "tiny", sizes: Iterable[Size] = (), delays: dict[Size | None, float] | None = None
) -> web.Application:
    modes = itertools.cycle(MODES)
    delays = delays or {}
    photos = {size: photo_png(size) for size in sizes} if images == "photo" else {}
    encoding: dict[Size, asyncio.Task[bytes]] = {}  # sizes first asked for while running
    tiny: dict[str, bytes] = {"png": PNG}  # by format

    async def photo(size: Size) -> bytes:
        if size not in photos:
            if size not in encoding:
                encoding[size] = asyncio.ensure_future(asyncio.to_thread(photo_png, size))
            photos[size] = await asyncio.shield(encoding[size])
        return photos[size]

    async def capabilities(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "node_id": "garbage",
                "version": "0",
                "device": "none",
                "status": "ready",
                "capacity": 64,
                "in_flight": 0,
                "queued": 0,
                "models": [{"model_id": "t2i/tiny-sd", "pipeline": "text-to-image", "warm": True, "loaded": True}],
            }
        )

    async def text_to_image(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if behaviour == "ok":
            size = (int(body.get("width") or 512), int(body.get("height") or 512))
            fmt = body.get("output_format") or "png"
            if fmt not in IMAGE_FORMATS or (images == "photo" and fmt != "png"):
                return web.json_response({"detail": {"msg": f"the fake node does not write {fmt!r} images"}}, status=400)
            delay = delays.get(size, delays.get(None, 0.0))
            if delay:
                await asyncio.sleep(delay)
            if images == "photo":
                await photo(size)  # before the answer: its urls serve at once
            base, seed = f"http://{request.host}", body.get("seed") or 0
            answer = [
                {
                    "url": f"{base}/stream/{image_id(size) if images == 'photo' else secrets.token_hex(16)}/{secrets.token_hex(8)}.{fmt}",
                    "seed": seed + i,
                    "nsfw": False,
                }
                for i in range(body.get("num_images_per_prompt", 1))
            ]
            return web.json_response({"images": answer})
        mode = next(modes)
        if mode == "malformed":
            return web.Response(text='{"images": [{"url": "http://x/stream/a/b.png", "seed": 1', content_type="application/json")
        if mode == "wrong_types":
            return web.json_response({"images": [{"url": 12, "seed": "seven", "nsfw": "maybe"}]})
        if mode == "truncated":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = 4096
            await response.prepare(request)
            await response.write(b'{"images": [{"url": "http://')
            assert request.transport is not None
            request.transport.close()
            return response
        return web.json_response({"detail": {"msg": "garbage node error"}}, status=500)

    async def stream(request: web.Request) -> web.Response:
        fmt = request.match_info["format"]
        if images == "tiny":
            if fmt not in tiny:
                tiny[fmt] = tiny_image(fmt)
            return web.Response(body=tiny[fmt], content_type=IMAGE_FORMATS[fmt])
        image = request.match_info["id"]
        try:
            size = (int(image[:8], 16), int(image[8:16], 16))
        except ValueError:
            raise web.HTTPNotFound() from None
        if len(image) != 32 or size not in photos or fmt != "png":
            raise web.HTTPNotFound()
        return web.Response(body=photos[size], content_type="image/png")

    app = web.Application()
    app.router.add_get("/capabilities", capabilities)
    app.router.add_post("/text-to-image", text_to_image)
    app.router.add_get(f"/stream/{{id}}/{{name}}.{{format:{FORMAT_PATTERN}}}", stream)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--behaviour", choices=("garbage", "ok"), default="garbage")
    parser.add_argument(
        "--images", choices=IMAGES, default="tiny", help="with ok: a 1x1 PNG for every image, or a photo of the size asked for"
    )
    parser.add_argument("--image-sizes", default="", help="with --images photo: sizes encoded at start-up, e.g. 512x512,1024x1024")
    parser.add_argument("--delay-ms", default="0", help="with ok: emulated generation time, e.g. 80 or 512x512=80,1024x1024=200,0")
    args = parser.parse_args()
    try:
        sizes = [parse_size(size) for size in args.image_sizes.split(",") if size.strip()]
        delays = parse_delays(args.delay_ms)
    except ValueError as exc:
        parser.error(str(exc))
    app = create_app(args.behaviour, args.images, sizes, delays)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
