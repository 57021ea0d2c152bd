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

This module holds the asyncio callbacks, the TLS upgrade and the dispatch of request heads;
the rest of a leg's life is in its parts (hidden_side.py, mobile_side.py, relaying.py),
mixins over server/leg.py's LegBase, which holds the state they share.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import ssl
from typing import cast

from rendezvous import logs
from rendezvous.errors import ClientHelloError, ProxyHeaderError, RegistryError
from rendezvous.protocol import clienthello, proxy, responses
from rendezvous.protocol.framing import FramingError, request_body
from rendezvous.protocol.head import NEED_MORE, HeadError, HeadTooLarge, RequestHead
from rendezvous.protocol.hostnames import name_in
from rendezvous.protocol.routing import (
    DIAG_EARLY_DATA,
    DIAG_MISDIRECTED,
    DIAG_TOO_MANY,
    Challenge,
    Pair,
    Park,
    Refuse,
    route,
)
from rendezvous.server.hidden_side import HiddenSide
from rendezvous.server.leg import (
    CLOSED,
    FIRST_BYTES,
    HANDSHAKE,
    HEAD,
    INTERNAL,
    OUTBOUND,
    PARKED,
    PROXY,
    PUBLIC,
    RELAYING,
    SETTLING,
    SSL_SHUTDOWN_TIMEOUT,
    VERIFYING,
    WAITING,
    WAITING_BUFFER_LIMIT,
    LegBase,
)
from rendezvous.server.mobile_side import MobileSide
from rendezvous.server.relaying import Relaying

__all__ = ["INTERNAL", "OUTBOUND", "PUBLIC", "SSL_SHUTDOWN_TIMEOUT", "Connection", "LegBase",
           "remember_sni"]

# Where remember_sni leaves the client's SNI on its SSLObject: Python shows a server no SNI
# after the handshake, only to the SNI callback during it.
SNI_ATTRIBUTE = "rendezvous_sni"


def remember_sni(sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                 _context: ssl.SSLContext) -> None:
    """The relay context's SNI callback with ``--domain``: keep the name the client asked for,
    so a request whose ``Host`` names another host gets 421 (RFC 9110 §15.5.20)."""
    setattr(sslobj, SNI_ATTRIBUTE, server_name)


