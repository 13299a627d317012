"""The gateway's HTTP application: the public Livepeer text-to-image API in front of the orchestrators."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from marshmallow import Schema

import metrics
from discovery import Discovery
from metrics import GatewayMetrics
from t2i_common import DEMO_MODEL_ID
from t2i_common.errors import (
    APIError,
    BadRequest,
    GatewayTimeout,
    RequestTimeout,
    ServiceUnavailable,
    error_middleware_for,
    error_response,
)
from t2i_common.logs import prompt_for_log
from t2i_common.schemas import TextToImageRequest, build_request_schema, decode_body, to_body, validate_request
from t2i_common.server import DRAIN, Drain
from t2i_common.sse import Notify, respond_with_events, wants_events

from . import accounts, images, openai_api
from .accounts import CHARGE, GENERATION_PATHS, TENANT
from .config import GatewayConfig
from .nodes import Demand, NodePool, retry_after_s
from .openapi import build_openapi
from .state import CONFIG, METRICS, POOL, SESSION, SIGNER
from .stream_tokens import StreamSigner
from .upstream import AttemptResult, Expected, attempt

logger = logging.getLogger(__name__)

SCHEMA = web.AppKey("schema", Schema)
OPENAPI = web.AppKey("openapi", dict)

# Read once, when the module is imported: never a file read on the event loop.
PLAYGROUND_HTML = (Path(__file__).parent / "playground.html").read_text().replace("__DEMO_MODEL_ID__", DEMO_MODEL_ID)
PLAYGROUND = web.AppKey("playground", str)
OPENAI = web.AppKey("openai", openai_api.OpenAIRequests)


def create_app(
    config: GatewayConfig, *, discovery: Discovery, stream_secret: bytes, metrics_: GatewayMetrics | None = None
) -> web.Application:
    """Build the gateway; ``discovery`` says where the orchestrators are."""
    drain = Drain(paths=GENERATION_PATHS)
    # Each API's errors in its own shape: OpenAI's under /v1/, Livepeer's elsewhere.
    errors = error_middleware_for(lambda request: openai_api.render_error if request.path.startswith(openai_api.PREFIX) else error_response)
    # The key before the drain: a request without one never counts as in flight.
    app = web.Application(middlewares=[errors, accounts.tenant_middleware, drain.middleware])
    app[DRAIN] = drain
    app[CONFIG] = config
    app[METRICS] = metrics_ or GatewayMetrics()
    app[POOL] = NodePool(
        discovery,
        app[METRICS],
        secret=config.orchestrator_secret,
        probe_interval_s=config.probe_interval_s,
        probe_timeout_s=config.probe_timeout_s,
        max_queued=config.max_queued,
        max_suspended_share=config.max_suspended_share,
        remember_s=config.image_ttl_s,
        node_queue=config.node_queue,
    )
    app[SIGNER] = StreamSigner(stream_secret, config.image_ttl_s)
    app[SCHEMA] = build_request_schema(config.limits)
    app[OPENAI] = openai_api.OpenAIRequests(config.limits, app[SCHEMA])
    app[OPENAPI] = build_openapi(config.limits, api_keys=bool(config.api_keys or config.api_keys_file or config.keys_file))
    app[PLAYGROUND] = PLAYGROUND_HTML
    app.cleanup_ctx.extend([_client_session, _node_pool])
    accounts.setup(app)
    images.setup(app)
    app.router.add_get("/", playground)
    app.router.add_post("/text-to-image", text_to_image)
    app.router.add_get("/health", health)
    app.router.add_get("/orchestrators", orchestrators)
    app.router.add_get("/models", models)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/v1/images/generations", openai_generations)
    app.router.add_get("/v1/models", openai_models)
    if config.metrics_port is None:  # else on its own listener (t2i_gateway.__main__)
        metrics.setup(app, app[METRICS].registry)
    return app


# -- resources ---------------------------------------------------------------------------------


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    # https:// orchestrators are always verified: against --orchestrator-ca, else the system's CAs.
    ca = app[CONFIG].orchestrator_ca
    # No cap on connections (aiohttp's default is 100): --max-in-flight bounds the requests, and a
    # large fleet's probes keep one connection per node alive. Kept 60 s (aiohttp's default is 15 s),
    # longer than a large fleet's probe interval, so that a probe does not cost a new connection (with
    # TLS, a handshake); and shorter than the 75 s a node's aiohttp server keeps it.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ssl=ssl.create_default_context(cafile=str(ca) if ca else None))
    # No total timeout here: each call sets the one it needs (probes short, generation long).
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        app[SESSION] = session
        yield


async def _node_pool(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[POOL].run(app[SESSION]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await app[POOL].discovery.close()


# -- handlers ----------------------------------------------------------------------------------


@dataclass
class _Trace:
    """What one request did, for its log line."""

    request_id: str
    node: str = "-"
    attempts: int = 0
    generation_s: float = 0.0  # of the attempt that made its images


class _Refused(APIError):
    """A node's 400 or 422: the client's error, passed on as the node put it."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__("The orchestrator refused the request.")
        self.status = status
        self._body = body

    def body(self) -> dict[str, Any]:
        return self._body


