"""A minimal aiohttp proxy for ``POST /text-to-image``: the floor for any Python proxy (bench.gateway_overhead).

It parses the JSON body, forwards it to one node over one keep-alive ``ClientSession``, rewrites the
image urls in the answer to its own host and returns it. No validation, routing, retries or metrics.

    python -m bench.reference_proxy --node http://127.0.0.1:9999 --port 9000
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def create_app(node: str) -> web.Application:
    node = node.rstrip("/")
    app = web.Application()

    async def session_context(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    async def text_to_image(request: web.Request) -> web.Response:
        body = await request.json()
        async with app["session"].post(f"{node}/text-to-image", json=body) as upstream:
            status, answer = upstream.status, await upstream.json(content_type=None)
        if status == 200:
            base = f"{request.scheme}://{request.host}"
            for image in answer.get("images", []):  # http://node:port/stream/... -> http://proxy:port/stream/...
                image["url"] = f"{base}/{image['url'].split('/', 3)[3]}"
        return web.json_response(answer, status=status)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.cleanup_ctx.append(session_context)
    app.router.add_post("/text-to-image", text_to_image)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--node", required=True, help="the node's base URL")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(args.node), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
