"""The plain-HTTP listener of ``serve --acme-http PORT``: HTTP-01 answers and redirects to HTTPS.

One request per connection, answered from protocol/plainhttp.py and closed: the CA's
validation fetch gets its key authorization (from the same :class:`Challenges` the TLS side
uses), everyone else a 308 to ``https://``. Port 80 is scanned all day, so each connection is
bounded: a head size, a deadline from accept to the whole head, and a cap on open connections
(past it a socket is closed at once). No aiohttp here: one head and one canned answer need
nothing beyond the relay's own head reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

from rendezvous import logs
from rendezvous.config import AcmeHttpConfig
from rendezvous.errors import HeadError
from rendezvous.protocol import plainhttp, responses
from rendezvous.protocol.head import NEED_MORE, HeadReader, HeadTooLarge
from rendezvous.server.certificates import Challenges

LISTEN_BACKLOG = 256


class PlainHTTPListener:
    """``await start()``, then ``await close()``; :attr:`answered` counts HTTP-01 answers."""

    def __init__(self, config: AcmeHttpConfig, site: plainhttp.Site,
                 challenges: Challenges) -> None:
        self.config = config
        self.site = site
        self.challenges = challenges
        self.open = 0
        self.answered = 0  # HTTP-01 validation requests answered with a key authorization
        self.redirected = 0
        self.repeats: logs.RepeatedEvents | None = None
        self._server: asyncio.Server | None = None
        self.connections: set[_PlainHTTP] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.repeats = logs.RepeatedEvents(schedule=loop.call_later)
        self._server = await loop.create_server(
            lambda: _PlainHTTP(self), host=self.config.host or None, port=self.config.port,
            backlog=LISTEN_BACKLOG, reuse_address=True)
        addresses = ",".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}"
                             for s in self._server.sockets)
        logs.event("listening for plain HTTP (ACME HTTP-01, redirects to https)",
                   addresses=addresses)

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for connection in list(self.connections):
            connection.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        if self.repeats is not None:
            self.repeats.flush(everything=True)


class _PlainHTTP(asyncio.Protocol):
    """One plain-HTTP connection: read one head (within the limits), answer, close."""

    def __init__(self, listener: PlainHTTPListener) -> None:
        self.listener = listener
        config = listener.config
        self.reader = HeadReader(config.max_head_size)
        self.transport = cast(asyncio.Transport, None)
        self.timer: asyncio.TimerHandle | None = None
        self.peer = "-"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        listener = self.listener
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else "-"
        listener.open += 1
        listener.connections.add(self)
        if listener.open > listener.config.max_connections:
            self._refuse("too many connections", 503, responses.status_only(503))
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(listener.config.timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        try:
            head = self.reader.feed(data)
        except HeadError as exc:
            answer = (responses.status_only(exc.status) if isinstance(exc, HeadTooLarge)
                      else responses.full_error(exc.status, exc.reason, True, True))
            self._refuse(exc.reason, exc.status, answer)
            return
        if head is NEED_MORE:
            return
        listener = self.listener
        result = plainhttp.answer(head, listener.site, listener.challenges.http_answer)
        if result.what == "challenge":
            listener.answered += 1
            logs.event("acme http-01 answered", peer=self.peer, path=head.target)
        elif result.what == "redirect":
            listener.redirected += 1
        else:
            self._note(result.what, result.status)
        self.transport.write(result.data)
        self._close()

    def _timed_out(self) -> None:
        self.timer = None
        answer = responses.status_only(408) if self.reader.trailing else b""
        self._refuse("head timeout", 408, answer)

    def _refuse(self, reason: str, status: int, answer: bytes) -> None:
        self._note(reason, status)
        if answer:
            self.transport.write(answer)
        self._close()

    def _note(self, reason: str, status: int) -> None:
        repeats = self.listener.repeats
        if repeats is not None:  # scanners come in floods: the first logged, then counts
            repeats.event((reason, status, self.peer), "plain http refused", level=logging.INFO,
                          reason=reason, status=status, peer=self.peer)

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.close()  # (after what was written has gone)

    def eof_received(self) -> bool | None:
        return None  # a client done sending before its head is complete gets a close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        listener = self.listener
        if self in listener.connections:
            listener.connections.discard(self)
            listener.open -= 1
