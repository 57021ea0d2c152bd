"""Internal links: every forwarded client of a cluster on one connection between two nodes.

A :class:`Link` runs the frames of ``protocol/mux.py`` over one established (mutual TLS)
connection; each forwarded client is a :class:`LinkStream`, an asyncio transport, so the relay's
own ``Connection`` runs on it unchanged, on both nodes: as the OUTBOUND leg where the visitor
entered and as the INTERNAL leg where the hidden server is parked. No handshake per client, no
descriptor per client between the nodes, and a half-close crosses the link as it would TCP.

Back-pressure works as on a socket: a stream whose receiver reads nothing gets no more credit
(``window`` bytes in flight at most), its unsent bytes queue, and past ``HIGH_WATER`` its
protocol is told ``pause_writing``; the link's own transport pausing pauses every stream.

:class:`LinkDialer` keeps one link per other node, opened on first use (concurrent callers share
the dial) and replaced when it dies or its node says GOAWAY. Both ends send a PING after a
third of ``timeout`` of silence and close a link that has said nothing for ``timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from rendezvous import logs
from rendezvous.protocol import mux
from rendezvous.protocol.mux import Header, LinkProtocolError

P = TypeVar("P", bound=asyncio.BaseProtocol)

DEFAULT_WINDOW = 256 * 1024
# A stream's writer is paused past this many bytes queued for lack of credit, resumed at LOW.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
# The link's own TLS transport: larger limits than asyncio's 64 KiB, so a bulk stream pauses
# every other stream less often (each pause and resume visits them all).
LINK_HIGH_WATER = 1024 * 1024
LINK_LOW_WATER = 256 * 1024
# A DATA payload this large is written at once instead of with the loop turn's other frames.
WRITE_AT_ONCE = 16 * 1024
SILENT_TICKS = 3  # keepalive ticks (a third of the timeout each) without a frame: link dead


class LinkStream(asyncio.Transport):
    """One forwarded client on a link, seen by its protocol as a plain TCP transport (it can
    half-close; no socket, no TLS of its own). On the dialer, ``answer`` (a probe stream only)
    resolves True when the acceptor takes the client, False when it refuses (closes the stream
    before ACCEPT) or the link dies first."""

    def __init__(self, link: Link, stream_id: int, *, probe: bool, answer: bool) -> None:
        super().__init__({"peername": link.peername, "sockname": link.sockname,
                          "probe": probe, "link": link})
        self.link = link
        self.id = stream_id
        self.protocol: asyncio.Protocol | None = None
        window = link.window
        self._credit = window  # bytes we may still send before the peer grants more
        self._allowance = window  # bytes the peer may still send us
        self._unacked = 0  # bytes passed to our protocol not yet granted back as credit
        # Written, waiting for credit: immutable pieces, split without copying (memoryview).
        self._pending: deque[bytes | memoryview] = deque()
        self._pending_size = 0
        self._inbox: deque[bytes] = deque()  # received while our protocol paused reading
        self._reading = True
        self._draining = False  # an inbox drain is scheduled
        self._writing_paused = False
        self._eof_in = False  # EOF received, to pass on once the inbox is empty
        self._eof_after_flush = False
        self._eof_out = False
        self._closing = False  # close() asked: flush, then CLOSE
        self._closed = False  # CLOSE sent or received, or the link died
        self._unanswered = probe and not answer  # acceptor: a probe not yet taken
        # True: taken; False: refused (nothing of it reached anyone); None: the link died first,
        # and whether the other node had taken it is unknown, so it must not go elsewhere.
        self.answer: asyncio.Future[bool | None] | None = (
            link.loop.create_future() if probe and answer else None)

    # asyncio.Transport -------------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def is_reading(self) -> bool:
        return self._reading and not self._closed

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading or self._closed:
            return
        self._reading = True
        if (self._inbox or self._eof_in) and not self._draining:
            # Later, as a socket would: the caller may still be setting up what reads it.
            self._draining = True
            self.link.loop.call_soon(self._drain)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._closed or not data:
            return
        if self._unanswered:
            self.accept()
        if not isinstance(data, bytes):
            data = bytes(data)  # (a caller may reuse a mutable buffer; bytes are kept as is)
        size = len(data)
        if not self._pending and size <= self._credit:
            self._credit -= size
            self.link.send_data(self.id, data)
            return
        self._pending.append(data)
        self._pending_size += size
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._closed or self._eof_out or self._eof_after_flush:
            return
        if self._pending_size:
            self._eof_after_flush = True
            return
        self._eof_out = True
        self.link.send(mux.frame(mux.EOF, self.id))

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW_WATER, HIGH_WATER

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # fixed: the window bounds what a stream holds

    def close(self) -> None:
        if self._closing or self._closed:
            return
        self._closing = True
        self._reading = False
        self._inbox.clear()
        if not self._pending_size:
            self._finish(send_close=True)
        # else: CLOSE follows the last queued byte (_flush)

    def abort(self) -> None:
        if self._closed:
            return
        self._closing = True
        self._drop_pending()
        self._inbox.clear()
        self._finish(send_close=True)

    # Acceptor: answering a probe -----------------------------------------------------------

    def accept(self) -> None:
        """Take the probed client (before anything of it is written): the dialer links it.
        Sent at once, not with the loop turn's other frames: the sooner the dialer knows."""
        if self._unanswered:
            self._unanswered = False
            self.link.send(mux.frame(mux.ACCEPT, self.id))
            self.link.flush()

    # Frames from the link -----------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self._closing or self._closed:
            return
        if self._reading and not self._inbox:
            self._pass_on(data)
        else:
            self._inbox.append(data)

    def _pass_on(self, data: bytes) -> None:
        unacked = self._unacked + len(data)
        if unacked >= self.link.window // 2:
            self._allowance += unacked
            self.link.send(mux.frame(mux.WINDOW, self.id, unacked))
            unacked = 0
        self._unacked = unacked
        assert self.protocol is not None
        self.protocol.data_received(data)

    def _drain(self) -> None:
        self._draining = False
        inbox = self._inbox
        while inbox and self._reading and not self._closed and not self._closing:
            self._pass_on(inbox.popleft())
        if not inbox and self._eof_in and self._reading:
            self._pass_eof()

    def _remote_eof(self) -> None:
        if self._closing or self._closed:
            return
        self._eof_in = True
        if self._reading and not self._inbox:
            self._pass_eof()

    def _pass_eof(self) -> None:
        self._eof_in = False
        assert self.protocol is not None
        if not self.protocol.eof_received():
            self.close()

    def _granted(self, credit: int) -> None:
        self._credit += credit
        if self._pending_size:
            self._flush()

    def _accepted(self) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(True)

    def _remote_close(self) -> None:
        """The peer closed the stream: what it sent before is passed on (even while paused:
        at most a window), what we still had to send is dropped, unread by anyone."""
        if self._closed:
            return
        while self._inbox and not self._closing:
            self._pass_on(self._inbox.popleft())
        self._drop_pending()
        self._finish(send_close=False)

    def _link_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._drop_pending()
        self._inbox.clear()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(None)
        self._finish(send_close=False, exc=exc)

    # Internals ---------------------------------------------------------------------------

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_size = 0

    def _flush(self) -> None:
        pending = self._pending
        while pending and self._credit > 0:
            piece = pending[0]
            size = len(piece)
            if size > self._credit:
                view = memoryview(piece)
                size = self._credit
                pending[0] = view[size:]
                piece = view[:size]
            else:
                pending.popleft()
            self._credit -= size
            self._pending_size -= size
            self.link.send_data(self.id, piece)
        if not pending:
            if self._eof_after_flush and not self._eof_out:
                self._eof_after_flush = False
                self._eof_out = True
                self.link.send(mux.frame(mux.EOF, self.id))
            if self._closing:
                self._finish(send_close=True)
                return
        self.update_writing()

    def update_writing(self) -> None:
        """Tell our protocol to pause or resume writing, from our queue and the link's state."""
        if self._closed or self.protocol is None:
            return
        queued = self._pending_size
        if self._writing_paused:
            if not self.link.writing_paused and queued <= LOW_WATER:
                self._writing_paused = False
                self.protocol.resume_writing()
        elif self.link.writing_paused or queued > HIGH_WATER:
            self._writing_paused = True
            self.protocol.pause_writing()

    def _finish(self, *, send_close: bool, exc: Exception | None = None) -> None:
        self._closed = self._closing = True
        self._reading = False
        if send_close:
            self.link.send(mux.frame(mux.CLOSE, self.id))
        self.link.forget(self.id)
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(False)
        if self.protocol is not None:
            self.link.loop.call_soon(self.protocol.connection_lost, exc)


