"""What the gateway knows about each orchestrator, how it keeps that fresh, and how it picks one.

A background task (``NodePool.run``) follows discovery and probes nodes' ``/capabilities``: every
second while a node has requests from us in flight (a hung node is noticed in seconds, not at the end
of a generation timeout), and at the end of its suspension after a failure. A node whose registry
passes on its reports (Redis) is probed once more when it joins, to check that this gateway can reach
it, and is otherwise known from its reports: in a large fleet, every gateway probing every node is
what costs. Any other node is also probed every ``probe_interval_s`` when idle (less often in a large
fleet: at most ``MAX_IDLE_PROBES_PER_S`` in all), and several times a second while it is loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import aiohttp

from discovery import Discovery, Endpoint
from metrics import GatewayMetrics
from t2i_common.schemas import TextToImageRequest
from t2i_common.sse import Notify

logger = logging.getLogger(__name__)

NOT_READY_PROBE_S = 0.25
BUSY_PROBE_S = 1.0
DISCOVERY_REFRESH_S = 1.0
DISCOVERY_TIMEOUT_S = 5.0
MAX_SUSPENSION_S = 60.0
MAX_DEPARTED = 10_000  # nodes that left, remembered for their images' sake (a churning fleet's are bounded)
# A node that fails requests while its probes pass is suspended after this many failures in a row (as
# Envoy's outlier detection, consecutive_5xx): one request, which may be built to fail, never suspends it.
FAILURES_TO_SUSPEND = 5
SAMPLE = 8  # nodes drawn per selection in a large fleet
# A fleet joining at once is probed this many at a time, not with a thousand connections opened at once
# (beyond a default limit of 1,024 open files, and a peak of memory the process keeps).
MAX_PROBES_AT_ONCE = 64
MAX_IDLE_PROBES_PER_S = 50.0  # beyond 250 nodes (at the default 5 s), idle ones are probed less often than --probe-interval


# Nodes whose expected completion is within this of the soonest are equals, one taken at random: gateways
# that share a fleet on reports a second old do not all pile onto the one fastest node.
NEAR_SHARE = 0.1
# With --node-queue, the next request goes to a node this long before what it runs is expected to end:
# about a round trip through the gateway, so that the device does not sit idle between two jobs.
LEAD_S = 0.01
NEAR_S = 0.005
# A node's reported speed is checked against what this gateway sees: over its last OBSERVED requests of
# at least OBSERVED_WORK megapixel-steps (smaller ones are mostly overhead), the quickest took seconds per
# megapixel-step; a report more than DISBELIEF times faster than that is a node bidding for work it cannot
# do (a registry is open to whoever can write to it): the observation counts instead.
OBSERVED = 8
OBSERVED_WORK = 0.25
DISBELIEF = 4.0


@dataclass(frozen=True, slots=True)
class Demand:
    """A request's size, for scheduling: its megapixels (width x height x images) and steps (None: the model's default)."""

    megapixels: float = 0.0
    steps: int | None = None

    @classmethod
    def of(cls, request: TextToImageRequest) -> Demand:
        return cls(request.width * request.height * request.num_images_per_prompt / 1e6, request.num_inference_steps)

    def work(self, node: Node, model_id: str) -> float:
        """In megapixel-steps, on ``node`` (whose default steps for the model apply when the request names none)."""
        return self.megapixels * (self.steps or node.default_steps.get(model_id, 1))


@dataclass(eq=False)
class _Waiter:
    model_id: str
    exclude: set[str]
    future: asyncio.Future[Node]
    notify: Notify | None
    demand: Demand
    tenant: str = ""
    weight: float = 1.0


class FairQueue:
    """Requests waiting for a slot: a queue per tenant, in arrival order, the tenants served in turn in
    proportion to their weights, so that one tenant's many requests do not delay another's few.

    Stride scheduling: each grant moves its tenant's pass on by ``1 / weight``, and the next goes to
    the waiting tenant with the lowest pass. A tenant that starts waiting again keeps its pass, or takes
    the pass of the last grant if that is later: time without waiting requests banks no credit, and a
    tenant with one request at a time gets no more than its weight's share. Between equal passes, the
    tenant with fewer requests waiting goes first."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[_Waiter]] = {}  # tenants with waiting requests only
        self._pass: dict[str, float] = {}  # every tenant seen: bounded by the keys (tenants are key names)
        self._last_pass = 0.0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def has_room(self, tenant: str, limit: int) -> bool:
        """Room for one more of ``tenant``'s: under ``limit`` in all or, when full, for a tenant with none
        waiting (the queue then holds at most ``limit`` and one per tenant): a tenant that filled the
        queue keeps no other out. A limit of 0: no waiting at all."""
        return self._count < limit or (limit > 0 and tenant not in self._queues)

    def append(self, waiter: _Waiter) -> None:
        if waiter.tenant not in self._queues:
            self._queues[waiter.tenant] = deque()
            self._pass[waiter.tenant] = max(self._pass.get(waiter.tenant, 0.0), self._last_pass)
        self._queues[waiter.tenant].append(waiter)
        self._count += 1

    def remove(self, waiter: _Waiter, *, granted: bool = False) -> bool:
        """Take ``waiter`` out (``granted``: its tenant's turn is used); False when it was not waiting."""
        queue = self._queues.get(waiter.tenant)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self._count -= 1
        if granted:
            self._last_pass = self._pass[waiter.tenant]
            self._pass[waiter.tenant] += 1 / waiter.weight
        if not queue:
            del self._queues[waiter.tenant]
        return True

    def in_turn(self) -> list[_Waiter]:
        """Every waiting request, in the order the tenants' turns would serve them."""
        passes = {tenant: self._pass[tenant] for tenant in self._queues}
        positions = dict.fromkeys(self._queues, 0)
        order: list[_Waiter] = []
        while positions:
            # The lowest pass; between equals, the tenant with fewer waiting (one request goes before a backlog).
            tenant = min(positions, key=lambda t: (passes[t], len(self._queues[t]) - positions[t]))
            queue = self._queues[tenant]
            waiter = queue[positions[tenant]]
            order.append(waiter)
            passes[tenant] += 1 / waiter.weight
            positions[tenant] += 1
            if positions[tenant] == len(queue):
                del positions[tenant]
        return order

    def __iter__(self) -> Iterator[_Waiter]:
        return (waiter for queue in self._queues.values() for waiter in queue)


