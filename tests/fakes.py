"""Fakes for tests, named as such: no torch, no diffusers."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from aiohttp import web
from PIL import Image

from t2i_common.errors import BadRequest
from t2i_common.schemas import TextToImageRequest
from t2i_common.sse import encode
from t2i_orchestrator.engine import GeneratedImage, Generation, GenerationCancelled


def solid_picture(width: int, height: int, shade: int) -> Image.Image:
    return Image.new("RGB", (width, height), (shade % 256, 0, 0))


def solid_png(width: int, height: int, shade: int, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    solid_picture(width, height, shade).save(buffer, format={"jpeg": "JPEG", "webp": "WEBP"}.get(fmt, "PNG"))
    return buffer.getvalue()


class FakeEngine:
    """An ``InferenceEngine`` that paints solid images; ``gate`` can hold generation to test queueing."""

    device = "fake"

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.gates: dict[int, threading.Event] = {}  # seed -> the gate its generation waits on instead
        self.started = threading.Event()
        self.stopped = threading.Event()  # set when a generation noticed should_stop
        self.start_error: Exception | None = None  # raised by start()
        self.load_errors: dict[str, Exception] = {}  # model id -> what loading it raises
        self.refuse: dict[str, str] = {}  # model id -> the 400 message check() gives
        self.batching = False  # whether batch_key lets compatible generations share a call
        self.batches: list[list[int]] = []  # the seeds of each call, in order
        self._loaded: tuple[str, ...] = ()

    def loaded_models(self) -> tuple[str, ...]:
        return self._loaded

    def start(self) -> None:
        if self.start_error:
            raise self.start_error

    def check(self, request: TextToImageRequest, model_id: str) -> None:
        if model_id in self.refuse:
            raise BadRequest(self.refuse[model_id])

    def load(self, model_id: str) -> bool:
        if model_id in self.load_errors:
            raise self.load_errors[model_id]
        if model_id in self._loaded:
            return False
        self.loads.append(model_id)
        self._loaded += (model_id,)
        return True

    def generate(
        self,
        request: TextToImageRequest,
        model_id: str,
        seed: int,
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[GeneratedImage]:
        self.load(model_id)
        self.started.set()
        steps = request.num_inference_steps or 2
        for step in range(1, steps + 1):
            if on_step:
                on_step(step, steps)
        gate = self.gates.get(seed, self.gate)
        while not gate.wait(0.01):
            if should_stop():
                self.stopped.set()
                raise GenerationCancelled()
        n = request.num_images_per_prompt
        return [GeneratedImage(solid_picture(request.width, request.height, seed + i), seed + i, False) for i in range(n)]

    def batch_key(self, generation: Generation) -> Hashable | None:
        request = generation.request
        return (generation.model_id, request.width, request.height, request.num_inference_steps) if self.batching else None

    def generate_batch(
        self,
        generations: Sequence[Generation],
        should_stop: Callable[[], bool],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[list[GeneratedImage]]:
        self.batches.append([g.seed for g in generations])
        if len(generations) == 1:
            g = generations[0]
            return [self.generate(g.request, g.model_id, g.seed, should_stop, on_step)]
        return [self.generate(g.request, g.model_id, g.seed, should_stop, on_step if i == 0 else None) for i, g in enumerate(generations)]

    def unload_all(self) -> None:
        self._loaded = ()


class FakeOrchestrator:
    """A fake node (a real aiohttp app on loopback) whose behaviour a test sets: ``mode`` is one of
    ok, fail (500), busy (503), oom (507: out of device memory), refuse (422), garbage (malformed JSON),
    wrong_types, hang (probes too), hold (generations only: they wait for ``release``, probes answer)."""

    def __init__(self, models: list[dict[str, object]] | None = None, *, capacity: int = 4, secret: str | None = None) -> None:
        self.models = models or [{"model_id": "m/warm", "pipeline": "text-to-image", "warm": True, "loaded": True}]
        self.capacity = capacity
        self.secret = secret
        self.mode = "ok"
        self.status = "ready"
        self.busy_report = 0  # in_flight it reports
        self.requests: list[dict[str, object]] = []
        self.headers: list[dict[str, str]] = []
        self.downloads: list[dict[str, str]] = []  # the headers of each /stream request
        self.image: bytes | None = None  # what /stream serves; None: a solid image of the size and format asked for
        self.release = asyncio.Event()  # lets a "hang" request go

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/capabilities", self._capabilities)
        app.router.add_post("/text-to-image", self._text_to_image)
        app.router.add_get("/stream/{id}/{name}.{format}", self._stream)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return self.secret is None or request.headers.get("Authorization") == f"Bearer {self.secret}"

    async def _capabilities(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"detail": {"msg": "no"}}, status=401)
        if self.mode == "hang":
            await self.release.wait()
        return web.json_response(
            {
                "node_id": "fake",
                "version": "0",
                "device": "fake",
                "status": self.status,
                "capacity": self.capacity,
                "in_flight": self.busy_report,
                "queued": 0,
                "models": self.models,
            }
        )

    async def _text_to_image(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response({"detail": {"msg": "no"}}, status=401)
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.mode in ("hang", "hold"):
            await self.release.wait()
        if self.mode == "fail":
            return web.json_response({"detail": {"msg": "boom"}}, status=500)
        if self.mode == "busy":
            return web.json_response({"detail": {"msg": "busy"}}, status=503, headers={"Retry-After": "1"})
        if self.mode == "oom":
            return web.json_response({"detail": {"msg": "Out of GPU memory"}}, status=507)
        if self.mode == "refuse":
            return web.json_response({"detail": [{"loc": ["body", "prompt"], "msg": "fake refusal", "type": "value_error"}]}, status=422)
        if self.mode == "garbage":
            return web.Response(text='{"images": [', content_type="application/json")
        if self.mode == "wrong_types":
            return web.json_response({"images": [{"url": 5, "seed": "x", "nsfw": "no"}]})
        n = int(body.get("num_images_per_prompt", 1))
        seed = int(body.get("seed") or 0)
        base = f"{request.scheme}://{request.host}"
        # The image's name says its size, for _stream: width, height, index, in hex.
        size = f"{body.get('width', 512):04x}{body.get('height', 512):04x}"
        fmt = body.get("output_format", "png")
        result = {"images": [{"url": f"{base}/stream/{'ab' * 16}/{size}{i:08x}.{fmt}", "seed": seed + i, "nsfw": False} for i in range(n)]}
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return web.json_response(result)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        steps = int(body.get("num_inference_steps") or 1)
        events: list[tuple[str, dict[str, Any]]] = [("queued", {"position": 0}), ("started", {"node": "fake"})]
        events += [("progress", {"step": i, "steps": steps}) for i in range(1, steps + 1)] + [("result", result)]
        for name, data in events:
            await response.write(encode(name, data))
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request) -> web.Response:
        self.downloads.append(dict(request.headers))
        if not self._authorized(request):
            return web.json_response({"detail": {"msg": "no"}}, status=401)
        if request.match_info["id"] != "ab" * 16:
            return web.json_response({"detail": {"msg": "gone"}}, status=404)
        name, fmt = request.match_info["name"], request.match_info["format"]
        width, height = int(name[:4], 16), int(name[4:8], 16)
        if not (0 < width <= 2048 and 0 < height <= 2048):  # a name of a test's own making
            width = height = 8
        return web.Response(body=self.image or solid_png(width, height, 1, fmt), content_type=f"image/{fmt}")
