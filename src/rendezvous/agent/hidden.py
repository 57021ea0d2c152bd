"""The hidden-server agent: keep connections parked at the relay and serve each pairing.

    agent = HiddenAgent(load_provisioning("hub.json"), handler=forward_to("127.0.0.1", 8080))
    await agent.run()  # until agent.stop()

A *link* is one TLS connection to the relay. It parks with ``CONNECT uuid:ID?response=TOTP``
(docs/protocol.md §1); the relay answers ``HTTP/1.1 200`` and keeps it in the ID's pool. When the
relay pairs a mobile client with it, it writes that client's request down the link, so the first
byte after the ``200`` turns the link into a *pairing*, which goes to ``handler`` — an
``asyncio.start_server``-style callback ``(reader, writer)``. The reader it gets is the link's
own StreamReader, untouched since the ``200`` (the agent notices data arriving without reading
it), so the request is whole, even when it came in the same read as the ``200``.
:func:`forward_to` makes a handler that relays each pairing to a local TCP service.

``pool`` slots each keep one link parked. A slot whose link is paired parks a replacement at
once, so concurrent mobile clients never queue behind a re-park; a link older than
``max_park_age`` is recycled (its replacement parks first, then it is closed), so a connection
silently dropped by a NAT box is never all that is left. TCP keepalive notices such drops too.

Failures are handled agent-wide. Until a CONNECT succeeds (at start, and after any failure) the
slots park one at a time, each attempt waiting out the back-off of the failures before it:
exponential with full jitter from ``BACKOFF_BASE`` up to ``backoff_cap`` for a network failure,
``auth_retry`` for a refusal (401, 403, 407, 409, an untrusted certificate), ``Retry-After`` for
a 429. So a relay that is down or refuses us sees one attempt per back-off, not one per slot,
and a refusal is logged once per streak. A ``200`` ends the streak and every slot parks again.

:meth:`HiddenAgent.reload` takes a new provisioning file (``rendezvous hidden`` does it on
SIGHUP, after ``users rotate``): the next CONNECTs use its secret at once, even one held back by
a refusal, and every parked link is recycled (replacement first), while pairings go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import Any, SupportsIndex

from rendezvous import logs, runtime
from rendezvous.agent.streams import (
    READ_CHUNK,
    close_writer,
    enable_keepalive,
    read_at_most,
    splice,
)
from rendezvous.config import (
    DEFAULT_AGENT_POOL,
    DEFAULT_AUTH_RETRY,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_GRACE,
    DEFAULT_MAX_PARK_AGE,
    DEFAULT_STATUS_INTERVAL,
)
from rendezvous.errors import ParkFailed, ProvisioningError
from rendezvous.protocol import responses
from rendezvous.protocol.head import HEAD_END
from rendezvous.protocol.responses import MAX_ERROR_BODY, error_text, parse_response_head
from rendezvous.protocol.totp import current_token
from rendezvous.provisioning import Provisioning
from rendezvous.registry.base import PROXY_VERSIONS
from rendezvous.tls import client_ssl_context

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""Serves one pairing: read the mobile client's bytes from the reader, answer on the writer.
The agent closes the writer when the handler returns (or raises)."""

# The defaults live beside HiddenAgentConfig, where the CLI reads them too.
DEFAULT_POOL = DEFAULT_AGENT_POOL

# TCP connect, TLS handshake and the relay's answer to our CONNECT, together.
CONNECT_TIMEOUT = 15.0
# What follows a refusal is read this long (and MAX_ERROR_BODY far) for its diagnostic.
ERROR_BODY_TIMEOUT = 2.0
# First back-off step (the delay is drawn from 0 to this, doubling with each failure).
BACKOFF_BASE = 0.5
# A link the relay closed while parked (a restart, an eviction) is replaced after a random pause
# up to this long: not all slots at once, and no tight loop against a relay that evicts.
REPARK_PAUSE = 0.5
# Slots start this far apart (randomised), so they don't move in lockstep from the start.
SLOT_STAGGER = 0.05
# Links are recycled at a random age between (1 - AGE_JITTER) * max_park_age and max_park_age.
AGE_JITTER = 0.15
# How long forward_to waits for the local service to accept before answering 502.
LOCAL_CONNECT_TIMEOUT = 10.0