class Link(asyncio.Protocol):
    """One internal connection carrying many streams (see the module's docstring).

    The dialer makes one with ``on_stream=None`` and calls :meth:`open_stream`; the acceptor
    gives ``on_stream(stream)``, called for each stream the dialer opens, which must give the
    stream its protocol (``set_protocol``, then ``connection_made``)."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, window: int, timeout: float,
                 on_stream: Callable[[LinkStream], None] | None = None,
                 on_closed: Callable[[Link], None] | None = None) -> None:
        self.loop = loop
        self.window = window
        self.timeout = timeout
        self._on_stream = on_stream
        self._on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        self.sockname: Any = None
        self.streams: dict[int, LinkStream] = {}
        self._reader = mux.FrameReader()
        self._out: list[bytes | memoryview] = []  # what this turn of the loop sends
        self._next_id = 1
        self._receiving: LinkStream | None = None  # the stream of the DATA payload arriving
        self.writing_paused = False
        self.draining = False  # GOAWAY sent or received: no new streams
        self.closed = False
        self._heard = True
        self._sent = True
        self._silent = 0
        self._ticker: asyncio.TimerHandle | None = None
        self.opened = 0  # streams opened on this link, either way

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self.transport.set_write_buffer_limits(LINK_HIGH_WATER, LINK_LOW_WATER)
        self._ticker = self.loop.call_later(self.timeout / SILENT_TICKS, self._tick)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        try:
            items = self._reader.feed(data)
        except LinkProtocolError as exc:
            self._broken(str(exc))
            return
        for item in items:
            if isinstance(item, Header):
                if not self._frame(item):
                    return
            else:
                stream = self._receiving
                if stream is not None:
                    stream._received(item[1])

    def eof_received(self) -> bool | None:
        return None  # the peer went: close; connection_lost ends every stream

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream._link_lost(exc or ConnectionResetError("internal link closed"))
        if self._on_closed is not None:
            self._on_closed(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in list(self.streams.values()):
            stream.update_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in list(self.streams.values()):
            stream.update_writing()

    # Dialer ------------------------------------------------------------------------------

    def open_stream(self, factory: Callable[[], P], *, probe: bool = False) -> P:
        """A new stream whose protocol ``factory()`` makes (its ``connection_made`` has run).
        With ``probe`` its transport's ``answer`` tells whether the acceptor took it."""
        if self.closed or self.draining or self._next_id > mux.MAX_STREAM_ID:
            raise ConnectionResetError("internal link closing")
        stream_id = self._next_id
        self._next_id += 1
        stream = LinkStream(self, stream_id, probe=probe, answer=True)
        self.streams[stream_id] = stream
        self.opened += 1
        self.send(mux.frame(mux.OPEN, stream_id, mux.PROBE if probe else 0))
        protocol = factory()
        stream.set_protocol(protocol)
        protocol.connection_made(stream)
        return protocol

    @property
    def usable(self) -> bool:
        return not self.closed and not self.draining and self._next_id <= mux.MAX_STREAM_ID

    # Both ends ---------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a frame: what one turn of the loop sends leaves in one write (one system
        call, not one per frame: on loopback a write costs the receiver's TCP work too)."""
        if not self.closed and self.transport is not None:
            self._sent = True
            out = self._out
            out.append(frame)
            if len(out) == 1:
                self.loop.call_soon(self._write_out)

    def send_data(self, stream_id: int, payload: bytes | memoryview) -> None:
        """Queue a DATA frame of immutable bytes (or a view of them). Its payload is never
        copied here: header and payload go to the TLS layer side by side (``writelines``),
        which encrypts them from where they are. A large payload leaves at once, with what
        is queued before it: held until the loop's next turn, several reads' worth of large
        buffers would be alive together, and glibc would grow and trim its heap (a brk call)
        for each."""
        self.send(mux.HEADER.pack(mux.DATA, stream_id, len(payload)))
        self._out.append(payload)
        if len(payload) >= WRITE_AT_ONCE:
            self._write_out()

    def flush(self) -> None:
        """Write what is queued now rather than at the end of the loop's turn."""
        self._write_out()

    def _write_out(self) -> None:
        out, self._out = self._out, []
        if out and not self.closed and self.transport is not None:
            self.transport.writelines(out)

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if self._receiving is not None and self._receiving.id == stream_id:
            self._receiving = None
        if self.draining and not self.streams:
            self.close()

    def goaway(self) -> None:
        """This node is leaving: the peer opens no more streams here (nor do we); the link
        closes once its last stream has."""
        if self.closed or self.draining:
            return
        self.draining = True
        self.send(mux.frame(mux.GOAWAY))
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._write_out()
            self.closed = True
            self.transport.close()

    def _frame(self, header: Header) -> bool:
        """Act on one frame; False when it broke the link."""
        kind, stream_id = header.kind, header.stream
        stream = self.streams.get(stream_id)
        if kind == mux.DATA:
            self._receiving = stream
            if stream is not None:
                stream._allowance -= header.value
                if stream._allowance < 0:
                    self._broken(f"stream {stream_id} sent past its credit")
                    return False
        elif kind == mux.WINDOW:
            if stream is not None:
                stream._granted(header.value)
        elif kind == mux.EOF:
            if stream is not None:
                stream._remote_eof()
        elif kind == mux.CLOSE:
            if stream is not None:
                stream._remote_close()
        elif kind == mux.OPEN:
            return self._opened(stream_id, header.value)
        elif kind == mux.ACCEPT:
            if stream is not None:
                stream._accepted()
        elif kind == mux.GOAWAY:
            self.draining = True
            if not self.streams:
                self.close()
        return True  # (PING: hearing it was the point)

    def _opened(self, stream_id: int, flags: int) -> bool:
        if self._on_stream is None or stream_id in self.streams:
            self._broken(f"unexpected OPEN of stream {stream_id}")
            return False
        if self.draining:  # we are leaving: refused, the dialer looks elsewhere
            self.send(mux.frame(mux.CLOSE, stream_id))
            return True
        stream = LinkStream(self, stream_id, probe=bool(flags & mux.PROBE), answer=False)
        self.streams[stream_id] = stream
        self.opened += 1
        self._on_stream(stream)
        return True

    def _broken(self, reason: str) -> None:
        logs.event("internal link broken", level=logging.WARNING, peer=_address(self.peername),
                   reason=reason)
        if self.transport is not None:
            self.transport.abort()

    def _tick(self) -> None:
        self._ticker = None
        if self.closed:
            return
        if self._heard:
            self._heard = False
            self._silent = 0
        else:
            self._silent += 1
            if self._silent >= SILENT_TICKS:
                logs.event("internal link silent", level=logging.WARNING,
                           peer=_address(self.peername), seconds=self.timeout)
                assert self.transport is not None
                self.transport.abort()
                return
        if not self._sent:
            self.send(mux.frame(mux.PING))
        self._sent = False
        self._ticker = self.loop.call_later(self.timeout / SILENT_TICKS, self._tick)