@dataclass(eq=False, slots=True)  # slots: selection reads a few fields of nodes drawn from a large fleet
class Node:
    endpoint: Endpoint
    capabilities: dict[str, Any] | None = None  # the last valid /capabilities answer
    tiers: dict[str, int] = field(default_factory=dict)  # model -> 0 warm (or loaded), 1 loadable on demand
    capacity: int = 0  # as it advertised at the last probe, at most 1 + the pool's node_queue
    advertised: int = 0  # as it advertised
    busy_until: float = 0.0  # when the work we sent it should end (monotonic; 0: none of known length)
    ready: bool = False
    suspended_until: float = 0.0
    failures: int = 0  # requests failed in a row
    suspensions: int = 0  # in a row, without a request served between: sets the length of the next
    last_error: str | None = None
    in_flight: int = 0  # our requests to it now
    reported_busy: int = 0  # in_flight + queued, as it said at the last probe
    in_flight_at_probe: int = 0
    latency_s: float | None = None  # moving average of successful requests
    # Its speed and load, as it reported them (t2i_orchestrator/speed.py): seconds per megapixel-step, per
    # model; the seconds of work it held; and the expected seconds of what we sent it since.
    speeds: dict[str, float] = field(default_factory=dict)
    default_steps: dict[str, int] = field(default_factory=dict)
    load_s: dict[str, float] = field(default_factory=dict)
    held_s: float = 0.0
    sent_s: float = 0.0
    reported_at: float = 0.0  # when held_s was said (monotonic): it has run down since
    epoch: int = 0  # counts its reports: a request taken before the last one is in its held_s, not in sent_s
    observed: dict[str, deque[float]] = field(default_factory=dict)  # model -> seconds per megapixel-step of our last requests
    next_probe: float = 0.0
    reports: bool = False  # its registry passes on its reports: probed only while in use or after a failure
    leaving: bool = False  # gone from discovery: no new requests; those in flight finish unless it is found down
    reached: bool = False  # a probe of ours succeeded since it joined or last failed: its url, TLS and secret work from here
    # Set when the node is found down; attempts waiting on it give up at once and retry elsewhere.
    down: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return self.endpoint.url

    def tier(self, model_id: str) -> int | None:
        """0 if the model is warm (or loaded) here, 1 if it can be loaded on demand, None if not offered."""
        return self.tiers.get(model_id)

    def free(self) -> int:
        """Capacity minus load: the load it reported, plus what we sent since. Where the gateway keeps the
        queue (``--node-queue``), one more once the work we sent is expected to end within ``LEAD_S``: the
        next request is on its way as the last one ends, and the device does not wait for a round trip."""
        capacity = self.capacity
        if capacity < self.advertised and self.busy_until and self.busy_until - time.monotonic() <= LEAD_S:
            capacity += 1
        return capacity - max(self.in_flight, self.reported_busy + self.in_flight - self.in_flight_at_probe)

    def suspended(self, now: float) -> bool:
        return now < self.suspended_until

    def speed(self, model_id: str) -> float | None:
        """Seconds per megapixel-step: as reported, unless what we saw says it is far slower."""
        reported = self.speeds.get(model_id)
        seen = self.observed.get(model_id)
        if reported is None or not seen or len(seen) < 3:
            return reported
        quickest = min(seen)
        return quickest if quickest > DISBELIEF * reported else reported

    def expected_s(self, model_id: str, demand: Demand, speed: float, now: float) -> float:
        """When a request would finish here: the work held (what is left of it since the report, and what
        we sent since), then its own at ``speed`` (and the model's load)."""
        load = self.load_s.get(model_id, 0.0) if self.tiers.get(model_id) else 0.0
        held = max(0.0, self.held_s - (now - self.reported_at)) + self.sent_s
        return held + load + demand.work(self, model_id) * speed

    def seconds_for(self, model_id: str, demand: Demand) -> float:
        """What a request should take here, at its speed (0 while that is unknown): what we count as sent."""
        return demand.work(self, model_id) * (self.speed(model_id) or 0.0)


