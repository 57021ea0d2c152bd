"""The mobile client: reach a hidden server through the relay from any HTTP client.

Two ways in, both naming the hidden server by its ID the way a stock client does
(``docs/protocol.md`` §2):

* :func:`open_tunnel` — a local TCP listener, like ``ssh -L``. Every connection a local client
  (a browser, curl, any HTTP library, no credentials needed) opens becomes one pairing at the
  relay: the tunnel follows the client's requests (protocol/framing.py), puts the
  ``Authorization`` that names the hidden server in each one's head, and passes every other
  byte on as it is; after an ``Upgrade`` request, bytes go on raw. Later requests on that
  connection go to the same hidden server, as the relay routes each by its ``Authorization``.
* :func:`client` and :func:`async_client` — an httpx client whose base URL is the relay and
  whose Digest credentials name the hidden server.

The local client's own ``Authorization`` header is always dropped: the relay would strip it
anyway (it names the hidden server, never reaches it), and only one header can name the ID.
Credentials meant for the hidden server itself must travel in another header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, Literal

import httpx

from rendezvous import logs, runtime
from rendezvous.agent.streams import (
    CLOSE_TIMEOUT,
    READ_CHUNK,
    close_writer,
    pump,
    read_at_most,
    read_head,
)
from rendezvous.config import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_HEAD_SIZE,
    DEFAULT_MAX_HEADERS,
    DEFAULT_VISITOR_PASSWORD,
)
from rendezvous.errors import RelayRefused
from rendezvous.errors import RelayUnreachable as RelayUnreachable  # raised by Tunnel.connect
from rendezvous.protocol import responses
from rendezvous.protocol.digest import basic_authorization
from rendezvous.protocol.digest import digest_authorization as digest_authorization
from rendezvous.protocol.framing import RequestFramer
from rendezvous.protocol.head import (
    HEAD_END,
    NEED_MORE,
    HeadError,
    HeadReader,
    HeadTooLarge,
    RequestHead,
)
from rendezvous.protocol.ids import valid_id
from rendezvous.protocol.responses import MAX_ERROR_BODY as MAX_ERROR_BODY  # for the CLI
from rendezvous.protocol.responses import (
    MAX_RESPONSE_HEAD,
    ResponseHead,
    may_be_relay_error,
    parse_response_head,
)
from rendezvous.protocol.responses import relay_diagnostic as relay_diagnostic  # for the CLI
from rendezvous.tls import client_ssl_context

Auth = Literal["basic", "digest"]
AUTH_SCHEMES: tuple[Auth, ...] = ("basic", "digest")

# The password that goes with the ID (the relay reads only the user name unless the hidden
# server checks its visitors), and where `rendezvous open` listens: defined in config.py.
PASSWORD = DEFAULT_VISITOR_PASSWORD

# TCP connect plus TLS handshake to the relay; beyond it the local client gets 502.
CONNECT_TIMEOUT = 10.0
# Time the local client gets to send its first request head. Browsers open spare connections
# that never send one; they must not hold a task (or a relay connection) for long.
LOCAL_HEAD_TIMEOUT = 15.0
# Time the relay gets to answer the Digest probe with its challenge.
CHALLENGE_TIMEOUT = 10.0
# The local client's first head, as the relay would bound it.
MAX_HEAD_SIZE = DEFAULT_MAX_HEAD_SIZE
MAX_HEADERS = DEFAULT_MAX_HEADERS
# A local client that sent EOF and hears nothing from the hidden server for this long is taken
# to be gone. Its EOF cannot be passed on (asyncio cannot half-close the TLS leg, and closing it
# would lose the answer to a client that only half-closed), and from here a full close looks the
# same as a half-close: without this bound, every closed keep-alive connection would hold a
# pairing, and a hidden server's connection, until the hidden server timed it out.
HALF_CLOSED_IDLE = 30.0


# ---------------------------------------------------------------------------- httpx helpers


def base_url(server: tuple[str, int]) -> str:
    """``https://host:port`` of the relay at ``server`` (IPv6 hosts in brackets)."""
    host, port = server
    return f"https://{_url_host(host)}:{port}"


