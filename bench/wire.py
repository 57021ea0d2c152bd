"""What the bench's peers say to each other, and a non-blocking pump for bulk transfers.

Every figure uses one tiny HTTP exchange, the same through our relay and through haproxy:

    GET|POST /b?up=N&down=M HTTP/1.1      mobile (client) to hidden server (backend)
    Authorization: Digest username="ID", ...   (or Basic; haproxy passes it on untouched)
    Content-Length: N                      then N bytes of body

    HTTP/1.1 200 OK                        hidden server (backend) back to the mobile client
    Content-Length: M                      then M bytes, then a close

With ``down`` > 0 the answer starts at once and the body is read meanwhile (download, or both
directions at once); with ``down`` = 0 it comes after the whole body (upload). A pairing cycle is
``up=0&down=2``. A raw download (``&raw=1``, with ``Connection: Upgrade``) is answered with
``101 Switching Protocols`` and then the bytes, unframed: the relay passes it on without
following any HTTP framing, which measures what the framing costs. Nothing here imports
asyncio: the threaded bulk peers and the asyncio cycle peers share it.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"  # every socket of the suite is on loopback
PARKED = b"HTTP/1.1 200\r\n\r\n"  # the relay's answer to a good CONNECT
HEAD_END = b"\r\n\r\n"
RAW_PROTOCOL = "bench-raw"  # the Upgrade of a raw download
OPAQUE = "a4f316df3e6c55a20ca82389083849ea"  # node-rendezvous's Digest opaque, md5("rendezvous")
SMALL = 2  # body bytes of a pairing cycle's answer
SEND_CHUNK = 256 * 1024  # one SSL_write of up to 16 records, or one plain send()
RECV_BUFFER = 1024 * 1024  # reused for every read of a transfer
ZEROS = memoryview(bytes(SEND_CHUNK))
MAX_HEAD = 64 * 1024
# SO_LINGER on, 0 s: a close sends RST instead of FIN. The bench's clients close only once their
# exchange is over, and so leave no TIME_WAIT behind: tens of thousands of those (one per cycle,
# held 60 s) make every later connect() on this machine search longer for a free port, which
# would slow the load generators more and more as a run goes on.
LINGER_ZERO = struct.pack("ii", 1, 0)


def request_head(uuid: str | None, up: int, down: int, auth: str = "digest",
                 raw: bool = False) -> bytes:
    """The mobile client's request; ``uuid`` None sends no Authorization (haproxy needs none,
    but the bench sends the same bytes to both). ``raw``: a download answered unframed (101)."""
    target = f"/b?up={up}&down={down}" + ("&raw=1" if raw else "")
    lines = [f"{'POST' if up else 'GET'} {target} HTTP/1.1", "Host: bench", "User-Agent: bench"]
    if raw:
        lines += ["Connection: Upgrade", f"Upgrade: {RAW_PROTOCOL}"]
    if uuid is not None:
        lines.append(f"Authorization: {authorization(uuid, target, auth)}")
    if up:
        lines.append(f"Content-Length: {up}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def authorization(uuid: str, uri: str, scheme: str) -> str:
    """A pre-emptive Digest (as Chromium sends once it has credentials) or Basic header value.

    The relay reads only the user name; the other Digest fields are well-formed stand-ins.
    """
    if scheme == "basic":
        import base64

        return "Basic " + base64.b64encode(f"{uuid}:x".encode()).decode("ascii")
    return (
        f'Digest username="{uuid}", realm="rendezvous", nonce="{"0" * 32}", uri="{uri}", '
        f'qop=auth, nc=00000001, cnonce="0a4f113b", response="{"1" * 32}", opaque="{OPAQUE}"'
    )


def response_head(down: int, raw: bool = False) -> bytes:
    """The hidden server's (backend's) answer head for ``down`` body bytes (``raw``: 101, and
    the bytes follow unframed)."""
    if raw:
        return (f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                f"Upgrade: {RAW_PROTOCOL}\r\n\r\n").encode()
    return f"HTTP/1.1 200 OK\r\nContent-Length: {down}\r\nConnection: close\r\n\r\n".encode()


def response_size(down: int, raw: bool = False) -> int:
    """Every byte the mobile client reads for an answer of ``down`` body bytes."""
    return len(response_head(down, raw)) + down


def wants_raw(head: bytes) -> bool:
    """Whether a request head asks for a raw (101) download."""
    return b"&raw=1 " in head.split(b"\r\n", 1)[0]


def parse_request(head: bytes) -> tuple[int, int]:
    """``(up, down)`` from a request head (as forwarded by the relay or by haproxy)."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {line!r}")
    query = parse_qs(urlsplit(parts[1]).query)
    return int(query.get("up", ["0"])[0]), int(query.get("down", ["0"])[0])


