"""Paired legs: bytes both ways, following each direction's HTTP framing.

Every later request on the mobile leg is routed by its own ``Authorization`` (stripped); one
for another ID waits until the first hidden server has answered in full, then the pairing ends
and it is served as a first request. Also the pairing's idle check, the check for a reader that
left without reading, and closing a pair with a bounded grace.
"""

from __future__ import annotations

import asyncio
import socket

from rendezvous import logs
from rendezvous.protocol import responses
from rendezvous.protocol.framing import ResponseFramer
from rendezvous.protocol.head import HeadError, RequestHead
from rendezvous.protocol.routing import Challenge, Pair, route
from rendezvous.server.leg import (
    CLOSE_GRACE,
    CLOSED,
    HEAD,
    HELD_BUFFER_LIMIT,
    OUTBOUND,
    RELAYING,
    STALL_CHECK,
    TCP_CLOSE_WAIT,
    LegBase,
)


class Relaying(LegBase):
    """A leg of a pair: framed relaying, per-request routing, idle and close."""

    __slots__ = ()

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
        request = head.forwarded(strip_authorization=peer.kind != OUTBOUND and not self.named,
                                 extra=self._forwarded())
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
        # Both legs are gone: unlinked, they (and their transports) are freed at once rather
        # than left as a reference cycle for the garbage collector, two per pairing.
        self.peer = peer.peer = None

    def _account_pair(self, mobile: LegBase, hidden: LegBase) -> None:
        """Count and log a pairing that has ended."""
        hub = self.hub
        hub.relay_ended(mobile)
        logs.event("closed", id=self.uuid, mobile=mobile._peer_text(),
                   bytes_up=mobile.received, bytes_down=hidden.received,
                   duration=f"{hub.loop.time() - mobile.since:.3f}s")


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

