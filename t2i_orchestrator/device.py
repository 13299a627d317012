"""The node's one device thread and the queue in front of it, where compatible requests are batched.

All model work (loading, inference) runs on a single dedicated thread per device: never on the event
loop, never in the default executor (which aiohttp's DNS resolver shares), and never two calls at
once on one pipeline (diffusers schedulers are not thread-safe). PNG encoding is the store's, beside
this thread, so that the device starts the next job meanwhile.

Requests wait in an explicit queue with one consumer. When the device frees up, the consumer takes
the first waiting job and, where the ``BatchPolicy`` says that batching pays on this device, the
compatible jobs waiting behind it (the engine's ``batch_key``), up to ``--max-batch`` images, and runs
them as one pipeline call. It never waits to fill a batch: an idle device starts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from metrics import OrchestratorMetrics
from t2i_common.errors import ServiceUnavailable
from t2i_common.sse import Notify

from .engine import GeneratedImage, Generation, GenerationCancelled, InferenceEngine
from .speed import SpeedMeter

StopCheck = Callable[[], bool]
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class BatchPolicy:
    """Whether a batch pays, from what this device has measured.

    For each model, size and step count it keeps the seconds per image of each batch size it has run
    (a moving average). A batch size is used only when it makes images at most 0.95x the time each of
    the best smaller size; sizes are explored upwards, one at a time, while each step up pays. On a
    CPU batching pays for small images and not for large ones; on a GPU it mostly pays: measured, not
    assumed. A size that did not pay is tried again now and then, in case that measurement was unlucky.
    """

    RETRY_EVERY = 32
    MAX_SHAPES = 256  # shapes are the clients' choice: the least recently used are forgotten beyond

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self._per_image: OrderedDict[Hashable, dict[int, float]] = OrderedDict()
        self._decisions: dict[Hashable, int] = {}

    def limit(self, shape: Hashable) -> int:
        """How many images the next call for ``shape`` may hold."""
        seen = self._per_image.get(shape, {})
        if self.max_batch == 1 or 1 not in seen:
            return 1  # first the cost of one image alone
        self._per_image.move_to_end(shape)
        decisions = self._decisions[shape] = self._decisions.get(shape, 0) + 1
        best = 1
        for size in BATCH_SIZES[1:]:
            if size > self.max_batch:
                break
            if size not in seen:
                return size  # the next size up is worth a try
            if seen[size] <= 0.95 * seen[best]:
                best = size
            elif decisions % self.RETRY_EVERY == 0:
                return size  # measure again the size that did not pay
            else:
                break
        return best

    def record(self, shape: Hashable, images: int, seconds: float) -> None:
        size = max(s for s in BATCH_SIZES if s <= images)
        seen = self._per_image.setdefault(shape, {})
        self._per_image.move_to_end(shape)
        per_image = seconds / images
        seen[size] = per_image if size not in seen else 0.7 * seen[size] + 0.3 * per_image
        while len(self._per_image) > self.MAX_SHAPES:
            forgotten, _ = self._per_image.popitem(last=False)
            self._decisions.pop(forgotten, None)


class _Entry:
    """A request waiting for the device: an engine generation (batchable) or other work (start, warm-up)."""

    __slots__ = ("generation", "work", "key", "images", "notify", "future", "stop", "label", "queued_at", "mpx_steps")

    def __init__(
        self,
        *,
        generation: Generation | None,
        work: Callable[[StopCheck], Any] | None,
        key: Hashable | None,
        label: str,
        notify: Notify | None,
    ) -> None:
        self.generation = generation
        self.work = work
        self.key = key
        self.images = generation.request.num_images_per_prompt if generation else 1
        self.label = label
        self.notify = notify
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.stop = threading.Event()  # its client went away
        self.queued_at = time.monotonic()
        self.mpx_steps = 0.0  # its work (speed.work_of), set as it is queued

    def tell(self, event: str, data: dict[str, Any]) -> None:
        if self.notify and not self.stop.is_set():
            self.notify(event, data)


class DeviceQueue:
    """Runs jobs on the device thread, batching compatible ones, with at most ``max_queue`` waiting."""

    def __init__(
        self,
        metrics: OrchestratorMetrics,
        engine: InferenceEngine,
        *,
        max_queue: int,
        max_batch: int = 1,
        node_id: str = "",
        name: str = "t2i-device",
        speed: SpeedMeter | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.node_id = node_id
        self.running = 0  # requests in the call on the device now
        self.left = 0  # requests whose client left while they waited or ran (counted as it is noticed)
        self.policy = BatchPolicy(max_batch)
        self._engine = engine
        self._queue: deque[_Entry] = deque()
        self._wake = asyncio.Event()
        self._metrics = metrics
        metrics.queue_limit.set(max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._typical_job_s = 1.0  # moving average, for Retry-After
        self.speed = speed or SpeedMeter({})
        self._call_started = 0.0
        self._call_expected_s = 0.0  # how long the call on the device now should take
        self._consumer = asyncio.get_running_loop().create_task(self._consume())

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def capacity(self) -> int:
        """Requests the node holds at once: one on the device, the rest waiting."""
        return 1 + self.max_queue

    def held_s(self) -> float:
        """The seconds of work this node holds: what is left of the call running, and the queue's."""
        held = max(0.0, self._call_expected_s - (time.monotonic() - self._call_started)) if self.running else 0.0
        return held + sum(self._expected_s([entry]) for entry in self._queue)

    def _expected_s(self, entries: Sequence[_Entry]) -> float:
        first = entries[0]
        if first.generation is None:
            return self._typical_job_s
        return self.speed.expected_s(first.generation.model_id, sum(entry.mpx_steps for entry in entries), self._typical_job_s)

    def check_admission(self) -> None:
        """503 (with a Retry-After from the recent job times) when no more requests fit."""
        if self.waiting + self.running >= self.capacity:
            wait_s = self._typical_job_s * (self.waiting + self.running)
            raise ServiceUnavailable(
                f"This node is busy: {self.running} request(s) generating and {self.waiting} waiting "
                f"(limit {self.max_queue}); retry later or elsewhere.",
                retry_after=max(1, min(60, math.ceil(wait_s))),
            )

    async def generate(self, generation: Generation, *, notify: Notify | None = None) -> list[GeneratedImage]:
        """The generation's images, made on the device, maybe in one call with compatible others."""
        key = self._engine.batch_key(generation)
        return await self._submit(_Entry(generation=generation, work=None, key=key, label=generation.model_id, notify=notify))

    async def run(self, work: Callable[[StopCheck], Any], *, label: str, notify: Notify | None = None) -> Any:
        """``work(should_stop)`` on the device thread, alone."""
        return await self._submit(_Entry(generation=None, work=work, key=None, label=label, notify=notify))

    async def _submit(self, entry: _Entry) -> Any:
        """Queue ``entry`` (503 at once when the queue is full) and wait for its result.

        ``notify`` hears ``queued`` (with the number of requests ahead, again whenever it changes) and
        ``started``. If the awaiting task is cancelled (the client went away), a waiting entry leaves the
        queue; a running one is told to stop, and the call stops at its next step once every request in
        it has left.
        """
        self.check_admission()
        if entry.generation is not None:
            entry.mpx_steps = self.speed.work(entry.generation.request, entry.generation.model_id)
        self._queue.append(entry)
        self._metrics.queue_depth.set(self.waiting)
        entry.tell("queued", {"position": self.running + self.waiting - 1})
        self._wake.set()
        try:
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            entry.stop.set()
            self.left += 1
            if entry in self._queue:
                self._queue.remove(entry)
                self._queue_moved()
            elif not entry.future.done():
                await asyncio.wait([entry.future])  # the call it is in noticed, or finished
            if entry.future.done() and not entry.future.cancelled():
                entry.future.exception()  # retrieved: nobody else will
            raise

    async def close(self) -> None:
        self._consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._consumer
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # -- the consumer --------------------------------------------------------------------------

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            self._call_started, self._call_expected_s = time.monotonic(), self._expected_s(batch)
            self.running = len(batch)
            self._metrics.in_flight.set(self.running)
            self._queue_moved()
            now = time.monotonic()
            for entry in batch:
                self._metrics.queue_wait.labels(entry.label).observe(now - entry.queued_at)
                entry.tell("started", {"node": self.node_id})
            try:
                await self._run_batch(loop, batch)
            finally:
                self._typical_job_s = 0.8 * self._typical_job_s + 0.2 * (time.monotonic() - now)
                self.running = 0
                self._metrics.in_flight.set(0)

    def _take_batch(self) -> list[_Entry]:
        first = self._queue.popleft()
        if first.key is None or first.generation is None:
            return [first]
        limit = self.policy.limit(_shape(first.key))
        batch, images = [first], first.images
        for entry in list(self._queue):
            if images >= limit:
                break
            if entry.key == first.key and images + entry.images <= limit:
                self._queue.remove(entry)
                batch.append(entry)
                images += entry.images
        return batch

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry]) -> None:
        try:
            results = await loop.run_in_executor(self._executor, self._call, loop, batch)
        except GenerationCancelled as exc:  # every request in it had left
            for entry in batch:
                _settle(entry, exc=exc)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc=exc)
                return
            # Each request gets its own outcome: alone, one may succeed (out of memory) where all failed.
            for entry in batch:
                await self._run_batch(loop, [entry])
        else:
            for entry, result in zip(batch, results):
                _settle(entry, result=result)

    def _call(self, loop: asyncio.AbstractEventLoop, batch: Sequence[_Entry]) -> list[Any]:
        """On the device thread: load the model if needed, then one engine call for the whole batch."""
        first = batch[0]
        if first.work is not None:
            return [first.work(first.stop.is_set)]
        assert first.generation is not None
        engine, metrics = self._engine, self._metrics
        model_id = first.generation.model_id
        started = time.monotonic()
        if engine.load(model_id):
            metrics.model_load.labels(model_id).observe(time.monotonic() - started)
            metrics.loaded_models.set(len(engine.loaded_models()))
            self.speed.loaded(model_id, time.monotonic() - started)

        def on_step(step: int, steps: int) -> None:
            for entry in batch:
                if entry.notify:
                    loop.call_soon_threadsafe(entry.tell, "progress", {"step": step, "steps": steps})

        started = time.monotonic()
        results = engine.generate_batch(
            [entry.generation for entry in batch if entry.generation],
            lambda: all(entry.stop.is_set() for entry in batch),
            on_step,
        )
        seconds = time.monotonic() - started
        images = sum(entry.images for entry in batch)
        self.policy.record(_shape(first.key), images, seconds)
        self.speed.record(model_id, sum(entry.mpx_steps for entry in batch), seconds)
        metrics.batch_size.observe(images)
        for _ in batch:  # each request in the call took the whole call
            metrics.inference.labels(model_id).observe(seconds)
        return results

    def _queue_moved(self) -> None:
        self._metrics.queue_depth.set(self.waiting)
        for ahead, entry in enumerate(self._queue, start=self.running):
            entry.tell("queued", {"position": ahead})


def _shape(key: Hashable | None) -> Hashable:
    """What the batch policy measures by: model, width, height and steps (the key's first four)."""
    return key[:4] if isinstance(key, tuple) else key


def _settle(entry: _Entry, *, result: Any = None, exc: BaseException | None = None) -> None:
    if entry.future.done():
        return
    if exc is not None:
        entry.future.set_exception(exc)
    else:
        entry.future.set_result(result)
