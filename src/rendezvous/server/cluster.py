"""Several relay nodes on one Redis: any node pairs any hidden server.

Each node publishes, in Redis:

- ``rendezvous:node:<node-id>`` = its internal address ``host:port``, with a short expiry that a
  heartbeat renews (a dead node vanishes within ``ttl`` seconds);
- ``rendezvous:parked:<ID>``, a hash of node-id -> count of that node's parked connections for ID,
  written when its pools change (batched, at most every ``FLUSH_INTERVAL``).

A node that gets a mobile client for an ID with no local parked connection asks Redis which live
nodes hold one (one round trip: a Lua script reads the hash and drops dead nodes), connects to
that node's internal listener, and sends it the mobile client's request head untouched plus every
byte after it. The holding node treats that connection exactly like a mobile client of its own
(it strips ``Authorization``, pairs, relays); this node then relays bytes between the mobile
client and the internal connection. Internal connections are never forwarded again, so a request
crosses at most one hop.

The internal listener speaks mutual TLS whose only trust anchor is a certificate derived from the
cluster key: only nodes holding the key can connect, or be connected to.

An internal connection carries one client (a pairing ends with a close, as on the public side), so
each forwarded client costs one handshake; :class:`InternalPools` does it ahead of time. Each node
keeps up to ``pool`` established connections idle towards every node it forwards to, refilled in
the background after each use, taken newest first, closed after ``pool_idle`` unused, and checked
(open, TCP established, nothing read) right before a client's bytes are written to one.

This module is imported only by a relay started with ``--cluster`` (it pulls in ``redis`` and
``cryptography``). It knows nothing of the hub or of connections: the member is given callables
(read a pool's size, list the pooled IDs, run a job) and offers ``locate`` and ``dial``, the
:class:`~rendezvous.server.hub.Cluster` interface the connections use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import socket
import ssl
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from redis.exceptions import RedisError

from rendezvous import logs
from rendezvous.config import ClusterConfig

P = TypeVar("P", bound=asyncio.BaseProtocol)

KEY_PREFIX = "rendezvous:"
FLUSH_INTERVAL = 0.02  # pool changes reach Redis within this many seconds
RESYNC_EVERY = 10  # heartbeats between full rewrites of our counts (after a Redis restart)
CLUSTER_CERT_NAME = "rendezvous-cluster"
# A pool is refilled this long after a connection is taken: past the exchange that took it (a
# handshake is ~1 ms of CPU on each node, on the loop that serves that client).
REFILL_DELAY = 0.01
TCP_ESTABLISHED = b"\x01"  # the first byte of Linux's struct tcp_info: tcpi_state
# Why opening an internal connection fails: refused, reset, unreachable, a handshake with a node
# that has another cluster key (or none), the handshake timeout, a malformed address.
DIAL_ERRORS = (OSError, ssl.SSLError, TimeoutError, ValueError)

# Which live nodes hold a parked connection for KEYS[1]; prunes fields of dead nodes.
_LOCATE = """
local fields = redis.call('HGETALL', KEYS[1])
local found = {}
for i = 1, #fields, 2 do
  local address = redis.call('GET', ARGV[1] .. fields[i])
  if address then
    if tonumber(fields[i + 1]) > 0 and fields[i] ~= ARGV[2] then
      table.insert(found, fields[i])
      table.insert(found, address)
    end
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return found
"""


# Claims a TOTP code for the address in ARGV[1] for ARGV[2] ms: 1 if that address holds it now.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""


def _cluster_identity(cluster_key: str) -> tuple[bytes, bytes]:
    """A certificate and key (PEM) derived from the cluster key alone, byte for byte the same on
    every node (Ed25519 signatures are deterministic), which each node trusts as its only
    anchor: a peer without the cluster key cannot complete the handshake either way."""
    seed = hashlib.sha256(b"rendezvous cluster identity\0" + cluster_key.encode()).digest()
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CLUSTER_CERT_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(CLUSTER_CERT_NAME)]),
                       critical=False)
        .sign(key, None)
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def cluster_ssl_contexts(cluster_key: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for the internal listener: mutual TLS on the cluster key."""
    cert_pem, key_pem = _cluster_identity(cluster_key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # load_cert_chain only reads files: write the pair to a private temporary folder.
    with tempfile.TemporaryDirectory() as folder:
        cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_file.write_bytes(cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        for context in (server, client):
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(cert_file, key_file)
            context.load_verify_locations(cadata=cert_pem.decode())
            context.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = False  # every node has the same name; the key is what is checked
    # No node resumes a session (asyncio's TLS cannot): the two TLS 1.3 session tickets a
    # server sends by default would cost each internal handshake ~25% more CPU, for nothing.
    server.num_tickets = 0
    return server, client


@dataclass(slots=True)
class _Pooled(Generic[P]):
    """One established internal connection waiting, idle, in a pool."""

    transport: asyncio.Transport
    protocol: P
    since: float  # loop time it joined the pool
    usable: Callable[[P], bool]  # the caller's own check of its protocol (e.g. nothing read)


class InternalPools:
    """Established internal connections to other nodes, ready for forwarded clients.

    One pool per node address (``host:port``), each holding at most ``size`` idle connections
    plus refills under way, so a burst of clients opens its extra connections for itself and
    none of them is kept. :meth:`get` takes the newest live one (or opens one when none is),
    then refills the pool in the background a moment later. A connection unused for ``idle``
    seconds is closed; one that died meanwhile (its node went away, closed it, sent something)
    is dropped when it is looked at, and never handed out. A node that cannot be reached has
    its pool drained. ``open_connection(address, factory)`` opens one connection and returns
    ``(transport, protocol)``.
    """

    def __init__(
        self, open_connection: Callable[[str, Callable[[], Any]],
                                        Coroutine[Any, Any, tuple[asyncio.Transport, Any]]],
        *, loop: asyncio.AbstractEventLoop, size: int, idle: float,
    ) -> None:
        self._open = open_connection
        self.loop = loop
        self.size = size
        self.idle = idle
        self._pools: dict[str, list[_Pooled[Any]]] = {}  # per address, oldest first
        self._filling: Counter[str] = Counter()  # refills under way, per address
        self._failing: set[str] = set()  # addresses whose last refill failed (logged once)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._refills: dict[str, asyncio.TimerHandle] = {}  # refills about to start
        self._closed = False
        self.opened = 0  # internal connections opened (each one TLS handshake)
        self.reused = 0  # forwarded clients sent on a connection from a pool

    async def get(self, address: str, factory: Callable[[], P], usable: Callable[[P], bool]) -> P:
        """A live connection to ``address``: a pooled one, else a new one (which may raise any
        of :data:`DIAL_ERRORS`; then that node's pool is drained). ``usable(protocol)`` says
        whether a pooled connection's protocol may still carry a client.

        A pooled connection is returned without yielding to the loop after its check, so the
        caller writes to it before anything else can happen to it."""
        pooled = self._take(address)
        if pooled is not None:
            self.reused += 1
            self._refill_soon(address, factory, usable)
            return cast(P, pooled.protocol)
        try:
            _, protocol = await self._open(address, factory)
        except DIAL_ERRORS:
            self.drain(address)
            raise
        self.opened += 1
        self._refill_soon(address, factory, usable)
        return cast(P, protocol)

    def idle_count(self, address: str | None = None) -> int:
        """Live idle connections in ``address``'s pool, or in every pool."""
        for pool_address in list(self._pools) if address is None else [address]:
            self._prune(pool_address)
        if address is not None:
            return len(self._pools.get(address, ()))
        return sum(len(pool) for pool in self._pools.values())

    def drain(self, address: str) -> None:
        """Close every idle connection to ``address`` (that node went away)."""
        pool = self._pools.pop(address, [])
        for pooled in pool:
            pooled.transport.close()
        if pool:
            logs.event("cluster pool drained", address=address, closed=len(pool))

    async def close(self) -> None:
        """Close every idle connection and stop the refills."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for handle in self._refills.values():
            handle.cancel()
        self._refills.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for address in list(self._pools):
            for pooled in self._pools.pop(address):
                pooled.transport.close()

    def _alive(self, pooled: _Pooled[Any], now: float) -> bool:
        return (now - pooled.since < self.idle and not pooled.transport.is_closing()
                and pooled.usable(pooled.protocol) and _established(pooled.transport))

    def _take(self, address: str) -> _Pooled[Any] | None:
        pool = self._pools.get(address)
        now = self.loop.time()
        while pool:
            pooled = pool.pop()  # the newest: the most likely alive
            if self._alive(pooled, now):
                return pooled
            pooled.transport.close()
        return None

    def _prune(self, address: str) -> None:
        """Close and forget the connections of ``address``'s pool that are dead or expired."""
        pool = self._pools.get(address)
        if pool is None:
            return
        now = self.loop.time()
        kept = []
        for pooled in pool:
            if self._alive(pooled, now):
                kept.append(pooled)
            else:
                pooled.transport.close()
        if kept:
            self._pools[address] = kept
        else:
            del self._pools[address]

    def _refill_soon(self, address: str, factory: Callable[[], P],
                     usable: Callable[[P], bool]) -> None:
        """Top the pool up a moment from now: after the exchange that took the connection
        rather than during it, and one batch for the connections taken meanwhile."""
        if self._closed or self.size == 0 or address in self._refills:
            return
        self._refills[address] = self.loop.call_later(REFILL_DELAY, self._refill, address,
                                                      factory, usable)

    def _refill(self, address: str, factory: Callable[[], P], usable: Callable[[P], bool]) -> None:
        self._refills.pop(address, None)
        if self._closed:
            return
        self._prune(address)
        missing = self.size - len(self._pools.get(address, ())) - self._filling[address]
        for _ in range(missing):
            self._filling[address] += 1
            task = self.loop.create_task(self._fill(address, factory, usable))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fill(self, address: str, factory: Callable[[], P],
                    usable: Callable[[P], bool]) -> None:
        try:
            transport, protocol = await self._open(address, factory)
        except DIAL_ERRORS as exc:
            if address not in self._failing:
                self._failing.add(address)
                logs.event("cluster pool refill failed", level=logging.WARNING,
                           address=address, error=str(exc) or type(exc).__name__)
            self.drain(address)
            return
        finally:
            self._filling[address] -= 1
            if self._filling[address] <= 0:
                del self._filling[address]
        self.opened += 1
        self._failing.discard(address)
        if self._closed:
            transport.close()
            return
        self._pools.setdefault(address, []).append(
            _Pooled(transport, protocol, self.loop.time(), cast(Callable[[Any], bool], usable)))
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle / 4, self._sweep)

    def _sweep(self) -> None:
        """Now and then while anything is pooled: close what expired or died."""
        self._sweeper = None
        for address in list(self._pools):
            self._prune(address)
        if self._pools and not self._closed:
            self._sweeper = self.loop.call_later(self.idle / 4, self._sweep)


def _established(transport: asyncio.BaseTransport) -> bool:
    """Whether the kernel still sees the connection as established (no FIN or RST from the
    peer yet, which the loop may not have read); True where this cannot be asked."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return True
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) == TCP_ESTABLISHED)
    except OSError:
        return False


class ClusterMember:
    """This node's presence in the cluster: heartbeat, published counts, lookups, dialling.

    ``parked_count(ID)`` and ``parked_ids()`` read this node's pools; ``spawn`` runs a
    background job holding a reference to it; ``handshake_timeout`` bounds the TLS handshakes
    of internal connections, both ways. Call :meth:`pool_changed` whenever a pool changes.
    ``internal`` holds the established connections to other nodes (:class:`InternalPools`).
    """

    def __init__(
        self, config: ClusterConfig, *, loop: asyncio.AbstractEventLoop,
        parked_count: Callable[[str], int], parked_ids: Callable[[], Collection[str]],
        spawn: Callable[[Coroutine[Any, Any, None]], None], handshake_timeout: float,
    ) -> None:
        self.config = config
        self.loop = loop
        self._parked_count = parked_count
        self._parked_ids = parked_ids
        self._spawn = spawn
        self.handshake_timeout = handshake_timeout
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            config.redis_url, socket_connect_timeout=2, socket_timeout=2)
        self.server_context, self.client_context = cluster_ssl_contexts(config.cluster_key)
        self.advertise = config.advertise or f"{config.internal_host}:{config.internal_port}"
        self._node_key = f"{KEY_PREFIX}node:{config.node_id}"
        self._locate = self.redis.register_script(_LOCATE)
        self._claim = self.redis.register_script(_CLAIM)
        self._dirty: set[str] = set()
        self._published: dict[str, int] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._listener: asyncio.Server | None = None
        self._healthy = True
        self.internal = InternalPools(self._open, loop=loop, size=config.pool,
                                      idle=config.pool_idle)
        # Connections other nodes opened to us, and how to tell one idle in their pool.
        self._accepted: weakref.WeakSet[asyncio.BaseProtocol] = weakref.WeakSet()
        self._accepted_idle: Callable[[Any], bool] = lambda _: False
        self.accepted = 0  # internal connections other nodes opened to this one

    async def start(self, protocol_factory: Callable[[], P],
                    idle: Callable[[P], bool] | None = None) -> None:
        """Listen on the internal address and join the cluster. ``idle(protocol)`` tells an
        accepted connection that has carried nothing yet (one waiting in the other node's
        pool): those are closed first when this node leaves."""
        loop = self.loop
        if idle is not None:
            self._accepted_idle = cast(Callable[[Any], bool], idle)

        def accept() -> P:
            protocol = protocol_factory()
            self._accepted.add(protocol)
            self.accepted += 1
            return protocol

        self._listener = await loop.create_server(
            accept, host=self.config.internal_host, port=self.config.internal_port,
            ssl=self.server_context, ssl_handshake_timeout=self.handshake_timeout,
            reuse_address=True)
        if self.config.internal_port == 0:  # tests: learn the port picked
            port = self._listener.sockets[0].getsockname()[1]
            self.advertise = f"{self.advertise.rsplit(':', 1)[0]}:{port}"
        await self._beat()
        self._heartbeat = loop.create_task(self._heartbeat_loop())
        logs.event("cluster joined", node=self.config.node_id, internal=self.advertise)

    async def close(self) -> None:
        """Leave the cluster: stop listening, withdraw our entries."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._listener is not None:
            self._listener.close()
        await self.internal.close()
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._node_key)
                for uuid in self._published:
                    pipe.hdel(self._parked_key(uuid), self.config.node_id)
                await pipe.execute()
        # Other nodes no longer find us; what they still hold idle for us would only wait
        # for the end of the shutdown grace: closed now, so they drop it and open elsewhere.
        for protocol in list(self._accepted):
            transport = getattr(protocol, "transport", None)
            if transport is not None and self._accepted_idle(protocol):
                transport.close()
        await self.redis.aclose()

    def status(self) -> dict[str, int]:
        """Internal connection counts, for ``rendezvous status``."""
        return {"internal_opened": self.internal.opened, "internal_reused": self.internal.reused,
                "internal_idle": self.internal.idle_count(), "internal_accepted": self.accepted}

    # Publishing ------------------------------------------------------------------------

    def pool_changed(self, uuid: str) -> None:
        """A pool of ours grew or shrank: publish its size soon (batched)."""
        self._dirty.add(uuid)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_later(FLUSH_INTERVAL, self._start_flush)

    def _start_flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        self._spawn(self._publish(dirty))

    async def _publish(self, uuids: set[str]) -> None:
        node = self.config.node_id
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for uuid in uuids:
                    count = self._parked_count(uuid)
                    if count:
                        pipe.hset(self._parked_key(uuid), node, count)
                        self._published[uuid] = count
                    else:
                        pipe.hdel(self._parked_key(uuid), node)
                        self._published.pop(uuid, None)
                await pipe.execute()
            self._set_health(True)
        except (RedisError, OSError) as exc:
            self._dirty |= uuids  # try again with the next change or heartbeat
            self._set_health(False, exc)

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.config.ttl / 3)
            beats += 1
            if beats % RESYNC_EVERY == 0:
                self._dirty |= set(self._published) | set(self._parked_ids())
            await self._beat()

    async def _beat(self) -> None:
        try:
            await self.redis.set(self._node_key, self.advertise, px=int(self.config.ttl * 1000))
            self._set_health(True)
        except (RedisError, OSError) as exc:
            self._set_health(False, exc)
            return
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            await self._publish(dirty)

    def _set_health(self, healthy: bool, exc: BaseException | None = None) -> None:
        if healthy != self._healthy:
            self._healthy = healthy
            if healthy:
                logs.event("cluster redis reachable again", node=self.config.node_id)
            else:
                logs.event("cluster redis unreachable", level=logging.WARNING,
                           node=self.config.node_id, error=str(exc))

    # Looking up ------------------------------------------------------------------------

    async def locate(self, uuid: str) -> list[tuple[str, str]]:
        """Live nodes other than this one holding a parked connection for ``uuid``:
        ``[(node-id, "host:port"), ...]``; empty when none or when Redis fails."""
        try:
            found = cast(list[bytes], await self._locate(
                keys=[self._parked_key(uuid)], args=[f"{KEY_PREFIX}node:", self.config.node_id]))
        except (RedisError, OSError) as exc:
            self._set_health(False, exc)
            return []
        pairs = [(found[i].decode(), found[i + 1].decode()) for i in range(0, len(found), 2)]
        return pairs

    async def claim_code(self, uuid: str, code: str, address: str, seconds: float) -> bool:
        """Hold ``code`` of ``uuid`` for ``address`` on every node for ``seconds`` (a code parks
        again only from the address that used it first); False when another address holds it.
        With Redis unreachable, True: this node's own claim still applies."""
        # Hashed: Redis holds no code that is still valid, only who used it.
        key = KEY_PREFIX + "code:" + hashlib.sha256(f"{uuid}\0{code}".encode()).hexdigest()
        try:
            held = await self._claim(keys=[key], args=[address, max(1, int(seconds * 1000))])
        except (RedisError, OSError) as exc:
            self._set_health(False, exc)
            return True
        return bool(held)

    async def dial(self, address: str, factory: Callable[[], P],
                   usable: Callable[[P], bool]) -> P:
        """A mutual-TLS connection to the internal listener of the node at ``address``
        (``host:port``): an established one from its pool when one is live (``usable`` checks
        its protocol), else a new one that the protocol ``factory`` makes. OSError,
        ssl.SSLError, TimeoutError (after ``handshake_timeout``) or ValueError (a malformed
        address) when it cannot."""
        return await self.internal.get(address, factory, usable)

    async def _open(self, address: str,
                    factory: Callable[[], P]) -> tuple[asyncio.Transport, P]:
        host, _, port = address.rpartition(":")
        transport, protocol = await asyncio.wait_for(self.loop.create_connection(
            factory, host.strip("[]"), int(port), ssl=self.client_context,
            server_hostname=CLUSTER_CERT_NAME), timeout=self.handshake_timeout)
        return transport, protocol

    @staticmethod
    def _parked_key(uuid: str) -> str:
        return f"{KEY_PREFIX}parked:{uuid}"
