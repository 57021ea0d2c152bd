"""A real rendezvous server in a background thread, and raw TLS clients that speak to it.

The server runs on its own uvloop event loop in a thread of the test process, on a free
127.0.0.1 port, with a real certificate; tests talk to it through real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import uvloop

from rendezvous.config import AdminConfig, Limits, ServerConfig, TLSConfig
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
        """Shut the server down and stop its loop. A shutdown that fails or hangs fails the
        test (after the loop is stopped anyway, so one broken shutdown spoils no other test)."""
        if self.loop.is_closed():
            return  # stopped already
        try:
            self.call(self.server.close(grace=0))
            self.call(self.registry.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():  # closing a loop that still runs would block
                self.loop.close()
        if not self.loop.is_closed():
            raise AssertionError("the server's event loop did not stop within 5 s")

    # Clients ----------------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting exactly this server's certificate."""
        assert self.tls is not None
        context = ssl.create_default_context(cafile=str(self.tls.cert_file))
        return context

    def connect(self, timeout: float = 5.0, source: str | None = None) -> socket.socket:
        """A raw connection to the server (TLS when the server has it), optionally from another
        loopback source address such as 127.0.0.2."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout,
                                       source_address=(source, 0) if source else None)
        if self.tls is None:
            return raw
        return self.client_context().wrap_socket(raw, server_hostname="127.0.0.1")

    def park(self, entry: Entry, token: str | None = None,
             source: str | None = None) -> socket.socket:
        """Park a connection for ``entry`` (from ``source``, say 127.0.0.2) and return it after
        its ``200``."""
        sock = self.connect(source=source)
        token = token or current_token(entry.base32, entry.step, entry.digits)
        sock.sendall(f"CONNECT uuid:{entry.uuid}?response={token} HTTP/1.1\r\n\r\n".encode())
        answer = recv_exactly(sock, len(PARKED))
        assert answer == PARKED, answer
        return sock

    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def admin_url(self) -> str:
        """The admin page's base URL (the server must run with ``admin=``)."""
        assert self.server.admin is not None, "started without admin="
        return self.server.admin.url


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
                   port: int = 0, admin: AdminConfig | None = None,
                   **limits: Any) -> Iterator[ServerThread]:
    """A server on a free port (or on ``port``, say to restart one where it was) with the
    given limits, and with ``admin`` its admin page; stopped afterwards. Stopping it earlier
    with ``stop()`` is fine."""
    config = ServerConfig(
        host="127.0.0.1", port=port,
        tls=make_certificate(tmp_path) if tls else None,
        registry_url="memory://",
        limits=replace(Limits(), **limits),
        admin=admin,
    )
    thread = ServerThread(config, registry)
    try:
        yield thread
    finally:
        thread.stop()


# A hidden HTTP server ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServedRequest:
    """One request a :class:`HiddenHTTPService` answered, as it arrived there."""

    pairing: int  # which pairing (parked connection) it came on, from 1
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class _HiddenRequestHandler(BaseHTTPRequestHandler):
    """Serves one paired connection (keep-alive: every request that comes on it).

    GET answers JSON ``{"method", "path", "headers": [[name, value], ...], "pairing"}``;
    ``/redirect/N`` answers 302 to ``/redirect/N-1`` until ``/redirect/0``. POST and PUT answer
    ``{"length": n, "sha256": hex}`` of the body (Content-Length or chunked).
    """

    protocol_version = "HTTP/1.1"
    server_version = "HiddenHTTPService/1.0"
    service: HiddenHTTPService
    pairing: int

    def __init__(self, sock: socket.socket, service: HiddenHTTPService, pairing: int) -> None:
        self.service = service
        self.pairing = pairing
        super().__init__(sock, ("127.0.0.1", 0), service)  # type: ignore[arg-type]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read ``service.requests`` instead

    def _record(self) -> None:
        self.service._record(ServedRequest(
            self.pairing, self.command, self.path, tuple(self.headers.items())))

    def _send(self, status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
              ) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_json(self, document: Any) -> None:
        self._send(200, json.dumps(document).encode(), (("Content-Type", "application/json"),))

    def do_GET(self) -> None:
        self._record()
        redirect = re.fullmatch(r"/redirect/(\d+)", self.path)
        if redirect and int(redirect.group(1)) > 0:
            self._send(302, headers=(("Location", f"/redirect/{int(redirect.group(1)) - 1}"),))
            return
        self._send_json({"method": self.command, "path": self.path, "pairing": self.pairing,
                         "headers": [[k, v] for k, v in self.headers.items()]})

    def do_POST(self) -> None:
        self._record()
        length, digest = self._read_body()
        self._send_json({"length": length, "sha256": digest})

    do_PUT = do_POST

    def _read_body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        length = 0
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            for _ in range(1 << 20):  # bounded: at most a million chunks
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return length, digest.hexdigest()
                length += self._read_exactly(size, digest)
                self.rfile.readline(16)  # the CRLF after each chunk
            raise ValueError("too many chunks")
        return self._read_exactly(int(self.headers.get("Content-Length") or 0), digest), \
            digest.hexdigest()

    def _read_exactly(self, size: int, digest: Any) -> int:
        left = size
        while left:
            data = self.rfile.read(min(left, 1 << 20))
            if not data:
                raise ConnectionError(f"connection closed {left} bytes before the body's end")
            digest.update(data)
            left -= len(data)
        return size


