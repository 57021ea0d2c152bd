"""One accepted connection, from its first byte to its close.

A connection starts by sending a request head. A ``CONNECT`` makes it a *hidden* leg: once its
token checks out it is parked in its ID's pool. Any other request makes it a *mobile* leg, which
takes a parked connection of the ID it names. Paired legs then relay bytes both ways, following
the HTTP framing of each direction (protocol/framing.py): every later request on the mobile leg
is routed by its own ``Authorization`` (stripped). One that names another ID ends the pairing
once the first hidden server has answered in full, then is served as a first request; one that
names none gets the relay's challenge (the client's retry names its ID) and the pairing goes
on. After a ``101`` both directions are raw.

With ``serve --domain D``, a request whose ``Host`` is ``NAME.D`` goes to the entry with that
name (a registry lookup) with no credentials needed and every header passed on untouched; its
later requests must keep that ``Host``, and one with another ends the pairing as a cross-ID one
does (docs/protocol.md, named hidden servers).

Everything is callback-driven (an ``asyncio.Protocol``, no task and no buffer per parked
connection) because a relay holds thousands of idle parked connections and must move bytes with
as little Python per chunk as possible: inside a body, ``data_received`` only counts and writes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
from typing import cast

from rendezvous import logs
from rendezvous.errors import RegistryError
from rendezvous.protocol import digest, responses
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.protocol.framing import (
    FramingError,
    RequestFramer,
    ResponseFramer,
    request_body,
)
from rendezvous.protocol.head import NEED_MORE, HeadError, HeadReader, HeadTooLarge, RequestHead
from rendezvous.protocol.hostnames import name_in
from rendezvous.protocol.routing import (
    DIAG_EARLY_DATA,
    DIAG_INVALID,
    DIAG_NOT_REGISTERED,
    DIAG_TOO_MANY,
    Challenge,
    Pair,
    Park,
    Refuse,
    route,
)
from rendezvous.protocol.totp import token_is_valid
from rendezvous.registry import Entry
from rendezvous.server.hub import CODE_CLAIM_STEPS, CODE_TAKEN, Cluster, Hub

# States. A connection only moves forward through these (HANDSHAKE, then HEAD, ...), except a
# mobile leg that is refused on a keep-alive connection, which goes back to HEAD for the next
# request.
HEAD = 0  # reading a request head
VERIFYING = 1  # hidden: CONNECT head read, token being checked against the registry
PARKED = 2  # hidden: in its ID's pool
WAITING = 3  # mobile: no parked connection yet; waiting up to pair_wait
SETTLING = 4  # both legs: paired, waiting for the just-parked hidden leg to settle
RELAYING = 5  # both legs: copying bytes
CLOSED = 6
HANDSHAKE = 7  # public TLS: accepted and counted, its handshake (start_tls) not finished

# Where a connection came from.
PUBLIC = 0  # accepted on the public listener
INTERNAL = 1  # accepted from another relay node (cluster): never forwarded again
OUTBOUND = 2  # opened by us to another relay node, carrying one of our mobile clients

# A client waiting for a hidden server that is parked on no node asks the cluster again after
# this long, doubling up to the maximum, until pair_wait runs out.
FORWARD_RETRY_FIRST = 0.025
FORWARD_RETRY_MAX = 0.25

# A mobile client waiting for its pairing may keep sending its body; we hold this much, then
# stop reading until the pairing starts (the bytes then flow with back-pressure).
WAITING_BUFFER_LIMIT = 256 * 1024

# A paired client's bytes held back (a request for another ID waiting for the first hidden
# server's answers, or bytes after an Upgrade request waiting for its answer): beyond this much,
# stop reading it until they can go on.
HELD_BUFFER_LIMIT = 256 * 1024

# A peer that never answers our TLS close_notify does not hold its socket longer than this.
SSL_SHUTDOWN_TIMEOUT = 5.0
# A relaying leg being closed gets this long to flush to its peer before it is cut.
CLOSE_GRACE = SSL_SHUTDOWN_TIMEOUT

# How often a leg whose reader has stopped reading is checked for a silent close.
STALL_CHECK = 0.5
TCP_CLOSE_WAIT = b"\x08"  # the first byte of Linux's struct tcp_info: tcpi_state

# Keepalive probes on parked connections: notice a dead NAT mapping within ~2 minutes.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 20
KEEPALIVE_COUNT = 3


class Connection(asyncio.Protocol):
    """The protocol object of one accepted socket, hidden or mobile."""

    __slots__ = (
        "__weakref__",
        "discarding",
        "entry",
        "eof",
        "failures",
        "framer",
        "head",
        "hub",
        "idle_seen",
        "idle_since",
        "idle_timer",
        "kind",
        "left",
        "named",
        "peer",
        "peername",
        "pending",
        "reader",
        "reading_paused",
        "received",
        "responses",
        "since",
        "state",
        "timer",
        "tls",
        "transport",
        "upgrade",
        "uuid",
        "visitor_ok",
        "writing_paused",
    )

    def __init__(self, hub: Hub[Connection], kind: int = PUBLIC,
                 upgrade: ssl.SSLContext | None = None) -> None:
        self.hub = hub
        self.kind = kind
        # Public TLS: the socket is accepted as plain TCP (so it counts against the caps before
        # any handshake work) and upgraded with this context.
        self.upgrade = upgrade
        self.tls = False
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.state = HEAD
        # Heads, then (as its trailing bytes) what came after the request head until pairing.
        self.reader = HeadReader(hub.limits.max_head_size, hub.limits.max_headers)
        self.timer: asyncio.TimerHandle | None = None
        self.head: RequestHead | None = None
        self.uuid = ""
        self.entry: Entry | None = None  # hidden: the registry entry it parked with
        self.peer: Connection | None = None
        self.peername: tuple[str, int] | None = None
        self.received = 0  # bytes read from this leg and sent on (after pairing)
        self.since = 0.0  # loop time of parking, or of pairing
        self.eof = False
        self.reading_paused = False
        self.writing_paused = False
        # While relaying: how many of the coming bytes are body, passed on by counting alone.
        self.left = 0
        self.discarding = False  # mobile: dropping the body of a request answered here
        self.framer: RequestFramer | None = None  # mobile: its requests' framing
        self.responses: ResponseFramer | None = None  # hidden: its answers' framing
        self.pending: RequestHead | HeadError | None = None  # mobile: to serve after the pair
        self.idle_timer: asyncio.TimerHandle | None = None  # mobile: the pairing's idle check
        self.idle_seen = 0  # bytes both ways at the last idle check
        self.idle_since = 0.0
        self.failures = 0  # wrong visitor passwords on this connection
        self.visitor_ok = False  # the current request passed the visitor check
        self.named = ""  # mobile: the name its Host asked for (serve --domain); "" for none

    # asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # On the public listener this runs at accept, before any TLS work: every socket is
        # counted against the caps from its first moment, and one over them costs no handshake.
        self.transport = cast(asyncio.Transport, transport)
        hub = self.hub
        self.tls = transport.get_extra_info("sslcontext") is not None
        peername = transport.get_extra_info("peername")
        self.peername = (str(peername[0]), int(peername[1])) if peername else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Nagle cost the original ~40 ms on every small write; asyncio usually sets this
            # already, but a relay must not depend on it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.kind == OUTBOUND:
            hub.opened(self, None)
            self.state = WAITING  # until linked to its mobile client (cluster forwarding)
            return
        address = self.address
        hub.opened(self, address)
        upgrade = self.upgrade if self.kind == PUBLIC and not self.tls else None
        if hub.closing:  # arrived after the shutdown began
            self.state = CLOSED
            self.transport.abort()
            return
        # Before the handshake there is no way to say 503: such a socket is just closed.
        over = b"" if upgrade is not None else responses.status_only(503)
        if hub.open_connections > hub.limits.max_connections:
            self._reject("too many connections", over, status=503)
            return
        # Other relay nodes forward many clients each: no per-address cap for them.
        if hub.from_address(address) > hub.limits.max_per_address and self.kind == PUBLIC:
            self._reject("too many connections from this address", over, status=503)
            return
        self._arm_head_timer()  # the head timeout counts from accept, handshake included
        if upgrade is not None:
            self.state = HANDSHAKE
            hub.spawn(self._handshake(upgrade))

    async def _handshake(self, context: ssl.SSLContext) -> None:
        """Upgrade an accepted socket to TLS within its own, shorter deadline."""
        hub = self.hub
        limits = hub.limits
        if self.state != HANDSHAKE:
            return
        if self.reader.trailing:  # the ClientHello came before this task ran: TLS's, first
            hub.loop.call_soon(self._hand_over_early_bytes)
        try:
            tls = await hub.loop.start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=min(limits.handshake_timeout, limits.head_timeout),
                ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT)
        except (OSError, ssl.SSLError, EOFError) as exc:  # ConnectionError is an OSError
            # asyncio and uvloop both abort a handshake past its deadline this way.
            timed_out = isinstance(exc, ConnectionAbortedError)
            self._handshake_failed("handshake timeout" if timed_out else "handshake failed")
            return
        if tls is None:  # (typeshed allows it; neither loop does it)
            self._handshake_failed("handshake failed")
            return
        if self.state != HANDSHAKE or tls.is_closing():  # cut meanwhile (timeout, shutdown)
            tls.abort()
            self._forget()  # (a close during the handshake may not reach connection_lost)
            return
        self.transport = tls
        self.tls = True
        self.state = HEAD

    def _hand_over_early_bytes(self) -> None:
        """Give the TLS layer (start_tls has just made it the socket's protocol) the bytes
        that reached us before it, as if it had read them itself."""
        found = self.transport.get_protocol()
        data = self.reader.take_trailing()
        if found is self or not hasattr(found, "buffer_updated"):
            return  # closed meanwhile
        layer = cast(asyncio.BufferedProtocol, found)  # (both loops' TLS layers are)
        while data:
            space = memoryview(layer.get_buffer(len(data)))
            size = min(len(space), len(data))
            space[:size] = data[:size]
            layer.buffer_updated(size)
            del data[:size]

    def _handshake_failed(self, reason: str) -> None:
        self.transport.abort()  # (usually closed already; abort is safe either way)
        if self.state == HANDSHAKE:
            # Scanners and unfinished handshakes come in floods: counted, logged aggregated.
            self._note_rejection(reason, None)
            self._release()
        self._forget()

    def data_received(self, data: bytes) -> None:
        if self.state == RELAYING:
            size = len(data)
            if size <= self.left:  # the hot path: inside a body (or raw), count and write
                self.left -= size
                self.received += size
                self.peer.transport.write(data)  # type: ignore[union-attr]
                return
            self._relay_framed(data)
            return
        self._data_before_relay(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.state == RELAYING:
            peer = self.peer
            assert peer is not None
            if peer.eof or peer.state == CLOSED:
                # Both directions are done. Close without leaving RELAYING: connection_lost
                # must still account for the pair.
                self._close_leg()
                return None
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                # TLS transports cannot half-close: flush what we sent and close.
                peer._close_leg()
            if self.tls:
                # asyncio's TLS closes this leg itself now; make sure that close ends.
                self._watch_close()
                return False
            return True  # plain TCP: keep reading the other direction
        if self.state in (WAITING, SETTLING) and not self.tls:
            return True  # half-closed after its request: the EOF is passed on once paired
        self._close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self.state == HANDSHAKE:
            return  # (asyncio's loop only) the handshake's task learns why, and tells
        if self.state == RELAYING:
            self.state = CLOSED
            self._cancel_timer()
            self._cancel_idle()
            self._relay_leg_lost()
        else:
            self._release()

    def _forget(self) -> None:
        """Take this socket out of the hub's counts (once, however often it is called)."""
        self.hub.closed(self, None if self.kind == OUTBOUND else self.address)

    def _release(self) -> None:
        """Leave the pool, the waiting line or a pending pairing, whichever this connection is
        in, and become CLOSED. Every way out but relaying goes through here, so nothing closed
        stays behind in the hub."""
        hub = self.hub
        state, self.state = self.state, CLOSED
        self._cancel_timer()
        if state == PARKED:
            if hub.unpark(self):  # (an evicted one was taken out already)
                logs.event("unparked", id=self.uuid, peer=self._peer_text(),
                           parked_for=f"{hub.loop.time() - self.since:.1f}s")
        elif state == WAITING:
            hub.stop_waiting(self)
        elif state == SETTLING:
            peer = self.peer
            assert peer is not None
            self.peer = peer.peer = None
            if peer.state != SETTLING:
                return
            if self.head is not None:  # a mobile client left before its pairing began
                peer.state = PARKED
                waiting = hub.return_to_pool(peer)
                if waiting is not None:
                    waiting.pair_with(peer)
            else:  # the parked connection died during its settle: find the client another
                peer._request_pairing()

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading from the leg that fills it.
        self.writing_paused = True
        peer = self.peer
        if self.state == RELAYING and peer is not None:
            peer.transport.pause_reading()
            self._check_stalled()
        elif self.state == HEAD:
            self.transport.pause_reading()  # a client pipelining requests it won't read

    def resume_writing(self) -> None:
        self.writing_paused = False
        peer = self.peer
        if self.state == RELAYING and peer is not None:
            if peer.state == RELAYING:
                peer.transport.resume_reading()
            if self.pending is not None:  # held while our own answers queued up unread
                self._pass_requests()
        elif self.state == HEAD:
            self.transport.resume_reading()
            self._process_heads()

    # Before relaying -----------------------------------------------------------------------

    def _data_before_relay(self, data: bytes) -> None:
        state = self.state
        if state == HEAD:
            self.reader.receive(data)
            self._process_heads()
        elif state == HANDSHAKE:
            # TLS bytes read before start_tls took the socket over (uvloop starts reading
            # right after connection_made): kept for the TLS layer, nothing more read.
            self.reader.receive(data)
            self.transport.pause_reading()
        elif state in (WAITING, SETTLING):
            self.reader.receive(data)
            if len(self.reader.trailing) > WAITING_BUFFER_LIMIT and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
        elif state == VERIFYING:
            self._reject("data before CONNECT answer",
                         responses.bare_error(409, DIAG_EARLY_DATA), status=409)
        elif state == PARKED:
            # A parked connection speaks only after pairing; anything else is a confused peer.
            self._reject("data while parked")

    def _process_heads(self) -> None:
        """Handle every complete head in the buffer (a client may pipeline its retry)."""
        while self.state == HEAD and not self.writing_paused:
            try:
                head = self.reader.next_head()
            except HeadError as exc:
                self._refuse_head(exc)
                return
            if head is NEED_MORE:
                return
            self._dispatch(head)

    def _refuse_head(self, exc: HeadError) -> None:
        status = exc.status
        body = (responses.status_only(status) if isinstance(exc, HeadTooLarge)
                else responses.full_error(status, exc.reason, permanent=True, close=True))
        self._reject(exc.reason, body, status=status)

    def _name_of(self, head: RequestHead) -> str | None:
        """The name a request's ``Host`` asks for under the relay's --domain, or None: the
        relay's own names (and every host, with no --domain) are routed the original's way."""
        domain = self.hub.domain
        if not domain or head.method == "CONNECT":
            return None
        host = head.header(b"host")
        return name_in(host.decode("latin-1"), domain) if host is not None else None

    def _dispatch(self, head: RequestHead) -> None:
        self.named = ""
        name = self._name_of(head)
        if name is not None:
            self._dispatch_named(head, name)
            return
        decision = route(head)
        if isinstance(decision, Park):
            self.uuid = decision.uuid
            if self.reader.trailing:
                self._reject("data before CONNECT answer",
                             responses.bare_error(409, DIAG_EARLY_DATA), status=409)
                return
            hub = self.hub
            wait = hub.guesses.retry_after(self.address, self.uuid, hub.loop.time())
            if wait > 0:
                header = b"Retry-After: %d\r\n" % math.ceil(wait)
                self._reject("too many failed attempts",
                             responses.bare_error(429, DIAG_TOO_MANY, extra=header), status=429)
                return
            self.state = VERIFYING
            hub.spawn(self._verify(decision))
        elif isinstance(decision, Pair):
            try:
                request_body(head)  # its body must be one we can find the end of
            except FramingError as exc:
                self._reject(exc.reason, responses.full_error(
                    400, exc.reason, permanent=True, close=True), status=400)
                return
            self.uuid = decision.uuid
            self.head = head
            self.visitor_ok = False
            self.since = self.hub.loop.time()
            self._request_pairing()
        elif isinstance(decision, Challenge):
            close = head.is_upgrade or not head.keep_alive
            nonce = self.hub.nonces.issue()
            self.transport.write(responses.challenge(head.is_upgrade, close, nonce))
            self._finish_refused(head, close)
        elif isinstance(decision, Refuse):
            if head.method == "CONNECT" or head.is_upgrade:
                body = responses.bare_error(decision.status, decision.diagnostic,
                                            decision.permanent)
                self._reject(decision.diagnostic, body, status=decision.status)
                return
            close = not head.keep_alive
            self.transport.write(responses.full_error(
                decision.status, decision.diagnostic, decision.permanent, close))
            self._note_rejection(decision.diagnostic, decision.status)
            self._finish_refused(head, close)

    def _dispatch_named(self, head: RequestHead, name: str) -> None:
        """A request for NAME.DOMAIN: find the entry with that name, then pair as if the
        request had named its ID (its bytes meanwhile wait, as a waiting client's do)."""
        try:
            request_body(head)
        except FramingError as exc:
            self._reject(exc.reason, responses.full_error(
                400, exc.reason, permanent=True, close=True), status=400)
            return
        self.head = head
        self.named = name
        self.uuid = ""
        self.visitor_ok = False
        self.state = WAITING  # not in the waiting line until the name is found
        self.hub.spawn(self._resolve_name(name))

    async def _resolve_name(self, name: str) -> None:
        try:
            entry = await self.hub.registry.by_name(name)
        except Exception as exc:  # any backend failure must cost this peer only
            if not isinstance(exc, RegistryError):
                logs.log.exception("registry lookup failed")
            if self.state == WAITING:
                self._reject(f"registry error: {exc}", responses.full_error(
                    503, "registry unavailable", close=True), status=503)
            return
        if self.state != WAITING:
            return  # the client left (or the relay is closing) while we looked it up
        if entry is None:
            self.uuid = name  # (what the rejection logs)
            self._not_found()
            return
        self.uuid = entry.uuid
        self.since = self.hub.loop.time()
        self._request_pairing()

    def _finish_refused(self, head: RequestHead, close: bool) -> None:
        """After answering a request ourselves: close, or skip its body and read the next."""
        if close or head.has_unframed_body:
            self._close()
            return
        self.state = HEAD
        self.head = None
        self.reader.skip(head.content_length or 0)
        self._arm_head_timer()
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    # Hidden side ---------------------------------------------------------------------------

    async def _verify(self, park: Park) -> None:
        """Check the CONNECT token, then park or refuse."""
        hub = self.hub
        try:
            seen = hub.registry_changes
            entry = await hub.registry.get(park.uuid)
            if hub.registry_changes != seen:  # a change came meanwhile: this may predate it
                entry = await hub.registry.get(park.uuid)
        except Exception as exc:  # any backend failure must cost this peer only
            if not isinstance(exc, RegistryError):
                logs.log.exception("registry lookup failed")
            if self.state == VERIFYING:
                self._reject(f"registry error: {exc}",
                             responses.bare_error(503, "registry unavailable"), status=503)
            return
        if self.state != VERIFYING:
            return  # the peer left, or broke the protocol, while we looked it up
        if entry is None or not token_is_valid(entry.base32, entry.step, park.token):
            reason = "unknown ID" if entry is None else "wrong token"
            hub.guesses.failed(self.address, park.uuid, hub.loop.time())
            self._reject(reason, responses.bare_error(401, DIAG_INVALID), status=401)
            return
        # With a cluster, the first address to use a code holds it on every node.
        cluster, claim = hub.cluster, CODE_CLAIM_STEPS * entry.step
        taken = cluster is not None and not await cluster.claim_code(
            park.uuid, park.token, self.address, claim)
        if self.state != VERIFYING:
            return
        refusal = CODE_TAKEN if taken else hub.refusal(self, park.token, entry.step)
        if refusal == CODE_TAKEN:  # a leaked code, replayed from elsewhere: as a wrong one
            hub.guesses.failed(self.address, park.uuid, hub.loop.time())
            self._reject(refusal, responses.bare_error(401, DIAG_INVALID), status=401)
            return
        if refusal is not None:  # the pool is full, and none of it is this address's to evict
            self._reject(refusal, responses.bare_error(503, refusal), status=503)
            return
        hub.guesses.succeeded(self.address, park.uuid, hub.loop.time())
        self.entry = entry
        self._cancel_timer()
        self.transport.write(responses.PARKED)
        self.state = PARKED
        self.since = hub.loop.time()
        self._enable_keepalive()
        waiting = hub.park(self)
        logs.event("parked", id=self.uuid, peer=self._peer_text(),
                   pool=hub.parked_count(self.uuid))
        if waiting is not None:
            waiting.pair_with(self)

    def _enable_keepalive(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)

    def evict(self, reason: str) -> None:
        """Close a parked connection the pool no longer keeps."""
        if self.state == PARKED:
            logs.event("evicted", id=self.uuid, peer=self._peer_text(), reason=reason)
            self.hub.unpark(self)
            self._close()

    # Mobile side ---------------------------------------------------------------------------

    def _request_pairing(self) -> None:
        hub = self.hub
        self._cancel_timer()
        hidden = hub.take(self.uuid)
        if hidden is not None:
            self.pair_with(hidden)
            return
        cluster = hub.cluster if self.kind == PUBLIC else None
        self.state = WAITING
        hub.wait_for(self)
        if hub.limits.pair_wait > 0:
            self.timer = hub.loop.call_later(hub.limits.pair_wait, self._not_found)
        hub.spawn(self._forward(cluster) if cluster is not None else self._precheck())

    async def _precheck(self) -> None:
        # Without pair_wait the 404 waits for the check only: a wrong password gets its 401
        # (not a 404 that would tell it nothing is parked).
        if await self._check_visitor_early() and self.timer is None and self.state == WAITING:
            self._not_found()

    async def _check_visitor_early(self) -> bool:
        """Nothing is parked: check the visitor password now, if the entry has one, so that a
        wrong one gets its 401 at once whether or not the hidden server is online (the 404
        after pair_wait tells only someone who knows the password). False if refused."""
        hub = self.hub
        try:
            entry = await hub.registry.get(self.uuid)
        except Exception:  # the pairing, if any, checks with its parked connection's entry
            return self.state == WAITING
        if self.state != WAITING or self.visitor_ok:
            return self.state == WAITING
        if entry is None or entry.visitor is None:
            return True
        verdict, wait = self._visitor_verdict(entry.visitor)
        if verdict != "ok":
            self._refuse_visitor(verdict, wait)
            return False
        return True

    async def _forward(self, cluster: Cluster) -> None:
        """Hand this client to another node that holds a parked connection for its ID.

        Meanwhile it keeps waiting here too: whichever comes first, a local park or a remote
        node, wins. With none yet, Redis is asked again (more and more slowly) until pair_wait
        runs out: the hidden server is often re-parking somewhere just then.
        """
        if not await self._check_visitor_early():  # here, before any node sees a guess
            return
        delay = FORWARD_RETRY_FIRST
        while self.state == WAITING:
            for node, address in await cluster.locate(self.uuid):
                if self.state != WAITING:
                    return
                if await self._forward_to(cluster, node, address):
                    return
            if self.timer is None:  # no pair_wait: nothing else to try
                if self.state == WAITING:
                    self._not_found()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, FORWARD_RETRY_MAX)

    async def _forward_to(self, cluster: Cluster, node: str, address: str) -> bool:
        """Connect to ``node``'s internal listener and relay this client through it."""
        hub = self.hub
        try:
            outbound = await cluster.dial(address, lambda: Connection(hub, OUTBOUND))
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            logs.event("forward failed", level=logging.WARNING, id=self.uuid, node=node,
                       address=address, error=str(exc) or type(exc).__name__)
            return False
        if self.state != WAITING:  # paired here meanwhile, or gave up
            outbound.transport.close()
            return True
        hub.stop_waiting(self)
        self._cancel_timer()
        assert self.head is not None
        self._link(outbound, self.head.forwarded(strip_authorization=False))
        hub.forwarded()
        logs.event("forwarded", id=self.uuid, mobile=self._peer_text(), node=node)
        return True

    def _not_found(self) -> None:
        """No parked connection came for this ID in time: 404."""
        head = self.head
        assert head is not None
        close = not head.keep_alive
        answer = (responses.bare_error(404, DIAG_NOT_REGISTERED) if head.is_upgrade
                  else responses.full_error(404, DIAG_NOT_REGISTERED, close=close))
        self._answer_request(DIAG_NOT_REGISTERED, 404, answer, close)

    def _answer_request(self, reason: str, status: int, answer: bytes, close: bool) -> None:
        """Answer a mobile client's pending request ourselves instead of pairing it. An
        Upgrade request is closed after its answer (as the original did); a plain one may keep
        its connection for the client's next request."""
        head = self.head
        assert head is not None
        self.hub.stop_waiting(self)
        self._cancel_timer()
        if head.is_upgrade:
            self._reject(reason, answer, status=status)
            return
        self.transport.write(answer)
        self._note_rejection(reason, status)
        self._finish_refused(head, close)
        self._process_heads()

    def pair_with(self, hidden: Connection) -> None:
        """Pair this mobile leg with a parked hidden leg, after the hidden leg has settled."""
        hub = self.hub
        secret = hidden.entry.visitor if hidden.entry is not None else None
        if secret is not None and not self.visitor_ok:
            verdict, wait = self._visitor_verdict(secret)
            if verdict != "ok":
                waiting = hub.return_to_pool(hidden)
                if waiting is not None:
                    waiting.pair_with(hidden)
                self._refuse_visitor(verdict, wait)
                return
        self._cancel_timer()
        self.peer, hidden.peer = hidden, self
        self.state = hidden.state = SETTLING
        settle = hidden.since + hub.limits.settle - hub.loop.time()
        if settle > 0:
            self.timer = hub.loop.call_later(settle, self._start_relay)
        else:
            self._start_relay()

    def _check_visitor(self, secret: VisitorSecret) -> str:
        """The visitor check of an entry with a visitor password: "ok", "stale", "invalid"."""
        head = self.head
        assert head is not None
        authorization = head.header(b"authorization")
        if authorization is None:  # named by ?rendezvous=ID: no credentials at all
            return "invalid"
        return digest.verify(authorization, head.method, self.uuid, secret, self.hub.nonces,
                             target=head.target)

    def _visitor_verdict(self, secret: VisitorSecret) -> tuple[str, float]:
        """The visitor check of the request being paired under the guess limits: "ok",
        "stale", "invalid", or "limited" (not checked: retry after the seconds given)."""
        hub = self.hub
        head = self.head
        assert head is not None
        if head.header(b"authorization") is None:  # named by ?rendezvous=ID: no guess made
            return "invalid", 0.0
        limiter = hub.visitor_guesses
        now = hub.loop.time()
        wait = limiter.retry_after(self.address, self.uuid, now)
        if wait > 0:
            return "limited", wait
        verdict = self._check_visitor(secret)
        if verdict == "ok":
            limiter.succeeded(self.address, self.uuid, now)
            self.visitor_ok = True
        elif verdict == "invalid":  # ("stale": the right password on an old nonce)
            limiter.failed(self.address, self.uuid, now)
            self.failures += 1
        return verdict, 0.0

    def _refuse_visitor(self, verdict: str, wait: float = 0.0) -> None:
        """Answer a client that failed the visitor check: 401 with a fresh challenge (SHA-256
        and MD5), closing after a few failures on one connection; or, past the guess limits,
        429 with Retry-After and a close."""
        head = self.head
        assert head is not None
        if verdict == "limited":
            header = b"Retry-After: %d\r\n" % math.ceil(wait)
            answer = (responses.bare_error(429, DIAG_TOO_MANY, extra=header) if head.is_upgrade
                      else responses.full_error(429, DIAG_TOO_MANY, close=True, extra=header))
            self._answer_request("too many visitor guesses", 429, answer, close=True)
            return
        close = (head.is_upgrade or not head.keep_alive
                 or self.failures >= self.hub.limits.visitor_failures_per_connection)
        answer = responses.challenge(head.is_upgrade, close, authenticate=digest.challenge_headers(
            self.hub.nonces, verdict == "stale"))
        self._answer_request("visitor not authorized", 401, answer, close)

    def _start_relay(self) -> None:
        """Send the hidden server the request and every byte read past it, then relay."""
        hidden, head = self.peer, self.head
        assert hidden is not None and head is not None
        self.timer = None
        # On a named host nothing is stripped: the hidden server may authenticate itself.
        latency = self._link(hidden, head.forwarded(strip_authorization=not self.named))
        self.hub.paired(self.uuid, latency)
        logs.event("paired", id=self.uuid, mobile=self._peer_text(), hidden=hidden._peer_text(),
                   latency=f"{latency * 1000:.1f}ms")

    def _link(self, other: Connection, request: bytes) -> float:
        """Join this mobile leg to ``other`` (a parked leg, or a connection to the node that
        holds one): send it ``request`` and every byte read past it, then relay both ways.
        Returns the seconds since the client's head arrived."""
        hub = self.hub
        head = self.head
        assert head is not None
        limits = hub.limits
        framer = self.framer = RequestFramer(limits.max_head_size, limits.max_headers)
        framer.begin(head)
        answers = other.responses = ResponseFramer()
        answers.expect(head.method)
        other.transport.write(request)
        self.received = len(request)
        early = other.reader.take_trailing()
        if early:  # (a hidden server that spoke first: passed on, and followed)
            other.received = len(early)
            self.transport.write(early)
            answers.feed(early)
        other.left = answers.take_opaque()
        buffer = self.reader.take_trailing()
        now = hub.loop.time()
        latency = now - self.since
        self.peer, other.peer = other, self
        self.state = other.state = RELAYING
        self.since = other.since = now
        hub.relay_started(self, other)
        self._arm_idle()
        for leg in (self, other):
            if leg.reading_paused:
                leg.reading_paused = False
                leg.transport.resume_reading()
        framer.feed(buffer)  # the rest of the first request, and any after it
        self._pass_requests()
        # A plain-TCP client that half-closed after its request.
        if self.eof and self.state == RELAYING:
            if other.transport.can_write_eof():
                other.transport.write_eof()
            else:
                other._close_leg()
        return latency

    # Relaying ------------------------------------------------------------------------------

    def _relay_framed(self, data: bytes) -> None:
        """Bytes past the current run of body bytes: pass on what is body, find where each
        message ends, route each new request head."""
        peer = self.peer
        assert peer is not None
        left = self.left
        if left:
            self.left = 0
            self.received += left
            peer.transport.write(data[:left])
            data = data[left:]
        answers = self.responses
        if answers is not None:  # hidden leg: answers pass on at once, then are followed
            self.received += len(data)
            peer.transport.write(data)
            answers.feed(data)
            self.left = answers.take_opaque()
            peer._answers_came(answers)
            return
        framer = self.framer
        assert framer is not None
        framer.feed(data)
        self._pass_requests()

    def _pass_requests(self) -> None:
        """Mobile leg: pass on every request the framer has, until one must wait. (A loop,
        not recursion: a client may pipeline thousands of requests the relay answers.)"""
        framer, peer = self.framer, self.peer
        assert framer is not None and peer is not None and peer.responses is not None
        while True:
            if self.pending is not None:
                if peer.responses.outstanding or self.writing_paused:
                    break  # until the answers are through, or the client reads ours
                if not self._serve_pending():
                    return  # this pairing has ended
                continue
            try:
                event = framer.next_event()
            except HeadError as exc:
                self._hold(exc)
                continue
            if event is None:
                break
            if isinstance(event, bytes):
                if not self.discarding:
                    self.received += len(event)
                    peer.transport.write(event)
            else:
                self._pass_request(event)
        if self.pending is None and not self.discarding:
            self.left = framer.take_opaque()
        if framer.buffered > HELD_BUFFER_LIMIT and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _pass_request(self, head: RequestHead) -> None:
        """A later request on this pairing: pass it on if it names this pairing's ID, else
        hold it until the hidden server has answered in full.

        One that names no ID is held too, for the relay's challenge: a Digest client (requests,
        httpx, curl) sends each new ID's first request without credentials, and on a
        connection paired with another ID that request must not reach the wrong server.
        (A visitor password is checked once per pairing, at its start: the client has proved
        itself on this connection, and its later nonces may be stale.)"""
        peer = self.peer
        assert peer is not None
        self.discarding = False
        name = self._name_of(head)
        if self.named or name is not None:  # a named pairing goes on only for its own Host
            same = name == self.named
        else:
            decision = route(head)
            same = isinstance(decision, Pair) and decision.uuid == self.uuid
        if not same:
            self._hold(head)
            return
        # Another relay node routes by it, and strips it itself; a named host strips nothing.
        request = head.forwarded(strip_authorization=peer.kind != OUTBOUND and not self.named)
        self.head = head
        self.received += len(request)
        peer.transport.write(request)
        assert peer.responses is not None
        peer.responses.expect(head.method)

    def _hold(self, item: RequestHead | HeadError) -> None:
        """Stop passing on: ``item`` (a request for another ID or for none, or a head we must
        refuse) is served once every request passed on so far has been answered."""
        self.pending = item
        self.left = 0
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _answers_came(self, answers: ResponseFramer) -> None:
        """Mobile leg: the hidden server's answers moved on; release what waited for them."""
        framer = self.framer
        assert framer is not None
        # An Upgrade answered with what is not HTTP: a tunnel we cannot follow, raw too.
        switched = answers.switched or answers.unframed
        if framer.awaiting_upgrade and (switched or not answers.outstanding):
            framer.upgrade_answered(switched)
            if framer.broken:  # raw bytes went on, the Upgrade was refused: lost track
                logs.event("upgrade refused after raw bytes", id=self.uuid,
                           mobile=self._peer_text())
                self._close_leg()
                return
            if self.reading_paused and self.pending is None:
                self.reading_paused = False
                self.transport.resume_reading()
            self._pass_requests()
        elif self.pending is not None and not answers.outstanding:
            self._pass_requests()

    def _serve_pending(self) -> bool:
        """Serve the held request, the hidden server having answered everything it was sent:
        challenge it and keep the pairing (True), or end the pairing and serve it as a first
        request, paired anew or answered here: 404, 401, 400 (False)."""
        item, self.pending = self.pending, None
        assert item is not None and self.framer is not None
        # (A named pairing's held request has another Host: it always ends the pairing.)
        if (isinstance(item, RequestHead) and not self.named and self._name_of(item) is None
                and _challenge_in_pairing(item)):
            self._challenge()
            return True
        rest = self.framer.detach()
        self._unpair()
        self.reader.receive(rest)  # (emptied when the pairing began)
        if isinstance(item, HeadError):
            self._refuse_head(item)
            return False
        if item.method == "CONNECT":
            self._reject("CONNECT after a request", responses.full_error(
                400, "CONNECT after a request", permanent=True, close=True), status=400)
            return False
        self.state = HEAD
        self._dispatch(item)
        if self.state == HEAD:
            self._process_heads()
        return False

    def _challenge(self) -> None:
        """Answer a later request that names no ID with the relay's challenge and keep the
        pairing: the client's retry, naming this ID, goes on to the same hidden server. The
        request's body (framed, so its end is known) is dropped."""
        self.transport.write(responses.challenge(False, False, self.hub.nonces.issue()))
        self.discarding = True
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def _unpair(self) -> None:
        """Mobile leg: close the hidden leg (its answers are through) and become unpaired."""
        hidden = self.peer
        assert hidden is not None
        self._cancel_timer()
        self._cancel_idle()
        self._account_pair(self, hidden)
        self.peer = hidden.peer = None
        self.framer = hidden.responses = None
        self.left = hidden.left = 0
        self.discarding = False
        self.head = None
        hidden.state = CLOSED
        hidden._cancel_timer()
        hidden.transport.close()  # a pairing is one-shot: the hidden server parks anew
        # Its close may wait on bytes it never reads: cut it after a grace, as relaying legs.
        self.hub.loop.call_later(CLOSE_GRACE, hidden.transport.abort)

    def _arm_idle(self) -> None:
        timeout = self.hub.limits.pair_idle_timeout
        if timeout > 0:
            self.idle_seen = -1
            self.idle_timer = self.hub.loop.call_later(timeout / 4, self._idle_check)

    def _idle_check(self) -> None:
        """Every quarter of the idle timeout: close the pairing if no byte moved for all of it."""
        self.idle_timer = None
        peer = self.peer
        if self.state != RELAYING or peer is None:
            return
        hub = self.hub
        now = hub.loop.time()
        timeout = hub.limits.pair_idle_timeout
        moved = self.received + peer.received
        if moved != self.idle_seen:
            self.idle_seen, self.idle_since = moved, now
        elif now - self.idle_since >= timeout:
            logs.event("idle timeout", id=self.uuid, mobile=self._peer_text(),
                       idle=f"{now - self.idle_since:.1f}s")
            self._close_leg()
            peer._close_leg()
            return
        self.idle_timer = hub.loop.call_later(timeout / 4, self._idle_check)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _check_stalled(self) -> None:
        """While our peer's bytes wait for this leg to read them, look now and then whether
        the leg is being closed under us: a TLS peer that sent a FIN without reading makes
        uvloop close the leg silently, and that close waits on the queued bytes for ever."""
        if self.state != RELAYING or not self.writing_paused or self.timer is not None:
            return
        if self.tls and _peer_sent_fin(self.transport):
            # It will never read what is queued: nothing is lost by cutting it now.
            logs.event("peer left without reading", id=self.uuid, peer=self._peer_text())
            self.transport.abort()
        elif self.transport.is_closing():
            self._watch_close()
        else:
            self.timer = self.hub.loop.call_later(STALL_CHECK, self._recheck_stalled)

    def _recheck_stalled(self) -> None:
        self.timer = None
        self._check_stalled()

    def _close_leg(self) -> None:
        """Close a relaying leg after it flushes what is queued for it, bounded in time."""
        self.transport.close()
        self._watch_close()

    def _watch_close(self) -> None:
        # A TLS close waits for its queued bytes to drain; a peer that reads nothing (and may
        # have sent a FIN) would hold it, and the whole pair, forever. Cut it after a grace.
        if self.timer is None:
            self.timer = self.hub.loop.call_later(CLOSE_GRACE, self._abort_if_open)

    def _abort_if_open(self) -> None:
        self.timer = None
        if self.state != CLOSED:
            logs.event("close timed out", id=self.uuid or "-", peer=self._peer_text())
            self.transport.abort()

    def _relay_leg_lost(self) -> None:
        """One leg is gone: close the other (after it flushes), log the pair once both are."""
        peer = self.peer
        assert peer is not None
        if peer.state != CLOSED:
            peer._close_leg()
            return
        mobile, hidden = (self, peer) if self.framer is not None else (peer, self)
        self._account_pair(mobile, hidden)

    def _account_pair(self, mobile: Connection, hidden: Connection) -> None:
        """Count and log a pairing that has ended."""
        hub = self.hub
        hub.relay_ended(mobile)
        logs.event("closed", id=self.uuid, mobile=mobile._peer_text(),
                   bytes_up=mobile.received, bytes_down=hidden.received,
                   duration=f"{hub.loop.time() - mobile.since:.3f}s")

    # Helpers -------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_timer()
        self.timer = self.hub.loop.call_later(self.hub.limits.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.state in (HANDSHAKE, HEAD, VERIFYING):
            # (mid-handshake the bytes are TLS's: no HTTP answer makes sense)
            answer = (responses.status_only(408)
                      if self.reader.trailing and self.state != HANDSHAKE else b"")
            self._reject("head timeout", answer, status=408)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _reject(self, reason: str, answer: bytes = b"", status: int | None = None) -> None:
        """Answer (if anything) and close, logging why."""
        if answer:
            self.transport.write(answer)
        self._note_rejection(reason, status)
        self._close()

    def _note_rejection(self, reason: str, status: int | None) -> None:
        peer = self._peer_text()
        self.hub.rejected(reason, status, self.uuid, peer)
        # The first of a kind from an address is logged at once, the rest as a count.
        self.hub.repeats.event((reason.partition(": ")[0], status, self.address), "rejected",
                               reason=reason, status=status or "-", id=self.uuid or "-",
                               peer=peer)

    def _close(self) -> None:
        """Close a connection that is not relaying (relaying legs close through their peer)."""
        self._release()
        self.transport.close()

    def abort(self) -> None:
        """Cut the connection at once, unflushed (the end of a shutdown)."""
        self.transport.abort()

    @property
    def address(self) -> str:
        """The peer's IP address (or "-" when unknown, e.g. a Unix socket)."""
        return self.peername[0] if self.peername else "-"

    def _peer_text(self) -> str:
        if self.peername is None:
            return "-"
        host, port = self.peername
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _challenge_in_pairing(head: RequestHead) -> bool:
    """Whether a later request on a pairing is one to challenge without ending the pairing: it
    names no ID, and its connection stays open after a 401 (not an Upgrade, not HTTP/1.0 or
    ``Connection: close``, no body held back behind ``Expect: 100-continue``, which might never
    come). The others are answered as first requests are, which closes them."""
    if not isinstance(route(head), Challenge) or head.is_upgrade or not head.keep_alive:
        return False
    expect = (head.header(b"expect") or b"").lower() == b"100-continue"
    return not (expect and head.content_length)


def _peer_sent_fin(transport: asyncio.Transport) -> bool:
    """Whether the kernel has the peer's FIN for this socket (TCP state CLOSE_WAIT)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) == TCP_CLOSE_WAIT)
    except OSError:
        return False