class NodePool:
    def __init__(
        self,
        discovery: Discovery,
        metrics: GatewayMetrics,
        *,
        secret: str | None = None,
        probe_interval_s: float = 5.0,
        probe_timeout_s: float = 3.0,
        max_queued: int = 0,
        max_suspended_share: float = 0.5,
        remember_s: float = 0.0,
        node_queue: int | None = None,
    ) -> None:
        self.discovery = discovery
        self.max_queued = max_queued
        # Requests we leave waiting on a node beyond the one it runs (None: as many as it takes). Fewer
        # keep the queue here, where tenants are served in turn and the next request goes to whichever
        # node frees first; at the cost of the node's own pipelining and batching.
        self._node_queue = node_queue if node_queue is not None else math.inf
        self._max_suspended_share = max_suspended_share
        self._remember_s = remember_s
        self._departed: dict[str, float] = {}  # url -> until when images may still be fetched from it, oldest first
        self._waiters = FairQueue()  # requests waiting for a free slot
        self.nodes: dict[str, Node] = {}
        self._metrics = metrics
        # Counted when scraped (on the loop): once per scrape, not once per probe of each of 1,000 joining nodes.
        metrics.orchestrators.labels("known").set_function(lambda: len(self.nodes))
        metrics.orchestrators.labels("healthy").set_function(lambda: len(self.healthy()))
        metrics.orchestrators.labels("suspended").set_function(lambda: len(self.nodes) - len(self._unsuspended()))
        metrics.discovery_ok.set_function(lambda: 0.0 if discovery.problem() else 1.0)
        self._secret = secret
        self._probe_interval_s = probe_interval_s
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout_s)
        self._probing: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        # What selection reads on every request, rebuilt only when a node's readiness or models change
        # (not on every change of load), so that a request costs the same with 10 nodes or 1,000.
        self._stale = True
        self._offer: dict[str, tuple[list[Node], list[Node]]] = {}  # model -> (ready warm nodes, ready on-demand nodes)
        self._largest: dict[str, tuple[int, ...]] = {}  # model -> the largest capacity in each of its tiers
        self._models_on_offer: list[str] = []
        self._default_model: str | None = None
        self._default_steps: dict[str, int] = {}
        self._idle: dict[Node, None] = {}  # nodes with no request of ours now, in the order they went idle

    # -- selection ----------------------------------------------------------------------------

    def select(self, model_id: str, exclude: set[str], demand: Demand | None = None) -> Node | None:
        """The best node for ``model_id``: warm before on-demand, then where the request is expected to
        finish first (``_soonest``), or, where no node has reported its speed, most free capacity, ties
        at random.

        Among more than ``2 * SAMPLE`` nodes of a tier, the most free of ``SAMPLE`` drawn at random
        (the "power of d choices": nearly as even a spread, at a cost that does not grow with the fleet),
        where ties go to one of the nodes that went idle last: its connection is open (over TLS, a
        handshake saved), so that a light load on a large fleet keeps to a few nodes instead of
        touching all of them; such a node is taken without drawing when none could be freer. Only when
        none of those can take the request are all of them looked at.
        """
        self._reindex()
        now = time.monotonic()
        for tier, nodes in enumerate(self._offer.get(model_id, ())):
            if len(nodes) > 2 * SAMPLE:
                recent = [node for node in islice(reversed(self._idle), 2) if node.tiers.get(model_id) == tier]
                for idle in recent:  # as free as the largest node of the tier can be: none drawn could beat it
                    if not idle.speeds and 0 < self._largest[model_id][tier] <= idle.free() and _usable(idle, exclude, now):
                        return idle  # (only by slot counting: a node that reports its speed is weighed against others)
                best = _soonest(recent + random.choices(nodes, k=SAMPLE), model_id, demand, exclude, now, prefer=recent)
                if best is not None:
                    return best
            best = _soonest(random.sample(nodes, len(nodes)), model_id, demand, exclude, now)
            if best is not None:
                return best
        return None

    # -- slots --------------------------------------------------------------------------------

    def can_admit(self, model_id: str, tenant: str = "") -> bool:
        """Whether a request for ``model_id`` can start now, or wait in the queue for a slot."""
        if self.select(model_id, exclude=set()) is not None and not self._waiting_for(model_id):
            return True
        return self._waiters.has_room(tenant, self.max_queued) and self._serves(model_id, exclude=set())

    async def acquire(
        self,
        model_id: str,
        exclude: set[str],
        *,
        timeout_s: float,
        notify: Notify | None = None,
        demand: Demand | None = None,
        tenant: str = "",
        weight: float = 1.0,
    ) -> Node | None:
        """A node for ``model_id`` with a slot taken for this request (``release`` gives it back).

        When every suitable node is full, the request waits for a free slot, for up to ``timeout_s``:
        behind the tenant's own earlier requests, and in turn with other tenants' (``FairQueue``). None
        at once when no ready node serves the model (or the queue is full), and None after the wait.
        """
        demand = demand or Demand()
        if not self._waiting_for(model_id):
            node = self.select(model_id, exclude, demand)
            if node is not None:
                return self._take(node, model_id, demand)
        if not self._waiters.has_room(tenant, self.max_queued) or not self._serves(model_id, exclude):
            return None
        waiter = _Waiter(model_id, exclude, asyncio.get_running_loop().create_future(), notify, demand, tenant, weight)
        self._waiters.append(waiter)
        self._queue_moved()
        try:
            await asyncio.wait([waiter.future], timeout=timeout_s)
        except asyncio.CancelledError:  # this very wait was cancelled (its client left)
            if waiter.future.done():
                granted = waiter.future.result()
                self.release(granted, model_id, demand, granted.epoch)  # granted as it left: the slot goes on, once
            raise
        finally:
            if self._waiters.remove(waiter):
                self._queue_moved()
        return waiter.future.result() if waiter.future.done() else None

    def release(self, node: Node, model_id: str = "", demand: Demand | None = None, epoch: int | None = None) -> None:
        """This request (for ``model_id``, of ``demand``, taken at the node's report ``epoch``) is done with
        ``node``: its work is no longer held there, and its slot goes to the next waiting request it suits."""
        node.in_flight -= 1
        if demand is not None and epoch == node.epoch:  # else a report since counted it, and has run it down
            node.sent_s = max(0.0, node.sent_s - node.seconds_for(model_id, demand))
        if not node.in_flight:
            node.busy_until = 0.0
            if node.leaving:
                self._remove(node)  # its last request has finished there
            else:
                self._idle[node] = None
        self._grant()

    def _take(self, node: Node, model_id: str, demand: Demand) -> Node:
        node.in_flight += 1
        seconds, now = node.seconds_for(model_id, demand), time.monotonic()
        node.sent_s += seconds  # until its next report says
        node.next_probe = min(node.next_probe, now + BUSY_PROBE_S)  # in use: probed every second
        if seconds:
            node.busy_until = max(node.busy_until, now) + seconds
            if node.capacity < node.advertised:  # the gateway keeps the queue: grant the next as this one ends
                asyncio.get_running_loop().call_later(node.busy_until - now - LEAD_S, self._grant)
        self._idle.pop(node, None)
        return node

    def _grant(self) -> None:
        """Free slots to waiting requests, in turn; each grant changes whose turn is next."""
        granted = False
        # What found no free slot stays so while slots are only taken: every waiter of the same model and
        # exclusions is skipped without a selection (on the path from one request's end to the next's start).
        full: set[tuple[str, frozenset[str]]] = set()
        while self._waiters:
            for waiter in self._waiters.in_turn():
                wants = (waiter.model_id, frozenset(waiter.exclude))
                if wants in full:
                    continue
                node = self.select(waiter.model_id, waiter.exclude, waiter.demand)
                if node is None:
                    full.add(wants)
                else:
                    waiter.future.set_result(self._take(node, waiter.model_id, waiter.demand))
                    self._waiters.remove(waiter, granted=True)
                    granted = True
                    break
            else:
                break
        if granted:
            self._queue_moved()

    def _waiting_for(self, model_id: str) -> bool:
        return any(waiter.model_id == model_id for waiter in self._waiters)

    def _serves(self, model_id: str, exclude: set[str]) -> bool:
        """Whether a ready node not in ``exclude`` offers the model (then waiting for it makes sense)."""
        self._reindex()
        return any(node.url not in exclude for tier in self._offer.get(model_id, ()) for node in tier)

    def _queue_moved(self) -> None:
        self._metrics.queued.set(len(self._waiters))
        if not any(waiter.notify for waiter in self._waiters):
            return
        for position, waiter in enumerate(self._waiters.in_turn()):
            if waiter.notify:
                waiter.notify("queued", {"position": position})

    def models_on_offer(self) -> list[str]:
        """Every model any known node offers (as last seen), sorted."""
        self._reindex()
        return self._models_on_offer

    def _reindex(self) -> None:
        if not self._stale:
            return
        self._stale = False
        self._idle.clear()  # a node among them may have left or changed its models
        offer: dict[str, tuple[list[Node], list[Node]]] = {}
        for node in self.nodes.values():
            if node.ready and not node.leaving:
                for model_id, tier in node.tiers.items():
                    offer.setdefault(model_id, ([], []))[tier].append(node)
        self._offer = offer
        self._largest = {
            model_id: tuple(max((node.capacity for node in nodes), default=0) for nodes in tiers) for model_id, tiers in offer.items()
        }
        self._models_on_offer = sorted({model_id for node in self.nodes.values() for model_id in node.tiers})
        # The default when a request names no model: warm on the most ready nodes, else offered by the most.
        warm = Counter({model_id: len(tiers[0]) for model_id, tiers in offer.items() if tiers[0]})
        offered = Counter({model_id: len(tiers[0]) + len(tiers[1]) for model_id, tiers in offer.items()})
        self._default_model = next((counts.most_common(1)[0][0] for counts in (warm, offered) if counts), None)
        # Said by the most nodes: one node cannot set what every request for the model counts as.
        steps = Counter((model_id, steps) for node in self.nodes.values() if node.ready for model_id, steps in node.default_steps.items())
        self._default_steps = {model_id: steps for (model_id, steps), _ in reversed(steps.most_common())}

    def models_summary(self) -> list[dict[str, Any]]:
        """Each model on offer, with on how many healthy nodes it is warm or loadable."""
        healthy = self.healthy()
        return [
            {
                "model_id": model_id,
                "warm_nodes": sum(node.tier(model_id) == 0 for node in healthy),
                "loadable_nodes": sum(node.tier(model_id) == 1 for node in healthy),
            }
            for model_id in self.models_on_offer()
        ]

    def default_steps(self, model_id: str) -> int:
        """The steps of a request for ``model_id`` that names none: what most of its nodes said (1 if none did)."""
        self._reindex()
        return self._default_steps.get(model_id, 1)

    def default_model(self) -> str | None:
        """The gateway's default when a request names no model: the one warm on the most ready nodes,
        else the one offered by the most ready nodes."""
        self._reindex()
        return self._default_model

    def healthy(self) -> list[Node]:
        return [node for node in self._unsuspended() if node.ready and not node.leaving]

    def knows(self, url: str) -> bool:
        """In the fleet now, or left it within ``remember_s`` (--image-ttl: its images may still be there)."""
        return url in self.nodes or self._departed.get(url, 0.0) > time.monotonic()

    def known_urls(self) -> list[str]:
        return [url for url in (*self.nodes, *self._departed) if self.knows(url)]

    def _unsuspended(self) -> list[Node]:
        now = time.monotonic()
        return [node for node in self.nodes.values() if not node.suspended(now)]

    def secret_for(self, url: str) -> str | None:
        """The secret to send to ``url``: its own, else the fleet's; none to an address not in the fleet now."""
        node = self.nodes.get(url)
        if node is None:
            return None
        return node.endpoint.secret or self._secret

    def auth_headers(self, url: str) -> dict[str, str]:
        secret = self.secret_for(url)
        return {"Authorization": f"Bearer {secret}"} if secret else {}

    # -- outcomes of requests -----------------------------------------------------------------

    def succeeded(self, node: Node, seconds: float, model_id: str = "", demand: Demand | None = None) -> None:
        node.failures = node.suspensions = 0
        node.latency_s = seconds if node.latency_s is None else 0.8 * node.latency_s + 0.2 * seconds
        work = demand.work(node, model_id) if demand else 0.0
        if work >= OBSERVED_WORK and len(node.observed) < 64:  # (a node offers few models; a liar may list many)
            node.observed.setdefault(model_id, deque(maxlen=OBSERVED)).append(seconds / work)

    def busy(self, node: Node) -> None:
        """It refused for lack of capacity: not a fault, but count it full until the next probe."""
        node.reported_busy = max(node.reported_busy, int((node.capabilities or {}).get("capacity", 0)))
        node.in_flight_at_probe = node.in_flight
        node.next_probe = min(node.next_probe, time.monotonic() + NOT_READY_PROBE_S)

    def failed(self, node: Node, reason: str, *, unreachable: bool = False) -> None:
        """A request failed on it (never for the request's own fault, which is a client error).

        It is probed at once, and a failed probe suspends it. Without one, it is suspended only when it
        could not be reached at all (``unreachable``) or after ``FAILURES_TO_SUSPEND`` failures in a
        row, and never beyond --max-suspended-share of the nodes serving one of its models: requests
        made to fail cannot take a fleet out of rotation (Envoy's max_ejection_percent).
        """
        node.failures += 1
        node.last_error = reason
        if not (unreachable or node.failures >= FAILURES_TO_SUSPEND):
            node.next_probe = min(node.next_probe, time.monotonic())
            return
        if not self._may_suspend(node):
            logger.warning("orchestrator %s failed (%s); not suspended: --max-suspended-share of its models' nodes are", node.url, reason)
            node.next_probe = min(node.next_probe, time.monotonic())
            return
        self._suspend(node, reason)

    def _may_suspend(self, node: Node) -> bool:
        now = time.monotonic()
        for model_id in node.tiers:
            serving = [other for other in self.nodes.values() if model_id in other.tiers]
            suspended = sum(1 for other in serving if other.suspended(now))
            if suspended + 1 > self._max_suspended_share * len(serving):
                return False
        return True

    def _suspend(self, node: Node, reason: str) -> None:
        """Out of rotation with exponential backoff; a successful probe afterwards re-admits it."""
        now = time.monotonic()
        if node.suspended(now):
            return  # the same episode, reported by another request or the prober: counted once
        node.suspensions += 1
        suspension = min(MAX_SUSPENSION_S, 2.0 ** (node.suspensions - 1))
        node.suspended_until = max(node.suspended_until, now + suspension)
        node.next_probe = node.suspended_until
        node.ready = False
        node.reached = False
        node.last_error = reason
        self._stale = True
        logger.warning("orchestrator %s failed (%s); suspended for %.0f s", node.url, reason, suspension)

    # -- background refresh -------------------------------------------------------------------

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Follow discovery and probe nodes, until cancelled."""
        self._session = session
        tasks: set[asyncio.Task[None]] = set()
        next_discovery = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_discovery:
                    try:  # bounded: a stuck backend must not stop the probing
                        async with asyncio.timeout(DISCOVERY_TIMEOUT_S):
                            await self.discovery.refresh()
                    except Exception:
                        logger.exception("discovery refresh failed; keeping the current set")
                    self._sync()
                    next_discovery = now + DISCOVERY_REFRESH_S
                for node in list(self.nodes.values()):
                    if len(self._probing) >= MAX_PROBES_AT_ONCE:
                        break  # the rest at the next turn
                    if node.next_probe <= now and node.url not in self._probing:
                        self._probing.add(node.url)
                        task = asyncio.create_task(self._probe(node))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    def _sync(self) -> None:
        endpoints = {endpoint.url: endpoint for endpoint in self.discovery.snapshot()}
        if endpoints.keys() != self.nodes.keys():
            self._stale = True
        for gone in [node for url, node in self.nodes.items() if url not in endpoints and not node.leaving]:
            # Leaving is draining: no new requests; those in flight finish there unless a probe finds it down.
            logger.info("orchestrator %s left discovery (%d request(s) of ours finish there)", gone.url, gone.in_flight)
            gone.leaving = True
            self._stale = True
            if not gone.in_flight:
                self._remove(gone)
        for url, endpoint in endpoints.items():
            known = self.nodes.get(url)
            if known is None:
                logger.info("orchestrator %s joined discovery", url)
                self.nodes[url] = Node(endpoint)
                self._departed.pop(url, None)
            else:
                known.endpoint = endpoint
                if known.leaving:
                    known.leaving, self._stale = False, True  # back before its last request had finished
        now = time.monotonic()
        for url, report in self.discovery.take_reports().items():
            reporting = self.nodes.get(url)
            if reporting is not None:
                self._reported(reporting, report, now)
        if self._waiters:
            self._grant()

    def _remove(self, node: Node) -> None:
        if self.nodes.get(node.url) is not node:
            return
        del self.nodes[node.url]
        self._idle.pop(node, None)
        self._stale = True
        self._metrics.forget_orchestrator(node.url)  # or a churning fleet grows the series without bound
        now = time.monotonic()
        self._departed[node.url] = now + self._remember_s
        while self._departed and (len(self._departed) > MAX_DEPARTED or next(iter(self._departed.values())) <= now):
            del self._departed[next(iter(self._departed))]

    def _reported(self, node: Node, report: dict[str, Any], now: float) -> None:
        """A report the node published through the registry: as good as a probe, if a little older."""
        try:
            capabilities = _check_capabilities(report)
        except (ValueError, TypeError) as exc:
            logger.warning("orchestrator %s: ignoring its registry report: %s", node.url, exc)
            return
        node.reports = True
        # Believed once a probe of ours has reached it (a node in Redis may still be one this gateway
        # cannot reach, or whose certificate it does not trust); and not while it is in use, when our
        # probes every second are fresher.
        if node.reached and not node.in_flight:
            self._apply(node, capabilities, now)

    async def _probe(self, node: Node) -> None:
        assert self._session is not None
        headers = self.auth_headers(node.url)
        if node.reports and not node.reached:
            # Only to check that it can be reached; its reports follow. Closed, so that a large fleet
            # does not leave this gateway with a thousand idle connections.
            headers["Connection"] = "close"
        try:
            async with self._session.get(f"{node.url}/capabilities", headers=headers, timeout=self._probe_timeout) as response:
                if response.status != 200:
                    raise ValueError(f"/capabilities answered {response.status}")
                capabilities = _check_capabilities(await response.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, RecursionError) as exc:
            reason = f"probe: {str(exc) or type(exc).__name__}"
            if self.nodes.get(node.url) is not node:
                return
            if node.capabilities is None and not node.reports:
                # Never seen up: probably still starting. Keep asking often, without suspending it. (A
                # node whose reports arrive is up: if we cannot reach it, we back off as from a failure.)
                node.last_error = reason
                node.next_probe = time.monotonic() + NOT_READY_PROBE_S
                return
            self._suspend(node, reason)  # a failed probe is proof enough, however many others are suspended
            node.down.set()  # the node itself is unwell: stop waiting on it
            return
        finally:
            self._probing.discard(node.url)
        node.reached = True
        self._apply(node, capabilities, time.monotonic())
        if self._waiters:
            self._grant()  # it may have room again

    def _apply(self, node: Node, capabilities: dict[str, Any], now: float) -> None:
        """What a probe or a report says of ``node``; when to probe it next."""
        node.capabilities = capabilities
        node.advertised = int(capabilities["capacity"])
        capacity = int(min(node.advertised, 1 + self._node_queue))
        if node.capacity != capacity:
            node.capacity = capacity
            self._stale = True  # the largest capacity on offer may have changed
        node.reported_busy = int(capabilities["in_flight"]) + int(capabilities["queued"])
        node.in_flight_at_probe = node.in_flight
        node.held_s, node.sent_s, node.reported_at = float(capabilities.get("held_s", 0.0)), 0.0, now
        node.epoch += 1
        models = capabilities["models"]
        node.speeds = {m["model_id"]: float(m["s_per_mpx_step"]) for m in models if m.get("s_per_mpx_step")}
        node.default_steps = {m["model_id"]: int(m["default_steps"]) for m in models if m.get("default_steps")}
        node.load_s = {m["model_id"]: float(m["load_s"]) for m in models if m.get("load_s") is not None}
        tiers = {m["model_id"]: 0 if m["warm"] or m["loaded"] else 1 for m in capabilities["models"]}
        was_ready = node.ready
        node.ready = capabilities.get("status", "ready") == "ready"
        if node.ready and not was_ready:
            node.down = asyncio.Event()
            node.suspended_until = 0.0
            node.last_error = None
            logger.info("orchestrator %s is ready: %s", node.url, ", ".join(m["model_id"] for m in capabilities["models"]))
        if tiers != node.tiers or node.ready != was_ready:
            node.tiers = tiers
            self._stale = True
        if node.in_flight:
            node.next_probe = now + (BUSY_PROBE_S if node.ready else NOT_READY_PROBE_S)
        elif node.reports:
            node.next_probe = math.inf  # its reports keep it current; a changed offer is announced at once
        elif not node.ready:
            node.next_probe = now + NOT_READY_PROBE_S
        else:
            # Bounded in a large fleet: 1,000 nodes every 5 s would cost each gateway 200 probes a second
            # (bench.fleet: even 50 a second cost it about 4 % of its throughput); a node in use is still
            # probed every second, and a dead one is dropped by the registry's TTL or its first failed request.
            interval = len(self.nodes) / MAX_IDLE_PROBES_PER_S
            if interval > self._probe_interval_s:
                # At random around it, so that nodes that joined together are not probed in one burst, again and again.
                node.next_probe = now + interval * random.uniform(0.5, 1.5)
            else:
                node.next_probe = now + self._probe_interval_s

    def describe(self) -> list[dict[str, Any]]:
        """The operator's view (``GET /orchestrators``)."""
        now = time.monotonic()
        wall = time.time()
        view = []
        for node in self.nodes.values():
            models = (node.capabilities or {}).get("models", [])
            view.append(
                {
                    "url": node.url,
                    "healthy": node.ready and not node.suspended(now),
                    "suspended_until": wall + node.suspended_until - now if node.suspended(now) else None,
                    "last_error": node.last_error,
                    "node_id": (node.capabilities or {}).get("node_id"),
                    "models_warm": [m["model_id"] for m in models if m["warm"] or m["loaded"]],
                    "models_loadable": [m["model_id"] for m in models if not (m["warm"] or m["loaded"])],
                    "capacity": (node.capabilities or {}).get("capacity"),
                    "free": node.free() if node.capabilities else None,
                    "in_flight": node.in_flight,
                    "latency_s": None if node.latency_s is None else round(node.latency_s, 3),
                    "s_per_mpx_step": {model: round(speed, 6) for model, speed in node.speeds.items()},  # as it measured
                    "held_s": round(
                        max(0.0, node.held_s - (now - node.reported_at)) + node.sent_s, 3
                    ),  # as reported, run down since, and what we sent since
                    "known_by": "reports" if node.reports else "probes",  # while idle: its registry reports, or our probes
                }
            )
        return view


