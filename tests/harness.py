"""A real rendezvous server in a background thread, and raw TLS clients that speak to it.

The server runs on its own uvloop event loop in a thread of the test process, on a free
127.0.0.1 port, with a real certificate; tests talk to it through real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from rendezvous.config import Limits, ServerConfig, TLSConfig
from rendezvous.protocol.totp import current_token
from rendezvous.registry import Entry, Registry, new_secret, open_registry
from rendezvous.server import RendezvousServer
from rendezvous.tls import generate_self_signed

T = TypeVar("T")
PARKED = b"HTTP/1.1 200\r\n\r\n"


def make_certificate(folder: Path) -> TLSConfig:
    """A self-signed certificate for localhost, 127.0.0.1 and ::1 in ``folder``."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if not cert.exists():
        generate_self_signed(["localhost", "127.0.0.1", "::1"], cert, key)
    return TLSConfig(cert_file=cert, key_file=key)


class ServerThread:
    """A RendezvousServer on its own event loop thread."""

    def __init__(self, config: ServerConfig, registry: Registry | None = None) -> None:
        self.loop = uvloop.new_event_loop()
        self.registry = registry if registry is not None else open_registry(config.registry_url)
        self.server = RendezvousServer(config, registry=self.registry)
        self.tls = config.tls
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.server.start())
        self.port = self.server.port

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def sync(self, function: Any, *args: Any) -> Any:
        """Call a plain function on the server's loop (to read its state safely)."""
        async def wrapper() -> Any:
            return function(*args)
        return self.call(wrapper())

    def add_entry(self, step: int = 30, digits: int = 6, uuid: str | None = None) -> Entry:
        """Register a new hidden server and return its entry."""
        entry = Entry(uuid=uuid or f"test-{time.monotonic_ns()}", base32=new_secret(),
                      step=step, digits=digits)
        self.call(self.registry.add(entry))
        return entry

    def parked(self, uuid: str | None = None) -> int:
        """How many connections are parked now (for one ID, or in all)."""
        assert self.server.hub is not None
        return int(self.sync(self.server.hub.parked_count, uuid))

    def wait_parked(self, uuid: str, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` connections of ``uuid`` are parked."""
        deadline = time.monotonic() + timeout
        while self.parked(uuid) != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.parked(uuid)} parked for {uuid}, expected {count}")
            time.sleep(0.01)

    def open_connections(self) -> int:
        assert self.server.hub is not None
        return int(self.sync(lambda: self.server.hub.open_connections))  # type: ignore[union-attr]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.server.close(grace=0))
            self.call(self.registry.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    # Clients ----------------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting exactly this server's certificate."""
        assert self.tls is not None
        context = ssl.create_default_context(cafile=str(self.tls.cert_file))
        return context

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A raw connection to the server (TLS when the server has it)."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls is None:
            return raw
        return self.client_context().wrap_socket(raw, server_hostname="127.0.0.1")

    def park(self, entry: Entry, token: str | None = None) -> socket.socket:
        """Park a connection for ``entry`` and return it after its ``200``."""
        sock = self.connect()
        token = token or current_token(entry.base32, entry.step, entry.digits)
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        answer = recv_exactly(sock, len(PARKED))
        assert answer == PARKED, answer
        return sock

    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes (fail on a short read)."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {size} bytes: {data!r}")
        data += chunk
    return bytes(data)


def recv_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read until ``marker`` has arrived; return everything read."""
    data = bytearray()
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}: {data!r}")
        data += chunk
        assert len(data) < limit
    return bytes(data)


def recv_all(sock: socket.socket) -> bytes:
    """Read until the peer closes (TLS: close_notify or a plain close both count)."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


@contextlib.contextmanager
def running_server(tmp_path: Path, tls: bool = True, registry: Registry | None = None,
                   **limits: Any) -> Iterator[ServerThread]:
    """A server on a free port with the given limits; stopped afterwards."""
    config = ServerConfig(
        host="127.0.0.1", port=0,
        tls=make_certificate(tmp_path) if tls else None,
        registry_url="memory://",
        limits=replace(Limits(), **limits),
    )
    thread = ServerThread(config, registry)
    try:
        yield thread
    finally:
        thread.stop()
