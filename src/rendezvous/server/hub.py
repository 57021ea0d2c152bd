"""The relay's shared state: parked connections per ID, mobile clients waiting, counters.

Pools are FIFO deques bounded by ``Limits.pool_size``; a mobile client takes the oldest parked
connection of its ID (the one longest proven alive), or waits up to ``Limits.pair_wait`` for one.
Everything here runs on the event loop thread, so no locks.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rendezvous.config import Limits
from rendezvous.protocol.digest import NonceBook
from rendezvous.registry import Registry
from rendezvous.server.ratelimit import GuessLimiter

if TYPE_CHECKING:
    from rendezvous.server.cluster import ClusterMember
    from rendezvous.server.connection import Connection


# How many recent rejections the status page can show.
RECENT_REJECTIONS = 50
# Upper bounds (seconds) of the pairing-latency buckets: from a pairing with a connection
# already parked (the settle delay, ~10 ms) to a client that waited most of pair_wait.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class IdStats:
    """Totals for one hidden-server ID, updated at park, pairing and close (never per chunk)."""

    active: int = 0
    pairings: int = 0
    bytes_up: int = 0  # mobile to hidden
    bytes_down: int = 0  # hidden to mobile
    last_seen: float = 0.0  # wall-clock time of its last park or pairing


@dataclass(frozen=True, slots=True)
class Rejection:
    """One refused peer, for the status page."""

    time: float
    reason: str
    status: int | None
    uuid: str
    peer: str


@dataclass(slots=True)
class LatencyHistogram:
    """Pairing latencies as counts per bucket: constant work per pairing, cumulative at scrape.

    ``counts[i]`` holds the values in ``(bounds[i-1], bounds[i]]``; the last slot, those above
    every bound.
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        """Count one pairing that took ``seconds``."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values <= bound)`` per bucket, ending with ``(inf, count)``."""
        found: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            found.append((bound, running))
        return found


@dataclass(slots=True)
class Stats:
    """Running totals since start, for logs, status and metrics."""

    parked: int = 0
    pairings: int = 0
    forwarded: int = 0  # mobile clients handed to another relay node (cluster)
    bytes_up: int = 0  # mobile to hidden
    bytes_down: int = 0  # hidden to mobile
    rejections: Counter[str] = field(default_factory=Counter)
    recent_rejections: deque[Rejection] = field(
        default_factory=lambda: deque(maxlen=RECENT_REJECTIONS))
    per_id: dict[str, IdStats] = field(default_factory=dict)
    # Seconds each pairing's mobile client waited from its head to the relay's start.
    pairing_latency: LatencyHistogram = field(default_factory=lambda: LatencyHistogram())

    def for_id(self, uuid: str) -> IdStats:
        """The totals of ``uuid``, created on first use."""
        found = self.per_id.get(uuid)
        if found is None:
            found = self.per_id[uuid] = IdStats()
        return found