async def text_to_image(request: web.Request) -> web.StreamResponse:
    """The Livepeer API: parse, dispatch, answer (as JSON, or as events while it runs)."""
    job, model_id = await admit(request, lambda raw: validate_request(raw, request.app[SCHEMA]))
    trace = _Trace(request.headers.get("X-Request-ID") or uuid.uuid4().hex)

    async def run(notify: Notify | None) -> dict[str, Any]:
        return await dispatch(request, trace, job, model_id, notify)

    if wants_events(request):
        return await respond_with_events(request, run)
    return web.json_response(await run(None), headers={"X-Request-ID": trace.request_id})


@dataclass(frozen=True)
class Job:
    request: TextToImageRequest
    forward: dict[str, Any]  # the Livepeer fields sent to the node
    demand: Demand  # its size, for scheduling and for its key's charge


async def admit(request: web.Request, parse: Callable[[dict[str, Any]], TextToImageRequest]) -> tuple[Job, str]:
    """Everything that can refuse a request before any node is tried, for either API; the job and its model.

    The API key was checked from the headers already (``accounts.tenant_middleware``); its limits are
    checked last (``accounts.charge``). ``parse`` turns the decoded body into the Livepeer request
    (raising the API's 4xx errors)."""
    app = request.app
    config = app[CONFIG]
    try:
        if app[DRAIN].in_flight > config.max_in_flight:  # this request is counted already
            raise ServiceUnavailable(f"The gateway is handling {config.max_in_flight} requests already; retry shortly.", retry_after=1)
        try:
            async with asyncio.timeout(config.body_timeout_s):
                body = await request.read()
        except TimeoutError:
            raise RequestTimeout(f"The request body did not arrive within {config.body_timeout_s:g} s; send it at once.") from None
        job, model_id = _admit(request, parse, body)
        await accounts.charge(request, job.request, job.demand, model_id)
        return job, model_id
    except APIError as error:
        # Refused before any attempt: counted too (the error-ratio alert needs these).
        app[METRICS].requests.labels(str(error.status), "other").inc()
        raise


def _admit(request: web.Request, parse: Callable[[dict[str, Any]], TextToImageRequest], body: bytes) -> tuple[Job, str]:
    app = request.app
    config, pool = app[CONFIG], app[POOL]
    job = parse(decode_body(body, request.headers.get("Content-Type")))  # decoded once: validated, then forwarded
    model_id = job.model_id or config.default_model or pool.default_model()
    if not model_id:
        raise ServiceUnavailable("No orchestrator is ready yet to say which models it serves; retry shortly.", retry_after=2)
    offered = pool.models_on_offer()
    if offered and model_id not in offered:
        raise BadRequest(f"Model {model_id!r} is not offered by any orchestrator; on offer: {', '.join(offered)}.")
    if not pool.can_admit(model_id, request[TENANT].name):
        raise ServiceUnavailable(
            f"Every orchestrator that serves {model_id!r} is busy, suspended or down; retry later.",
            retry_after=retry_after_s(pool.healthy()),
        )
    return Job(job, {**to_body(job), "model_id": model_id}, Demand.of(job)), model_id


async def dispatch(request: web.Request, trace: _Trace, job: Job, model_id: str, notify: Notify | None) -> dict[str, Any]:
    """Run an admitted job on the network: the Livepeer result body, or an APIError."""
    wanted = job.request
    return await _observed(request, trace, wanted.prompt, model_id, job.forward, Expected.of(wanted), job.demand, notify)


async def _observed(
    request: web.Request,
    trace: _Trace,
    prompt: str,
    model_id: str,
    forward: dict[str, Any],
    expected: Expected,
    demand: Demand,
    notify: Notify | None,
) -> dict[str, Any]:
    """``_generate`` with its metrics and its log line."""
    config, metrics_ = request.app[CONFIG], request.app[METRICS]
    started = time.monotonic()
    metrics_.in_flight.inc()
    status = 500
    try:
        result = await _generate(request, trace, model_id, forward, expected, demand, notify)
        status = 200
        return result
    except APIError as error:
        status = error.status
        error.headers["X-Request-ID"] = trace.request_id
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it): not a server error
        raise
    finally:
        seconds = time.monotonic() - started
        charge = request.get(CHARGE)
        if charge is not None:  # settled as the response ends (accounts.tenant_middleware)
            charge.status, charge.seconds = status, trace.generation_s
        metrics_.in_flight.dec()
        metrics_.requests.labels(str(status), model_id).inc()
        metrics_.request_seconds.labels(model_id).observe(seconds)
        logger.info(
            "request %s: key %s model %s node %s attempts %d status %d in %.2f s prompt %s",
            trace.request_id,
            request[TENANT].name,
            model_id,
            trace.node,
            trace.attempts,
            status,
            seconds,
            prompt_for_log(prompt, config.log_prompts),
        )


