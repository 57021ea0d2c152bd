"""The relay's shared state: parked connections per ID, mobile clients waiting, counters.

This module is plain state with no I/O of its own: it holds *legs* (anything shaped like
:class:`Leg`, in the relay a ``server.connection.Connection``; in tests, fakes) and decides which
of them go together, and the legs carry out what it decides. It imports nothing else of
``server/``; the cluster (``server/cluster.py``) plugs in through :class:`Cluster` and
``on_pool_change``.

Pools are LIFO, bounded by ``Limits.pool_size`` (docs/protocol.md §1): a mobile client takes the
*newest* parked connection of its ID, the one most likely alive behind a NAT (a client written
for the original, where a new CONNECT replaced the old one, expects its latest connection to
serve), or waits up to ``Limits.pair_wait`` for one. A full pool closes its oldest connection of
the parking address; a park never evicts another address's connections, and a TOTP code, once
used, parks only from the address that used it first (so one leaked code cannot take over a
pool). Each pool stays in parking order, oldest first, so the sweeper of connections parked too
long looks at each pool's first leg only.

Everything here runs on the event loop thread, so no locks.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from rendezvous import logs
from rendezvous.config import IPNetwork, Limits
from rendezvous.protocol.digest import NonceBook
from rendezvous.registry import Entry, Registry
from rendezvous.registry.base import Changes
from rendezvous.server.ratelimit import GuessLimiter

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


class Leg(Protocol):
    """What the hub needs of a connection it holds: a parked hidden leg, a waiting mobile leg,
    or one side of a relaying pair."""

    @property
    def uuid(self) -> str:
        """The hidden-server ID the leg parked for, or asks for."""

    @property
    def address(self) -> str:
        """The peer's IP address (a park never evicts another address's legs)."""

    @property
    def since(self) -> float:
        """Loop time of parking (of a parked leg); pools are kept in this order."""

    @property
    def received(self) -> int:
        """Bytes read from this leg and sent on, once relaying."""

    def evict(self, reason: str) -> None:
        """Close a parked leg the pool no longer keeps; it calls :meth:`Hub.unpark` itself."""

    def abort(self) -> None:
        """Cut the leg at once (the end of a shutdown)."""


P = TypeVar("P", bound=asyncio.BaseProtocol)


class Cluster(Protocol):
    """What the relay needs of the other nodes of its cluster (``server/cluster.py``)."""

    async def locate(self, uuid: str) -> list[tuple[str, str]]:
        """Other live nodes holding a parked connection for ``uuid``: ``[(node, address)]``."""

    async def dial(self, address: str, factory: Callable[[], P], *, probe: bool = False) -> P:
        """A new stream to a node, on this node's internal link to it, speaking
        ``factory()``'s protocol; with ``probe``, its transport's ``answer`` says whether that
        node took the client. OSError, ssl.SSLError, TimeoutError or ValueError when it
        cannot."""

    def route(self, uuid: str) -> tuple[str, str] | None:
        """The node (node, address) that last took a client of ``uuid`` from this one."""

    def remember_route(self, uuid: str, node: str, address: str) -> None:
        """``node`` took a client of ``uuid``: ask it first next time."""

    def route_answered(self, uuid: str, taken: bool) -> None:
        """The remembered node took (or refused, then it is forgotten) a probed client."""

    def forget_route(self, uuid: str) -> None:
        """The remembered node of ``uuid`` could not be reached."""

    def status(self) -> dict[str, int]:
        """Counts of the internal links and streams, for ``rendezvous status``."""

    async def claim_code(self, uuid: str, code: str, address: str, seconds: float) -> bool:
        """Claim ``code`` of ``uuid`` for ``address`` on every node for ``seconds``; False when
        another address holds it (True when the cluster cannot be asked)."""


class TlsChallenges(Protocol):
    """Pending TLS-ALPN-01 challenges (``server/certificates.py``'s Challenges)."""

    @property
    def alpn_pending(self) -> bool:
        """Whether any is pending (then ClientHellos are read before the handshake)."""

    def context_for(self, server_name: str | None, alpn: tuple[str, ...]) -> ssl.SSLContext | None:
        """The challenge context for this SNI and ALPN list, or None for the normal one."""


class EntryCache:
    """Registry entries as last read, for CONNECTs and visitors of known IDs.

    An entry is used only while the registry's changes are followed (``following``, set by
    server/revocation.py once its watch runs) and the registry vouches that nothing it has not
    reported yet was committed (:meth:`Registry.fresh`); every change reported or written here
    forgets its entry, and a read that spans one is not kept. So no entry is ever used that is
    older than one the relay has seen. Misses, unknown IDs included, go to the registry.
    """

    def __init__(self, size: int) -> None:
        self.size = size  # entries kept at most (the oldest kept goes first); 0: none
        self.following = False
        self.generation = 0  # changes forgotten so far: a read that spans one is not kept
        self._entries: dict[str, Entry] = {}

    def get(self, uuid: str) -> Entry | None:
        """The entry kept for ``uuid``, or None (then read the registry)."""
        return self._entries.get(uuid) if self.following else None

    def keep(self, entry: Entry, generation: int) -> None:
        """Keep ``entry``, read when :attr:`generation` was ``generation``."""
        if not self.following or generation != self.generation or self.size <= 0:
            return
        entries = self._entries
        if entry.uuid not in entries:
            while len(entries) >= self.size:
                del entries[next(iter(entries))]
        entries[entry.uuid] = entry

    def forget(self, uuid: str) -> None:
        """``uuid`` changed (a write through this process's registry, as it happens)."""
        self.generation += 1
        self._entries.pop(uuid, None)

    def changed(self, changes: Changes) -> None:
        """Forget what a watch report names (everything, when it says so)."""
        self.generation += 1
        if changes.everything:
            self._entries.clear()
        else:
            for uuid in changes.ids:
                self._entries.pop(uuid, None)

    def follow(self, following: bool) -> None:
        """The watch started (True) or stopped following changes: start over either way."""
        self.generation += 1
        self._entries.clear()
        self.following = following

    def __len__(self) -> int:
        return len(self._entries)


L = TypeVar("L", bound=Leg)

# Why a park is refused though its code is right; the relay answers each with its own status.
CODE_TAKEN = "code used from another address"
POOL_TAKEN = "pool full of other addresses' connections"
# A code is accepted for at most three steps (one either side, for clock skew): its claim by
# the first address that used it lasts that long.
CODE_CLAIM_STEPS = 3


class Hub(Generic[L]):
    """Parked pools and waiting mobile clients, keyed by hidden-server ID, and the counters.

    The legs report what happens to them (:meth:`opened`, :meth:`paired`, :meth:`relay_started`,
    ...) and the hub keeps the numbers; readers (status page, metrics) use its methods and
    ``stats``, never the legs.
    """

    def __init__(
        self, registry: Registry, limits: Limits, loop: asyncio.AbstractEventLoop,
        nonce_key: bytes | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.loop = loop
        # Rejections logged once per (reason, address) and 10 s, with counts: floods stay small.
        self.repeats = logs.RepeatedEvents(schedule=loop.call_later)
        self.guesses = GuessLimiter(limits.guesses)
        self.visitor_guesses = GuessLimiter(limits.visitor_guesses)  # visitor passwords
        # Digest nonces; nodes of a cluster share the key so any node checks any nonce.
        self.nonces = NonceBook(nonce_key)
        self.closing = False  # shutting down: connections that arrive now are cut
        self.cluster: Cluster | None = None  # set when serving as part of a cluster
        self.domain = ""  # serve --domain: requests for NAME.DOMAIN go to the entry named NAME
        # serve --proxy-protocol-from: sources whose connections begin with a PROXY header.
        self.proxy_from: tuple[IPNetwork, ...] = ()
        self.add_forwarded = False  # serve --forwarded: a Forwarded header in each head passed on
        self.challenges: TlsChallenges | None = None  # serve --acme: TLS-ALPN-01 ones pending
        # Called with an ID whenever its pool grows or shrinks (the cluster publishes sizes).
        self.on_pool_change: Callable[[str], None] | None = None
        self.stats = Stats()
        self._pools: dict[str, deque[L]] = {}  # oldest first
        self._waiting: dict[str, deque[L]] = {}  # first come, first served
        self._connections: set[L] = set()  # every open one, to cut them at shutdown
        self._per_address: Counter[str] = Counter()  # open connections by source address
        self._pairs: dict[L, L] = {}  # relaying now: mobile leg -> the leg it relays to
        # (ID, code) -> (the address that first parked with it, loop time its claim ends)
        self._codes: dict[tuple[str, str], tuple[str, float]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # Registry changes noticed so far (server/revocation.py): a token check whose lookup
        # spans one looks again, so nothing parks with an entry older than one already seen.
        self.registry_changes = 0
        self.entries = EntryCache(limits.entry_cache)
        registry.on_write(self.entries.forget)
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a short job (a token check) holding a reference, so it is not collected."""
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Open connections --------------------------------------------------------------------

    def opened(self, leg: L, address: str | None) -> None:
        """Count an accepted connection, against ``address`` unless None (ours, outbound)."""
        self._connections.add(leg)
        if address is not None:
            self._per_address[address] += 1

    def closed(self, leg: L, address: str | None) -> None:
        """Forget a connection counted by :meth:`opened` (with the same ``address``); once: a
        leg whose TLS handshake failed may or may not be reported twice, depending on the loop."""
        if leg not in self._connections:
            return
        self._connections.discard(leg)
        if address is not None:
            if self._per_address[address] <= 1:
                del self._per_address[address]
            else:
                self._per_address[address] -= 1

    def from_address(self, address: str) -> int:
        """Open connections from ``address``."""
        return self._per_address.get(address, 0)

    @property
    def open_connections(self) -> int:
        """Accepted connections not yet closed."""
        return len(self._connections)

    # Hidden side -------------------------------------------------------------------------

    def refusal(self, hidden: L, code: str, step: int) -> str | None:
        """Why ``hidden``, whose ``code`` (of a ``step``-second TOTP) checked out, may not park
        now (:data:`CODE_TAKEN`, :data:`POOL_TAKEN`), or None; then the code is claimed for
        its address, and :meth:`park` may follow."""
        uuid, address = hidden.uuid, hidden.address
        now = self.loop.time()
        claim = self._codes.get((uuid, code))
        if claim is not None and claim[1] > now and claim[0] != address:
            return CODE_TAKEN
        pool = self._pools.get(uuid)
        if (not self._waiting.get(uuid) and pool and len(pool) >= self.limits.pool_size
                and all(leg.address != address for leg in pool)):
            return POOL_TAKEN
        if claim is None or claim[1] <= now:
            self._codes[(uuid, code)] = (address, now + CODE_CLAIM_STEPS * step)
        return None

    def park(self, hidden: L) -> L | None:
        """Take in a newly authenticated connection (after :meth:`refusal`): the waiting mobile
        client it must be paired with (removed from the queue), or None when it was pooled.

        A full pool first closes its oldest connection from the same address.
        """
        stats = self.stats
        stats.parked += 1
        stats.for_id(hidden.uuid).last_seen = time.time()
        mobile = self._next_waiting(hidden.uuid)
        if mobile is not None:
            return mobile
        uuid = hidden.uuid
        pool = self._pools.get(uuid)
        if pool is not None and len(pool) >= self.limits.pool_size:
            victim = next((leg for leg in pool if leg.address == hidden.address), None)
            if victim is None:
                raise RuntimeError(f"{POOL_TAKEN}: refusal() must be asked first")
            victim.evict("pool full")  # a bound of 1 from one address = the original
        self._pools.setdefault(uuid, deque()).append(hidden)
        self._pool_changed(uuid)
        return None

    def return_to_pool(self, hidden: L) -> L | None:
        """Put back a connection whose mobile client left, or failed the visitor check,
        before the pairing began: the waiting client it must pair with instead, or None. It
        goes back to its place in parking order (it is usually still the newest)."""
        mobile = self._next_waiting(hidden.uuid)
        if mobile is not None:
            return mobile
        pool = self._pools.setdefault(hidden.uuid, deque())
        place = len(pool)
        while place and pool[place - 1].since > hidden.since:
            place -= 1
        pool.insert(place, hidden)
        self._pool_changed(hidden.uuid)
        return None

    def unpark(self, hidden: L) -> bool:
        """Forget a parked connection that closed; False if it was not in its pool."""
        pool = self._pools.get(hidden.uuid)
        if pool is None:
            return False
        try:
            pool.remove(hidden)
        except ValueError:
            return False
        if not pool:
            del self._pools[hidden.uuid]
        self._pool_changed(hidden.uuid)
        return True

    def _pool_changed(self, uuid: str) -> None:
        if self.on_pool_change is not None:
            self.on_pool_change(uuid)

    def parked_count(self, uuid: str | None = None) -> int:
        """Connections parked now, for one ID or in all."""
        if uuid is not None:
            return len(self._pools.get(uuid, ()))
        return sum(len(pool) for pool in self._pools.values())

    def parked_ids(self) -> Collection[str]:
        """The IDs with a connection parked now."""
        return self._pools.keys()

    def pool_sizes(self) -> dict[str, int]:
        """Connections parked now, per ID that has any."""
        return {uuid: len(pool) for uuid, pool in self._pools.items()}

    def parked(self, uuid: str) -> list[L]:
        """The connections parked for ``uuid``, oldest first (a copy)."""
        return list(self._pools.get(uuid, ()))

    # Mobile side -------------------------------------------------------------------------

    def take(self, uuid: str) -> L | None:
        """The newest parked connection of ``uuid``, removed from its pool, or None."""
        pool = self._pools.get(uuid)
        if not pool:
            return None
        hidden = pool.pop()
        if not pool:
            del self._pools[uuid]
        self._pool_changed(uuid)
        return hidden

    def wait_for(self, mobile: L) -> None:
        """Queue a mobile client until a connection of its ID parks."""
        self._waiting.setdefault(mobile.uuid, deque()).append(mobile)

    def stop_waiting(self, mobile: L) -> None:
        """Take a mobile client out of the queue (it gave up, closed, or went elsewhere)."""
        waiters = self._waiting.get(mobile.uuid)
        if waiters is None:
            return
        try:
            waiters.remove(mobile)
        except ValueError:
            return
        if not waiters:
            del self._waiting[mobile.uuid]

    def waiting_count(self, uuid: str | None = None) -> int:
        """Mobile clients waiting now, for one ID or in all."""
        if uuid is not None:
            return len(self._waiting.get(uuid, ()))
        return sum(len(waiters) for waiters in self._waiting.values())

    def _next_waiting(self, uuid: str) -> L | None:
        waiters = self._waiting.get(uuid)
        if not waiters:
            return None
        mobile = waiters.popleft()
        if not waiters:
            del self._waiting[uuid]
        return mobile

    # Pairings ----------------------------------------------------------------------------

    def paired(self, uuid: str, latency: float) -> None:
        """Count a pairing made here, whose client waited ``latency`` seconds for it."""
        stats = self.stats
        stats.pairings += 1
        stats.pairing_latency.observe(latency)
        stats.for_id(uuid).pairings += 1

    def forwarded(self) -> None:
        """Count a mobile client handed to another node of the cluster."""
        self.stats.forwarded += 1

    def relay_started(self, mobile: L, other: L) -> None:
        """``mobile`` now relays with ``other`` (a parked leg, or a link to another node)."""
        self._pairs[mobile] = other
        per_id = self.stats.for_id(mobile.uuid)
        per_id.active += 1
        per_id.last_seen = time.time()

    def relay_ended(self, mobile: L) -> None:
        """Both legs of ``mobile``'s pair have closed: add up what they moved."""
        other = self._pairs.pop(mobile)
        stats = self.stats
        stats.bytes_up += mobile.received
        stats.bytes_down += other.received
        per_id = stats.for_id(mobile.uuid)
        per_id.active -= 1
        per_id.bytes_up += mobile.received
        per_id.bytes_down += other.received

    @property
    def active_pairs(self) -> int:
        """Pairings relaying now (forwarded ones included)."""
        return len(self._pairs)

    def bytes_in_flight(self) -> dict[str, int]:
        """Bytes moved so far by pairings still open, per ID (both ways)."""
        found: dict[str, int] = {}
        for mobile, other in self._pairs.items():
            moved = mobile.received + other.received
            if moved:
                found[mobile.uuid] = found.get(mobile.uuid, 0) + moved
        return found

    def rejected(self, reason: str, status: int | None, uuid: str, peer: str) -> None:
        """Count a refused peer (by kind of reason, so the counter stays small)."""
        stats = self.stats
        stats.rejections[reason.partition(": ")[0]] += 1
        stats.recent_rejections.append(Rejection(time.time(), reason, status, uuid, peer))

    # Housekeeping ------------------------------------------------------------------------

    def abort_all(self) -> None:
        """Cut every remaining connection at once (the end of a shutdown)."""
        for connection in list(self._connections):
            connection.abort()

    def set_limits(self, limits: Limits) -> None:
        """Limits that change while running (SIGHUP): new connections, pairings and guesses
        follow them; what is open stays as it is (a smaller pool shrinks as connections
        pair or age out)."""
        self.limits = limits
        self.entries.size = limits.entry_cache  # (a smaller cache shrinks as entries come)
        self.guesses.set_limits(limits.guesses)
        self.visitor_guesses.set_limits(limits.visitor_guesses)

    def start_sweeping(self) -> None:
        """Close parked connections older than ``parked_timeout``, checking periodically, and
        drop expired code claims.

        Pools are in parking order, so only each pool's first leg needs looking at: no timer
        per parked connection.
        """
        now = self.loop.time()
        deadline = now - self.limits.parked_timeout
        for pool in list(self._pools.values()):
            while pool and pool[0].since < deadline:
                pool[0].evict("parked too long")  # takes itself out of the pool
        self._codes = {key: claim for key, claim in self._codes.items() if claim[1] > now}
        interval = min(30.0, max(0.05, self.limits.parked_timeout / 4))
        self._sweeper = self.loop.call_later(interval, self.start_sweeping)

    def stop_sweeping(self) -> None:
        """Stop the periodic sweep (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def close_parked(self, uuid: str | None = None, reason: str = "shutting down") -> int:
        """Close every parked connection, of one ID or of all; how many were closed."""
        pools = [self._pools.get(uuid, deque())] if uuid is not None else list(
            self._pools.values())
        closed = 0
        for pool in pools:
            for hidden in list(pool):
                hidden.evict(reason)
                closed += 1
        if uuid is None:
            self._pools.clear()
        return closed
