"""Who pays for a request: the tenant of its API key, what it takes from the key's limits when it is
admitted, and what it adds to the key's usage when it ends, however it ends.

The tenant is known from the headers alone (``tenant_middleware``), before the body is read; the
limits are checked once the request is valid and its model known (``charge``: at most one Redis round
trip); its usage is settled by the same middleware when the response is done, and counted in
Prometheus (labelled by key name: the names in the keys file bound the series) and by the limiter
(summed across gateways when it is Redis's), which ``GET /admin/usage`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from t2i_common.errors import APIError, BadRequest, Forbidden, Handler, TooManyRequests, Unauthorized
from t2i_common.schemas import TextToImageRequest

from .limits import Cost, Limiter, LocalLimiter, Quota, RedisLimiter, Usage
from .nodes import Demand
from .state import CONFIG, KEYS, LIMITER, METRICS, POOL
from .tenants import ANONYMOUS, KeyFiles, Tenant

GENERATION_PATHS = frozenset({"/text-to-image", "/text-to-image/", "/v1/images/generations"})
USAGE_PATH = "/admin/usage"
# Where an API key is needed when keys are set: the API, what shows the fleet (nodes' addresses, errors), usage.
KEYED_PATHS = GENERATION_PATHS | {"/v1/models", "/models", "/orchestrators", USAGE_PATH}
NO_LIMITS = Quota()


@dataclass
class Charge:
    """What one admitted request holds of its key's limits, and what it used."""

    ticket: str
    cost: Cost
    headers: dict[str, str]  # the key's x-ratelimit-* as of its admission, sent with the answer
    status: int = 0  # as the request ended (0: before its dispatch)
    seconds: float = 0.0  # of generation, on the node that made its images


TENANT = web.RequestKey("tenant", Tenant)
CHARGE = web.RequestKey("charge", Charge)


def setup(app: web.Application) -> None:
    app.cleanup_ctx.extend([_keys, _limiter])
    app.on_response_prepare.append(_rate_headers)
    app.router.add_get(USAGE_PATH, usage)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    limiter: Limiter
    if config.limits_redis:
        limiter = RedisLimiter(config.limits_redis, hold_s=config.request_timeout_s + 60)
    else:
        limiter = LocalLimiter()
    app[LIMITER] = limiter
    yield
    await limiter.close()


async def _keys(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[KEYS] = await KeyFiles.open(config.api_keys, config.api_keys_file, config.keys_file)
    task = asyncio.create_task(app[KEYS].watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def tenant_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API key, from the headers alone: a request without a valid one is refused before its body is
    read or the drain counts it, so that anonymous slow senders take no slot from real clients. A
    generation request's usage is settled here, whatever became of it."""
    keys = request.app[KEYS].ring
    tenant = ANONYMOUS
    if keys.required and request.path in KEYED_PATHS:
        found = keys.tenant_for(request.headers.get("Authorization", ""))
        if found is None:
            if request.path in GENERATION_PATHS:
                request.app[METRICS].requests.labels("401", "other").inc()  # refused before any attempt: counted
            raise Unauthorized("A valid API key is required: send 'Authorization: Bearer <key>'.")
        tenant = found
    request[TENANT] = tenant
    if request.path not in GENERATION_PATHS:
        return await handler(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except APIError as error:
        status = error.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        _settle(request, tenant, status)


async def charge(request: web.Request, job: TextToImageRequest, demand: Demand, model_id: str) -> None:
    """Admit ``job`` against its key's models and limits, or raise the 403, 400 or 429 that says why not."""
    tenant = request[TENANT]
    if not tenant.may_use(model_id):
        allowed = ", ".join(sorted(tenant.models or ())) or "none"
        raise Forbidden(f"Key {tenant.name!r} may not use model {model_id!r}; it may use: {allowed}.")
    cost = Cost(job.num_images_per_prompt, demand.megapixels * (demand.steps or request.app[POOL].default_steps(model_id)))
    ticket = uuid.uuid4().hex
    headers: dict[str, str] = {}
    if tenant.quota != NO_LIMITS:  # else nothing to count before it runs: no round trip
        verdict = await request.app[LIMITER].admit(tenant.name, tenant.quota, cost, ticket)
        if not verdict.allowed:
            raise _refusal(tenant, cost, verdict.exceeded or "requests", verdict.retry_after_s, verdict.headers)
        headers = verdict.headers
    request[CHARGE] = Charge(ticket, cost, headers)


def _refusal(tenant: Tenant, cost: Cost, exceeded: str, retry_after_s: float, headers: dict[str, str]) -> APIError:
    quota = tenant.quota
    if exceeded == "concurrent":
        error = TooManyRequests(
            f"Key {tenant.name!r} has {quota.concurrent} requests in progress, its limit; retry when one has finished.", headers=headers
        )
        error.headers.setdefault("Retry-After", "1")
        return error
    limit = {"requests": quota.requests_per_minute, "images": quota.images_per_minute, "megapixel-steps": quota.mpx_steps_per_minute}
    if math.isinf(retry_after_s):  # more than a whole minute's worth: waiting would not help
        needs = {"images": f"{cost.images} images", "megapixel-steps": f"{cost.mpx_steps:g} megapixel-steps"}.get(exceeded, exceeded)
        return BadRequest(
            f"This request needs {needs}, more than key {tenant.name!r} may use in a minute ({limit[exceeded]:g}); "
            "ask for fewer or smaller images, or fewer steps."
        )
    return TooManyRequests(
        f"Key {tenant.name!r} is over its limit of {limit[exceeded]:g} {exceeded} per minute; retry in {math.ceil(retry_after_s)} s.",
        headers=headers,
    )


def _settle(request: web.Request, tenant: Tenant, status: int) -> None:
    metrics_ = request.app[METRICS]
    charge_ = request.get(CHARGE)
    if charge_ is None:  # refused before admission: a request, and nothing else
        metrics_.tenant_requests.labels(tenant.name, str(status)).inc()
        request.app[LIMITER].finish(tenant.name, "", Usage(status, 0, 0.0, 0.0))
        return
    status = charge_.status or status
    done = status == 200
    used = Usage(status, charge_.cost.images if done else 0, charge_.cost.mpx_steps if done else 0.0, charge_.seconds)
    request.app[LIMITER].finish(tenant.name, charge_.ticket, used)
    metrics_.tenant_requests.labels(tenant.name, str(status)).inc()
    metrics_.tenant_images.labels(tenant.name).inc(used.images)
    metrics_.tenant_megapixel_steps.labels(tenant.name).inc(used.mpx_steps)
    metrics_.tenant_generation_seconds.labels(tenant.name).inc(used.seconds)


async def _rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    charge_ = request.get(CHARGE)
    if charge_ is not None:
        for name, value in charge_.headers.items():
            response.headers.setdefault(name, value)


async def usage(request: web.Request) -> web.Response:
    """Each key's usage, for operators (a key with ``admin = true``): summed across gateways with Redis."""
    if not request[TENANT].admin:
        raise Forbidden("GET /admin/usage needs a key with 'admin = true' in --keys-file.")
    limiter = request.app[LIMITER]
    body = {"keys": await limiter.usage(), "shared": isinstance(limiter, RedisLimiter) and limiter.problem() is None}
    if limiter.problem():
        body["problem"] = limiter.problem()
    return web.json_response(body)
