"""Several relay nodes on one Redis: any node pairs any hidden server.

Each node publishes, in Redis:

- ``rendezvous:node:<node-id>`` = its internal address ``host:port``, with a short expiry that a
  heartbeat renews (a dead node vanishes within ``ttl`` seconds);
- ``rendezvous:parked:<ID>``, a hash of node-id -> count of that node's parked connections for ID,
  written when its pools change (batched, at most every ``FLUSH_INTERVAL``).

A node that gets a mobile client for an ID with no local parked connection asks Redis which live
nodes hold one (one round trip: a Lua script reads the hash and drops dead nodes), opens a stream
to that node on its internal link, and sends it the mobile client's request head untouched plus
every byte after it. The holding node treats that stream exactly like a mobile client of its own
(it strips ``Authorization``, pairs, relays); this node then relays bytes between the mobile
client and the stream. Streams from other nodes are never forwarded again, so a request crosses
at most one hop.

Each node keeps one internal link to every node it forwards to (``server/links.py``): a
mutual-TLS connection carrying every forwarded client as a stream, so a forwarded client costs
no handshake. The node also remembers where each ID was last paired (``routes``, bounded): the
next client of that ID goes straight there as a *probe*, with no Redis round trip, and the
holding node refuses it at once when it has nothing parked for it any more; only then is Redis
asked.

The internal listener speaks mutual TLS whose only trust anchor is a certificate derived from the
cluster key: only nodes holding the key can connect, or be connected to.

This module is imported only by a relay started with ``--cluster`` (it pulls in ``redis`` and
``cryptography``). It knows nothing of the hub or of connections: the member is given callables
(read a pool's size, list the pooled IDs, run a job) and offers ``locate``, ``route`` and
``dial``, the :class:`~rendezvous.server.hub.Cluster` interface the connections use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import ssl
import tempfile
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from redis.exceptions import RedisError

from rendezvous import logs
from rendezvous.config import ClusterConfig
from rendezvous.server.links import Link, LinkDialer, LinkStream

P = TypeVar("P", bound=asyncio.BaseProtocol)

KEY_PREFIX = "rendezvous:"
FLUSH_INTERVAL = 0.02  # pool changes reach Redis within this many seconds
RESYNC_EVERY = 10  # heartbeats between full rewrites of our counts (after a Redis restart)
CLUSTER_CERT_NAME = "rendezvous-cluster"
# Why opening an internal link fails: refused, reset, unreachable, a handshake with a node that
# has another cluster key (or none), the handshake timeout, a malformed address.
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


class ClusterMember:
    """This node's presence in the cluster: heartbeat, published counts, lookups, links.

    ``parked_count(ID)`` and ``parked_ids()`` read this node's pools; ``spawn`` runs a
    background job holding a reference to it; ``handshake_timeout`` bounds the TLS handshakes
    of internal links, both ways. Call :meth:`pool_changed` whenever a pool changes.
    ``links`` holds this node's links to the others (:class:`~rendezvous.server.links.LinkDialer`).
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
        self.links = LinkDialer(self._open, loop=loop, window=config.window,
                                timeout=config.link_timeout)
        self._accepted_links: set[Link] = set()  # links other nodes opened to this one
        self.accepted = 0  # links other nodes opened to this one, in all
        self.accepted_streams = 0  # forwarded clients other nodes sent us
        # Where each ID was last paired through another node (insertion order = age).
        self._routes: dict[str, tuple[str, str]] = {}
        self.route_hits = 0  # clients a remembered node took, with no Redis lookup
        self.route_misses = 0  # clients a remembered node refused (nothing parked there now)

    async def start(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        """Listen on the internal address and join the cluster. Every stream another node
        opens here gets a protocol from ``protocol_factory``."""
        loop = self.loop

        def stream_opened(stream: LinkStream) -> None:
            protocol = protocol_factory()
            stream.set_protocol(protocol)
            self.accepted_streams += 1
            protocol.connection_made(stream)

        def accept() -> Link:
            self.accepted += 1
            link = Link(loop=loop, window=self.config.window, timeout=self.config.link_timeout,
                        on_stream=stream_opened, on_closed=self._accepted_links.discard)
            self._accepted_links.add(link)
            return link

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
        """Leave the cluster: stop listening, withdraw our entries, and say GOAWAY on every
        link (no new streams either way; a link closes with its last stream, so pairings
        under way get the shutdown's grace)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._listener is not None:
            self._listener.close()
        self.links.goaway()
        for link in list(self._accepted_links):
            link.goaway()
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._node_key)
                for uuid in self._published:
                    pipe.hdel(self._parked_key(uuid), self.config.node_id)
                await pipe.execute()
        await self.redis.aclose()

    def status(self) -> dict[str, int]:
        """Internal link counts, for ``rendezvous status``."""
        return {"links_opened": self.links.opened, "links": self.links.link_count(),
                "links_accepted": self.accepted, "links_in": len(self._accepted_links),
                "streams_out": self.links.streams, "streams_in": self.accepted_streams,
                "route_hits": self.route_hits, "route_misses": self.route_misses}

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
            before = await self.redis.set(self._node_key, self.advertise,
                                          px=int(self.config.ttl * 1000), get=True)
            self._set_health(True)
        except (RedisError, OSError) as exc:
            self._set_health(False, exc)
            return
        if before is None:
            # Our listing had lapsed (a heartbeat late by more than the TTL: a stalled loop or
            # Redis): other nodes' lookups have pruned our counts since. Publish them all again
            # now rather than at the next full resync, or our hidden servers stay unfound.
            self._dirty |= set(self._published) | set(self._parked_ids())
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

    async def dial(self, address: str, factory: Callable[[], P], *, probe: bool = False) -> P:
        """A new stream, whose protocol ``factory`` makes, to the node at ``address``
        (``host:port``) on the link to it (opened first if there is none). With ``probe`` the
        stream's transport (a :class:`~rendezvous.server.links.LinkStream`) has an ``answer``.
        OSError, ssl.SSLError, TimeoutError (after ``handshake_timeout``) or ValueError (a
        malformed address) when it cannot."""
        return await self.links.open_stream(address, factory, probe=probe)

    # Remembered locations ------------------------------------------------------------

    def route(self, uuid: str) -> tuple[str, str] | None:
        """The node (node-id, address) that last took a client of ``uuid`` from us, if any."""
        return self._routes.get(uuid)

    def remember_route(self, uuid: str, node: str, address: str) -> None:
        routes = self._routes
        if self.config.routes <= 0:
            return
        routes.pop(uuid, None)  # (moved to the newest end)
        routes[uuid] = (node, address)
        if len(routes) > self.config.routes:
            del routes[next(iter(routes))]  # the oldest

    def route_answered(self, uuid: str, taken: bool) -> None:
        """A probe of the remembered node was taken or refused (then forgotten)."""
        if taken:
            self.route_hits += 1
        else:
            self.route_misses += 1
            self._routes.pop(uuid, None)

    def forget_route(self, uuid: str) -> None:
        self._routes.pop(uuid, None)

    async def _open(self, address: str,
                    factory: Callable[[], Link]) -> tuple[asyncio.BaseTransport, Link]:
        host, _, port = address.rpartition(":")
        transport, protocol = await asyncio.wait_for(self.loop.create_connection(
            factory, host.strip("[]"), int(port), ssl=self.client_context,
            server_hostname=CLUSTER_CERT_NAME), timeout=self.handshake_timeout)
        return transport, protocol

    @staticmethod
    def _parked_key(uuid: str) -> str:
        return f"{KEY_PREFIX}parked:{uuid}"