async def _generate(
    request: web.Request,
    trace: _Trace,
    model_id: str,
    forward: dict[str, Any],
    expected: Expected,
    demand: Demand,
    notify: Notify | None,
) -> dict[str, Any]:
    """Try up to --max-attempts nodes within the request's deadline; the result body, or an APIError."""
    app = request.app
    config, pool, metrics_ = app[CONFIG], app[POOL], app[METRICS]
    payload = json.dumps(forward).encode()
    deadline = time.monotonic() + config.request_timeout_s
    tried: set[str] = set()
    last: AttemptResult | None = None
    out_of_memory = 0  # attempts a node could not hold
    tenant = request[TENANT]
    while trace.attempts < config.max_attempts:
        # Every suitable node full: wait for a free slot, in turn with other keys' requests (--queue-timeout).
        wait_s = min(config.queue_timeout_s, deadline - time.monotonic())
        node = await pool.acquire(
            model_id, tried, timeout_s=max(0.0, wait_s), notify=notify, demand=demand, tenant=tenant.name, weight=tenant.weight
        )
        if node is None:
            break
        epoch = node.epoch
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pool.release(node, model_id, demand, epoch)
            raise GatewayTimeout(f"No orchestrator answered within the request's {config.request_timeout_s:.0f} s deadline.")
        if last is not None:
            metrics_.retries.inc()
            if notify:
                notify("retry", {"attempt": trace.attempts + 1, "reason": last.reason})
        trace.attempts += 1
        trace.node = node.url
        tried.add(node.url)
        if notify:
            notify("started", {"node": node.url})
        started = time.monotonic()
        result: dict[str, Any] = {}
        try:
            last = await attempt(
                app[SESSION],
                node,
                payload,
                headers={"Content-Type": "application/json", "X-Request-ID": trace.request_id, **pool.auth_headers(node.url)},
                timeout=aiohttp.ClientTimeout(total=remaining, sock_connect=config.connect_timeout_s),
                expected=expected,
                on_event=notify,
            )
            if last.outcome == "ok":  # the images handed over (into the store) while the node still counts as busy
                try:
                    result = await images.publish(request, node.url, last.body, expected)
                except images.BadImage as exc:  # it answered with images it cannot hand over
                    last = AttemptResult("failed", reason=f"malformed answer: {exc}")
            # Counted before the slot goes back: a node that left is forgotten (its series too) at its release.
            metrics_.attempts.labels(node.url, last.outcome).inc()
        finally:
            pool.release(node, model_id, demand, epoch)
        if last.outcome == "ok":
            trace.generation_s = time.monotonic() - started
            pool.succeeded(node, trace.generation_s, model_id, demand)
            return result
        logger.info("request %s: attempt on %s: %s %s", trace.request_id, node.url, last.outcome, last.reason)
        if last.outcome == "client_error":
            raise _Refused(last.status, last.body)
        if last.outcome == "busy":
            pool.busy(node)
        elif last.outcome == "no_memory":
            out_of_memory += 1
        else:
            pool.failed(node, last.reason, unreachable=last.unreachable)
    retry_after = retry_after_s(pool.healthy())
    if out_of_memory and out_of_memory == trace.attempts:
        raise BadRequest(
            f"No orchestrator tried ({out_of_memory}) has the device memory for this request; ask for fewer or smaller images."
        )
    if last is None:
        raise ServiceUnavailable(
            f"Every orchestrator that serves {model_id!r} is busy, suspended or down; retry later.", retry_after=retry_after
        )
    raise ServiceUnavailable(
        f"No orchestrator could generate the image ({len(tried)} tried, last: {last.reason}); retry later.", retry_after=retry_after
    )


async def openai_generations(request: web.Request) -> web.Response:
    """OpenAI's Images API: its body in, the same admission and dispatch, its answer out."""
    app = request.app
    response_format = "url"

    def parse(data: dict[str, Any]) -> TextToImageRequest:
        nonlocal response_format
        job, response_format = app[OPENAI].parse(data)
        return job

    job, model_id = await admit(request, parse)
    trace = _Trace(request.headers.get("X-Request-ID") or uuid.uuid4().hex)
    result = await dispatch(request, trace, job, model_id, None)
    if response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(await images.image_bytes(app, image["url"])).decode()} for image in result["images"]]
    else:
        data = [{"url": image["url"]} for image in result["images"]]
    return web.json_response(openai_api.images_body(data), headers={"X-Request-ID": trace.request_id})


async def openai_models(request: web.Request) -> web.Response:
    return web.json_response(openai_api.models_body(request.app[POOL].models_on_offer()))


async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    healthy = pool.healthy()
    status = "draining" if request.app[DRAIN].draining else "ready" if healthy else "unavailable"
    # A discovery problem (Redis away) is shown but does not fail the check: the last known nodes still serve.
    body = {"status": status, "orchestrators_ready": len(healthy), "discovery": pool.discovery.problem() or "ok"}
    return web.json_response(body, status=200 if status == "ready" else 503)


async def orchestrators(request: web.Request) -> web.Response:
    return web.json_response({"orchestrators": request.app[POOL].describe()})


async def playground(request: web.Request) -> web.Response:
    """A single page to try the API in a browser; no external assets, so it works offline."""
    return web.Response(text=request.app[PLAYGROUND], content_type="text/html")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"models": request.app[POOL].models_summary()})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])