class HiddenHTTPService:
    """A hidden HTTP server for ``entry``: keeps ``parked`` connections parked at ``server``,
    re-parks one as soon as a parked one is paired (its first bytes arrive), and serves each
    paired connection with :class:`_HiddenRequestHandler` in its own thread.

    Use as a context manager; on exit every connection is shut and every thread joined
    (bounded), and errors met while serving fail the test.
    """

    STOP_TIMEOUT = 5.0

    def __init__(self, server: ServerThread, entry: Entry, parked: int = 2,
                 timeout: float = 10.0, max_connections: int = 500) -> None:
        self.server = server
        self.entry = entry
        self.parked = parked
        self.timeout = timeout  # idle timeout of a served connection
        self.max_connections = max_connections  # bound on parks over the service's life
        self.requests: list[ServedRequest] = []
        self.errors: list[BaseException] = []
        self.pairings = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()

    def __enter__(self) -> HiddenHTTPService:
        for _ in range(self.parked):
            self._spawn()
        self.server.wait_parked(self.entry.uuid, self.parked)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
        if kind is None and self.errors:
            raise AssertionError(f"hidden service errors: {self.errors!r}") from self.errors[0]

    def stop(self) -> None:
        """Shut every connection (waking blocked readers) and join every thread, bounded."""
        with self._lock:
            self._stopping.set()
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown: wakes a reader blocked in this TLS socket.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        deadline = time.monotonic() + self.STOP_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in threads if thread.is_alive()]
        if alive:
            self.errors.append(RuntimeError(f"threads still running after stop: {alive}"))

    def _record(self, request: ServedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            if self.connections >= self.max_connections:
                self.errors.append(RuntimeError(f"more than {self.max_connections} parks"))
                return
            self.connections += 1
            thread = threading.Thread(target=self._run, daemon=True,
                                      name=f"hidden-{self.connections}")
            self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        try:
            sock = self.server.park(self.entry)
        except Exception as exc:
            if not self._stopping.is_set():
                self.errors.append(exc)
            return
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                return
            self._sockets.add(sock)
        try:
            if not self._wait_for_pairing(sock):
                return
            self._spawn()  # stay reachable: park a new connection at once
            with self._lock:
                self.pairings += 1
                pairing = self.pairings
            sock.settimeout(self.timeout)
            _HiddenRequestHandler(sock, self, pairing)
        except OSError:
            pass  # the relay or the client closed the connection: normal at the end
        except Exception as exc:
            self.errors.append(exc)
        finally:
            with self._lock:
                self._sockets.discard(sock)
            sock.close()

    def _wait_for_pairing(self, sock: ssl.SSLSocket | socket.socket) -> bool:
        """Wait until the parked connection becomes readable (its pairing's first bytes, or a
        close); False when the service stops first."""
        while not self._stopping.is_set():
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                return True
        return False


def run_in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a daemon thread; the list gets its result or its exception."""
    outcome: list[Any] = []

    def wrapper() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wrapper, daemon=True)
    thread.start()
    return thread, outcome