# Answers to a CONNECT that retrying soon cannot change: wait auth_retry (429: Retry-After).
_REFUSALS = frozenset({401, 403, 407, 409, 429})

# Link states. A link only moves forward: PARKED, then PAIRED or CLOSED.
_PARKED = "parked"
_PAIRED = "paired"
_CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A snapshot of a :class:`HiddenAgent`: what :meth:`HiddenAgent.status` returns and the
    periodic ``status`` log line says."""

    parked: int  # links parked at the relay now
    connecting: int  # CONNECTs under way
    active: int  # pairings being served now
    served: int  # pairings finished since start
    bytes_up: int  # mobile to hidden, every pairing since start (active ones so far)
    bytes_down: int  # hidden to mobile, likewise
    failures: int  # failed CONNECTs since start
    last_error: str | None  # why the last CONNECT failed; None if none has


class _LinkReader(asyncio.StreamReader):
    """A link's StreamReader that counts the bytes that arrive and, on request, calls back once
    at the next arrival (data, EOF or error) without consuming anything."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_CHUNK, loop=loop)
        self.received = 0
        self._on_arrival: Callable[[], None] | None = None

    def call_on_arrival(self, callback: Callable[[], None] | None) -> None:
        self._on_arrival = callback

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        super().feed_data(data)
        size = len(data) if isinstance(data, Sized) else 0
        self.received += size
        if size:
            self._arrived()

    def feed_eof(self) -> None:
        super().feed_eof()
        self._arrived()

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        self._arrived()

    def _arrived(self) -> None:
        callback, self._on_arrival = self._on_arrival, None
        if callback is not None:
            callback()


class _CountingWriter(asyncio.StreamWriter):
    """A StreamWriter that counts what the handler writes (the pairing's bytes down)."""

    written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)
        super().write(data)

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in data:
            self.write(chunk)