def _check_capabilities(body: Any) -> dict[str, Any]:
    """Accept a /capabilities answer only if it has the shape selection relies on."""
    if not isinstance(body, dict):
        raise ValueError("/capabilities is not a JSON object")
    for key in ("capacity", "in_flight", "queued"):
        value = body.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1_000_000:
            raise ValueError(f"/capabilities has no valid {key!r}")
    models = body.get("models")
    if not isinstance(models, list) or not all(
        isinstance(m, dict) and isinstance(m.get("model_id"), str) and isinstance(m.get("warm"), bool) and isinstance(m.get("loaded"), bool)
        for m in models
    ):
        raise ValueError("/capabilities has no valid 'models' list")
    if not isinstance(body.get("status", "ready"), str):
        raise ValueError("/capabilities has an invalid 'status'")
    # The speed report (optional: nodes of earlier versions send none); bounded, so that no value can
    # overflow or poison the arithmetic of selection.
    if not _number(body.get("held_s", 0.0), 0.0):
        raise ValueError("/capabilities has an invalid 'held_s'")
    for m in models:
        if not (
            _number(m.get("s_per_mpx_step"), 1e-9, none=True)
            and _number(m.get("load_s"), 0.0, none=True)
            and (m.get("default_steps") is None or (type(m["default_steps"]) is int and 1 <= m["default_steps"] <= 10_000))
        ):
            raise ValueError(f"/capabilities has an invalid speed report for {m['model_id'][:100]!r}")
    return body