def client(
    uuid: str, server: tuple[str, int], *, ca_pem: str | None = None, password: str = PASSWORD,
    **httpx_kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client`` that reaches hidden server ``uuid`` through the relay at ``server``.

    Its base URL is the relay (``client.get("/status")``), its credentials Digest with the ID as
    user name and ``password`` (the visitor password of a hidden server that checks visitors),
    and it trusts ``ca_pem`` (the relay's self-signed certificate or CA, as in a provisioning
    file; None: the system's trust store). ``httpx_kwargs`` go to ``httpx.Client`` and override
    these settings.
    """
    return httpx.Client(**_httpx_settings(uuid, server, ca_pem, password, httpx_kwargs))


def async_client(
    uuid: str, server: tuple[str, int], *, ca_pem: str | None = None, password: str = PASSWORD,
    **httpx_kwargs: Any,
) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` counterpart of :func:`client`."""
    return httpx.AsyncClient(**_httpx_settings(uuid, server, ca_pem, password, httpx_kwargs))


def _httpx_settings(
    uuid: str, server: tuple[str, int], ca_pem: str | None, password: str,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    return {
        "base_url": base_url(server),
        "auth": httpx.DigestAuth(uuid, password),
        "verify": client_ssl_context(ca_pem),
        **overrides,
    }


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def with_authorization(head: RequestHead, authorization: str) -> bytes:
    """The head as the relay must see it: the local client's ``Authorization`` dropped, ours
    added last."""
    forwarded = head.forwarded()  # ends in the blank line; already without Authorization
    return forwarded[:-2] + b"Authorization: " + authorization.encode("latin-1") + HEAD_END


# ---------------------------------------------------------------------------- the tunnel


class Tunnel:
    """A local listener whose every connection reaches hidden server ``uuid`` through the relay.

    ``await start()`` binds ``listen`` (port 0 picks a free one, see :attr:`port`);
    ``await close()`` stops listening and cuts open tunnels. Also an async context manager.
    """

    def __init__(
        self,
        uuid: str,
        server: tuple[str, int],
        *,
        ca_pem: str | None = None,
        listen: tuple[str, int] = DEFAULT_LISTEN,
        auth: Auth = "basic",
        connect_timeout: float = CONNECT_TIMEOUT,
        password: str = PASSWORD,
    ) -> None:
        if auth not in AUTH_SCHEMES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_SCHEMES)}, not {auth!r}")
        if not valid_id(uuid):
            raise ValueError(f"invalid ID {uuid!r}: no spaces or control characters")
        if auth == "basic" and ":" in uuid:
            raise ValueError(f"ID {uuid!r} holds ':', which Basic credentials cannot carry")
        self.uuid = uuid
        self.server = server
        self.listen = listen
        self.auth: Auth = auth
        self.connect_timeout = connect_timeout
        # The visitor password, for a hidden server whose visitors the relay checks.
        self.password = password
        self.ssl_context = client_ssl_context(ca_pem)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The local port bound."""
        assert self._server is not None, "tunnel not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port/`` of the local listener."""
        return f"http://{_url_host(self.listen[0])}:{self.port}/"

    @property
    def relay(self) -> str:
        """``host:port`` of the relay."""
        host, port = self.server
        return f"{_url_host(host)}:{port}"

    async def start(self) -> None:
        """Bind the local listener; raises OSError when the address is taken or unusable."""
        host, port = self.listen
        self._server = await asyncio.start_server(
            self._accepted, host=host, port=port, limit=READ_CHUNK, reuse_address=True
        )
        logs.event("listening", address=f"{_url_host(host)}:{self.port}", id=self.uuid,
                   relay=self.relay, auth=self.auth)

    async def close(self) -> None:
        """Stop listening and cut every open tunnel."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)

    async def __aenter__(self) -> Tunnel:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _Pairing(self, reader, writer).run()
        except asyncio.CancelledError:
            # close() cut this connection. Ending the task quietly keeps asyncio (3.11) from
            # reporting the cancellation of a connection callback as an error.
            pass
        except Exception:  # one local connection's surprise must not reach the listener
            logs.log.exception("tunnel failed")
        finally:
            self._tasks.discard(task)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection to the relay; raises RelayUnreachable saying why not."""
        host, port = self.server
        where = self.relay
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.open_connection(
                    host, port, ssl=self.ssl_context, server_hostname=host,
                    ssl_handshake_timeout=self.connect_timeout, limit=READ_CHUNK,
                )
        except TimeoutError:
            raise RelayUnreachable(
                f"relay {where} did not answer within {self.connect_timeout:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise RelayUnreachable(
                f"relay {where} failed TLS verification: {exc.verify_message or exc.reason} "
                "(is --ca the relay's certificate?)") from None
        except ssl.SSLError as exc:
            raise RelayUnreachable(
                f"TLS handshake with relay {where} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise RelayUnreachable(f"cannot reach relay {where}: {_os_error_text(exc)}"
                                   ) from None


class _Pairing:
    """One local connection: its first head, the relay connection, then bytes both ways."""

    def __init__(
        self, tunnel: Tunnel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.tunnel = tunnel
        self.local_reader = reader
        self.local_writer = writer
        self.relay_reader: asyncio.StreamReader | None = None
        self.relay_writer: asyncio.StreamWriter | None = None
        peer = writer.get_extra_info("peername")
        self.peer = f"{_url_host(str(peer[0]))}:{peer[1]}" if peer else "-"
        self.up = 0  # bytes from the local client to the relay
        self.down = 0  # bytes from the relay to the local client
        self.authorization = ""  # what names the hidden server, in every request's head
        self.framer = RequestFramer(MAX_HEAD_SIZE, MAX_HEADERS)  # the local client's requests
        self.raw = False  # after an Upgrade request: bytes go on unparsed

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            first = await self._read_first_head()
            if first is None:
                return
            head, rest = first
            opened = loop.time()
            try:
                await self._open(head, rest)
            except RelayUnreachable as exc:
                logs.event("relay error", level=logging.WARNING, status=502, id=self.tunnel.uuid,
                           peer=self.peer, reason=str(exc))
                await self._answer(responses.full_error(502, str(exc), close=True))
                return
            except RelayRefused as exc:
                logs.event("relay error", level=logging.WARNING, status=exc.status or "-",
                           id=self.tunnel.uuid, peer=self.peer, reason=exc.reason)
                await self._answer(exc.data)
                return
            logs.event("tunnel opened", id=self.tunnel.uuid, peer=self.peer,
                       method=head.method, target=head.target)
            try:
                await self._relay()
            finally:
                logs.event("tunnel closed", id=self.tunnel.uuid, peer=self.peer,
                           bytes_up=self.up, bytes_down=self.down,
                           duration=f"{loop.time() - opened:.3f}s")
        finally:
            await self._close_all()

    # The first request ---------------------------------------------------------------------

    async def _read_first_head(self) -> tuple[RequestHead, bytes] | None:
        """The local client's first head and the bytes read past it; None after answering
        (or dropping) a client that sent no usable head."""
        reader = HeadReader(MAX_HEAD_SIZE, MAX_HEADERS)
        try:
            async with asyncio.timeout(LOCAL_HEAD_TIMEOUT):
                while (head := reader.next_head()) is NEED_MORE:
                    data = await self.local_reader.read(READ_CHUNK)
                    if not data:
                        return None  # a spare connection, closed unused
                    reader.receive(data)
        except TimeoutError:
            if reader.trailing:
                await self._local_error(408, "request head timeout", responses.status_only(408))
            return None
        except (ConnectionError, OSError):
            return None
        except HeadError as exc:
            answer = (responses.status_only(exc.status) if isinstance(exc, HeadTooLarge) else
                      responses.full_error(exc.status, exc.reason, permanent=True, close=True))
            await self._local_error(exc.status, exc.reason, answer)
            return None
        rest = bytes(reader.take_trailing())
        if head.method == "CONNECT":
            reason = "CONNECT cannot go through a tunnel: it already leads to one hidden server"
            await self._local_error(
                405, reason, responses.full_error(405, reason, permanent=True, close=True))
            return None
        self.up += reader.head_size
        return head, rest

    async def _local_error(self, status: int, reason: str, answer: bytes) -> None:
        logs.event("rejected", level=logging.WARNING, status=status, peer=self.peer,
                   reason=reason)
        await self._answer(answer)

    async def _answer(self, data: bytes) -> None:
        """Write ``data`` to the local client (it is closed after)."""
        with contextlib.suppress(ConnectionError, OSError):
            self.local_writer.write(data)
            await self.local_writer.drain()

    async def _open(self, head: RequestHead, rest: bytes) -> None:
        """Connect to the relay and send it the first request with our credentials."""
        tunnel = self.tunnel
        self.relay_reader, self.relay_writer = await tunnel.connect()
        if tunnel.auth == "basic":
            authorization = basic_authorization(tunnel.uuid, tunnel.password)
        else:
            authorization = await self._answer_challenge(head)
        self.authorization = authorization
        self.relay_writer.write(with_authorization(head, authorization))
        self.framer.begin(head)
        self.raw = head.is_upgrade
        self._send_up(rest)
        await self._drain_relay()

    def _send_up(self, data: bytes) -> None:
        """Pass the local client's bytes on: each later request head with our
        ``Authorization`` (the relay routes every request by its own, and the pairing's
        check was made at its start), everything else as it is."""
        assert self.relay_writer is not None
        self.up += len(data)
        if self.raw:
            self.relay_writer.write(data)
            return
        framer = self.framer
        framer.feed(data)
        while True:
            try:
                event = framer.next_event()
            except HeadError:
                # Not a head we can follow: the relay refuses it (400) and closes; pass it on.
                self.raw = True
                self.relay_writer.write(bytes(framer.detach()))
                return
            if event is None:
                return
            if isinstance(event, bytes):
                self.relay_writer.write(event)
                continue
            self.relay_writer.write(with_authorization(event, self.authorization))
            if event.is_upgrade:
                # Whatever the answer, the tunnel leads to one hidden server: raw from here.
                self.raw = True
                self.relay_writer.write(bytes(framer.detach()))
                return

    async def _answer_challenge(self, head: RequestHead) -> str:
        """Send a bodiless probe, read the relay's 401 Digest challenge and answer it.

        The relay keeps the connection for the retry, as it does for curl; if it closes it
        instead (node-rendezvous on some requests), a new one is opened.
        """
        reader, writer = self.relay_reader, self.relay_writer
        assert reader is not None and writer is not None
        uri = head.target if head.target.startswith("/") else "/"
        host = self.tunnel.relay
        writer.write(f"GET {uri} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode())
        await self._drain_relay()
        try:
            async with asyncio.timeout(CHALLENGE_TIMEOUT):
                data, end, _ = await read_head(reader, MAX_RESPONSE_HEAD)
                answer = parse_response_head(data[:end]) if end > 0 else None
                if answer is None:
                    raise RelayRefused(data, None, "the relay did not answer with HTTP")
                if answer.status != 401:
                    data += await _read_rest(reader, answer, data[end:])
                    reason = relay_diagnostic(answer.status, data[end:]) or answer.reason
                    raise RelayRefused(data, answer.status, reason)
                challenge = answer.header("www-authenticate") or ""
                authorization = digest_authorization(
                    challenge, self.tunnel.uuid, self.tunnel.password, head.method, head.target)
                if authorization is None:  # no Digest challenge: Basic names the ID as well
                    authorization = basic_authorization(self.tunnel.uuid, self.tunnel.password)
                reusable = await _skip_body(reader, answer, data[end:])
        except TimeoutError:
            raise RelayUnreachable(
                f"relay {host} did not answer within {CHALLENGE_TIMEOUT:g} s") from None
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            raise RelayUnreachable(f"relay {host} closed the connection: {exc}") from None
        if not reusable:
            await close_writer(writer)
            self.relay_reader, self.relay_writer = await self.tunnel.connect()
        return authorization

    async def _drain_relay(self) -> None:
        assert self.relay_writer is not None
        try:
            await self.relay_writer.drain()
        except (ConnectionError, OSError) as exc:
            raise RelayUnreachable(f"relay {self.tunnel.relay} closed the connection: {exc}"
                                   ) from None

    # Relaying ------------------------------------------------------------------------------

    async def _relay(self) -> None:
        """Copy bytes both ways until the relay side ends (or the local side fails)."""
        up = asyncio.create_task(self._pump_up())
        down = asyncio.create_task(self._pump_down())
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up.done() and not down.done() and up.result():
                # The local client sent EOF: stop reading it, keep the answer coming, but do
                # not wait forever for a peer that may have closed altogether.
                while not down.done():
                    before = self.down
                    await asyncio.wait({down}, timeout=HALF_CLOSED_IDLE)
                    if self.down == before:
                        break
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _pump_up(self) -> bool:
        """Local client to relay; True when the local client ended with EOF."""
        reader, writer = self.local_reader, self.relay_writer
        assert writer is not None
        try:
            while data := await reader.read(READ_CHUNK):
                self._send_up(data)  # (counted there)
                await writer.drain()
        except OSError:  # ConnectionError included
            return False
        return True

    def _count_down(self, size: int) -> None:
        self.down += size

    async def _pump_down(self) -> None:
        """Relay to local client: the first response checked for a relay error, then as is."""
        assert self.relay_reader is not None
        try:
            if not await self._first_response():
                return
        except OSError:
            return
        await pump(self.relay_reader, self.local_writer, self._count_down)

    async def _first_response(self) -> bool:
        """Pass on the answer to the first request; False when the tunnel must end with it.

        A relay error (``404 UUID not registered``: no hidden server parked in time) is logged
        and ends the tunnel: on a kept-alive connection the relay would next answer the local
        client's second request, which carries no credentials, with a 401 it cannot answer.
        A fresh connection gets a fresh pairing.
        """
        reader, writer = self.relay_reader, self.local_writer
        assert reader is not None
        data, end, eof = await read_head(reader, MAX_RESPONSE_HEAD)
        answer = parse_response_head(data[:end]) if end > 0 else None
        diagnostic = None
        if answer is not None and answer.status >= 400 and may_be_relay_error(answer):
            data += await _read_rest(reader, answer, data[end:])
            diagnostic = relay_diagnostic(answer.status, data[end:])
            if diagnostic is not None and not answer.closes:
                # Say so, or a keep-alive client may send its next request into our close.
                data = data[: end - 2] + b"Connection: close\r\n\r\n" + data[end:]
        self.down += len(data)
        writer.write(data)
        await writer.drain()
        if diagnostic is not None:
            assert answer is not None
            logs.event("relay error", level=logging.WARNING, status=answer.status,
                       id=self.tunnel.uuid, peer=self.peer, reason=diagnostic)
            return False
        return not eof

    async def _close_all(self) -> None:
        writers = [w for w in (self.relay_writer, self.local_writer) if w is not None]
        await asyncio.gather(*(close_writer(w) for w in writers))


async def _read_rest(reader: asyncio.StreamReader, answer: ResponseHead, have: bytes) -> bytes:
    """The rest of a short body (Content-Length, or up to the close, bounded); what more was
    read past ``have``."""
    length = answer.content_length
    want = MAX_ERROR_BODY + 1 if length is None else min(length, MAX_ERROR_BODY + 1)
    return await read_at_most(reader, max(0, want - len(have)))


async def _skip_body(reader: asyncio.StreamReader, answer: ResponseHead, have: bytes) -> bool:
    """Consume the body of the relay's 401; True when the connection stays usable after it."""
    if answer.closes:
        return False
    length = answer.content_length
    if length is not None:
        if length > MAX_ERROR_BODY or len(have) > length:
            return False
        if length > len(have):
            await reader.readexactly(length - len(have))
        return True
    if "chunked" in (answer.header("transfer-encoding") or "").lower():
        # node-rendezvous sent an empty chunked body: "0", perhaps trailers, then a blank line.
        buffer = bytearray(have)
        while (end := buffer.find(HEAD_END)) < 0:
            if len(buffer) > MAX_ERROR_BODY:
                return False
            chunk = await reader.read(MAX_ERROR_BODY)
            if not chunk:
                return False
            buffer += chunk
        return buffer.startswith(b"0") and end + len(HEAD_END) == len(buffer)
    return False  # a body delimited by the close


def _os_error_text(exc: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('host', port)``."""
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror or exc)
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc)


# ---------------------------------------------------------------------------- entry points


async def open_tunnel(
    uuid: str,
    server: tuple[str, int],
    *,
    ca_pem: str | None = None,
    listen: tuple[str, int] = DEFAULT_LISTEN,
    auth: Auth = "basic",
    password: str = PASSWORD,
) -> Tunnel:
    """Start a :class:`Tunnel` on ``listen`` to hidden server ``uuid`` via the relay at
    ``server``, trusting ``ca_pem`` for the relay (None: the system's trust store).

    ``auth`` picks how the tunnel names the ID: ``"basic"`` (one round trip) or ``"digest"``
    (answers the relay's challenge, as curl --digest does); ``password`` is the visitor password
    of a hidden server that checks visitors. Close it with ``await tunnel.close()``.
    """
    tunnel = Tunnel(uuid, server, ca_pem=ca_pem, listen=listen, auth=auth, password=password)
    await tunnel.start()
    return tunnel


async def serve_until_signalled(tunnel: Tunnel, ready: Callable[[Tunnel], None]) -> None:
    """Start ``tunnel``, call ``ready`` with it, and serve until SIGINT or SIGTERM."""
    await tunnel.start()
    stop = asyncio.Event()
    with runtime.signals(stop.set):
        try:
            ready(tunnel)
            await stop.wait()
        finally:
            logs.event("stopping", listening=tunnel.url)
            await tunnel.close()
            logs.event("stopped")