class Connection(HiddenSide, MobileSide, Relaying):
    """The protocol object of one accepted socket, hidden or mobile.

    The asyncio callbacks and the dispatch of request heads live here; each part of a
    leg's life is a mixin (server/leg.py)."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # On the public listener this runs at accept, before any TLS work: every socket is
        # counted against the caps from its first moment, and one over them costs no handshake.
        self.transport = cast(asyncio.Transport, transport)
        hub = self.hub
        self.tls = transport.get_extra_info("sslcontext") is not None
        peername = transport.get_extra_info("peername")
        self.peername = (str(peername[0]), int(peername[1])) if peername else None
        # Nagle cost the original ~40 ms on every small write; asyncio usually sets this
        # already, but a relay must not depend on it. (The public listener's sockets inherit
        # it from the listener: leg.tune_listener.)
        sock = transport.get_extra_info("socket") if self.kind != PUBLIC else None
        if sock is not None:
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
        self._arm_head_timer()  # the head timeout counts from accept, handshake included
        if self.kind == PUBLIC and hub.proxy_from and self.peername is not None and any(
                ipaddress.ip_address(address) in network for network in hub.proxy_from):
            # A balancer: the real client (whose count the caps apply to) is in its header.
            self.state = PROXY
            return
        self._begin(upgrade, over)

    def _begin(self, upgrade: ssl.SSLContext | None, over: bytes) -> None:
        """Apply the per-address cap to the (real) client, then start the TLS handshake, or
        read the request heads."""
        hub = self.hub
        # Other relay nodes forward many clients each: no per-address cap for them.
        if hub.from_address(self.address) > hub.limits.max_per_address and self.kind == PUBLIC:
            self._reject("too many connections from this address", over, status=503)
            return
        challenges = hub.challenges
        peek = (bool(hub.proxy_from) and self.state != PROXY) or (
            challenges is not None and challenges.alpn_pending)
        if upgrade is not None and peek:
            self.state = FIRST_BYTES
            if self.reader.trailing:  # what came behind a PROXY header
                self._first_bytes_in()
        elif upgrade is not None:
            self.state = HANDSHAKE
            hub.spawn(self._handshake(upgrade))
        else:
            self.state = HEAD
            if self.reader.trailing:  # what came behind a PROXY header
                self._process_heads()

    def _read_proxy_header(self, data: bytes) -> None:
        """Read the balancer's PROXY header; then the connection is its real client's."""
        reader = self.reader
        reader.receive(data)
        upgrade = self.upgrade if not self.tls else None
        try:
            header = proxy.parse(reader.trailing)
        except ProxyHeaderError as exc:
            answer = responses.status_only(400) if upgrade is None else b""
            self._reject(f"bad PROXY header: {exc}", answer, status=400)
            return
        if header is None:
            return
        del reader.trailing[:header.size]
        hub = self.hub
        if header.source is not None:  # (LOCAL, UNKNOWN: the balancer's own connection)
            hub.closed(self, self.address)
            self.peername = header.source
            hub.opened(self, self.address)
        self._begin(upgrade, b"" if upgrade is not None else responses.status_only(503))

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
        if hub.domain:
            sni = getattr(tls.get_extra_info("ssl_object"), SNI_ATTRIBUTE, None)
            self.sni_name = (name_in(sni, hub.domain) or "") if sni else ""

    def _first_bytes_in(self) -> None:
        """Start the handshake once the first bytes say which context it needs: while a
        TLS-ALPN-01 challenge is pending, the ClientHello is read whole first, and only the
        CA's (the name's SNI, ALPN offering acme-tls/1) gets the challenge context."""
        context = self.upgrade
        assert context is not None
        challenges = self.hub.challenges
        if challenges is not None and challenges.alpn_pending:
            try:
                hello = clienthello.parse(self.reader.trailing, self.hub.limits.max_client_hello)
            except ClientHelloError:
                hello = None  # not for us to judge: OpenSSL answers it with the normal context
            if hello is NEED_MORE:
                return  # (bounded by the parser's limit and the head timeout)
            if hello is not None:
                context = challenges.context_for(hello.server_name, hello.alpn) or context
        self.transport.pause_reading()
        self.state = HANDSHAKE
        self.hub.spawn(self._handshake(context))

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

    def _data_before_relay(self, data: bytes) -> None:
        state = self.state
        if state == HEAD:
            if self.head is None and not self.reader.trailing and proxy.starts_with_proxy(data):
                self._reject("PROXY header from an untrusted address",
                             responses.status_only(400), status=400)
                return
            self.reader.receive(data)
            self._process_heads()
        elif state == HANDSHAKE:
            # TLS bytes read before start_tls took the socket over (uvloop starts reading
            # right after connection_made): kept for the TLS layer, nothing more read.
            self.reader.receive(data)
            self.transport.pause_reading()
        elif state == PROXY:
            self._read_proxy_header(data)
        elif state == FIRST_BYTES:
            if not self.reader.trailing and self.hub.proxy_from and proxy.starts_with_proxy(data):
                self._reject("PROXY header from an untrusted address", status=400)
                return
            self.reader.receive(data)  # the ClientHello, for the TLS layer
            self._first_bytes_in()
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
        decision: Park | Pair | Challenge | Refuse
        if self.sni_name and name != self.sni_name and head.method != "CONNECT":
            # The handshake was for one named host, the request is for another (or for the
            # relay's own name): this connection is not authoritative for it. The client may
            # retry on a connection of its own, and this one keeps serving its SNI's host.
            decision = Refuse(421, DIAG_MISDIRECTED, permanent=True)
        elif name is not None:
            self._dispatch_named(head, name)
            return
        else:
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
            self._verify_soon(decision)
        elif isinstance(decision, Pair):
            try:
                # Its body must be one we can find the end of; the pairing follows it from here.
                self.body = request_body(head)
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
            self.body = request_body(head)
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