def _number(value: Any, low: float, *, none: bool = False) -> bool:
    """A finite JSON number from ``low`` to a million (or None, where ``none``)."""
    if value is None:
        return none
    return not isinstance(value, bool) and isinstance(value, (int, float)) and low <= value <= 1e6


def _soonest(
    nodes: list[Node], model_id: str, demand: Demand | None, exclude: set[str], now: float, prefer: list[Node] | None = None
) -> Node | None:
    """Where a request would finish first: the node with a free slot whose expected completion (the work
    it holds, plus ours since its report, plus this request's at its speed) is least, at random among
    those within ``NEAR_SHARE`` of it, one of ``prefer`` among them if any (nodes that went idle last:
    their connections are open, and a light load on a large fleet keeps to a few nodes instead of being
    probed on all of them). A node whose speed is not known yet counts as fast as the fastest known (so
    it is tried, and measured); when no node's is known, the most free one (slot counting)."""
    usable = [node for node in nodes if _usable(node, exclude, now) and node.free() > 0]
    speeds = [node.speed(model_id) for node in usable]
    known = [speed for speed in speeds if speed is not None]
    if demand is None or not known:
        return _most_free(usable, exclude, now)
    fastest = min(known)
    costs = [(node.expected_s(model_id, demand, fastest if speed is None else speed, now), node) for node, speed in zip(usable, speeds)]
    best = min(cost for cost, _ in costs)
    near = [node for cost, node in costs if cost <= best * (1 + NEAR_SHARE) + NEAR_S]
    return random.choice([node for node in near if node in (prefer or ())] or near)


def _most_free(nodes: list[Node], exclude: set[str], now: float) -> Node | None:
    """The node with the most free capacity that can take a request now (the first of equals: callers order them)."""
    best, best_free = None, 0
    for node in nodes:
        if _usable(node, exclude, now):
            free = node.free()
            if free > best_free:
                best, best_free = node, free
    return best


def _usable(node: Node, exclude: set[str], now: float) -> bool:
    return node.ready and not node.leaving and now >= node.suspended_until and not (exclude and node.url in exclude)


def retry_after_s(nodes: list[Node]) -> int:
    """A hint for clients: about one typical generation, between 1 and 30 seconds."""
    latencies = [node.latency_s for node in nodes if node.latency_s]
    return max(1, min(30, math.ceil(min(latencies)) if latencies else 1))
