"""The node's one device thread and the bounded queue in front of it.

All model work (loading, inference, PNG encoding) runs on a single dedicated thread per device:
never on the event loop, never in the default executor (which aiohttp's DNS resolver shares), and
never two jobs at once on one pipeline (diffusers schedulers are not thread-safe).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from metrics import OrchestratorMetrics
from t2i_common.errors import ServiceUnavailable
from t2i_common.sse import Notify

T = TypeVar("T")
StopCheck = Callable[[], bool]


class _Waiter:
    """A request waiting for the device, and whom to tell its place in the queue."""

    def __init__(self, notify: Notify | None) -> None:
        self.notify = notify

    def tell(self, ahead: int) -> None:
        if self.notify:
            self.notify("queued", {"position": ahead})


class DeviceQueue:
    """Runs jobs on the device thread one at a time, with at most ``max_queue`` waiting behind."""

    def __init__(self, metrics: OrchestratorMetrics, *, max_queue: int, node_id: str = "", name: str = "t2i-device") -> None:
        self.max_queue = max_queue
        self.node_id = node_id
        self.running = 0
        self._queue: list[_Waiter] = []  # in arrival order, which is the order asyncio.Lock serves
        self._metrics = metrics
        metrics.queue_limit.set(max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._turn = asyncio.Lock()
        self._typical_job_s = 1.0  # moving average, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def capacity(self) -> int:
        """Requests the node holds at once: one on the device, the rest waiting."""
        return 1 + self.max_queue

    def check_admission(self) -> None:
        """503 (with a Retry-After from the recent job times) when no more requests fit."""
        if self.waiting + self.running >= self.capacity:
            wait_s = self._typical_job_s * (self.waiting + self.running)
            raise ServiceUnavailable(
                f"This node is busy: {self.running} request(s) generating and {self.waiting} waiting "
                f"(limit {self.max_queue}); retry later or elsewhere.",
                retry_after=max(1, min(60, math.ceil(wait_s))),
            )

    async def run(self, work: Callable[[StopCheck], T], *, label: str, notify: Notify | None = None) -> T:
        """Run ``work(should_stop)`` on the device thread; 503 at once when the queue is full.

        ``notify`` hears ``queued`` (with the number of requests ahead, again whenever it changes) and
        ``started``. If the awaiting task is cancelled (the client went away), ``should_stop`` turns
        true, and the device is held until the job has noticed, so the counts stay true.
        """
        self.check_admission()
        entry = _Waiter(notify)
        self._queue.append(entry)
        self._metrics.queue_depth.set(self.waiting)
        entry.tell(self.running + self.waiting - 1)
        queued_at = time.monotonic()
        acquired = False
        try:
            await self._turn.acquire()
            acquired = True
        finally:
            self._queue.remove(entry)
            self._metrics.queue_depth.set(self.waiting)
            if acquired:
                self.running += 1
                self._metrics.in_flight.set(self.running)
            for ahead, waiter in enumerate(self._queue, start=self.running):  # everyone behind moved up
                waiter.tell(ahead)
        if notify:
            notify("started", {"node": self.node_id})
        self._metrics.queue_wait.labels(label).observe(time.monotonic() - queued_at)
        stop = threading.Event()
        started = time.monotonic()
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, work, stop.is_set)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                stop.set()
                await asyncio.wait([future])
                raise
        finally:
            self._typical_job_s = 0.8 * self._typical_job_s + 0.2 * (time.monotonic() - started)
            self.running -= 1
            self._metrics.in_flight.set(self.running)
            self._turn.release()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
