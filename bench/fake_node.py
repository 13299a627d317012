"""A fake orchestrator, named as such, for the fault suite and the fuzz test. It advertises the demo
model with plenty of capacity, so a gateway sends it work. With ``--behaviour garbage`` it answers in
turn with malformed JSON, wrong types, a truncated body or a 500; with ``ok`` it answers at once with
well-formed images (a tiny fixed PNG), so that a gateway can be fuzzed without generating anything.

    python -m bench.fake_node --port 9999 --behaviour garbage
"""

from __future__ import annotations

import argparse
import base64
import itertools
import secrets

from aiohttp import web

MODES = ("malformed", "wrong_types", "truncated", "error")
# A 1x1 PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def create_app(behaviour: str) -> web.Application:
    modes = itertools.cycle(MODES)

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
            base, seed = f"http://{request.host}", body.get("seed") or 0
            images = [
                {"url": f"{base}/stream/{secrets.token_hex(16)}/{secrets.token_hex(8)}.png", "seed": seed + i, "nsfw": False}
                for i in range(body.get("num_images_per_prompt", 1))
            ]
            return web.json_response({"images": images})
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
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/capabilities", capabilities)
    app.router.add_post("/text-to-image", text_to_image)
    app.router.add_get("/stream/{id}/{name}.png", stream)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--behaviour", choices=("garbage", "ok"), default="garbage")
    args = parser.parse_args()
    web.run_app(create_app(args.behaviour), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