class Hub:
    """Parked pools and waiting mobile clients, keyed by hidden-server ID."""

    def __init__(
        self, registry: Registry, limits: Limits, loop: asyncio.AbstractEventLoop, tls: bool,
        nonce_key: bytes | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.loop = loop
        self.tls = tls
        self.pools: dict[str, deque[Connection]] = {}
        self.waiting: dict[str, deque[Connection]] = {}
        self.connections: set[Connection] = set()  # every open one, to cut them at shutdown
        self.closing = False  # shutting down: connections that arrive now are cut
        self.per_address: Counter[str] = Counter()  # open connections by source address
        self.guesses = GuessLimiter(limits.guesses)
        # Digest nonces; nodes of a cluster share the key so any node checks any nonce.
        self.nonces = NonceBook(nonce_key)
        self._sweeper: asyncio.TimerHandle | None = None
        self.cluster: ClusterMember | None = None  # set when serving as part of a cluster
        self.active_pairs = 0
        self.stats = Stats()
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a short job (a token check) holding a reference, so it is not collected."""
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Hidden side -------------------------------------------------------------------------

    def park(self, hidden: Connection) -> None:
        """Give a newly authenticated connection to a waiting mobile client, or pool it."""
        waiters = self.waiting.get(hidden.uuid)
        if waiters:
            mobile = waiters.popleft()
            if not waiters:
                del self.waiting[hidden.uuid]
            mobile.pair_with(hidden)
            return
        pool = self.pools.setdefault(hidden.uuid, deque())
        if len(pool) >= self.limits.pool_size:
            pool[0].evict("pool full")  # the oldest goes: a bound of 1 = the original
            pool = self.pools.setdefault(hidden.uuid, pool)  # (evict may drop an empty pool)
        pool.append(hidden)
        self._pool_changed(hidden.uuid)

    def return_to_pool(self, hidden: Connection) -> None:
        """Put back a connection whose mobile client left before the pairing began."""
        waiters = self.waiting.get(hidden.uuid)
        if waiters:
            self.park(hidden)
            return
        self.pools.setdefault(hidden.uuid, deque()).appendleft(hidden)
        self._pool_changed(hidden.uuid)

    def unpark(self, hidden: Connection) -> bool:
        """Forget a parked connection that closed; False if it was not in its pool."""
        pool = self.pools.get(hidden.uuid)
        if pool is None:
            return False
        try:
            pool.remove(hidden)
        except ValueError:
            return False
        if not pool:
            del self.pools[hidden.uuid]
        self._pool_changed(hidden.uuid)
        return True

    def _pool_changed(self, uuid: str) -> None:
        if self.cluster is not None:
            self.cluster.pool_changed(uuid)

    def parked_count(self, uuid: str | None = None) -> int:
        """Connections parked now, for one ID or in all."""
        if uuid is not None:
            return len(self.pools.get(uuid, ()))
        return sum(len(pool) for pool in self.pools.values())

    # Mobile side -------------------------------------------------------------------------

    def take(self, uuid: str) -> Connection | None:
        """The oldest parked connection of ``uuid``, removed from its pool, or None."""
        pool = self.pools.get(uuid)
        if not pool:
            return None
        hidden = pool.popleft()
        if not pool:
            del self.pools[uuid]
        self._pool_changed(uuid)
        return hidden

    def wait_for(self, mobile: Connection) -> None:
        """Queue a mobile client until a connection of its ID parks."""
        self.waiting.setdefault(mobile.uuid, deque()).append(mobile)

    def stop_waiting(self, mobile: Connection) -> None:
        """Take a mobile client out of the queue (it gave up or closed)."""
        waiters = self.waiting.get(mobile.uuid)
        if waiters is None:
            return
        try:
            waiters.remove(mobile)
        except ValueError:
            return
        if not waiters:
            del self.waiting[mobile.uuid]

    @property
    def open_connections(self) -> int:
        """Accepted connections not yet closed."""
        return len(self.connections)

    def abort_all(self) -> None:
        """Cut every remaining connection at once (the end of a shutdown)."""
        for connection in list(self.connections):
            connection.transport.abort()

    def start_sweeping(self) -> None:
        """Close parked connections older than ``parked_timeout``, checking periodically.

        Pools are in parking order, so only each pool's head needs looking at: no timer per
        parked connection.
        """
        now = self.loop.time()
        deadline = now - self.limits.parked_timeout
        for pool in list(self.pools.values()):
            while pool and pool[0].since < deadline:
                pool[0].evict("parked too long")  # takes itself out of the pool
        interval = min(30.0, max(0.05, self.limits.parked_timeout / 4))
        self._sweeper = self.loop.call_later(interval, self.start_sweeping)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def close_parked(self) -> None:
        """Close every parked connection (shutdown)."""
        for pool in list(self.pools.values()):
            for hidden in list(pool):
                hidden.evict("shutting down")
        self.pools.clear()
