"""A simulated orchestrator, named as such (a simulation, not a node): one device that serves one job at a
time, in arrival order, for ``work x --s-per-mpx-step`` seconds (an ``asyncio.sleep``; nothing is
generated), where a request's work is ``width x height / 1e6 x steps x num_images_per_prompt`` in
megapixel-steps (``num_inference_steps``, else the model's ``default_steps``, 2). For the scheduling bench
(``bench.scheduling``), so that a gateway can be measured in front of a fleet of nodes of known speeds.

To a gateway it looks like a real node (``t2i_orchestrator``):

- ``GET /health``: 200 ``{"status": "ready"}``;
- ``GET /capabilities``: the real node's shape (``capabilities_report``), one warm model ``t2i/tiny-sd``,
  with the speed report: ``held_s`` (the seconds of work it holds now: the running job's remaining
  part and every queued job's), and in the model's entry ``s_per_mpx_step`` (its true speed; null until
  its first job has finished, with ``--report-after-first``, the default, so that a gateway's way of
  trying a node it has no measure of yet is exercised), ``default_steps`` 2 and ``load_s`` null;
- ``POST /text-to-image``: queued behind the jobs before it, then answered as a node answers, one image
  url ``<advertise url>/stream/<32 hex>/<16 hex>.<format>`` per image (those urls serve nothing: a
  gateway fetches images only with ``--image-store``); 503 when it already holds ``--capacity`` jobs
  (9 by default, as a real node's ``1 + --max-queue``);
- with ``--register REDIS_URL`` (and ``--advertise-url``), it joins that registry as a node does
  (``discovery.open_registrar``): a heartbeat carrying its report every ``--heartbeat-interval`` seconds,
  one within a second when its report changes by more than its job counts (its speed becomes known, the
  work it holds changes), as a real node's, and it leaves at shutdown.

What it served is at ``GET /sim/jobs``: each job's ``X-Request-ID``, work, seconds, and when it arrived,
started, finished and was answered, in seconds of ``time.monotonic()`` (the system's monotonic clock,
which other processes on the machine share). ``started`` and ``finished`` are the device's own schedule:
a job starts when it arrived or when the one before it finished, whichever is later, and runs exactly
its seconds, so that a late wake-up of this process delays that one answer, not every later job.

    python -m bench.sim_node --port 9001 --s-per-mpx-step 0.0763
    python -m bench.sim_node --port 9001 --s-per-mpx-step 0.305 --register redis://127.0.0.1:6379/0 --advertise-url http://127.0.0.1:9001
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from discovery import RegistrySettings, open_registrar
from t2i_orchestrator.app import _offer  # what a real node announces: its offer, not its load

logger = logging.getLogger("bench.sim_node")

MODEL = "t2i/tiny-sd"
DEFAULT_STEPS = 2
DEFAULT_CAPACITY = 9  # a real node's: 1 running + --max-queue 8 waiting
OFFER_CHECK_S = 1.0  # as a real node: a changed offer goes to the registry within a second
MAX_RECORDS = 100_000


def work_of(width: int, height: int, steps: int, images: int = 1) -> float:
    """A request's work in megapixel-steps."""
    return width * height / 1e6 * steps * images


class Closing(Exception):
    """The node is shutting down."""


@dataclass
class Job:
    request_id: str
    work: float  # megapixel-steps
    seconds: float  # work x the node's speed
    arrived: float  # time.monotonic()
    started: float | None = None  # on the device's schedule (see the module's doc)
    finished: float | None = None
    answered: float | None = None  # when the answer was handed to aiohttp
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future(), repr=False)

    def record(self) -> dict[str, Any]:
        fields = ("request_id", "work", "seconds", "arrived", "started", "finished", "answered")
        return {name: getattr(self, name) for name in fields}


