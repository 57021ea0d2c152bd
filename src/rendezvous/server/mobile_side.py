"""The mobile side of a leg: a visitor's request meets a parked connection.

It checks the visitor (when the entry has a visitor password), takes a parked connection of its
ID (here, or on another cluster node), lets a just-parked one settle, and links the two legs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from typing import cast

from rendezvous import logs
from rendezvous.protocol import digest, responses
from rendezvous.protocol.digest import VisitorSecret
from rendezvous.protocol.framing import RequestFramer, ResponseFramer
from rendezvous.protocol.routing import DIAG_NOT_REGISTERED, DIAG_TOO_MANY
from rendezvous.server.hub import Cluster
from rendezvous.server.leg import (
    FORWARD_RETRY_FIRST,
    FORWARD_RETRY_MAX,
    INTERNAL,
    OUTBOUND,
    PUBLIC,
    RELAYING,
    SETTLING,
    WAITING,
    LegBase,
)
from rendezvous.server.links import LinkStream, accept_probe, is_unanswered_probe


class MobileSide(LegBase):
    """A leg that sent a visitor's request: the visitor check and the pairing."""

    __slots__ = ()

    def _request_pairing(self) -> None:
        hub = self.hub
        self._cancel_timer()
        hidden = hub.take(self.uuid)
        if self.kind == INTERNAL and is_unanswered_probe(self.transport):
            # The node that sent it guessed from an earlier pairing: take it, or refuse it at
            # once (a close before any byte) so that node asks Redis for the right one.
            if hidden is None:
                self._close()
                return
            accept_probe(self.transport)
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
        try:
            entry = await self._lookup(self.uuid)
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

        The node that took this ID's last client is asked first, with no Redis lookup (a
        probe: it refuses at once if nothing is parked there now). Otherwise Redis says who
        holds one. Meanwhile the client keeps waiting here too: whichever comes first, a local
        park or a remote node, wins. With none yet, Redis is asked again (more and more
        slowly) until pair_wait runs out: the hidden server is often re-parking somewhere.
        """
        route = cluster.route(self.uuid)
        if route is not None:
            if not await self._check_visitor_early() or self.state != WAITING:
                return
            if await self._forward_to(cluster, *route, probe=True):
                return
            found = await cluster.locate(self.uuid) if self.state == WAITING else []
        else:
            # The lookup runs during the visitor check (a read of Redis: no node sees the
            # request before the check passes), saving the forwarded client one round trip.
            located = self.hub.loop.create_task(cluster.locate(self.uuid))
            allowed = await self._check_visitor_early()  # here, before any node sees a guess
            found = await located
            if not allowed:
                return
        delay = FORWARD_RETRY_FIRST
        while self.state == WAITING:
            for node, address in found:
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
            found = await cluster.locate(self.uuid) if self.state == WAITING else []

    async def _forward_to(self, cluster: Cluster, node: str, address: str, *,
                          probe: bool = False) -> bool:
        """Relay this client through a stream to ``node``. A ``probe`` (``node`` is where the
        ID was paired last) sends the request first and links only once ``node`` takes it:
        False when it refuses, and then nothing of the client has reached anyone."""
        hub = self.hub
        head = self.head
        assert head is not None
        if probe:
            hub.stop_waiting(self)  # not paired here meanwhile: that node may be pairing it
        try:
            outbound = await cluster.dial(address, lambda: type(self)(hub, OUTBOUND),
                                          probe=probe)
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            logs.event("forward failed", level=logging.WARNING, id=self.uuid, node=node,
                       address=address, error=str(exc) or type(exc).__name__)
            if probe:
                cluster.forget_route(self.uuid)
                self._wait_again()
            return False
        if self.state != WAITING:  # paired here meanwhile, or gave up
            outbound.transport.close()
            return True
        # (Authorization kept: that node routes by it; the Forwarded header is ours to add.)
        request = head.forwarded(strip_authorization=False, extra=self._forwarded())
        if probe:
            outbound.transport.write(request)
            stream = cast(LinkStream, outbound.transport)
            assert stream.answer is not None
            taken = await stream.answer
            if taken is None:
                # The link died before the answer: that node may have passed the request on
                # already, so it is not sent anywhere else (no request runs twice). As with a
                # pairing cut by a dying node, the client's connection is closed.
                cluster.forget_route(self.uuid)
                if self.state == WAITING:
                    self._close()
                return True
            cluster.route_answered(self.uuid, taken)
            if not taken:
                self._wait_again()
                return False
            if self.state != WAITING:  # gave up meanwhile (pair_wait, or left)
                outbound.transport.abort()
                return True
        hub.stop_waiting(self)
        self._cancel_timer()
        self._link(outbound, request, written=probe)
        cluster.remember_route(self.uuid, node, address)
        hub.forwarded()
        logs.event("forwarded", id=self.uuid, mobile=self._peer_text(), node=node)
        return True

    def _wait_again(self) -> None:
        """Back in this node's waiting line after a probe came to nothing."""
        if self.state == WAITING:
            self.hub.wait_for(self)

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

    def pair_with(self, hidden: LegBase) -> None:
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
        latency = self._link(hidden, head.forwarded(strip_authorization=not self.named,
                                                    extra=self._forwarded()))
        self.hub.paired(self.uuid, latency)
        logs.event("paired", id=self.uuid, mobile=self._peer_text(), hidden=hidden._peer_text(),
                   latency=f"{latency * 1000:.1f}ms")

    def _link(self, other: LegBase, request: bytes, *, written: bool = False) -> float:
        """Join this mobile leg to ``other`` (a parked leg, or a stream to the node that holds
        one): send it ``request`` (unless ``written`` already) and every byte read past it,
        then relay both ways. Returns the seconds since the client's head arrived."""
        hub = self.hub
        head = self.head
        assert head is not None
        limits = hub.limits
        framer = self.framer = RequestFramer(limits.max_head_size, limits.max_headers)
        framer.begin(head, self.body)
        self.body = None
        answers = other.responses = ResponseFramer()
        answers.expect(head.method)
        if other.send_proxy:  # (a leg to another node has none: that node's hidden leg may)
            other.transport.write(self._proxy_header(other.send_proxy))
        if not written:
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

