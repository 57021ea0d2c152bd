"""The PROXY protocol (haproxy's spec, versions 1 and 2), sans I/O.

A TCP load balancer in front of the relay hides every peer's address behind its own; with
``send-proxy`` (v1, one text line) or ``send-proxy-v2`` (binary) it first sends a header naming
the real source, before any byte of the peer (before the TLS ClientHello). :func:`parse` reads
that header from the start of a buffer; :func:`encode_v1` and :func:`encode_v2` write one (for a
hidden server's local service that asks for it).

Only connections from trusted sources (``serve --proxy-protocol-from``) may send one; the relay
decides that, this module only reads and writes bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from rendezvous.errors import ProxyHeaderError

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # bytes of a v1 line, CRLF included (the spec's worst case, TCP6)
V2_FIXED = 16  # signature, version/command, family, length
# Address block plus TLVs of a v2 header. The spec allows 64 KiB; haproxy's TLVs (ALPN, SNI,
# unique ID, SSL details) fit in a few hundred bytes, and more is someone filling our memory.
V2_MAX_PAYLOAD = 2048

# v2 families (high nibble: address family; low nibble: transport).
_V2_FAMILIES = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_LOCAL, _PROXY = 0x0, 0x1


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header said.

    ``source`` and ``destination`` are ``(ip, port)``, or None when the header carries no
    address (v1 ``UNKNOWN``, v2 ``LOCAL`` or an unspecified/Unix family): the connection's own
    addresses then stand.
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    size: int = 0  # bytes of the header, to drop from the stream


def starts_with_proxy(data: bytes | bytearray) -> bool:
    """Whether ``data`` begins with the fixed start of a PROXY header of either version (a
    peer that is not trusted to send one is refused on this)."""
    return data[:len(V1_PREFIX)] == V1_PREFIX or data[:len(V2_SIGNATURE)] == V2_SIGNATURE


def parse(data: bytes | bytearray) -> ProxyHeader | None:
    """The PROXY header at the start of ``data``, or None if more bytes are needed.

    Raises :class:`ProxyHeaderError` when ``data`` does not start with a valid header (garbage,
    a header too long, an address that is not one).
    """
    if not data:
        return None
    first = bytes(data[:len(V2_SIGNATURE)])
    if V2_SIGNATURE.startswith(first):
        return None if len(first) < len(V2_SIGNATURE) else _parse_v2(data)
    if V1_PREFIX.startswith(first[:6]):
        return None if len(first) < len(V1_PREFIX) else _parse_v1(data)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyHeaderError("PROXY v1 line too long or not ended by CRLF")
        return None
    try:
        line = bytes(data[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    size = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(1, None, None, size=size)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 line malformed: {line[:V1_MAX]!r}")
    _, family, src, dst, sport, dport = parts
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(1, (_ip(src, version), _port(sport)), (_ip(dst, version), _port(dport)),
                       size=size)


def _ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY header address {text!r} is not an IP address") from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY header address {text!r} is not IPv{version}")
    return str(address)


def _port(text: str) -> int:
    # Decimal digits only, no sign, no leading zero (the spec's words).
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"PROXY header port {text!r} is not a port")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY header port {text!r} is not a port")
    return port


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes (at most {V2_MAX_PAYLOAD})")
    size = V2_FIXED + length
    if len(data) < size:
        return None
    payload = bytes(data[V2_FIXED:size])
    address_size = _V2_FAMILIES.get(family, 0)
    if family not in _V2_FAMILIES and family != 0x00:
        raise ProxyHeaderError(f"PROXY v2 header with unknown family 0x{family:02x}")
    if len(payload) < address_size:
        raise ProxyHeaderError("PROXY v2 address block shorter than its family needs")
    tlvs = _tlvs(payload[address_size:])
    if command == _LOCAL or family >> 4 not in (1, 2):  # a health check, or no IP to use
        return ProxyHeader(2, None, None, tlvs, size)
    if family >> 4 == 1:
        src, dst = payload[0:4], payload[4:8]
        ports = payload[8:12]
    else:
        src, dst = payload[0:16], payload[16:32]
        ports = payload[32:36]
    sport, dport = struct.unpack("!HH", ports)
    return ProxyHeader(2, (str(ipaddress.ip_address(src)), sport),
                       (str(ipaddress.ip_address(dst)), dport), tlvs, size)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    found = []
    at = 0
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyHeaderError("PROXY v2 TLV truncated")
        kind, length = struct.unpack_from("!BH", data, at)
        at += 3
        if len(data) - at < length:
            raise ProxyHeaderError("PROXY v2 TLV longer than the header")
        found.append((kind, data[at:at + length]))
        at += length
    return tuple(found)


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header line for a TCP connection from ``source`` to ``destination``."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:  # (an IPv4 visitor of an IPv6 listener): say what we can
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v2 header (no TLVs) for a TCP connection, or a LOCAL one when an address is None."""
    if source is None or destination is None:
        return V2_SIGNATURE + bytes((0x20, 0x00)) + struct.pack("!H", 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        return V2_SIGNATURE + bytes((0x21, 0x00)) + struct.pack("!H", 0)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(block)) + block


def forwarded_header(client: str, https: bool) -> bytes:
    """A ``Forwarded`` header line (RFC 7239) naming ``client`` (an IP address), CRLF ended:
    an IPv6 address is bracketed and quoted, as the RFC's grammar requires."""
    node = f'"[{client}]"' if ":" in client else client if client != "-" else "unknown"
    return f"Forwarded: for={node};proto={'https' if https else 'http'}\r\n".encode("ascii")