class SimNode:
    """The simulated device: a FIFO of jobs served one at a time by a worker task."""

    def __init__(
        self, s_per_mpx_step: float, *, capacity: int = DEFAULT_CAPACITY, report_after_first: bool = True, node_id: str = ""
    ) -> None:
        if not s_per_mpx_step > 0:
            raise ValueError("--s-per-mpx-step must be > 0")
        if capacity < 1:
            raise ValueError("--capacity must be >= 1")
        self.s_per_mpx_step = s_per_mpx_step
        self.capacity = capacity
        self.node_id = node_id or f"sim-{secrets.token_hex(4)}"
        self.measured = not report_after_first  # whether its speed is reported yet
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.records: deque[Job] = deque(maxlen=MAX_RECORDS)
        self._wake = asyncio.Event()
        self._submitted = asyncio.Event()  # set at each job queued: until_submitted waits on it
        self._free_at = 0.0  # when the device finished its last job, on its own schedule

    @property
    def held(self) -> int:
        return len(self.waiting) + (self.running is not None)

    def held_s(self, now: float | None = None) -> float:
        """Seconds of work held now: the running job's remaining part, and all of every queued job."""
        now = time.monotonic() if now is None else now
        running = 0.0
        if self.running is not None and self.running.finished is not None:
            running = max(0.0, self.running.finished - now)
        return running + sum(job.seconds for job in self.waiting)

    def submit(self, request_id: str, work: float) -> Job | None:
        """Queue a job; None when the node holds ``capacity`` jobs already."""
        if self.held >= self.capacity:
            return None
        job = Job(request_id, work, work * self.s_per_mpx_step, time.monotonic())
        self.waiting.append(job)
        self.records.append(job)
        self._wake.set()
        self._submitted.set()
        return job

    async def until_submitted(self, count: int) -> None:
        """Until ``count`` jobs have been queued here since it started (for tests that order requests)."""
        while len(self.records) < count:
            self._submitted.clear()
            await self._submitted.wait()

    async def serve(self) -> None:
        """The device: until cancelled, the first waiting job, for exactly its seconds, then the next."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = self.waiting.popleft()
            if job.done.done():  # its client went away before it started
                continue
            self.running = job
            job.started = max(job.arrived, self._free_at)
            job.finished = job.started + job.seconds
            try:
                await asyncio.sleep(max(0.0, job.finished - loop.time()))  # loop.time() is time.monotonic()
            finally:
                self.running = None
            self._free_at = job.finished
            self.measured = True
            if not job.done.done():
                job.done.set_result(None)

    def close(self) -> None:
        """Shutting down: every job held is answered 503 at once (an idle device has nothing to finish)."""
        for job in (*self.waiting, *([self.running] if self.running else [])):
            if not job.done.done():
                job.done.set_exception(Closing())
        self.waiting.clear()

    def report(self) -> dict[str, Any]:
        """``/capabilities``, which is also the report its heartbeats carry."""
        return {
            "node_id": self.node_id,
            "version": "sim",
            "device": "simulated",
            "status": "ready",
            "capacity": self.capacity,
            "in_flight": int(self.running is not None),
            "queued": len(self.waiting),
            "models": [
                {
                    "model_id": MODEL,
                    "pipeline": "text-to-image",
                    "warm": True,
                    "loaded": True,
                    "capacity": self.capacity,
                    "s_per_mpx_step": self.s_per_mpx_step if self.measured else None,
                    "default_steps": DEFAULT_STEPS,
                    "load_s": None,
                }
            ],
            "held_s": round(self.held_s(), 6),
        }


SIM = web.AppKey("sim", SimNode)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    node: SimNode,
    *,
    advertise_url: str | None = None,
    secret: str | None = None,
    register: RegistrySettings | None = None,
    heartbeat_interval_s: float = 10.0,
    heartbeat_ttl_s: float = 30.0,
) -> web.Application:
    app = web.Application(middlewares=[_require_secret(secret)])
    app[SIM] = node

    async def device(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(node.serve())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(device)

    async def closing(app: web.Application) -> None:
        node.close()

    app.on_shutdown.append(closing)  # before aiohttp waits for the handlers in flight
    if register is not None:
        if not advertise_url:
            raise ValueError("--register needs --advertise-url")
        app.cleanup_ctx.append(_registration(node, register, advertise_url, heartbeat_interval_s, heartbeat_ttl_s))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    async def capabilities(request: web.Request) -> web.Response:
        return web.json_response(node.report())

    async def text_to_image(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            width, height = int(body.get("width", 512)), int(body.get("height", 512))
            steps = int(body.get("num_inference_steps") or DEFAULT_STEPS)
            images = int(body.get("num_images_per_prompt", 1))
            seed = int(body.get("seed") or secrets.randbelow(2**32))
            fmt = str(body.get("output_format", "png"))
        except (ValueError, TypeError, AttributeError):
            return web.json_response({"detail": {"msg": "not a text-to-image request"}}, status=400)
        if min(width, height, steps, images) < 1 or fmt not in ("png", "jpeg", "webp"):
            return web.json_response({"detail": {"msg": "not a text-to-image request"}}, status=400)
        job = node.submit(request.headers.get("X-Request-ID", ""), work_of(width, height, steps, images))
        if job is None:
            return web.json_response(
                {"detail": {"msg": f"The simulated node holds {node.capacity} jobs already; retry elsewhere."}},
                status=503,
                headers={"Retry-After": "1"},
            )
        try:
            await job.done
        except Closing:
            return web.json_response({"detail": {"msg": "The simulated node is shutting down."}}, status=503)
        finally:
            if not job.done.done():
                job.done.cancel()  # the client went away: the device skips it if it has not started
        base = advertise_url or f"{request.scheme}://{request.host}"
        image_id = secrets.token_hex(16)
        answer = {
            "images": [
                {"url": f"{base}/stream/{image_id}/{secrets.token_hex(8)}.{fmt}", "seed": seed + i, "nsfw": False} for i in range(images)
            ]
        }
        job.answered = time.monotonic()
        return web.json_response(answer)

    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"node_id": node.node_id, "jobs": [job.record() for job in node.records]})

    app.router.add_get("/health", health)
    app.router.add_get("/capabilities", capabilities)
    app.router.add_post("/text-to-image", text_to_image)
    app.router.add_post("/text-to-image/", text_to_image)
    app.router.add_get("/sim/jobs", jobs)
    return app


def _registration(
    node: SimNode, settings: RegistrySettings, url: str, interval_s: float, ttl_s: float
) -> Callable[[web.Application], AsyncIterator[None]]:
    """In the registry while serving, as a real node (``t2i_orchestrator.app._registration``): heartbeats
    with its report every ``interval_s``, one within a second of a changed offer, a leave at shutdown."""

    async def registration(app: web.Application) -> AsyncIterator[None]:
        registrar = open_registrar(settings, url, heartbeat_ttl_s=ttl_s)
        sent: dict[str, Any] | None = None
        next_beat = 0.0

        async def heartbeat() -> None:
            nonlocal sent, next_beat
            report = node.report()
            next_beat = time.monotonic() + interval_s
            try:
                async with asyncio.timeout(interval_s):
                    await registrar.heartbeat(report, changed=_offer(report) != sent)
            except Exception as exc:  # as a node: it serves on, and tries again at the next heartbeat
                logger.error("could not reach the registry %s: %s", registrar.where, exc or type(exc).__name__)
                return
            sent = _offer(report)

        async def heartbeat_forever() -> None:
            while True:
                await asyncio.sleep(min(OFFER_CHECK_S, interval_s))
                if time.monotonic() >= next_beat or _offer(node.report()) != sent:
                    await heartbeat()

        await heartbeat()
        task = asyncio.create_task(heartbeat_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            async with asyncio.timeout(5.0):
                await registrar.deregister()
        except Exception as exc:
            logger.error("could not leave %s: %s", registrar.where, exc or type(exc).__name__)
        finally:
            await registrar.close()

    return registration


def _require_secret(secret: str | None) -> Middleware:
    expected = f"Bearer {secret}".encode()

    @web.middleware
    async def require_secret(request: web.Request, handler: Handler) -> web.StreamResponse:
        if secret and request.path != "/health" and not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return web.json_response({"detail": {"msg": "a bearer secret is required"}}, status=401)
        return await handler(request)

    return require_secret


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--s-per-mpx-step", type=float, required=True, help="seconds per megapixel-step of this simulated device")
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="jobs held (running + queued) beyond which it answers 503")
    parser.add_argument(
        "--report-after-first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="report s_per_mpx_step as null until the first job has finished (default: on)",
    )
    parser.add_argument("--node-id", default="")
    parser.add_argument("--secret", help="bearer secret required on every path but /health (the gateway's --orchestrator-secret)")
    parser.add_argument("--advertise-url", help="its base URL in image urls and in the registry (default: the URL a request came to)")
    parser.add_argument("--register", help="a Redis registry to join: redis://host:port/db")
    parser.add_argument("--registry-prefix", default="t2i")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds between heartbeats (a real node's default: 10)")
    parser.add_argument("--heartbeat-ttl", type=float, default=30.0)
    args = parser.parse_args()
    if args.register and not args.advertise_url:
        parser.error("--register needs --advertise-url")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def build() -> web.Application:  # the node's futures and events belong to the running loop
        node = SimNode(args.s_per_mpx_step, capacity=args.capacity, report_after_first=args.report_after_first, node_id=args.node_id)
        settings = RegistrySettings(args.register, prefix=args.registry_prefix) if args.register else None
        return create_app(
            node,
            advertise_url=args.advertise_url.rstrip("/") if args.advertise_url else None,
            secret=args.secret,
            register=settings,
            heartbeat_interval_s=args.heartbeat_interval,
            heartbeat_ttl_s=args.heartbeat_ttl,
        )

    web.run_app(build(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
