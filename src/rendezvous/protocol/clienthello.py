"""The two fields of a TLS ClientHello the relay needs before its handshake: SNI and ALPN.

While an ACME TLS-ALPN-01 challenge is pending, the relay must hand the CA's handshake (SNI the
name, ALPN offering ``acme-tls/1``, RFC 8737) the challenge certificate and every visitor's
handshake for the same name the normal one. Python's SNI callback cannot see the client's ALPN
list, so the relay reads the ClientHello itself before starting TLS and picks the context.

Why a parser of our own: the maintained TLS libraries for Python either terminate TLS
themselves (ssl, pyOpenSSL) or are packet toolkits (scapy; dpkt, last released 2022, untyped)
far larger than the two fields needed here. This one reads only the RFC 8446 §4.1.2 framing
down to the ``server_name`` (RFC 6066 §3) and ``application_layer_protocol_negotiation``
(RFC 7301 §3.1) extensions, with every length checked against its container and the whole
message bounded by ``max_size``. Nothing it returns is trusted: a wrong answer only picks the
certificate OpenSSL then presents, and OpenSSL parses the real thing.

    record:     type(1)=22 version(2) length(2) fragment        (a message may span records)
    handshake:  type(1)=1 length(3) body
    body:       version(2) random(32) session_id<0..32> cipher_suites<2..2^16-2>
                compression_methods<1..2^8-1> [extensions<0..2^16-1>]
    extension:  type(2) data<0..2^16-1>
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from rendezvous.errors import ClientHelloError
from rendezvous.protocol.head import NEED_MORE, NeedMore

__all__ = ["MAX_CLIENT_HELLO", "NEED_MORE", "ClientHello", "parse"]

# Bytes of a ClientHello's handshake message we read at most. Browsers with post-quantum key
# shares (X25519MLKEM768) send ~1.8 KiB, and padding extensions round up to 512; anything past
# this is not a client we need to route, and it just gets the normal context.
MAX_CLIENT_HELLO = 16 * 1024

_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_RECORD_HEADER = 5
_MAX_RECORD = 2**14 + 2048  # RFC 8446 §5.2: the largest record a peer may send
# Records one ClientHello may span. Clients send one; anti-censorship tools split it in two or
# a few; more is someone making each read re-walk a long chain.
MAX_RECORDS = 32
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0
_EXTENSION_HEADER = struct.Struct("!HH")  # type, length


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the relay reads from a ClientHello: the SNI host name (None when the client sent
    none) and the ALPN protocols it offers, in its order."""

    server_name: str | None
    alpn: tuple[str, ...]


def parse(data: bytes | bytearray, max_size: int = MAX_CLIENT_HELLO) -> ClientHello | NeedMore:
    """The ClientHello at the start of ``data`` (the first bytes a TLS client sends), or
    :data:`NEED_MORE` until all of it has arrived.

    Raises :class:`ClientHelloError` when ``data`` does not start with a ClientHello, one is
    malformed, or it is longer than ``max_size``.
    """
    message = _handshake_message(memoryview(data), max_size)
    if message is NEED_MORE:
        return NEED_MORE
    return _parse_body(message)


def _handshake_message(data: memoryview, max_size: int) -> memoryview | NeedMore:
    """The first handshake message's body, reassembled from as many records as it spans."""
    fragments = bytearray()
    offset = 0
    wanted = -1  # bytes of the message body, once its header is in
    for _ in range(MAX_RECORDS):
        if len(data) - offset < _RECORD_HEADER:
            return NEED_MORE
        kind, major = data[offset], data[offset + 1]
        length = int.from_bytes(data[offset + 3:offset + 5])
        if kind != _HANDSHAKE_RECORD or major != 3:
            raise ClientHelloError("not a TLS handshake record")
        if length == 0 or length > _MAX_RECORD:
            raise ClientHelloError(f"TLS record of {length} bytes")
        start = offset + _RECORD_HEADER
        end = start + length
        fragments += data[start:min(end, len(data))]
        if wanted < 0 and len(fragments) >= 4:
            if fragments[0] != _CLIENT_HELLO:
                raise ClientHelloError("the first handshake message is not a ClientHello")
            wanted = int.from_bytes(fragments[1:4])
            if wanted > max_size:
                raise ClientHelloError(f"ClientHello of {wanted} bytes (limit {max_size})")
        if wanted >= 0 and len(fragments) >= 4 + wanted:
            return memoryview(fragments)[4:4 + wanted]
        if end > len(data):
            return NEED_MORE
        offset = end
    raise ClientHelloError(f"ClientHello spread over more than {MAX_RECORDS} records")


class _Reader:
    """Bounds-checked reads from one length-delimited part of the message."""

    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int, what: str) -> memoryview:
        end = self.pos + count
        if end > len(self.data):
            raise ClientHelloError(f"ClientHello cut short in {what}")
        part = self.data[self.pos:end]
        self.pos = end
        return part

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what))

    def vector(self, size: int, what: str) -> _Reader:
        """The next ``<length of size bytes><bytes>`` field, as a reader of its own."""
        return _Reader(self.take(self.number(size, what), what))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _parse_body(body: memoryview) -> ClientHello:
    hello = _Reader(body)
    hello.take(2 + 32, "version and random")
    if hello.vector(1, "session id").left > 32:
        raise ClientHelloError("session id longer than 32 bytes")
    suites = hello.vector(2, "cipher suites")
    if suites.left == 0 or suites.left % 2:
        raise ClientHelloError("bad cipher suite list")
    if hello.vector(1, "compression methods").left == 0:
        raise ClientHelloError("no compression method")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if hello.left == 0:
        return ClientHello(None, ())  # (TLS 1.2 allows no extensions at all)
    extensions = hello.vector(2, "extensions")
    if hello.left:
        raise ClientHelloError("bytes after the extensions")
    # The extension list walked with plain offsets: a browser sends ~20 extensions, and this
    # loop is most of the parse's cost.
    data, pos, end = extensions.data, 0, len(extensions.data)
    seen: set[int] = set()
    while pos < end:
        if end - pos < 4:
            raise ClientHelloError("ClientHello cut short in an extension header")
        kind, size = _EXTENSION_HEADER.unpack_from(data, pos)
        pos += 4
        if pos + size > end:
            raise ClientHelloError("ClientHello cut short in extension data")
        if kind in seen:  # RFC 8446 §4.2: at most one of each
            raise ClientHelloError(f"extension {kind} twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            server_name = _server_name(_Reader(data[pos:pos + size]))
        elif kind == _EXT_ALPN:
            alpn = _alpn(_Reader(data[pos:pos + size]))
        pos += size
    return ClientHello(server_name, alpn)


def _server_name(data: _Reader) -> str | None:
    names = data.vector(2, "server name list")
    found: str | None = None
    while names.left:
        kind = names.number(1, "server name type")
        name = names.vector(2, "server name")
        if kind == _HOST_NAME and found is None:
            raw = bytes(name.take(name.left, "server name"))
            if not raw or not raw.isascii() or not all(0x21 <= b < 0x7F for b in raw):
                raise ClientHelloError("server name is not a DNS name")
            found = raw.decode("ascii").lower().rstrip(".")
    return found


def _alpn(data: _Reader) -> tuple[str, ...]:
    protocols = data.vector(2, "ALPN list")
    found = []
    while protocols.left:
        name = protocols.vector(1, "ALPN protocol")
        if name.left == 0:
            raise ClientHelloError("empty ALPN protocol name")
        found.append(bytes(name.take(name.left, "ALPN protocol")).decode("latin-1"))
    return tuple(found)
