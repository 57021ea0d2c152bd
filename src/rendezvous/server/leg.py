"""What every leg of the relay is: its state, its counters' home, the helpers all parts use.

A ``Connection`` (server/connection.py) is one accepted socket, and its code is split by the
part of its life it serves: ``hidden_side.py`` (a CONNECT: token check, parking),
``mobile_side.py`` (a visitor's request: the visitor check, finding a parked connection here or
on another node, linking the two), ``relaying.py`` (paired legs: per-request routing, idle and
stall checks, closing a pair). Each part is a mixin over :class:`LegBase`, which holds the
slots (no per-connection ``__dict__``: a relay holds thousands of parked legs), the states and
limits named below, and a stub for each method one part calls in another, so every part
type-checks alone and no module imports another's.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, cast

from rendezvous.protocol import proxy, responses
from rendezvous.protocol.framing import BodyReader, RequestFramer, ResponseFramer
from rendezvous.protocol.head import HeadError, HeadReader, RequestHead
from rendezvous.protocol.routing import Park
from rendezvous.registry import Entry
from rendezvous.server.hub import Hub

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
PROXY = 8  # from a trusted balancer: reading the PROXY header that names the real client
# Public TLS with --proxy-protocol-from, from anyone else: the first bytes are looked at (a PROXY
# header is refused, and logged as such) before the TLS layer gets them; and while an ACME
# TLS-ALPN-01 challenge is pending, the whole ClientHello is read (it picks the TLS context).
FIRST_BYTES = 9

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


def tune_listener(sock: Any) -> None:
    """Set on a listening socket what every socket it accepts inherits (Linux copies these
    options at accept): TCP_NODELAY (Nagle cost the original ~40 ms on every small write) and
    the keepalive probes of parked connections, so accepts and parks need no setsockopt each
    (through uvloop, each of those built a socket object: a fifth of a plain accept's calls)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_keepalive(sock)


def set_keepalive(sock: Any) -> None:
    """Keepalive probes on ``sock`` (see KEEPALIVE_IDLE)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


class LegBase(asyncio.Protocol):
    """State and shared helpers of one accepted socket (see the module docstring).

    The protocol object of one accepted socket, hidden or mobile.
    """

    __slots__ = (
        "__weakref__",
        "body",
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
        "send_proxy",
        "since",
        "sni_name",
        "state",
        "timer",
        "tls",
        "transport",
        "upgrade",
        "uuid",
        "visitor_ok",
        "writing_paused",
    )

    def __init__(self, hub: Hub[LegBase], kind: int = PUBLIC,
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
        self.peer: LegBase | None = None
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
        # Mobile: how the body of the request being paired is framed (found when it was
        # routed), for the pairing's framer to follow.
        self.body: BodyReader | None = None
        self.responses: ResponseFramer | None = None  # hidden: its answers' framing
        self.pending: RequestHead | HeadError | None = None  # mobile: to serve after the pair
        self.idle_timer: asyncio.TimerHandle | None = None  # mobile: the pairing's idle check
        self.idle_seen = 0  # bytes both ways at the last idle check
        self.idle_since = 0.0
        self.failures = 0  # wrong visitor passwords on this connection
        self.visitor_ok = False  # the current request passed the visitor check
        self.named = ""  # mobile: the name its Host asked for (serve --domain); "" for none
        self.sni_name = ""  # public TLS: the name its SNI asked for (serve --domain); "" for none
        self.send_proxy = 0  # hidden: the PROXY version its CONNECT asked for (&proxy=N); 0: none

    def _arm_head_timer(self) -> None:
        self._cancel_timer()
        hub = self.hub
        self.timer = hub.loop.call_later(hub.limits.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.state in (PROXY, FIRST_BYTES, HANDSHAKE, HEAD, VERIFYING):
            # (mid-handshake the bytes are TLS's: no HTTP answer makes sense)
            answer = (responses.status_only(408)
                      if self.reader.trailing and self.state == HEAD else b"")
            self._reject("head timeout", answer, status=408)

    def _kept_entry(self, uuid: str) -> Entry | None:
        """The entry for ``uuid`` kept in memory (server/hub.py's EntryCache) if the registry
        vouches that it is current, else None."""
        hub = self.hub
        entry = hub.entries.get(uuid)
        return entry if entry is not None and hub.registry.fresh() else None

    async def _lookup(self, uuid: str, cached: bool = True) -> Entry | None:
        """The registry's entry for ``uuid``: the one kept in memory when the registry vouches
        for it and ``cached``, else read (and kept)."""
        hub = self.hub
        cache = hub.entries
        entry = self._kept_entry(uuid) if cached else None
        if entry is not None:
            return entry
        generation = cache.generation
        entry = await hub.registry.get(uuid)
        if entry is not None:
            cache.keep(entry, generation)
        return entry

    def _proxy_header(self, version: int) -> bytes:
        """A PROXY header naming this visitor and the relay address it reached."""
        local = self.transport.get_extra_info("sockname")
        source = self.peername
        destination = (str(local[0]), int(local[1])) if local and source else None
        if version == 1:
            if source is None or destination is None:
                return b"PROXY UNKNOWN\r\n"
            return proxy.encode_v1(source, destination)
        return proxy.encode_v2(source, destination)

    def _forwarded(self) -> bytes:
        """serve --forwarded: the header naming this visitor, for the head passed on (not on a
        request another node forwarded to us: that node added its own, about the visitor)."""
        if not self.hub.add_forwarded or self.kind == INTERNAL:
            return b""
        return proxy.forwarded_header(self.address, self.tls)

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

    # Provided by the parts (mixins) ------------------------------------------------------

    def _verify_soon(self, park: Park) -> None:
        raise NotImplementedError  # (in hidden_side.py)

    def evict(self, reason: str) -> None:
        raise NotImplementedError  # (in hidden_side.py)

    def _request_pairing(self) -> None:
        raise NotImplementedError  # (in mobile_side.py)

    def _not_found(self) -> None:
        raise NotImplementedError  # (in mobile_side.py)

    def pair_with(self, hidden: LegBase) -> None:
        raise NotImplementedError  # (in mobile_side.py)

    def _relay_framed(self, data: bytes) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _pass_requests(self) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _answers_came(self, answers: ResponseFramer) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _arm_idle(self) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _cancel_idle(self) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _check_stalled(self) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _close_leg(self) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _watch_close(self) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _relay_leg_lost(self) -> None:
        raise NotImplementedError  # (in relaying.py)

    def _release(self) -> None:
        raise NotImplementedError  # (in connection.py)

    def _process_heads(self) -> None:
        raise NotImplementedError  # (in connection.py)

    def _refuse_head(self, exc: HeadError) -> None:
        raise NotImplementedError  # (in connection.py)

    def _name_of(self, head: RequestHead) -> str | None:
        raise NotImplementedError  # (in connection.py)

    def _dispatch(self, head: RequestHead) -> None:
        raise NotImplementedError  # (in connection.py)

    def _finish_refused(self, head: RequestHead, close: bool) -> None:
        raise NotImplementedError  # (in connection.py)
