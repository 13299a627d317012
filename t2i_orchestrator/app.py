"""The orchestrator's HTTP application: the Livepeer text-to-image API in front of one device."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from marshmallow import Schema

import metrics
from discovery import open_registrar
from metrics import OrchestratorMetrics
from t2i_common import FORMAT_PATTERN, IMAGE_FORMATS, IMAGE_ID_PATTERN, IMAGE_NAME_PATTERN, __version__
from t2i_common.errors import APIError, BadRequest, Middleware, NotFound, Unauthorized, error_middleware
from t2i_common.logs import prompt_for_log
from t2i_common.schemas import DEFAULT_QUALITY, MAX_SEED, TextToImageRequest, build_request_schema, parse_request
from t2i_common.server import DRAIN, STOP, Drain, Stop
from t2i_common.sse import EVENT_STREAM, Notify, respond_with_events, wants_events

from .config import OrchestratorConfig
from .device import DeviceQueue
from .engine import Generation, InferenceEngine
from .loras import LoraFetcher, LoraHub
from .models import profile_for
from .speed import SpeedMeter
from .storage import ImageStore

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/metrics"})
OFFER_CHECK_S = 1.0  # how soon a changed offer (ready, draining, a model loaded) is sent to the registry
WARM_UP_REQUEST = TextToImageRequest(prompt="warm-up", width=256, height=256, safety_check=False)


@dataclass
class Readiness:
    """Whether the warm models are loaded; ``/health`` reports it."""

    status: str = "loading"  # loading -> ready, or error
    error: str | None = None


CONFIG = web.AppKey("config", OrchestratorConfig)
ENGINE = web.AppKey[InferenceEngine]("engine")
METRICS = web.AppKey("metrics", OrchestratorMetrics)
DEVICE = web.AppKey("device", DeviceQueue)
STORE = web.AppKey("store", ImageStore)
READINESS = web.AppKey("readiness", Readiness)
SCHEMA = web.AppKey("schema", Schema)
LORAS = web.AppKey("loras", LoraFetcher)


def create_app(
    config: OrchestratorConfig,
    *,
    engine: InferenceEngine,
    metrics_: OrchestratorMetrics | None = None,
    lora_hub: LoraHub | None = None,
) -> web.Application:
    """Build the node's application; ``engine`` is the real ``DiffusersEngine`` or a test fake,
    ``lora_hub`` the Hugging Face Hub (the default) or a test fake."""
    drain = Drain()
    app = web.Application(middlewares=[_count_requests, error_middleware, drain.middleware, _require_secret(config.secret)])
    app[DRAIN] = drain
    app[STOP] = Stop()
    app[CONFIG] = config
    app[ENGINE] = engine
    app[METRICS] = metrics_ or OrchestratorMetrics()
    app[STORE] = ImageStore(config.storage_dir, config.image_ttl_s)
    app[READINESS] = Readiness()
    app[SCHEMA] = build_request_schema(config.limits)
    app[LORAS] = LoraFetcher(
        config.lora_dir,
        hub_policy=config.lora_hub,
        max_bytes=config.lora_max_bytes,
        cache_bytes=config.lora_cache_bytes,
        timeout_s=config.lora_fetch_timeout_s,
        hub=lora_hub,
    )
    app.cleanup_ctx.extend([_device_queue, _lora_fetcher, _warm_models, _image_sweeper])
    if config.register:
        app.cleanup_ctx.append(_registration)
    app.router.add_post("/text-to-image", text_to_image)
    app.router.add_post("/text-to-image/", text_to_image)  # Livepeer's runner accepts both
    app.router.add_get(f"/stream/{{image_id:{IMAGE_ID_PATTERN}}}/{{name:{IMAGE_NAME_PATTERN}}}.{{format:{FORMAT_PATTERN}}}", stream_image)
    app.router.add_get("/capabilities", capabilities)
    app.router.add_get("/health", health)
    metrics.setup(app, app[METRICS].registry)
    return app


# -- resources ---------------------------------------------------------------------------------


async def _device_queue(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    speed = SpeedMeter({spec.model_id: profile_for(spec).default_steps for spec in config.models})
    device = DeviceQueue(
        app[METRICS], app[ENGINE], max_queue=config.max_queue, max_batch=config.max_batch, node_id=config.node_id, speed=speed
    )
    app[DEVICE] = device
    yield
    await device.close()
    await asyncio.to_thread(app[ENGINE].unload_all)


async def _lora_fetcher(app: web.Application) -> AsyncIterator[None]:
    yield
    app[LORAS].close()


async def _warm_models(app: web.Application) -> AsyncIterator[None]:
    """Load warm models in the background, so that /health can say "loading" meanwhile."""
    task = asyncio.create_task(_load_warm_models(app))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _load_warm_models(app: web.Application) -> None:
    """The shared safety checker, then each warm model; a node that cannot have them stops (exit 1)."""
    readiness = app[READINESS]
    engine = app[ENGINE]
    try:
        await app[DEVICE].run(lambda stop: engine.start(), label="start")
        for spec in app[CONFIG].models:
            if spec.warm:
                # Load and generate once, so that the first real request pays for no lazy set-up.
                await app[DEVICE].generate(Generation(WARM_UP_REQUEST, spec.model_id, 0))
                logger.info("model %s is warm", spec.model_id)
    except Exception as exc:
        message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
        logger.error("cannot start: %s", message, exc_info=not isinstance(exc, APIError))
        readiness.status, readiness.error = "error", message
        app[STOP].fail(message)
        return
    readiness.status = "ready"
    logger.info("ready: %s on %s", ", ".join(engine.loaded_models()) or "no warm models", engine.device)


async def _image_sweeper(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]

    async def sweep_forever() -> None:
        while True:
            try:
                removed = await store.sweep()
                if removed:
                    logger.info("swept %d expired image folder(s)", removed)
            except Exception:
                logger.exception("sweeping expired images failed")
            await asyncio.sleep(min(60.0, store.ttl_s / 2))

    task = asyncio.create_task(sweep_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _registration(app: web.Application) -> AsyncIterator[None]:
    """Be in the registry while serving: joined at start, heartbeats, left on a clean shutdown.

    Each heartbeat carries the node's report (its ``/capabilities``), so that a Redis registry can pass
    it on to gateways; when the offer changes (ready, draining, a model loaded or unloaded) the next
    heartbeat goes within a second, not at the end of the interval. A registry that cannot be reached
    is logged once per outage; the node keeps serving and keeps trying at every heartbeat, so it is
    back in the registry as soon as the registry is.
    """
    config = app[CONFIG]
    assert config.register and config.advertise_url
    registrar = open_registrar(config.register, config.advertise_url, heartbeat_ttl_s=config.heartbeat_ttl_s)
    failing = False
    sent: dict[str, Any] | None = None  # the offer of the last heartbeat that went through
    next_beat = 0.0

    async def heartbeat(report: dict[str, Any]) -> None:
        nonlocal failing, sent, next_beat
        offer = _offer(report)
        next_beat = time.monotonic() + config.heartbeat_interval_s
        try:
            async with asyncio.timeout(config.heartbeat_interval_s):
                await registrar.heartbeat(report, changed=offer != sent)
        except Exception as exc:  # whatever the backend raises, the node serves on
            if not failing:
                logger.error(
                    "could not reach the registry %s: %s; retrying every %.0f s",
                    registrar.where,
                    exc or type(exc).__name__,
                    config.heartbeat_interval_s,
                )
            failing = True
            return
        if failing:
            logger.warning("the registry %s is reachable again", registrar.where)
        failing, sent = False, offer

    async def heartbeat_forever() -> None:
        while True:
            await asyncio.sleep(min(OFFER_CHECK_S, config.heartbeat_interval_s))
            report = capabilities_report(app)
            if time.monotonic() >= next_beat or (not failing and _offer(report) != sent):
                await heartbeat(report)

    await heartbeat(capabilities_report(app))
    if not failing:
        logger.info("registered %s in %s", config.advertise_url, registrar.where)
    task = asyncio.create_task(heartbeat_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        async with asyncio.timeout(5.0):
            await registrar.deregister()
        logger.info("removed %s from %s", config.advertise_url, registrar.where)
    except Exception as exc:
        logger.error("could not remove this node from %s: %s", registrar.where, exc or type(exc).__name__)
    finally:
        await registrar.close()


def _offer(report: dict[str, Any]) -> dict[str, Any]:
    """A report without its load, and with each model's speed to within 10%: what changes when the node
    becomes ready, a model is loaded or its speed moves (announced at once to every gateway), not with
    every request (gateways probe the nodes they use every second: they see the load there)."""
    models = [{**model, "s_per_mpx_step": _bucket(model["s_per_mpx_step"]), "load_s": None} for model in report["models"]]
    return {key: value for key, value in report.items() if key not in ("in_flight", "queued", "held_s")} | {"models": models}


def _bucket(speed: float | None) -> int | None:
    return None if speed is None else round(math.log(speed) / math.log(1.1))


# -- handlers ----------------------------------------------------------------------------------


async def text_to_image(request: web.Request) -> web.StreamResponse:
    app = request.app
    job = parse_request(await request.read(), request.headers.get("Content-Type"), app[SCHEMA])
    model_id = _resolve_model(app[CONFIG], job.model_id)
    app[ENGINE].check(job, model_id)  # refused before it waits for, or loads, anything
    app[STORE].check_format(job.output_format)
    if job.loras:
        job = replace(job, loras=await app[LORAS].resolve(job.loras))  # local folders, fetched off the device thread
    seed = job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1)
    if wants_events(request):
        app[DEVICE].check_admission()  # a full queue is a plain 503, before the stream starts

        async def counted(notify: Notify) -> dict[str, Any]:
            # An event stream is a 200 whatever happens in it: count how it really ended.
            status = 499  # the client went away (nginx's code for it)
            try:
                result = await _generate(request, job, model_id, seed, notify)
                status = 200
                return result
            except APIError as error:
                status = error.status
                raise
            finally:
                app[METRICS].requests.labels(str(status)).inc()

        return await respond_with_events(request, counted)
    return web.json_response(await _generate(request, job, model_id, seed, None))


async def _generate(request: web.Request, job: TextToImageRequest, model_id: str, seed: int, notify: Notify | None) -> dict[str, Any]:
    app = request.app
    config = app[CONFIG]
    started = time.monotonic()
    images = await app[DEVICE].generate(Generation(job, model_id, seed), notify=notify)
    app[METRICS].images.labels(model_id).inc(len(images))
    quality = DEFAULT_QUALITY if job.output_compression is None else job.output_compression
    image_id, names = await app[STORE].save([image.picture for image in images], job.output_format, quality)
    logger.info(
        "request %s: %s %dx%d x%d seed %d prompt %s: %d images in %.2f s",
        request.headers.get("X-Request-ID", "-"),
        model_id,
        job.width,
        job.height,
        job.num_images_per_prompt,
        seed,
        prompt_for_log(job.prompt, config.log_prompts),
        len(images),
        time.monotonic() - started,
    )
    base = config.advertise_url or f"{request.scheme}://{request.host}"
    return {
        "images": [
            {"url": f"{base}/stream/{image_id}/{name}.{job.output_format}", "seed": image.seed, "nsfw": image.nsfw}
            for name, image in zip(names, images)
        ]
    }


async def stream_image(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    fmt = request.match_info["format"]
    path = await store.find(request.match_info["image_id"], request.match_info["name"], fmt)
    if path is None:
        raise NotFound("Image not found: it never existed or it has expired.")
    return web.FileResponse(path, headers={"Content-Type": IMAGE_FORMATS[fmt], "Cache-Control": f"private, max-age={int(store.ttl_s)}"})


async def capabilities(request: web.Request) -> web.Response:
    return web.json_response(capabilities_report(request.app))


def capabilities_report(app: web.Application) -> dict[str, Any]:
    """What this node offers now, and its load: ``/capabilities``, and its registry heartbeats."""
    config, device, engine = app[CONFIG], app[DEVICE], app[ENGINE]
    loaded = set(engine.loaded_models())
    return {
        "node_id": config.node_id,
        "version": __version__,
        "device": engine.device,
        "status": _status(app),
        "capacity": device.capacity,
        "in_flight": device.running,
        "queued": device.waiting,
        # The work it holds, in seconds: what a gateway schedules by. Not rounded: a small job's seconds
        # (a tiny image on a fast device) would round to none.
        "held_s": device.held_s(),
        "models": [
            {
                "model_id": spec.model_id,
                "pipeline": spec.pipeline,
                "warm": spec.warm,
                "loaded": spec.model_id in loaded,
                "capacity": spec.capacity,  # as the models file says; the node runs one job at a time
                "s_per_mpx_step": device.speed.speed(spec.model_id),  # seconds per megapixel-step (speed.py); null until measured
                "default_steps": device.speed.default_steps[spec.model_id],
                "load_s": device.speed.load_s(spec.model_id),
            }
            for spec in config.models
        ],
    }


async def health(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    status = _status(request.app)
    body = {"status": status} | ({"detail": {"msg": readiness.error}} if readiness.error else {})
    return web.json_response(body, status=200 if status == "ready" else 503)


# -- helpers -----------------------------------------------------------------------------------


def _status(app: web.Application) -> str:
    """loading, ready or error (``Readiness``), or draining once shutdown has begun."""
    return "draining" if app[DRAIN].draining else app[READINESS].status


def _resolve_model(config: OrchestratorConfig, model_id: str) -> str:
    """An empty model id means the node's default: its first warm model, else its first."""
    offered = [spec.model_id for spec in config.models]
    if not model_id:
        return next((spec.model_id for spec in config.models if spec.warm), offered[0])
    if model_id not in offered:
        raise BadRequest(f"Model {model_id!r} is not offered by this node; it offers: {', '.join(offered)}.")
    return model_id


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    counted = request.path.rstrip("/") == "/text-to-image"
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        if counted:  # the client went away (nginx's 499); a stream counts its own
            request.app[METRICS].requests.labels("499").inc()
        raise
    if counted and response.content_type != EVENT_STREAM:  # streams count themselves
        request.app[METRICS].requests.labels(str(response.status)).inc()
    return response


def _require_secret(secret: str | None) -> Middleware:
    expected = f"Bearer {secret}".encode()

    @web.middleware
    async def require_secret(request: web.Request, handler: Handler) -> web.StreamResponse:
        if secret and request.path not in PUBLIC_PATHS:
            if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
                raise Unauthorized()
        return await handler(request)

    return require_secret
