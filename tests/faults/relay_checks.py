"""What every fault-injection and live-fuzz test checks after it has done its damage.

A relay that survived a fault is one whose open connections, event-loop tasks and this process's
descriptors are back where they were before it, on whose loop no exception surfaced, and which
still parks and pairs. Imported as ``faults.relay_checks`` (``tests/`` is on ``sys.path``), so the
fuzz tests share it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import ssl
import struct
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from harness import ServerThread, recv_exactly, recv_until

from rendezvous.registry import Entry

HEAD_END = b"\r\n\r\n"
MiB = 1 << 20


# Heads that once crashed route() ------------------------------------------------------------

# route() let the standard library's parsers' exceptions escape on these (found by the tests in
# tests/fuzz/ and by fuzz/fuzz_head.py; fixed in 640cfa7): kept as regression inputs.
KNOWN_ROUTE_CRASHERS = (
    b"GET / HTTP/1.1\r\nAuthorization: Digest username=\r\n\r\n",  # IndexError
    b"GET / HTTP/1.1\r\nAuthorization: Basic \xe9\xe9\xe9\xe9\r\n\r\n",  # ValueError
    b"GET http://[x/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",  # ValueError (urlsplit)
    b"GET http://[&ay]/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",  # ValueError (ipaddress)
)
KNOWN_ROUTE_CRASHER_IDS = ["digest-empty-value", "basic-non-ascii", "upgrade-bad-ipv6",
                           "upgrade-bracketed-host"]


# The server loop's exception handler --------------------------------------------------------


class LoopErrors:
    """Every context that reaches the server loop's exception handler: an exception that escaped
    a protocol callback or a task. Use as a context manager around a test's traffic."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.contexts: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        with self._lock:
            self.contexts.append(context)

    def __enter__(self) -> LoopErrors:
        self.server.sync(self.server.loop.set_exception_handler, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):
            self.server.sync(self.server.loop.set_exception_handler, None)

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            found, self.contexts = self.contexts, []
        return found

    def assert_none(self) -> None:
        """No exception reached the loop."""
        found = self.take()
        if found:
            raise AssertionError("exceptions reached the server loop:\n" + "\n".join(
                describe(context) for context in found))


def describe(context: dict[str, Any]) -> str:
    exc = context.get("exception")
    text = f"- {context.get('message')}"
    if isinstance(exc, BaseException):
        text += "\n" + "".join(traceback.format_exception(exc)).rstrip()
    return text


# Baselines -----------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def vm_rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def loop_tasks(server: ServerThread) -> int:
    """Tasks on the server loop. The probe is itself a task, so compare only with other values
    taken this way."""
    return int(server.sync(lambda: len(asyncio.all_tasks())))


@dataclass(frozen=True)
class Snapshot:
    connections: int
    tasks: int
    fds: int
    parked: int
    active_pairs: int
    waiting: int


def snapshot(server: ServerThread) -> Snapshot:
    hub = server.server.hub
    assert hub is not None
    return Snapshot(
        connections=server.open_connections(),
        tasks=loop_tasks(server),
        fds=open_fds(),
        parked=server.parked(),
        active_pairs=int(server.sync(lambda: hub.active_pairs)),
        waiting=int(server.sync(lambda: hub.waiting_count())),
    )


def idle_snapshot(server: ServerThread, timeout: float = 5.0) -> Snapshot:
    """A snapshot once the relay holds no connection at all (the baseline of a test)."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(server)
        if (now.connections, now.active_pairs, now.parked, now.waiting) == (0, 0, 0, 0):
            time.sleep(0.05)  # and this process's sockets of them are gone too
            return snapshot(server)
        if time.monotonic() > deadline:
            raise AssertionError(f"the relay never went idle: {now}")
        time.sleep(0.01)


def wait_for_baseline(server: ServerThread, baseline: Snapshot, timeout: float = 5.0) -> None:
    """Wait (bounded) until the relay's and this process's counts are back at ``baseline``."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(server)
        if now == baseline:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not back to baseline after {timeout} s:\n  now  {now}\n"
                                 f"  then {baseline}")
        time.sleep(0.02)


# Sockets -------------------------------------------------------------------------------------


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN (nor a TLS close_notify)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def raw_connect(server: ServerThread, source: str | None = None,
                timeout: float = 5.0) -> socket.socket:
    """A plain TCP connection to the relay's TLS port (no handshake)."""
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def client_hello(server_hostname: str = "localhost") -> bytes:
    """The bytes of a real TLS ClientHello, as a client's first flight."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]  # a handshake record
    return hello


def read_to_close(sock: socket.socket, timeout: float,
                  limit: int = 4 * MiB) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes (EOF, reset or a TLS error on a cut stream);
    returns (data, closed) — closed False if ``timeout`` passed first."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(data), False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(data), False
        except (OSError, ValueError):
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
        if len(data) > limit:
            raise AssertionError(f"peer sent more than {limit} bytes instead of closing")


def basic(uuid: str) -> str:
    return "Basic " + base64.b64encode(f"{uuid}:x".encode()).decode()


# The hidden leg's answer that makes a paired stream raw bytes both ways (docs/protocol.md §2).
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n"


def mobile_head(server: ServerThread, entry: Entry, path: str = "/check",
                extra_headers: str = "") -> bytes:
    """A request that asks to switch to raw bytes (the hidden leg answers with SWITCHED)."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: {basic(entry.uuid)}\r\nUpgrade: raw\r\nConnection: Upgrade\r\n"
            f"{extra_headers}\r\n").encode()


def pair(server: ServerThread, entry: Entry, extra: bytes = b"",
         source: str | None = None) -> tuple[ssl.SSLSocket, ssl.SSLSocket, bytes]:
    """Park a hidden leg, pair a mobile leg with it and switch the stream to raw bytes (the
    hidden leg answers the Upgrade with a 101); (mobile, hidden, bytes the hidden leg read
    past the forwarded head)."""
    hidden = server.park(entry)
    mobile = server.connect(source=source)
    mobile.sendall(mobile_head(server, entry) + extra)
    received = recv_until(hidden, HEAD_END)
    end = received.index(HEAD_END) + len(HEAD_END)
    assert received[:end].startswith(b"POST /check HTTP/1.1\r\n"), received[:end]
    assert b"authorization" not in received[:end].lower()
    hidden.sendall(SWITCHED)
    assert recv_exactly(mobile, len(SWITCHED)) == SWITCHED
    assert isinstance(mobile, ssl.SSLSocket) and isinstance(hidden, ssl.SSLSocket)
    return mobile, hidden, received[end:]


def assert_pairing_works(server: ServerThread, entry: Entry) -> None:
    """A normal park + pair + exchange both ways + close, on the relay as it is now."""
    token = os.urandom(8).hex().encode()
    mobile, hidden, rest = pair(server, entry, extra=b"up:" + token)
    try:
        mobile.settimeout(5)
        hidden.settimeout(5)
        up = rest + recv_exactly(hidden, len(b"up:" + token) - len(rest))
        assert up == b"up:" + token, up
        hidden.sendall(b"down:" + token)
        assert recv_exactly(mobile, len(b"down:" + token)) == b"down:" + token
    finally:
        hidden.close()
        mobile.close()


def wait_gone(server: ServerThread, connections: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while server.open_connections() != connections:
        if time.monotonic() > deadline:
            raise AssertionError(f"{server.open_connections()} connections open, "
                                 f"expected {connections}")
        time.sleep(0.01)