class _Link:
    """One parked connection to the relay, until it is paired or closed."""

    __slots__ = ("agent", "consumed", "outcome", "parked_at", "reader", "slot", "state", "writer")

    def __init__(
        self, agent: HiddenAgent, slot: int, reader: _LinkReader, writer: _CountingWriter,
        consumed: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.agent = agent
        self.slot = slot
        self.reader = reader
        self.writer = writer
        self.consumed = consumed  # bytes read before the pairing: the relay's answer head
        self.state = _PARKED
        self.parked_at = loop.time()
        self.outcome: asyncio.Future[str] = loop.create_future()  # _PAIRED or _CLOSED

    @property
    def bytes_up(self) -> int:
        return self.reader.received - self.consumed

    @property
    def bytes_down(self) -> int:
        return self.writer.written

    def watch(self) -> None:
        """Settle the link at the first data, EOF or error after the ``200``."""
        reader = self.reader
        if self.bytes_up > 0 or reader.at_eof() or reader.exception() is not None:
            self._arrival()  # it came with the 200 (or the link died at once)
        else:
            reader.call_on_arrival(self._arrival)

    def _arrival(self) -> None:
        if self.state != _PARKED:
            return
        if self.bytes_up > 0:
            self.state = _PAIRED
            self.agent._begin_pairing(self)
        else:
            self.state = _CLOSED
            self.agent._links.discard(self)
            self.agent._close_in_background(self.writer)
            logs.event("unparked", id=self.agent.provisioning.uuid, slot=self.slot,
                       parked_for=f"{self.agent._loop_time() - self.parked_at:.1f}s")
        if not self.outcome.done():
            self.outcome.set_result(self.state)

    def retire(self) -> None:
        """Close the link if it is still parked (recycling, stopping)."""
        if self.state != _PARKED:
            return
        self.state = _CLOSED
        self.reader.call_on_arrival(None)
        self.agent._links.discard(self)
        self.agent._close_in_background(self.writer)
        if not self.outcome.done():
            self.outcome.set_result(_CLOSED)


@dataclass(slots=True)
class _Gate:
    """Agent-wide retry state (see the module docstring)."""

    healthy: bool = False  # the last CONNECT parked: slots connect freely
    failures: int = 0  # consecutive failed CONNECTs
    not_before: float = 0.0  # loop time before which the next attempt may not start
    reported: str | None = None  # the refusal logged in this streak
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one attempt at a time


class HiddenAgent:
    """Keeps ``pool`` connections parked at the relay of ``provisioning`` and hands each pairing
    to ``handler``. ``await run()`` until ``await stop()``.

    ``server`` overrides the relay's (host, port) from the provisioning file. ``max_park_age``
    (seconds) bounds how long one link stays parked before it is recycled. ``backoff_cap`` caps
    the back-off after network failures; ``auth_retry`` is the wait after a refusal.
    ``status_interval`` is the period of the ``status`` log line; ``grace`` the default time
    :meth:`stop` gives active pairings. ``proxy_protocol`` (1 or 2; 0 for none) overrides the
    file's ``proxyProtocol``: the PROXY header version asked for in front of each pairing; None
    follows the file, also after :meth:`reload`. Raises ProvisioningError if ``server.ca`` is
    unusable.
    """

    def __init__(
        self,
        provisioning: Provisioning,
        *,
        handler: Handler,
        pool: int = DEFAULT_POOL,
        server: tuple[str, int] | list[tuple[str, int]] | None = None,
        max_park_age: float = DEFAULT_MAX_PARK_AGE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        auth_retry: float = DEFAULT_AUTH_RETRY,
        status_interval: float = DEFAULT_STATUS_INTERVAL,
        grace: float = DEFAULT_GRACE,
        proxy_protocol: int | None = None,
    ) -> None:
        if pool < 1:
            raise ValueError(f"pool must be at least 1, not {pool}")
        for name, value in (("max_park_age", max_park_age), ("backoff_cap", backoff_cap),
                            ("auth_retry", auth_retry), ("status_interval", status_interval)):
            if not value > 0:
                raise ValueError(f"{name} must be more than 0 seconds, not {value}")
        self.provisioning = provisioning
        self.handler = handler
        self.pool = pool
        self._server_override = server is not None
        # Several relays (nodes of one cluster): a network failure moves on to the next.
        if server is None:
            self.servers = [(provisioning.host, provisioning.port)]
        elif isinstance(server, tuple):
            self.servers = [server]
        else:
            self.servers = list(server) or [(provisioning.host, provisioning.port)]
        self._server_index = 0
        self.max_park_age = max_park_age
        self.backoff_cap = backoff_cap
        self.auth_retry = auth_retry
        self.status_interval = status_interval
        self.grace = grace
        if proxy_protocol not in (None, *PROXY_VERSIONS):
            raise ValueError(f"proxy_protocol must be 0, 1 or 2, not {proxy_protocol}")
        self._proxy_override = proxy_protocol
        try:
            self._ssl = client_ssl_context(provisioning.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ProvisioningError(f"server.ca is not a usable certificate: {exc}") from None
        self._gate = _Gate()
        self._links: set[_Link] = set()  # parked now
        self._pairings: dict[asyncio.Task[None], _Link] = {}  # active now
        self._background: list[asyncio.Task[None]] = []  # slots and the status reporter
        self._closers: set[asyncio.Task[None]] = set()  # links being closed
        self._connecting = 0
        self._served = 0
        self._bytes_up = 0  # of finished pairings
        self._bytes_down = 0
        self._failures = 0
        self._last_error: str | None = None
        self._started = False
        self._stopping = False
        self._hurry = asyncio.Event()  # a second stop(): cut pairings now
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()  # reload(): end the gate's wait now
        # Resolved by reload(), then replaced: the slots recycle their parked links.
        self._renewal: asyncio.Future[None] | None = None

    @property
    def proxy_protocol(self) -> int:
        """The PROXY header version (1, 2) the relay is asked to start each pairing with,
        naming the visitor (forward_to passes it on to the local service like every other
        byte); 0 for none. The option given to the agent, else the provisioning file's."""
        if self._proxy_override is not None:
            return self._proxy_override
        return self.provisioning.proxy_protocol

    @property
    def host(self) -> str:
        """The relay's host this agent parks at now."""
        return self.servers[self._server_index][0]

    @property
    def port(self) -> int:
        """The relay's port this agent parks at now."""
        return self.servers[self._server_index][1]

    @property
    def tls_name(self) -> str:
        """The name the relay's certificate is checked against. A file with no ``server.ca``
        trusts public CAs, whose certificate is for the relay's name in the file, not for the
        address ``--server`` reaches it at (a node's IP, a balancer); a pinned certificate is
        checked against the address dialled, as always."""
        if self.provisioning.ca_pem is None:
            return self.provisioning.host
        return self.host

    @property
    def relay(self) -> str:
        """The relay's address as ``host:port``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def status(self) -> AgentStatus:
        """The agent's numbers now."""
        active = self._pairings.values()
        return AgentStatus(
            parked=len(self._links),
            connecting=self._connecting,
            active=len(active),
            served=self._served,
            bytes_up=self._bytes_up + sum(link.bytes_up for link in active),
            bytes_down=self._bytes_down + sum(link.bytes_down for link in active),
            failures=self._failures,
            last_error=self._last_error,
        )

    async def run(self) -> None:
        """Park and serve until :meth:`stop` has finished (or this task is cancelled, which
        stops the agent at once)."""
        if self._started:
            raise RuntimeError("HiddenAgent.run() may be called only once")
        self._started = True
        loop = asyncio.get_running_loop()
        self._renewal = loop.create_future()
        logs.event("agent started", id=self.provisioning.uuid, relay=self.relay, pool=self.pool,
                   proxy=self.proxy_protocol or "none")
        if not self._stopping:
            self._background = [loop.create_task(self._slot(i)) for i in range(self.pool)]
            self._background.append(loop.create_task(self._report_status()))
        try:
            await self._stopped.wait()
        finally:
            if not self._stopped.is_set():  # cancelled
                await self.stop(0)

    async def stop(self, grace: float | None = None) -> None:
        """Stop parking, close parked links, give active pairings ``grace`` seconds (default:
        the agent's) to finish, then cancel them. A second call while the first is still
        waiting cuts the pairings at once."""
        if self._stopping:
            self._hurry.set()
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.grace if grace is None else grace
        logs.event("stopping", id=self.provisioning.uuid, active=len(self._pairings),
                   grace=f"{grace:g}s")
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for link in list(self._links):
            link.retire()
        await self._finish_pairings(grace)
        # Closed links finish their TLS close (bounded), so none is left for the loop's end.
        await asyncio.gather(*self._closers, return_exceptions=True)
        self._log_status("stopped")
        self._stopped.set()

    def reload(self, provisioning: Provisioning) -> None:
        """Use ``provisioning`` (the same ID, e.g. a rotated secret) from now on: CONNECTs park
        with it at once, even one held back after a refusal, and every parked link is
        recycled (its replacement parks first); active pairings are not touched. The relay's
        address follows the file unless ``server`` was given. Raises ProvisioningError (and
        changes nothing) for another ID or an unusable ``server.ca``."""
        if provisioning.uuid != self.provisioning.uuid:
            raise ProvisioningError(f"the file is for ID {provisioning.uuid!r}, not "
                                    f"{self.provisioning.uuid!r}: start another agent for it")
        try:
            context = client_ssl_context(provisioning.ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ProvisioningError(f"server.ca is not a usable certificate: {exc}") from None
        self.provisioning, self._ssl = provisioning, context
        if not self._server_override:
            self.servers, self._server_index = [(provisioning.host, provisioning.port)], 0
        gate = self._gate
        gate.not_before, gate.reported = 0.0, None
        self._wake.set()
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            self._renewal = asyncio.get_running_loop().create_future()
            renewal.set_result(None)
        logs.event("reloaded provisioning", id=provisioning.uuid, relay=self.relay,
                   proxy=self.proxy_protocol or "none", recycling=len(self._links))

    # Slots -----------------------------------------------------------------------------------

    async def _slot(self, slot: int) -> None:
        """Keep one link parked, for as long as the agent runs."""
        await asyncio.sleep(slot * SLOT_STAGGER * random.uniform(0.5, 1.5))
        retiring: _Link | None = None
        try:
            while True:
                # The reload this link's CONNECT comes before, taken before it is sent: a
                # reload while it parks recycles it too (it asked with the old file).
                renewal = self._renewal
                assert renewal is not None
                link = await self._connect(slot)
                if link is None:
                    continue  # failed: the gate holds the next attempt back
                if retiring is not None:
                    retiring.retire()  # its replacement is parked: now it may go
                    retiring = None
                age = self.max_park_age * random.uniform(1 - AGE_JITTER, 1)
                ends: set[asyncio.Future[Any]] = {link.outcome, renewal}
                await asyncio.wait(ends, timeout=age, return_when=asyncio.FIRST_COMPLETED)
                if not link.outcome.done():
                    logs.event("recycling", id=self.provisioning.uuid, slot=slot,
                               parked_for=f"{self._loop_time() - link.parked_at:.0f}s",
                               reason="reloaded" if renewal.done() else "age")
                    retiring = link
                elif link.outcome.result() == _CLOSED:
                    await asyncio.sleep(random.uniform(0, REPARK_PAUSE))
                # _PAIRED: park the replacement at once
        finally:
            if retiring is not None:
                retiring.retire()

    async def _connect(self, slot: int) -> _Link | None:
        """Park one link, through the gate: freely while healthy, else one at a time after
        the back-off. None when the attempt failed."""
        gate = self._gate
        if not gate.healthy:
            async with gate.lock:
                wait = gate.not_before - self._loop_time()
                if wait > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                if not gate.healthy:
                    return await self._attempt(slot)
        return await self._attempt(slot)

    async def _attempt(self, slot: int) -> _Link | None:
        self._connecting += 1
        try:
            link = await self._park(slot)
        except ParkFailed as failure:
            self._failed(failure)
            return None
        finally:
            self._connecting -= 1
        gate = self._gate
        gate.healthy, gate.failures, gate.not_before, gate.reported = True, 0, 0.0, None
        return link

    def _failed(self, failure: ParkFailed) -> None:
        gate = self._gate
        gate.healthy = False
        gate.failures += 1
        self._failures += 1
        self._last_error = failure.reason
        if failure.refused:
            delay = failure.retry_after
            if delay is None:
                delay = self.auth_retry * random.uniform(0.9, 1.1)
            # Once per streak: a relay that keeps refusing does not fill the log.
            level = logging.WARNING if failure.reason != gate.reported else logging.DEBUG
            gate.reported = failure.reason
            logs.event("park refused", level=level, id=self.provisioning.uuid,
                       reason=failure.reason, retry_in=f"{delay:.1f}s")
        else:
            ceiling = min(self.backoff_cap, BACKOFF_BASE * 2.0 ** min(gate.failures - 1, 32))
            delay = random.uniform(0, ceiling)  # full jitter
            logs.event("park failed", level=logging.WARNING, id=self.provisioning.uuid,
                       reason=failure.reason, retry_in=f"{delay:.1f}s")
            if len(self.servers) > 1:
                self._server_index = (self._server_index + 1) % len(self.servers)
                logs.event("switching relay", id=self.provisioning.uuid, relay=self.relay)
        gate.not_before = max(gate.not_before, self._loop_time() + delay)

    async def _park(self, slot: int) -> _Link:
        """Open a link, send the CONNECT and read the answer; the parked link, or ParkFailed."""
        loop = asyncio.get_running_loop()
        prov = self.provisioning
        reader = _LinkReader(loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        writer: _CountingWriter | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                # TCP first, then TLS over it: cancelling create_connection(ssl=...) mid-way
                # can leak its socket in Python 3.11's asyncio; a cancelled start_tls closes it.
                transport, _ = await loop.create_connection(lambda: protocol, self.host, self.port)
                writer = _CountingWriter(transport, protocol, reader, loop)
                await writer.start_tls(self._ssl, server_hostname=self.tls_name,
                                       ssl_handshake_timeout=CONNECT_TIMEOUT)
                token = current_token(prov.base32, prov.step, prov.digits)
                extra = f"&proxy={self.proxy_protocol}" if self.proxy_protocol else ""
                writer.transport.write(f"CONNECT uuid:{prov.uuid}?response={token}{extra} "
                                       "HTTP/1.1\r\n\r\n".encode("latin-1"))
                # Exactly the answer head: whatever follows it is the pairing's.
                head = await reader.readuntil(HEAD_END)
                answer = parse_response_head(head)
                if answer is None:
                    first = head.partition(b"\r\n")[0].decode("latin-1")
                    raise ParkFailed(f"relay answered something that is not HTTP: {first[:80]!r}")
                if answer.status != 200:
                    body = await read_at_most(reader, MAX_ERROR_BODY, ERROR_BODY_TIMEOUT)
                    raise _refusal(answer.status, error_text(body), answer.retry_after)
        except BaseException as exc:
            if writer is not None:
                writer.transport.abort()
            if isinstance(exc, Exception):
                raise _park_failure(exc, self.relay) from exc
            raise  # cancelled
        enable_keepalive(writer.transport)
        link = _Link(self, slot, reader, writer, consumed=len(head))
        self._links.add(link)
        logs.event("parked", id=prov.uuid, slot=slot, parked=len(self._links))
        link.watch()
        return link

    def _close_in_background(self, writer: asyncio.StreamWriter) -> None:
        """Close a link that is no longer parked, without waiting here (see stop())."""
        task = asyncio.get_running_loop().create_task(close_writer(writer))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # Pairings --------------------------------------------------------------------------------

    def _begin_pairing(self, link: _Link) -> None:
        """A parked link received its first bytes: serve it (called from the reader)."""
        self._links.discard(link)
        task = asyncio.get_running_loop().create_task(self._serve(link))
        self._pairings[task] = link
        task.add_done_callback(self._pairing_done)

    def _pairing_done(self, task: asyncio.Task[None]) -> None:
        link = self._pairings.pop(task)
        self._served += 1
        self._bytes_up += link.bytes_up
        self._bytes_down += link.bytes_down

    async def _serve(self, link: _Link) -> None:
        uuid = self.provisioning.uuid
        started = self._loop_time()
        logs.event("paired", id=uuid, slot=link.slot,
                   parked_for=f"{started - link.parked_at:.3f}s")
        try:
            await self.handler(link.reader, link.writer)
        except asyncio.CancelledError:
            link.writer.transport.abort()
            logs.event("pairing cut", id=uuid, bytes_up=link.bytes_up,
                       bytes_down=link.bytes_down,
                       duration=f"{self._loop_time() - started:.3f}s")
            raise
        except Exception as exc:
            logs.event("pairing failed", level=logging.WARNING, id=uuid,
                       error=f"{type(exc).__name__}: {exc}")
        await close_writer(link.writer)
        logs.event("pairing closed", id=uuid, bytes_up=link.bytes_up,
                   bytes_down=link.bytes_down, duration=f"{self._loop_time() - started:.3f}s")

    async def _finish_pairings(self, grace: float) -> None:
        """Wait up to ``grace`` seconds (less after a second stop) for the active pairings,
        then cancel the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        hurry = loop.create_task(self._hurry.wait())
        try:
            while self._pairings and not self._hurry.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait([*self._pairings, hurry], timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
        left = list(self._pairings)
        if left:
            logs.event("cutting pairings", id=self.provisioning.uuid, count=len(left))
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

    # Status ----------------------------------------------------------------------------------

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            self._log_status("status")

    def _log_status(self, name: str) -> None:
        now = self.status()
        logs.event(name, id=self.provisioning.uuid, parked=now.parked, active=now.active,
                   served=now.served, bytes_up=now.bytes_up, bytes_down=now.bytes_down,
                   last_error=now.last_error or "-")

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()


# Answers and failures --------------------------------------------------------------------------


def _refusal(status: int, diagnostic: str, retry_after: float | None) -> ParkFailed:
    what = f"{status} {diagnostic}".strip()
    if status == 401:
        return ParkFailed(
            f"relay refused our credentials ({what}): wrong secret, entry removed, or clock "
            "off by more than one step", refused=True)
    if status == 429:
        return ParkFailed(f"relay is limiting our attempts ({what})", refused=True,
                          retry_after=retry_after)
    if status in _REFUSALS:
        return ParkFailed(f"relay refused our CONNECT ({what})", refused=True)
    return ParkFailed(f"relay answered {what}")  # 5xx and the like: retry with back-off


def _park_failure(exc: Exception, relay: str) -> ParkFailed:
    """``exc``, raised while parking, as a ParkFailed with a reason for people."""
    if isinstance(exc, ParkFailed):
        return exc
    if isinstance(exc, TimeoutError):
        return ParkFailed(f"relay {relay} did not answer within {CONNECT_TIMEOUT:g} s")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # Retrying soon will not make the certificate trusted: wait like for a refusal.
        return ParkFailed(f"relay {relay}'s certificate is not the one in the provisioning "
                           f"file ({exc.verify_message})", refused=True)
    if isinstance(exc, ssl.SSLError):
        return ParkFailed(f"TLS with relay {relay} failed: {exc.reason or exc}")
    if isinstance(exc, asyncio.IncompleteReadError):
        return ParkFailed(f"relay {relay} closed the connection without answering")
    if isinstance(exc, asyncio.LimitOverrunError):
        return ParkFailed(f"relay {relay} answered with an over-long head")
    if isinstance(exc, OSError):
        return ParkFailed(f"cannot reach relay {relay}: {exc.strerror or exc}")
    return ParkFailed(f"{type(exc).__name__}: {exc}")


# Forwarding to a local service -----------------------------------------------------------------


def forward_to(host: str, port: int) -> Handler:
    """A handler that relays each pairing to the TCP service at ``host``:``port``.

    Bytes flow both ways with back-pressure, ``READ_CHUNK`` at a time. When the mobile side
    ends its stream the local connection is half-closed (``write_eof``) and the local service's
    answer still flows back; when the local service ends its stream the relay side is flushed
    and closed (a TLS connection cannot half-close in asyncio). If the local service refuses
    the connection, the mobile client gets a complete ``502 Bad Gateway`` response.
    """
    service = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(LOCAL_CONNECT_TIMEOUT):
                local_reader, local_writer = await asyncio.open_connection(
                    host, port, limit=READ_CHUNK)
        except OSError as exc:
            reason = (f"no answer within {LOCAL_CONNECT_TIMEOUT:g} s"
                      if isinstance(exc, TimeoutError) else exc.strerror or str(exc))
            logs.event("local service unreachable", level=logging.WARNING, service=service,
                       reason=reason)
            writer.write(responses.full_error(
                502, f"local service unreachable: {service}: {reason}", close=True))
            with contextlib.suppress(OSError):
                await writer.drain()
            return
        try:
            await splice(reader, writer, local_reader, local_writer)
        except BaseException:  # cancelled (a stop's grace ran out), or a bug
            local_writer.transport.abort()
            raise
        await close_writer(local_writer)

    return forward


# Running under a signal handler ----------------------------------------------------------------


async def serve_until_signalled(
    agent: HiddenAgent, reload: Callable[[], Provisioning] | None = None
) -> None:
    """Run ``agent`` until SIGINT or SIGTERM, then stop it gracefully (a second signal cuts
    active pairings at once). On SIGHUP, ``reload()`` reads the provisioning file again for
    :meth:`HiddenAgent.reload`; a file that fails is logged and the old one kept."""
    loop = asyncio.get_running_loop()
    stoppers: set[asyncio.Task[None]] = set()

    def on_stop() -> None:
        task = loop.create_task(agent.stop())
        stoppers.add(task)
        task.add_done_callback(stoppers.discard)

    def on_reload() -> None:
        assert reload is not None
        try:
            agent.reload(reload())
        except ProvisioningError as exc:
            logs.event("reload failed, keeping the old provisioning", level=logging.ERROR,
                       id=agent.provisioning.uuid, error=str(exc))

    with runtime.signals(on_stop, on_reload=on_reload if reload is not None else None):
        await agent.run()