def connect_head(uuid: str, token: str) -> bytes:
    """The hidden server's park request."""
    return f"CONNECT uuid:{uuid}?response={token} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def client_context() -> ssl.SSLContext:
    """TLS for the bench's clients: no certificate check (loopback, and it keeps the load
    generators' CPU for the relays), no session resumption (every handshake is a full one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS for the bench's backend servers (haproxy's side): what our relay uses."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


# ----------------------------------------------------------------------------- blocking sockets


def connect(port: int, context: ssl.SSLContext | None, timeout: float = 10.0) -> socket.socket:
    """A connected socket to ``HOST:port`` (TLS handshake done when ``context`` is given)."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    if context is None:
        return raw
    try:
        return context.wrap_socket(raw, server_hostname=None)
    except BaseException:
        raw.close()
        raise


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from a blocking socket."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """A request head from a blocking socket, and the bytes read past it."""
    data = bytearray()
    while True:
        end = data.find(HEAD_END)
        if end >= 0:
            end += len(HEAD_END)
            return bytes(data[:end]), bytes(data[end:])
        if len(data) > MAX_HEAD:
            raise ConnectionError("request head too large")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a request head")
        data += chunk


def close_quietly(sock: socket.socket, goodbye: bool = True) -> None:
    """Close once the peer has everything, then let the close reset (no TIME_WAIT).

    With ``goodbye``, first end our side and wait (2 s at most) for the peer to end its own: a
    TLS close_notify each way, or a FIN each way on plain TCP. The peer has then read all we
    sent, so the reset of a LINGER_ZERO socket cannot cut data in flight.
    """
    try:
        if goodbye:
            sock.setblocking(True)
            sock.settimeout(2.0)
            if isinstance(sock, ssl.SSLSocket):
                sock.unwrap()
            else:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
    except (OSError, ValueError):
        pass
    finally:
        sock.close()


def pump(
    sock: socket.socket,
    *,
    prefix: bytes,
    send: int,
    recv: int,
    deadline: float,
    send_after_recv: bool = False,
    first: bytearray | None = None,
) -> None:
    """Send ``prefix`` then ``send`` zero bytes while receiving ``recv`` bytes, on one thread.

    The socket goes non-blocking and both directions make progress in one loop, the way an event
    loop drives them: no second thread ever touches the SSL object. An SSL_write that would block
    is retried with the same length (OpenSSL's rule; the bytes are all zeros anyway). The first
    16 bytes received go to ``first`` so the caller can check the answer's status line.
    Raises TimeoutError past ``deadline`` (a monotonic time) and ConnectionError on an early EOF.
    """
    sock.setblocking(False)
    head = memoryview(prefix)
    body_left = send
    got = 0
    buffer = bytearray(RECV_BUFFER)
    poller = select.poll()
    fd = sock.fileno()
    poller.register(fd, 0)
    while got < recv or len(head) or body_left:
        want = 0
        progressed = False
        if got < recv:
            try:
                n = sock.recv_into(buffer)
            except ssl.SSLWantReadError:
                want |= select.POLLIN
            except ssl.SSLWantWriteError:
                want |= select.POLLOUT
            except BlockingIOError:
                want |= select.POLLIN
            else:
                if n == 0:
                    raise ConnectionError(f"EOF after {got} of {recv} bytes")
                if first is not None and len(first) < 16:
                    first += buffer[: 16 - len(first)]
                got += n
                progressed = True
        if (len(head) or body_left) and (not send_after_recv or got >= recv):
            chunk = head if len(head) else ZEROS[: min(SEND_CHUNK, body_left)]
            try:
                n = sock.send(chunk)
            except ssl.SSLWantWriteError:
                want |= select.POLLOUT
            except ssl.SSLWantReadError:
                want |= select.POLLIN
            except BlockingIOError:
                want |= select.POLLOUT
            else:
                if len(head):
                    head = head[n:]
                else:
                    body_left -= n
                progressed = True
        if progressed:
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"transfer unfinished: {got} of {recv} received, "
                               f"{body_left} still to send")
        poller.modify(fd, want or select.POLLIN)
        poller.poll(min(remaining, 1.0) * 1000)