def _address(peername: Any) -> str:
    return f"{peername[0]}:{peername[1]}" if peername else "-"


class LinkDialer:
    """This node's links to the others: one per address, opened on first use.

    ``connect(address, factory)`` opens an internal connection (TLS done) and returns
    ``(transport, protocol)``; it may raise any of the errors it likes (OSError, ssl.SSLError,
    TimeoutError, ValueError), which :meth:`open_stream` passes on."""

    def __init__(
        self, connect: Callable[[str, Callable[[], Link]],
                                Coroutine[Any, Any, tuple[asyncio.BaseTransport, Link]]],
        *, loop: asyncio.AbstractEventLoop, window: int, timeout: float,
    ) -> None:
        self._connect = connect
        self.loop = loop
        self.window = window
        self.timeout = timeout
        self._links: dict[str, Link] = {}
        self._dialing: dict[str, asyncio.Future[Link]] = {}
        self._closed = False
        self.opened = 0  # links this node opened (each one TLS handshake)
        self.streams = 0  # forwarded clients sent over them

    async def open_stream(self, address: str, factory: Callable[[], P], *,
                          probe: bool = False) -> P:
        """A new stream to the node at ``address`` speaking ``factory()``'s protocol, on the
        link to it (opened now if there is none)."""
        link = self._links.get(address)
        if link is None or not link.usable:
            link = await self._link(address)
        protocol = link.open_stream(factory, probe=probe)
        self.streams += 1
        return protocol

    def link_count(self) -> int:
        return sum(1 for link in self._links.values() if link.usable)

    async def _link(self, address: str) -> Link:
        if self._closed:
            raise ConnectionResetError("this node is leaving the cluster")
        dialing = self._dialing.get(address)
        if dialing is None:
            dialing = self.loop.create_future()
            self._dialing[address] = dialing
            try:
                _, link = await self._connect(address, lambda: Link(
                    loop=self.loop, window=self.window, timeout=self.timeout,
                    on_closed=self._link_closed))
            except BaseException as exc:
                dialing.set_exception(exc)
                dialing.exception()  # (retrieved: the callers waiting on it raise it)
                raise
            finally:
                del self._dialing[address]
            self.opened += 1
            if self._closed:
                link.close()
                raise ConnectionResetError("this node is leaving the cluster")
            self._links[address] = link
            dialing.set_result(link)
            return link
        return await asyncio.shield(dialing)

    def _link_closed(self, link: Link) -> None:
        for address, known in list(self._links.items()):
            if known is link:
                del self._links[address]

    def goaway(self) -> None:
        """Open no more streams; each link closes when its last stream has."""
        self._closed = True
        for link in list(self._links.values()):
            link.goaway()


def is_unanswered_probe(transport: asyncio.BaseTransport) -> bool:
    """Whether ``transport`` is a probe stream (acceptor side) not yet taken or refused."""
    return isinstance(transport, LinkStream) and transport._unanswered


def accept_probe(transport: asyncio.BaseTransport) -> None:
    """Take the probed client on ``transport`` (see :func:`is_unanswered_probe`)."""
    if isinstance(transport, LinkStream):
        transport.accept()
